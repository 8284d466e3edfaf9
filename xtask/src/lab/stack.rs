//! The stack guest: a Debian root filesystem with systemd, libvirt and real qemu,
//! for scenarios with `guest = "stack"`.
//!
//! Why a second guest: the busybox guest's VMs are the project's imitation of qemu,
//! started by the harness. Operators run libvirt on systemd hosts and install
//! daemons from packages; this guest puts vmbalancer in that world. The harness,
//! the scenario format, the judge and the comparison are the same; only the image
//! and the kind of VM differ.
//!
//! - [`Recipe`]: suite, packages and the version of what xtask adds. Its hash names
//!   the cache directory `target/lab/stack/<hash>/`, where mmdebstrap's tar is kept:
//!   built once (minutes), rebuilt only when the recipe changes.
//! - Per run: the tar is unpacked into a fresh tree, the run's files are added
//!   (harness, vmbalancer's Debian package for the harness to `dpkg -i`, the guest payload, tests/stack
//!   (domain template, scripts), the scenario, a oneshot unit that runs the harness after libvirtd and
//!   powers off), and `mke2fs -d` makes the ext4 image booted with the kernel and
//!   initrd from the image's own /boot.
//! - The suite is a parameter: bookworm (6.1) today; trixie (6.12) is the same
//!   recipe with another suite.

use std::fs;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use super::KernelGen;
use super::host::run_checked;

/// Debian packages of the stack guest.
const PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "dbus",
    "libvirt-daemon-system",
    "libvirt-clients",
    "qemu-system-x86",
    "numactl",
    "numad",
    "linux-image-amd64",
    "procps",
    "iproute2",
    "kmod",
];

/// Bumped when what xtask adds to the cached tar changes in a way the cache must see.
const RECIPE_VERSION: u32 = 1;

/// What the cached base image is built from.
#[derive(Debug, Clone, Hash)]
pub struct Recipe {
    pub suite: &'static str,
    pub packages: &'static [&'static str],
    pub version: u32,
}

impl Recipe {
    pub fn for_kernel(generation: KernelGen) -> Self {
        Self {
            suite: match generation {
                KernelGen::V6_1 => "bookworm",
                KernelGen::V6_12 => "trixie",
            },
            packages: PACKAGES,
            version: RECIPE_VERSION,
        }
    }

    /// A stable name for the recipe (FNV-1a of its fields: std's `DefaultHasher` is
    /// not stable across Rust releases, and the cache must survive toolchain updates).
    pub fn hash_hex(&self) -> String {
        struct Fnv(u64);
        impl Hasher for Fnv {
            fn finish(&self) -> u64 {
                self.0
            }
            fn write(&mut self, bytes: &[u8]) {
                for b in bytes {
                    self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
                }
            }
        }
        let mut h = Fnv(0xcbf2_9ce4_8422_2325);
        self.hash(&mut h);
        format!("{}-{:016x}", self.suite, h.finish())
    }
}

/// The apt sources the host uses, as mmdebstrap's mirror argument; for another
/// suite than the host's, the Debian mirror named there with that suite.
fn mirror_arg(suite: &str) -> String {
    let sources = Path::new("/etc/apt/sources.list.d/debian.sources");
    let text = fs::read_to_string(sources).unwrap_or_default();
    let host_suite = text
        .lines()
        .find_map(|l| l.strip_prefix("Suites:"))
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or("");
    if host_suite == suite {
        return sources.display().to_string();
    }
    let uri = text
        .lines()
        .find_map(|l| l.strip_prefix("URIs:"))
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or("http://deb.debian.org/debian");
    format!("deb {uri} {suite} main")
}

