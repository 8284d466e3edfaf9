//! `cargo xtask test`: everything the README's test command runs, in the order that
//! fails fastest: formatting, clippy (userspace with the stable toolchain, the eBPF
//! crate with the nightly for `bpfel-unknown-none`), `systemd-analyze verify` of the
//! unit and its exposure score (`systemd-analyze security`, at most
//! [`MAX_UNIT_EXPOSURE`]), then unit and integration tests, including the ignored ones that need root
//! (eBPF programs, other processes' affinity and pages, the lab guest; CI runs as
//! root), a short fuzz run of every parser of outside input ([`FUZZ_SECONDS`] each),
//! then the lab's CI scenarios on a 4-node guest kernel.
//!
//! The run needs about 10 GiB of disk at its peak (the fuzz build, beside the debug
//! and release builds). A CI machine's disk is shared with others and its free space
//! varies, so the free space is printed before each heavy stage, and under CI (`CI`
//! set) the fuzz build is removed once its run is over, before the lab unpacks its
//! images.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

use crate::build::{self, cargo, run_step};

/// Seconds of fuzzing per target in CI (18 targets: about 2 minutes once they are built).
const FUZZ_SECONDS: u64 = 4;

/// Arguments of `cargo xtask test`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn main(_args: Args) -> anyhow::Result<()> {
    let ebpf_dir = build::workspace_root().join("balancer-ebpf");
    run_step("format", cargo().args(["fmt", "--all", "--check"]))?;
    run_step(
        "format (eBPF crate)",
        cargo()
            .current_dir(&ebpf_dir)
            .args(["fmt", "--all", "--check"]),
    )?;
    run_step(
        "clippy",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    run_step("clippy (eBPF crate)", &mut ebpf_clippy(&ebpf_dir))?;
    report_free_disk("before the builds");
    // `cargo test` below builds the binary too; build it first for the unit check.
    build::build(false)?;
    verify_unit()?;
    unit_exposure()?;
    // Tests that need root are `#[ignore]`d so that a plain `cargo test` reports
    // them as not run; here (CI runs as root) they run with the others.
    let mut tests = cargo();
    tests.args(["test", "--workspace", "--", "--include-ignored"]);
    for (name, why) in NOT_ON_THIS_HOST {
        eprintln!("xtask: tests: not run here: {name}: {why}");
        tests.args(["--skip", name]);
    }
    run_step("tests", &mut tests)?;
    // A short fuzz run: catches a parser change that panics on the seeds' neighbours.
    // The long run's figures are in tests/results/fuzz.md.
    report_free_disk("before the fuzz build");
    let targets: Vec<String> = crate::fuzz::TARGETS.iter().map(|t| t.to_string()).collect();
    let outcomes = crate::fuzz::run(&targets, FUZZ_SECONDS)?;
    crate::fuzz::print_table(&outcomes);
    let found: usize = outcomes.iter().map(|o| o.findings.len()).sum();
    if found > 0 {
        bail!("step `fuzz` failed: {found} input(s) break a parser (see above)");
    }
    if std::env::var_os("CI").is_some() {
        crate::fuzz::remove_build()?;
    }
    report_free_disk("before the lab");
    // NUMA behaviour is proven on a real 4-node kernel: the lab's CI scenarios.
    crate::lab::ci()?;
    eprintln!("xtask test: all steps passed");
    Ok(())
}

/// Prints the free space of the file system that holds the build (a run that stops on
/// "No space left on device" then shows how much there was at each stage).
fn report_free_disk(stage: &str) {
    let root = build::workspace_root();
    match nix::sys::statvfs::statvfs(&root) {
        Ok(fs) => {
            let free_bytes = fs.blocks_available() * fs.fragment_size();
            eprintln!(
                "xtask: {:.1} GiB free on the build's disk {stage}",
                free_bytes as f64 / (1u64 << 30) as f64
            );
        }
        Err(e) => eprintln!("xtask: could not read the free disk space {stage}: {e}"),
    }
}

