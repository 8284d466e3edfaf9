//! `vmbalancer advise`.

/// Arguments of `vmbalancer advise`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn main(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`vmbalancer advise` is not available in this build yet")
}
