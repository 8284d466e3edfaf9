//! `cargo xtask setup`: installs what building and testing need, idempotently.
//!
//! Three things cannot be assumed on a fresh machine:
//! 1. `rust-src` for the nightly toolchain (`-Z build-std=core` rebuilds `core` for
//!    `bpfel-unknown-none`);
//! 2. a `bpf-linker` that reads the bitcode of the nightly's own LLVM. Prebuilt
//!    binaries follow a different LLVM, so it is built from crates.io against the
//!    `libLLVM` shipped inside the nightly sysroot;
//! 3. cargo-fuzz, which `cargo xtask fuzz` (and the short fuzz run of `cargo xtask
//!    test`) drives;
//! 4. the Debian packages the tests and the lab use;
//! 5. cargo-deb, pinned, for `cargo xtask package`;
//! 6. a QEMU whose TCG translates patched code correctly. Before 9.1 (8.2.6 and
//!    9.0.2 in their series) a vCPU could go on running a stale translation of
//!    kernel text that another vCPU had just patched (static keys flip when eBPF
//!    programs attach): the guest hit a leftover int3, or stopped silently with a
//!    CPU waiting for the others. Debian 12 ships 7.2, so setup installs the one
//!    from bookworm-backports there.
//!
//! Every step first checks whether its result is already there (and works), so a
//! second run does nothing and says so. A step that fails names itself.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// Debian packages the build, the tests and the lab need.
/// - build-essential, pkg-config: the C toolchain `cargo install bpf-linker` links with;
/// - systemd: `systemd-analyze verify` checks the unit in `cargo xtask test`;
/// - util-linux: `mount` for tracefs;
/// - qemu-system-x86, busybox-static, cpio: the multi-node NUMA lab guest;
/// - numad, numactl: the baseline balancer and the placement tool the lab compares with;
/// - mmdebstrap, e2fsprogs: the stack lab's Debian image and its ext4 disk.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "build-essential",
    "pkg-config",
    "systemd",
    "util-linux",
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "numad",
    "numactl",
    "mmdebstrap",
    "e2fsprogs",
];

/// The cargo-fuzz release `cargo xtask fuzz` drives (builds with the stable toolchain;
/// the fuzz targets themselves build with the nightly's sanitizers).
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The bpf-linker release known to build against LLVM 22 with `--features llvm-22`.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Arguments of `cargo xtask setup`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Install bpf-linker under this prefix (`DIR/bin/bpf-linker`) instead of cargo's
    /// default. Used to exercise the install path without touching the real one.
    #[arg(long, value_name = "DIR")]
    pub bpf_linker_root: Option<PathBuf>,
    /// Skip the Debian packages (for machines where apt is not available).
    #[arg(long)]
    pub no_apt: bool,
}

pub fn main(args: Args) -> anyhow::Result<()> {
    let mut done: Vec<String> = Vec::new();
    step("rust-src for nightly", || rust_src(&mut done))?;
    step("bpf-linker", || {
        bpf_linker(args.bpf_linker_root.as_deref(), &mut done)
    })?;
    step("cargo-fuzz", || cargo_fuzz(&mut done))?;
    if !args.no_apt {
        step("Debian packages", || debian_packages(&mut done))?;
    }
    step("cargo-deb", || cargo_deb(&mut done))?;
    if !args.no_apt {
        step("QEMU for the lab", || lab_qemu(&mut done))?;
    }
    if done.is_empty() {
        eprintln!("xtask setup: everything is already present, nothing was done");
    } else {
        for d in &done {
            eprintln!("xtask setup: did: {d}");
        }
    }
    Ok(())
}

fn step(name: &str, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    f().with_context(|| format!("setup step `{name}` failed"))
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask setup: running {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn rust_src(done: &mut Vec<String>) -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .context("is rustup installed, with a `nightly` toolchain?")?;
    if installed.lines().any(|l| l.trim().starts_with("rust-src")) {
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    done.push("installed rust-src for the nightly toolchain".into());
    Ok(())
}

/// The nightly's LLVM: its major version and the path of its shared library.
struct NightlyLlvm {
    major: u32,
    lib: PathBuf,
}

fn nightly_llvm() -> anyhow::Result<NightlyLlvm> {
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let version = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .map(str::trim)
        .context("`rustc +nightly -vV` prints no LLVM version")?;
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("cannot parse LLVM version {version:?}"))?;
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let libdir = Path::new(sysroot.trim()).join("lib");
    // The sysroot ships `libLLVM.so.<major>.<minor>-rust-<rustc version>` (and on some
    // releases `libLLVM-<major>-rust-...so`); prefer the versioned soname.
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("libLLVM.so.{major}")))
        })
        .collect();
    if candidates.is_empty() {
        candidates = std::fs::read_dir(&libdir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("libLLVM-{major}")))
            })
            .collect();
    }
    candidates.sort();
    let lib = candidates.pop().with_context(|| {
        format!(
            "no libLLVM for LLVM {major} in {} (is the nightly toolchain complete?)",
            libdir.display()
        )
    })?;
    Ok(NightlyLlvm { major, lib })
}