/// The cached base tar for `recipe`, built with mmdebstrap if missing.
pub fn ensure_base(target: &Path, recipe: &Recipe) -> anyhow::Result<PathBuf> {
    let dir = target.join("lab/stack").join(recipe.hash_hex());
    let tar = dir.join("base.tar");
    if tar.exists() {
        return Ok(tar);
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let partial = dir.join("base.tar.partial");
    eprintln!(
        "lab: building the {} stack image with mmdebstrap (a few minutes, cached in {})",
        recipe.suite,
        dir.display()
    );
    let start = std::time::Instant::now();
    run_checked(
        "mmdebstrap",
        Command::new("mmdebstrap")
            .args(["--variant=minbase", "--format=tar"])
            .arg(format!("--include={}", recipe.packages.join(",")))
            .arg(recipe.suite)
            .arg(&partial)
            .arg(mirror_arg(recipe.suite)),
    )?;
    fs::rename(&partial, &tar)?;
    eprintln!(
        "lab: stack image built in {:.0} s",
        start.elapsed().as_secs_f64()
    );
    Ok(tar)
}

/// Builds the guest payload (tests/guest/payload.c) into `out`.
pub fn build_payload(workspace: &Path, out: &Path) -> anyhow::Result<()> {
    let dir = workspace.join("tests/guest");
    run_checked(
        "building the guest payload",
        Command::new("gcc")
            .args([
                "-m32",
                "-O2",
                "-ffreestanding",
                "-fno-pic",
                "-fno-stack-protector",
                "-nostdlib",
                "-static",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-Wl,--build-id=none",
                "-Wl,--no-warn-rwx-segments",
            ])
            .arg("-T")
            .arg(dir.join("payload.ld"))
            .arg("-o")
            .arg(out)
            .arg(dir.join("payload.c")),
    )
}

/// The oneshot unit that runs the scenario once libvirtd is up, then powers off.
const UNIT: &str = "[Unit]
Description=vmbalancer lab scenario
After=libvirtd.service systemd-user-sessions.service
Wants=libvirtd.service

[Service]
Type=oneshot
ExecStart=/lab/run.sh
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0
LimitMEMLOCK=infinity

[Install]
WantedBy=multi-user.target
";

const RUN_SH: &str = r#"#!/bin/sh
echo "@@VMBLAB-INIT@@ kernel $(uname -r), $(ls -d /sys/devices/system/node/node* | wc -l) nodes, $(cut -d' ' -f1 /proc/uptime) s since boot"
# The heartbeat the lab host watches: see ALIVE_MARK in qemu.rs.
( while sleep 5; do echo @@VMBLAB-ALIVE@@; done ) &
/usr/bin/lab-harness $(cat /lab/args)
echo "@@VMBLAB-EXIT@@ $?"
systemctl poweroff --no-block
"#;

/// What one run adds to the image.
pub struct RunFiles<'a> {
    pub harness: &'a Path,
    pub vmbalancer: Option<&'a Path>,
    pub payload: &'a Path,
    /// tests/stack: the domain template and the scripts scenarios run, to /lab/stack.
    pub stack_dir: &'a Path,
    pub scenario_toml: &'a str,
    pub harness_args: &'a str,
}

