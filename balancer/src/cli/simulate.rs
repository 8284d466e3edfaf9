//! `vmbalancer simulate`.

/// Arguments of `vmbalancer simulate`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn main(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`vmbalancer simulate` is not available in this build yet")
}
