//! `cargo xtask package`: the Debian package `target/debian/vmbalancer_VERSION_amd64.deb`,
//! made by cargo-deb from `[package.metadata.deb]` in `balancer/Cargo.toml`.
//!
//! cargo-deb packages files; three of them do not exist until the release binary
//! does, so this command makes them first, next to the binary (cargo-deb's
//! `target/release/`):
//! - the man pages (gzipped here) and shell completions, which the binary writes from
//!   its own command-line definition (`vmbalancer package-assets`), so they always
//!   describe the packaged flags;
//! - `/etc/vmbalancer/config.toml`, a conffile: `systemd/config.toml.example` with
//!   every setting commented out. The daemon then runs on its built-in defaults, and
//!   a later package whose defaults changed is not held back by a conffile that
//!   spells out the old ones (dpkg keeps an edited conffile across upgrades).
//!
//! The maintainer scripts come from cargo-deb's systemd support (enable and start
//! nothing on install; stop on removal, which restores the VMs' CPU sets) and
//! `contrib/debian/postrm` (purge removes the state directory).

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use crate::build::{self, cargo, run_step};

/// The cargo-deb release `cargo xtask setup` installs (builds with stable 1.85+).
pub const CARGO_DEB_VERSION: &str = "3.8.0";

/// Arguments of `cargo xtask package`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn main(_args: Args) -> anyhow::Result<()> {
    let deb = build_deb()?;
    eprintln!("xtask package: built {}", deb.display());
    lint(&deb);
    Ok(())
}

/// Prints what lintian says about the package, when lintian is installed. Advisory:
/// the package has no maintainer e-mail address or Debian changelog, which lintian
/// reports as errors.
fn lint(deb: &std::path::Path) {
    match Command::new("lintian")
        .args(["--tag-display-limit", "0"])
        .arg(deb)
        .output()
    {
        Ok(out) => eprintln!(
            "xtask package: lintian ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) => eprintln!("xtask package: lintian is not installed, not checked"),
    }
}

/// Builds the release binary and the generated files, then the .deb; returns its path
/// (`TARGET_DIR/debian/vmbalancer_VERSION_amd64.deb`).
pub fn build_deb() -> anyhow::Result<PathBuf> {
    if !cargo_deb_installed() {
        bail!(
            "cargo-deb {CARGO_DEB_VERSION} is not installed: run `cargo xtask setup` \
             (or `cargo install cargo-deb --locked --version {CARGO_DEB_VERSION}`)"
        );
    }
    run_step("package: release build", &mut build::vmbalancer_release())?;
    let assets = build::target_dir().join("release/package-assets");
    let _ = std::fs::remove_dir_all(&assets);
    std::fs::create_dir_all(&assets).with_context(|| format!("creating {}", assets.display()))?;
    run_step(
        "package: man pages and completions",
        Command::new(build::binary_path(true))
            .arg("package-assets")
            .arg("--out")
            .arg(&assets)
            .stdout(Stdio::null()),
    )?;
    gzip_man_pages(&assets.join("man8"))?;
    let example = build::workspace_root().join("systemd/config.toml.example");
    let text = std::fs::read_to_string(&example)
        .with_context(|| format!("reading {}", example.display()))?;
    std::fs::write(assets.join("config.toml"), commented_config(&text))?;
    let deb = build::target_dir().join("debian").join(format!(
        "vmbalancer_{}_amd64.deb",
        env!("CARGO_PKG_VERSION")
    ));
    if let Some(dir) = deb.parent() {
        std::fs::create_dir_all(dir)?;
    }
    run_step(
        "package: cargo deb",
        cargo()
            // The release profile keeps debug info (for profiling); the package does not.
            .args(["deb", "-p", "balancer", "--no-build", "--strip", "--output"])
            .arg(&deb),
    )?;
    Ok(deb)
}

/// `gzip -9n` every page: Debian installs man pages compressed, and cargo-deb only
/// compresses files it did not find under the build directory.
fn gzip_man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    let pages: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "8"))
        .collect();
    if pages.is_empty() {
        bail!("no man pages in {}", dir.display());
    }
    run_step(
        "package: compress man pages",
        Command::new("gzip").arg("-9n").args(&pages),
    )
}

/// Whether `cargo deb` runs and is the pinned release.
pub fn cargo_deb_installed() -> bool {
    cargo()
        .args(["deb", "--version"])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_DEB_VERSION)
        })
}

/// The example configuration with every setting commented out, under a header that
/// says so. Comments and blank lines stay as they are.
pub fn commented_config(example: &str) -> String {
    let mut out = String::from(
        "# Every setting below is commented out: the daemon runs on its built-in\n\
         # defaults, shown here. Uncomment a line to change a setting, then\n\
         # `systemctl restart vmbalancer`.\n#\n",
    );
    for line in example.lines() {
        if line.trim().is_empty() || line.starts_with('#') {
            out.push_str(line);
        } else {
            out.push('#');
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../systemd/config.toml.example");

    #[test]
    fn shipped_conffile_sets_nothing_and_uncomments_to_the_example() {
        let conffile = commented_config(EXAMPLE);
        let parsed: toml::Table = toml::from_str(&conffile).unwrap();
        assert!(parsed.is_empty(), "sets {parsed:?}");
        let example_settings: Vec<&str> = EXAMPLE
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .collect();
        assert!(example_settings.len() > 10, "{example_settings:?}");
        for setting in example_settings {
            assert!(
                conffile
                    .lines()
                    .any(|l| l.strip_prefix('#') == Some(setting)),
                "{setting} is not offered commented out"
            );
        }
    }
}
