//! `cargo xtask setup`: installs what building and testing need.

/// Arguments of `cargo xtask setup`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn main(_args: Args) -> anyhow::Result<()> {
    eprintln!("xtask setup: nothing to install");
    Ok(())
}
