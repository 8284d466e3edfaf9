//! Fetches and caches the lab guest's kernel image.
//!
//! The lab boots distribution kernels, not self-built ones: they are what operators
//! run, they carry BTF, NUMA emulation, cpusets and NUMA balancing, and Debian's apt
//! gives them reproducibly. Two generations are supported: bookworm's 6.1 (the
//! machine's own suite) and trixie's 6.12. Trixie is reached through a private apt
//! configuration (its own sources list, `sourceparts=/dev/null` and its own lists
//! directory under `target/`), so the machine's apt state is never touched.
//! The unpacked `vmlinuz` is cached under `target/lab/kernels/<generation>/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use super::host::run_checked;

/// A kernel generation the lab can boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelGen {
    /// Debian bookworm `linux-image-amd64` (6.1).
    #[value(name = "6.1")]
    V6_1,
    /// Debian trixie `linux-image-amd64` (6.12).
    #[value(name = "6.12")]
    V6_12,
}

impl KernelGen {
    pub fn label(self) -> &'static str {
        match self {
            KernelGen::V6_1 => "6.1",
            KernelGen::V6_12 => "6.12",
        }
    }
}

/// Returns the path of a cached `vmlinuz` for `generation`, downloading it first
/// if the cache is empty.
pub fn ensure(target_dir: &Path, generation: KernelGen) -> anyhow::Result<PathBuf> {
    let dir = target_dir
        .join("lab")
        .join("kernels")
        .join(generation.label());
    if let Some(found) = find_vmlinuz(&dir.join("root"))? {
        return Ok(found);
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let apt = AptConfig::for_generation(target_dir, generation)?;
    if let Some(apt) = &apt {
        apt.update()?;
    }
    let package = resolve_image_package(apt.as_ref())?;
    eprintln!("lab: kernel {}: downloading {package}", generation.label());
    let mut download = Command::new("apt-get");
    if let Some(apt) = &apt {
        apt.add_options(&mut download);
    }
    // apt's `_apt` user cannot write into target/; download as the caller.
    download
        .args(["-o", "APT::Sandbox::User=root", "download"])
        .arg(&package)
        .current_dir(&dir);
    run_checked("apt-get download (kernel image)", &mut download)?;
    let deb = fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&package) && n.ends_with(".deb"))
        })
        .with_context(|| {
            format!(
                "apt-get download left no {package}*.deb in {}",
                dir.display()
            )
        })?;
    let root = dir.join("root");
    run_checked(
        "dpkg -x (kernel image)",
        Command::new("dpkg").arg("-x").arg(&deb).arg(&root),
    )?;
    // The unpacked modules are large and the initramfs does not need them.
    let _ = fs::remove_dir_all(root.join("lib"));
    let _ = fs::remove_dir_all(root.join("usr"));
    let _ = fs::remove_file(&deb);
    find_vmlinuz(&root)?.with_context(|| format!("{} holds no boot/vmlinuz-*", deb.display()))
}

fn find_vmlinuz(root: &Path) -> anyhow::Result<Option<PathBuf>> {
    let boot = root.join("boot");
    if !boot.is_dir() {
        return Ok(None);
    }
    Ok(fs::read_dir(&boot)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        }))
}

/// `linux-image-amd64` is a meta package: its first `Depends:` names the real image.
fn resolve_image_package(apt: Option<&AptConfig>) -> anyhow::Result<String> {
    let mut cmd = Command::new("apt-cache");
    if let Some(apt) = apt {
        apt.add_options(&mut cmd);
    }
    cmd.args(["depends", "linux-image-amd64"]);
    let mut out = cmd
        .output()
        .context("running apt-cache depends linux-image-amd64")?;
    if apt.is_none() && parse_depends(&String::from_utf8_lossy(&out.stdout)).is_none() {
        // A fresh machine may have empty package lists.
        run_checked("apt-get update", Command::new("apt-get").arg("update"))?;
        out = Command::new("apt-cache")
            .args(["depends", "linux-image-amd64"])
            .output()
            .context("running apt-cache depends linux-image-amd64")?;
    }
    parse_depends(&String::from_utf8_lossy(&out.stdout)).with_context(|| {
        format!(
            "apt-cache depends linux-image-amd64 names no linux-image-* package: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn parse_depends(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
        .map(str::to_string)
}

/// A private apt configuration for a suite other than the machine's own.
struct AptConfig {
    sources: PathBuf,
    lists: PathBuf,
    cache: PathBuf,
}

impl AptConfig {
    fn for_generation(target_dir: &Path, generation: KernelGen) -> anyhow::Result<Option<Self>> {
        let suite = match generation {
            KernelGen::V6_1 => return Ok(None),
            KernelGen::V6_12 => "trixie",
        };
        let base = target_dir.join("lab").join("apt").join(suite);
        let lists = base.join("lists");
        let cache = base.join("cache");
        fs::create_dir_all(lists.join("partial"))?;
        fs::create_dir_all(cache.join("archives").join("partial"))?;
        let sources = base.join("sources.list");
        fs::write(
            &sources,
            format!(
                "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
                 http://deb.debian.org/debian {suite} main\n"
            ),
        )?;
        Ok(Some(Self {
            sources,
            lists,
            cache,
        }))
    }

    fn add_options(&self, cmd: &mut Command) {
        cmd.arg("-o")
            .arg(format!("Dir::Etc::sourcelist={}", self.sources.display()))
            .args(["-o", "Dir::Etc::sourceparts=/dev/null"])
            .arg("-o")
            .arg(format!("Dir::State::Lists={}", self.lists.display()))
            .arg("-o")
            .arg(format!("Dir::Cache={}", self.cache.display()));
    }

    fn update(&self) -> anyhow::Result<()> {
        let mut cmd = Command::new("apt-get");
        self.add_options(&mut cmd);
        cmd.arg("update");
        run_checked("apt-get update (private trixie lists)", &mut cmd)?;
        if !self.lists.is_dir() {
            bail!("apt left no lists in {}", self.lists.display());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_names_the_real_image() {
        let text = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            parse_depends(text).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(parse_depends("linux-image-amd64\n"), None);
    }
}
