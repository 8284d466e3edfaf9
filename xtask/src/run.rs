//! `cargo xtask run`.

/// Arguments of `cargo xtask run`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn main(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`cargo xtask run` is not implemented yet")
}
