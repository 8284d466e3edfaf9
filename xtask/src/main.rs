//! `cargo xtask`: everything that is not `cargo build` of one crate.
//!
//! Each subcommand lives in its own module. They shell out to cargo, rustup, apt and
//! qemu with clear messages naming the step that failed.

mod build;
mod fuzz;
mod install;
mod lab;
mod package;
mod run;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    about = "vmbalancer build, load, test and lab tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what building and testing need (idempotent).
    Setup(setup::Args),
    /// Build the eBPF programs and the userspace binaries.
    Build(build::Args),
    /// Build, then run `vmbalancer ARGS` as root.
    Run(run::Args),
    /// Fuzz every parser of outside input for a while and print what was found.
    Fuzz(fuzz::Args),
    /// Run everything the README's test command runs.
    Test(test::Args),
    /// Install the binary, the systemd unit and an example configuration.
    Install(install::Args),
    /// Build the Debian package target/debian/vmbalancer_VERSION_amd64.deb.
    Package(package::Args),
    /// Boot the 4-node NUMA lab guest and run scenarios in it.
    Lab(lab::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup(a) => setup::main(a),
        Command::Build(a) => build::main(a),
        Command::Run(a) => run::main(a),
        Command::Fuzz(a) => fuzz::main(a),
        Command::Test(a) => test::main(a),
        Command::Install(a) => install::main(a),
        Command::Package(a) => package::main(a),
        Command::Lab(a) => lab::main(a),
    }
}