/// Tests that CI's host kernel cannot run, each with the reason; they are left out by
/// name (and said so in the log) rather than passing without running.
const NOT_ON_THIS_HOST: &[(&str, &str)] = &[(
    "a_constantly_written_region_is_hotter_than_a_rarely_written_one",
    "needs soft-dirty bits (CONFIG_MEM_SOFT_DIRTY), which the CI host's kernel does not set; \
     the lab guest's kernel does, and the daemon samples write heat there in every run",
)];

/// The highest `systemd-analyze security` exposure the unit may have (0.0 = fully
/// locked down, 10.0 = nothing restricted).
pub const MAX_UNIT_EXPOSURE: f64 = 3.0;

/// Scores the unit offline and fails above [`MAX_UNIT_EXPOSURE`]; prints the score.
fn unit_exposure() -> anyhow::Result<()> {
    let unit = build::workspace_root().join("systemd/vmbalancer.service");
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&unit)
        .output()
        .context("could not run systemd-analyze (is the `systemd` package installed? run `cargo xtask setup`)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let score = exposure_score(&text).with_context(|| {
        format!(
            "systemd-analyze security printed no overall exposure ({}):\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    eprintln!("xtask: unit: exposure {score:.1} (at most {MAX_UNIT_EXPOSURE:.1})");
    if score > MAX_UNIT_EXPOSURE {
        bail!(
            "step `unit exposure` failed: {score:.1} > {MAX_UNIT_EXPOSURE:.1}; what is open:\n{}",
            text.lines()
                .filter(|l| l.trim_start().starts_with('✗'))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    Ok(())
}

/// The number in `→ Overall exposure level for vmbalancer.service: 2.4 OK`.
fn exposure_score(report: &str) -> Option<f64> {
    report
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for "))
        .and_then(|(_, rest)| rest.split_once(": "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Clippy on the eBPF crate needs the same toolchain and target as its build.
fn ebpf_clippy(ebpf_dir: &Path) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.current_dir(ebpf_dir)
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ])
        // The outer `cargo xtask` sets these for the stable toolchain.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("CARGO");
    cmd
}

/// Installs into a temporary root and runs `systemd-analyze verify` on the unit, with
/// `ExecStart` pointing at the installed binary (verify checks that it exists).
/// Any diagnostic about our unit fails the step.
fn verify_unit() -> anyhow::Result<()> {
    let root = std::env::temp_dir().join(format!("vmbalancer-verify-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    crate::install::install_files(&root, &build::binary_path(false))?;
    let unit = root.join("lib/systemd/system/vmbalancer.service");
    let text = std::fs::read_to_string(&unit)?;
    let binary = root.join("usr/sbin/vmbalancer");
    let patched = text.replace("/usr/sbin/vmbalancer", &binary.display().to_string());
    // verify wants the unit name to match the file name.
    let checked = root.join("vmbalancer.service");
    std::fs::write(&checked, patched)?;
    eprintln!("xtask: unit: systemd-analyze verify {}", checked.display());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        // Documentation= names the man pages, which exist once the package is installed.
        .arg("--man=no")
        .arg(&checked)
        .output()
        .context("could not run systemd-analyze (is the `systemd` package installed? run `cargo xtask setup`)")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // systemd-analyze also reports problems of unrelated units on the host; keep ours.
    let ours: Vec<&str> = text.lines().filter(|l| l.contains("vmbalancer")).collect();
    let _ = std::fs::remove_dir_all(&root);
    if !out.status.success() || !ours.is_empty() {
        bail!(
            "step `unit` failed: systemd-analyze verify ({}):\n{}",
            out.status,
            if ours.is_empty() {
                text.clone()
            } else {
                ours.join("\n")
            }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_overall_exposure() {
        let report = "✗ PrivateUsers=   Service has access to other users   0.2\n\
                      → Overall exposure level for vmbalancer.service: 2.4 OK 🙂\n";
        assert_eq!(exposure_score(report), Some(2.4));
        assert_eq!(exposure_score("✗ PrivateUsers= 0.2\n"), None);
    }
}
