//! Host prerequisites of the lab: Debian packages and the workspace binaries.
//!
//! Nothing installed by hand survives to CI, so the lab installs what it needs
//! itself, and only when it is missing (`apt-get update` runs only if an install
//! is needed and the first attempt fails on stale lists).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// (package, a file it installs) for every host tool the lab uses.
const PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("busybox-static", "/bin/busybox"),
    ("cpio", "/usr/bin/cpio"),
    ("numad", "/usr/bin/numad"),
    ("numactl", "/usr/bin/numactl"),
    ("mmdebstrap", "/usr/bin/mmdebstrap"),
    ("e2fsprogs", "/usr/sbin/mke2fs"),
];

/// Runs `cmd`, failing with `what` in the message if it cannot start or fails.
pub fn run_checked(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("{what}: could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status}): {cmd:?}");
    }
    Ok(())
}

/// Installs the Debian packages the lab needs if any is missing.
pub fn ensure_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("lab: installing {}", missing.join(" "));
    let install = |pkgs: &[&str]| {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(pkgs)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
    };
    if !install(&missing).is_ok_and(|s| s.success()) {
        run_checked("apt-get update", Command::new("apt-get").arg("update"))?;
        let status = install(&missing).context("running apt-get install")?;
        if !status.success() {
            bail!("apt-get install {} failed ({status})", missing.join(" "));
        }
    }
    Ok(())
}

/// The binaries built from the workspace that go into the guest.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub fake_qemu: PathBuf,
    pub harness: PathBuf,
    /// `None` when the `balancer` crate does not build yet.
    pub vmbalancer: Option<PathBuf>,
}

/// Builds the guest binaries (release: the fake VM's touch loop runs under TCG).
pub fn build_binaries(workspace: &Path, target_dir: &Path) -> anyhow::Result<Binaries> {
    let release = target_dir.join("release");
    // vmbalancer-tests depends on the balancer library, whose build script builds
    // the eBPF programs: without the eBPF toolchain this fails too.
    run_checked(
        "cargo build -p vmbalancer-tests",
        Command::new("cargo")
            .args(["build", "--release", "-p", "vmbalancer-tests", "--bins"])
            .current_dir(workspace),
    )
    .context(
        "building the lab's guest programs failed; if the error names the eBPF \
         toolchain (nightly, rust-src, bpf-linker), run `cargo xtask setup` first",
    )?;
    let status = crate::build::vmbalancer_release()
        .status()
        .context("starting cargo build -p balancer")?;
    let vmbalancer = if status.success() {
        Some(release.join("vmbalancer"))
    } else {
        eprintln!(
            "lab: WARNING: `vmbalancer` does not build ({status}); the guest gets no \
             vmbalancer: balancers none/autonuma/numad still work, vmbalancer steps fail"
        );
        None
    };
    Ok(Binaries {
        fake_qemu: release.join("fake_qemu"),
        harness: release.join("lab_harness"),
        vmbalancer,
    })
}
