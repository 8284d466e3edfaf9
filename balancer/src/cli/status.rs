//! `vmbalancer status`: asks the running daemon over its control socket.

use std::path::PathBuf;
use std::time::Duration;

use crate::daemon::config::Config;
use crate::daemon::control::{self, Request, Response};
use crate::daemon::status::render_text;

/// Arguments of `vmbalancer status`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the status document as JSON.
    #[arg(long)]
    pub json: bool,
    /// Configuration file, to find the runtime directory.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Control socket [default: RUNTIME_DIR/control.sock].
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

/// The control socket named by flags or configuration.
pub fn socket_path(
    config: Option<&std::path::Path>,
    socket: Option<PathBuf>,
) -> anyhow::Result<PathBuf> {
    Ok(match socket {
        Some(s) => s,
        None => Config::load(config)?.control_socket_path(),
    })
}

pub fn main(args: Args) -> anyhow::Result<()> {
    let path = socket_path(args.config.as_deref(), args.socket)?;
    match control::request(&path, &Request::Status, Duration::from_secs(10))? {
        Response::Status(doc) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                print!("{}", render_text(&doc));
            }
            Ok(())
        }
        Response::Error { error } => anyhow::bail!("the daemon refused: {error}"),
        other => anyhow::bail!("unexpected answer from the daemon: {other:?}"),
    }
}
