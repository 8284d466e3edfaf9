//! `vmbalancer trace`.

/// Arguments of `vmbalancer trace`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn main(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`vmbalancer trace` is not available in this build yet")
}
