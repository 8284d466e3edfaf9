//! `vmbalancer reload`: asks the running daemon to read its configuration again and
//! says what took effect, or why nothing did (the exit status tells `systemctl
//! reload`). The unit's `ExecReload=` runs it: unlike a bare SIGHUP, the command
//! waits for the daemon's answer, so a refused file fails the reload job.

use std::path::PathBuf;
use std::time::Duration;

use crate::daemon::config::Config;
use crate::daemon::control::{self, Request, Response};

/// Arguments of `vmbalancer reload`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Configuration file, to find the runtime directory.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Control socket [default: RUNTIME_DIR/control.sock].
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

/// How long to wait for the daemon: a reload waits for the loop's next tick (up to a
/// minute at the longest `tick_ms`) and the daemon gives up on its own before this.
const ANSWER_WITHIN: Duration = Duration::from_secs(150);

pub fn main(args: Args) -> anyhow::Result<()> {
    let path = match args.socket {
        Some(s) => s,
        // The daemon judges the file; a file this command cannot read either still
        // goes to the daemon at the default place, which says what is wrong.
        None => match Config::load(args.config.as_deref()) {
            Ok(cfg) => cfg.control_socket_path(),
            Err(e) => {
                eprintln!("note: {e}; asking the daemon at the default socket");
                Config::default().control_socket_path()
            }
        },
    };
    match control::request(&path, &Request::Reload, ANSWER_WITHIN)? {
        Response::Reloaded {
            changed,
            needs_restart,
        } => {
            println!(
                "configuration reloaded; changed: {}",
                list_or_none(&changed)
            );
            if !needs_restart.is_empty() {
                println!(
                    "waiting for a restart (running on the previous values): {}",
                    needs_restart.join(", ")
                );
            }
            Ok(())
        }
        Response::Error { error } => anyhow::bail!("configuration not reloaded: {error}"),
        other => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
    }
}

fn list_or_none(keys: &[String]) -> String {
    if keys.is_empty() {
        "nothing".into()
    } else {
        keys.join(", ")
    }
}
