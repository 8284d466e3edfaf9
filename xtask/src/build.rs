//! `cargo xtask build`.

/// Arguments of `cargo xtask build`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn main(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`cargo xtask build` is not implemented yet")
}