/// Where the LLVM prefix for bpf-linker lives: next to the installed binary
/// (`$CARGO_HOME/vmbalancer-llvm` by default, `DIR/vmbalancer-llvm` with `--root DIR`).
fn llvm_prefix(root: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(r) = root {
        return Ok(r.join("vmbalancer-llvm"));
    }
    let cargo_home = match std::env::var_os("CARGO_HOME") {
        Some(h) => PathBuf::from(h),
        None => {
            PathBuf::from(std::env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?)
                .join(".cargo")
        }
    };
    Ok(cargo_home.join("vmbalancer-llvm"))
}

fn bpf_linker_path(root: Option<&Path>) -> PathBuf {
    match root {
        Some(r) => r.join("bin/bpf-linker"),
        None => PathBuf::from("bpf-linker"),
    }
}

/// A bpf-linker "works" when it starts (so its libLLVM loads) and is linked against
/// the nightly's libLLVM (its soname appears in the binary's dynamic section).
/// `--version` does not print the LLVM version, hence the soname check.
fn bpf_linker_works(bin: &Path, llvm: &NightlyLlvm) -> bool {
    let runs = Command::new(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !runs {
        return false;
    }
    let Some(path) = resolve_in_path(bin) else {
        return false;
    };
    let Some(soname) = llvm.lib.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let Ok(bytes) = std::fs::read(&path) else {
        return false;
    };
    bytes.windows(soname.len()).any(|w| w == soname.as_bytes())
}

/// `which`: a bare name is looked up in PATH, a path is taken as is.
fn resolve_in_path(bin: &Path) -> Option<PathBuf> {
    if bin.components().count() > 1 {
        return Some(bin.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

fn bpf_linker(root: Option<&Path>, done: &mut Vec<String>) -> anyhow::Result<()> {
    let llvm = nightly_llvm()?;
    let bin = bpf_linker_path(root);
    if bpf_linker_works(&bin, &llvm) {
        return Ok(());
    }
    // LLVM_PREFIX/lib/libLLVM.so -> the nightly's libLLVM; llvm-sys links against it
    // and records LLVM_PREFIX/lib as the binary's RUNPATH, so the directory must
    // outlive the build and also hold the library's soname.
    let prefix = llvm_prefix(root)?.join(format!("llvm-{}", llvm.major));
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    let soname = llvm
        .lib
        .file_name()
        .context("libLLVM path has no file name")?;
    for name in [std::ffi::OsStr::new("libLLVM.so"), soname] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm.lib, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), llvm.lib.display()))?;
    }
    let mut cmd = Command::new("cargo");
    cmd.args([
        "+nightly",
        "install",
        "--locked",
        "--force",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--no-default-features",
        "--features",
    ])
    .arg(format!("llvm-{}", llvm.major))
    .env("LLVM_PREFIX", &prefix);
    if let Some(r) = root {
        cmd.arg("--root").arg(r);
    }
    without_outer_cargo_settings(&mut cmd);
    run(&mut cmd)?;
    if !bpf_linker_works(&bin, &llvm) {
        bail!(
            "{} was installed but does not run against {}",
            bin.display(),
            llvm.lib.display()
        );
    }
    done.push(format!(
        "built bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {} ({})",
        llvm.major,
        llvm.lib.display()
    ));
    Ok(())
}

/// Keeps the outer `cargo xtask` invocation's settings out of a `cargo install`.
fn without_outer_cargo_settings(cmd: &mut Command) {
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
}

/// cargo-deb for `cargo xtask package`, built with the stable toolchain.
fn cargo_deb(done: &mut Vec<String>) -> anyhow::Result<()> {
    use crate::package::{CARGO_DEB_VERSION, cargo_deb_installed};
    if cargo_deb_installed() {
        return Ok(());
    }
    let mut cmd = Command::new("cargo");
    cmd.args(["install", "--locked", "--force", "cargo-deb", "--version"])
        .arg(CARGO_DEB_VERSION);
    without_outer_cargo_settings(&mut cmd);
    run(&mut cmd)?;
    if !cargo_deb_installed() {
        bail!("cargo-deb {CARGO_DEB_VERSION} was installed but `cargo deb --version` disagrees");
    }
    done.push(format!("installed cargo-deb {CARGO_DEB_VERSION}"));
    Ok(())
}

