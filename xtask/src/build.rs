//! `cargo xtask build`: the eBPF objects, then userspace.
//!
//! There is a single embedding mechanism: `balancer/build.rs` builds `balancer-ebpf`
//! with the nightly toolchain and the loader includes the object from `OUT_DIR`. This
//! command therefore only checks the prerequisites (to fail with the setup hint before
//! cargo prints a wall of output) and runs `cargo build`. The helpers here are shared
//! by `run`, `test` and `install`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

/// Arguments of `cargo xtask build`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Build with the release profile.
    #[arg(long)]
    pub release: bool,
}

pub fn main(args: Args) -> anyhow::Result<()> {
    build(args.release)?;
    eprintln!("xtask build: built {}", binary_path(args.release).display());
    Ok(())
}

/// Builds the workspace's default members (the eBPF object comes with `balancer`).
pub fn build(release: bool) -> anyhow::Result<()> {
    let mut cmd = cargo();
    cmd.arg("build");
    if release {
        cmd.arg("--release");
    }
    run_step("build", &mut cmd)
}

/// `cargo build --release` of the `vmbalancer` binary alone (packaging and the lab
/// need nothing else of the workspace).
pub fn vmbalancer_release() -> Command {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--release",
        "-p",
        "balancer",
        "--bin",
        "vmbalancer",
    ]);
    cmd
}

/// The repository root (the parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ has a parent")
        .to_path_buf()
}

/// Cargo's target directory for this workspace.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => workspace_root().join("target"),
    }
}

/// The `vmbalancer` binary of a profile.
pub fn binary_path(release: bool) -> PathBuf {
    target_dir()
        .join(if release { "release" } else { "debug" })
        .join("vmbalancer")
}

/// `cargo` (the one running us), in the workspace root.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs a command, failing with the step's name.
pub fn run_step(name: &str, cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: {name}: {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("{name}: could not start {cmd:?}"))?;
    if !status.success() {
        bail!("step `{name}` failed ({status})");
    }
    Ok(())
}
