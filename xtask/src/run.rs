//! `cargo xtask run [--release] -- ARGS`: builds, then runs `vmbalancer ARGS` as root
//! (loading eBPF programs needs it). `--help` and `--version` work without root.

use std::process::Command;

use anyhow::{Context, bail};

use crate::build;

/// Arguments of `cargo xtask run`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Build and run the release profile.
    #[arg(long)]
    pub release: bool,
    /// Arguments for `vmbalancer`, after `--`.
    #[arg(last = true)]
    pub args: Vec<String>,
}

pub fn main(args: Args) -> anyhow::Result<()> {
    let wants_help_only = args
        .args
        .iter()
        .any(|a| matches!(a.as_str(), "-h" | "--help" | "-V" | "--version" | "help"));
    if !wants_help_only && !crate::setup::nix_is_root() {
        bail!(
            "vmbalancer loads eBPF programs and must run as root: \
             run `sudo -E cargo xtask run -- {}`",
            args.args.join(" ")
        );
    }
    build::build(args.release)?;
    let bin = build::binary_path(args.release);
    eprintln!("xtask run: {} {}", bin.display(), args.args.join(" "));
    let status = Command::new(&bin)
        .args(&args.args)
        .status()
        .with_context(|| format!("could not start {}", bin.display()))?;
    if !status.success() {
        bail!("vmbalancer exited with {status}");
    }
    Ok(())
}
