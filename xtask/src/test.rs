//! `cargo xtask test`: everything the README's test command runs.

use std::process::Command;

use anyhow::{Context, bail};

/// Arguments of `cargo xtask test`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn main(_args: Args) -> anyhow::Result<()> {
    step(
        "format",
        Command::new("cargo").args(["fmt", "--all", "--check"]),
    )?;
    step(
        "clippy",
        Command::new("cargo").args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    step("tests", Command::new("cargo").args(["test", "--workspace"]))?;
    Ok(())
}

fn step(name: &str, cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask test: {name}: {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("{name}: could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    Ok(())
}
