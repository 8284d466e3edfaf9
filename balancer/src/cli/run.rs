//! `vmbalancer run`.

/// Arguments of `vmbalancer run`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn main(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`vmbalancer run` is not available in this build yet")
}