/// Whether `cargo fuzz` is the pinned release.
pub fn cargo_fuzz_present() -> bool {
    Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains(&format!(" {CARGO_FUZZ_VERSION}"))
        })
}

fn cargo_fuzz(done: &mut Vec<String>) -> anyhow::Result<()> {
    if cargo_fuzz_present() {
        return Ok(());
    }
    let mut cmd = Command::new("cargo");
    cmd.args([
        "install",
        "--locked",
        "--force",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
    ]);
    without_outer_cargo_settings(&mut cmd);
    run(&mut cmd)?;
    done.push(format!("installed cargo-fuzz {CARGO_FUZZ_VERSION}"));
    Ok(())
}

fn debian_packages(done: &mut Vec<String>) -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !nix_is_root() {
        bail!(
            "missing Debian packages {} and not root: run `sudo apt-get install {}`",
            missing.join(" "),
            missing.join(" ")
        );
    }
    apt_install(&missing)?;
    done.push(format!("installed Debian packages: {}", missing.join(" ")));
    Ok(())
}

/// The `major.minor.patch` of `qemu-system-x86_64 --version`'s first line.
fn qemu_version(text: &str) -> Option<(u32, u32, u32)> {
    let word = text.lines().next()?.split_whitespace().nth(3)?;
    let mut parts = word.split('.').map(|p| p.parse::<u32>().ok());
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
    ))
}

/// Whether this QEMU has the fixes for TCG's stale translations of patched code
/// (9.1.0, backported to 8.2.6 and 9.0.2); see the module doc.
fn qemu_translates_patched_code((major, minor, patch): (u32, u32, u32)) -> bool {
    match (major, minor) {
        (8, 2) => patch >= 6,
        (9, 0) => patch >= 2,
        _ => (major, minor) >= (9, 1),
    }
}

/// The Debian release this machine runs (`VERSION_CODENAME` of os-release).
fn debian_codename() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
}

/// Installs QEMU from bookworm-backports where the release's own is too old for a
/// lab that attaches eBPF programs (see the module doc); elsewhere says what to do.
fn lab_qemu(done: &mut Vec<String>) -> anyhow::Result<()> {
    let text = output(Command::new("qemu-system-x86_64").arg("--version"))?;
    let version = qemu_version(&text)
        .with_context(|| format!("no version in qemu-system-x86_64 --version: {text:?}"))?;
    if qemu_translates_patched_code(version) {
        return Ok(());
    }
    let shown = format!("{}.{}.{}", version.0, version.1, version.2);
    if debian_codename().as_deref() != Some("bookworm") || !nix_is_root() {
        eprintln!(
            "xtask setup: warning: QEMU {shown} runs stale translations of patched kernel \
             code under TCG (fixed in 9.1, 8.2.6, 9.0.2); lab guests may stop while eBPF \
             programs attach. Install a newer qemu-system-x86 for the lab."
        );
        return Ok(());
    }
    let sources = Path::new("/etc/apt/sources.list.d/bookworm-backports.sources");
    if !sources.exists() {
        std::fs::write(
            sources,
            "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\n\
             Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        )
        .with_context(|| format!("writing {}", sources.display()))?;
    }
    apt_install(&["-t", "bookworm-backports", "qemu-system-x86"])?;
    let now = output(Command::new("qemu-system-x86_64").arg("--version"))?;
    match qemu_version(&now) {
        Some(v) if qemu_translates_patched_code(v) => {
            done.push(format!(
                "installed QEMU {}.{}.{} from bookworm-backports (was {shown})",
                v.0, v.1, v.2
            ));
            Ok(())
        }
        _ => bail!("qemu-system-x86 from bookworm-backports is still old: {now:?}"),
    }
}

/// `apt-get update`, then `apt-get install` of `args` (packages, and options such as
/// `-t RELEASE`) without recommends or questions.
fn apt_install(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${db:Status-Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout == b"installed")
}

/// Effective uid 0.
pub fn nix_is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_versions_with_and_without_the_tcg_fix() {
        let debian12 = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright";
        assert_eq!(qemu_version(debian12), Some((7, 2, 22)));
        assert!(!qemu_translates_patched_code((7, 2, 22)));
        assert!(!qemu_translates_patched_code((8, 2, 5)));
        assert!(qemu_translates_patched_code((8, 2, 6)));
        assert!(!qemu_translates_patched_code((9, 0, 1)));
        assert!(qemu_translates_patched_code((9, 0, 2)));
        assert!(qemu_translates_patched_code((9, 1, 0)));
        assert_eq!(
            qemu_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)"),
            Some((10, 0, 2))
        );
        assert!(qemu_translates_patched_code((10, 0, 2)));
        assert_eq!(qemu_version("QEMU emulator version 9.1"), Some((9, 1, 0)));
        assert_eq!(qemu_version("garbage"), None);
    }
}
