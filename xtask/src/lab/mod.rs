//! `cargo xtask lab`.

/// Arguments of `cargo xtask lab`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn main(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`cargo xtask lab` is not implemented yet")
}