fn write_mode(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    if let Some(p) = path.parent() {
        fs::create_dir_all(p)?;
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn copy_mode(src: &Path, dst: &Path, mode: u32) -> anyhow::Result<()> {
    if let Some(p) = dst.parent() {
        fs::create_dir_all(p)?;
    }
    fs::copy(src, dst)
        .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    fs::set_permissions(dst, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// A booted image: the ext4 file and the kernel and initrd from its /boot.
pub struct Image {
    pub disk: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Unpacks `base`, adds the run's files and makes the ext4 image under `work`.
pub fn build_image(
    work: &Path,
    base: &Path,
    run: &RunFiles<'_>,
    tag: &str,
) -> anyhow::Result<Image> {
    let root = work.join(format!("stack-{tag}"));
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    fs::create_dir_all(&root)?;
    run_checked(
        "unpacking the stack image",
        Command::new("tar")
            .arg("-xf")
            .arg(base)
            .arg("-C")
            .arg(&root)
            .arg("--numeric-owner"),
    )?;
    let boot = root.join("boot");
    let find = |prefix: &str| -> anyhow::Result<PathBuf> {
        let mut found: Vec<PathBuf> = fs::read_dir(&boot)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(prefix))
            })
            .collect();
        found.sort();
        found
            .pop()
            .with_context(|| format!("no {prefix}* in the image's /boot"))
    };
    let kernel = work.join(format!("stack-{tag}.vmlinuz"));
    let initrd = work.join(format!("stack-{tag}.initrd"));
    fs::copy(find("vmlinuz-")?, &kernel)?;
    fs::copy(find("initrd.img-")?, &initrd)?;

    copy_mode(run.harness, &root.join("usr/bin/lab-harness"), 0o755)?;
    if run.vmbalancer.is_some() {
        // As an operator installs it: the harness runs `dpkg -i` of the package.
        let deb = crate::package::build_deb()?;
        copy_mode(
            &deb,
            &root.join("var/cache/vmbalancer/vmbalancer.deb"),
            0o644,
        )?;
    }
    copy_mode(
        run.payload,
        &root.join("var/lib/libvirt/images/vmblab-payload.elf"),
        0o644,
    )?;
    for entry in fs::read_dir(run.stack_dir)
        .with_context(|| format!("reading {}", run.stack_dir.display()))?
    {
        let path = entry?.path();
        let executable = path.extension().is_some_and(|e| e == "sh");
        if let Some(name) = path.file_name() {
            copy_mode(
                &path,
                &root.join("lab/stack").join(name),
                if executable { 0o755 } else { 0o644 },
            )?;
        }
    }
    write_mode(&root.join("lab/scenario.toml"), run.scenario_toml, 0o644)?;
    write_mode(&root.join("lab/args"), run.harness_args, 0o644)?;
    write_mode(&root.join("lab/run.sh"), RUN_SH, 0o755)?;
    write_mode(&root.join("etc/systemd/system/vmblab.service"), UNIT, 0o644)?;
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    fs::create_dir_all(&wants)?;
    symlink("../vmblab.service", wants.join("vmblab.service"))?;
    // Debian enables numad.service with the package: numad would bind every qemu
    // above 300 MB to a node (a CPU set that looks like an operator's pin) in every
    // run. It runs only when the scenario's balancer is numad (the harness starts
    // it). The periodic maintenance timers (apt, man-db, fstrim, ...) are off too:
    // each would take CPU from the measured run at a random moment.
    let wants_dir = root.join("etc/systemd/system");
    let _ = fs::remove_file(wants_dir.join("multi-user.target.wants/numad.service"));
    let timers = wants_dir.join("timers.target.wants");
    if timers.exists() {
        fs::remove_dir_all(&timers)?;
    }
    // The console belongs to the scenario's output, not a login prompt.
    symlink(
        "/dev/null",
        root.join("etc/systemd/system/serial-getty@ttyS0.service"),
    )?;
    write_mode(&root.join("etc/hostname"), "vmblab\n", 0o644)?;
    write_mode(
        &root.join("etc/fstab"),
        "/dev/vda / ext4 rw,errors=remount-ro 0 1\n",
        0o644,
    )?;

    let disk = work.join(format!("stack-{tag}.ext4"));
    let _ = fs::remove_file(&disk);
    run_checked(
        "mke2fs",
        Command::new("mke2fs")
            .args(["-q", "-t", "ext4", "-d"])
            .arg(&root)
            .arg("-F")
            .arg(&disk)
            .arg("4G"),
    )?;
    fs::remove_dir_all(&root)?;
    Ok(Image {
        disk,
        kernel,
        initrd,
    })
}

/// The kernel command line of the stack guest.
pub const APPEND: &str = "root=/dev/vda rw quiet systemd.show_status=0";

/// Adds the image's disk to a qemu command of [`super::qemu::command`].
pub fn attach_disk(cmd: &mut Command, image: &Image) {
    cmd.arg("-drive").arg(format!(
        "file={},if=virtio,format=raw",
        image.disk.display()
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipe_hash_is_stable_and_follows_the_recipe() {
        let a = Recipe::for_kernel(KernelGen::V6_1);
        assert_eq!(a.hash_hex(), a.clone().hash_hex());
        assert!(a.hash_hex().starts_with("bookworm-"));
        let b = Recipe {
            version: a.version + 1,
            ..a.clone()
        };
        assert_ne!(a.hash_hex(), b.hash_hex());
        assert!(
            Recipe::for_kernel(KernelGen::V6_12)
                .hash_hex()
                .starts_with("trixie-")
        );
    }
}
