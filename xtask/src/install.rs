//! `cargo xtask install`.

/// Arguments of `cargo xtask install`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn main(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`cargo xtask install` is not implemented yet")
}
