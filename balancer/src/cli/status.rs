//! `vmbalancer status`.

/// Arguments of `vmbalancer status`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn main(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`vmbalancer status` is not available in this build yet")
}
