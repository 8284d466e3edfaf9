//! The `vmbalancer` command line. Each subcommand lives in its own module with its
//! arguments and entry point; this module only dispatches.

mod advise;
mod assets;
mod reload;
mod run;
mod simulate;
mod status;
mod trace;

use clap::{Parser, Subcommand};

/// Keeps KVM virtual machines NUMA-local.
#[derive(Debug, Parser)]
#[command(name = "vmbalancer", version, about, long_about = None)]
pub struct Cli {
    /// Log filter, as in RUST_LOG (e.g. `info`, `balancer::daemon=debug`). Default
    /// `info`; `warn` for `simulate`, whose daemon would log every simulated action.
    #[arg(long, global = true, env = "VMBALANCER_LOG")]
    pub log: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Observe only: which VM runs where, where its memory is, what is hot and remote.
    Trace(trace::Args),
    /// Run the balancing daemon.
    Run(run::Args),
    /// Ask the running daemon for its state.
    Status(status::Args),
    /// Ask the running daemon to read its configuration again.
    Reload(reload::Args),
    /// Run the engine and baseline policies on a simulated host.
    Simulate(simulate::Args),
    /// numad-compatible placement advice for a new VM (`-w NCPUS[:MB]`).
    Advise(advise::Args),
    /// Writes the man pages and shell completions (for packaging).
    #[command(hide = true)]
    PackageAssets(assets::Args),
}

/// Parses the command line, sets up logging and runs the subcommand.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let quiet = matches!(cli.command, Command::Simulate(_));
    init_logging(
        cli.log
            .as_deref()
            .unwrap_or(if quiet { "warn" } else { "info" }),
    );
    match cli.command {
        Command::Trace(args) => trace::main(args),
        Command::Run(args) => run::main(args),
        Command::Status(args) => status::main(args),
        Command::Reload(args) => reload::main(args),
        Command::Simulate(args) => simulate::main(args),
        Command::Advise(args) => advise::main(args),
        Command::PackageAssets(args) => assets::main(args),
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not for journald or log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
