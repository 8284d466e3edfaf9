//! `vmbalancer package-assets --out DIR` (hidden): the man pages and shell
//! completions, generated from this very command-line definition.
//!
//! Generating them from the binary that gets packaged (instead of keeping copies in
//! the tree, or a build script that would rebuild the CLI a second time) means the
//! packaged pages and completions can never describe another version's flags.
//! `cargo xtask package` runs it on the release binary.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;

use super::Cli;

/// Arguments of `vmbalancer package-assets`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory to write `man8/` and `completions/` into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// Section 8: system administration commands, as the binary lives in /usr/sbin.
pub const MAN_SECTION: &str = "8";

pub fn main(args: Args) -> anyhow::Result<()> {
    for path in generate(&args.out)? {
        println!("{}", path.display());
    }
    Ok(())
}

/// Writes `man8/vmbalancer.8`, one `man8/vmbalancer-SUB.8` per visible subcommand,
/// and `completions/{vmbalancer.bash,_vmbalancer,vmbalancer.fish}`; returns the paths.
pub fn generate(out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let man_dir = out.join(format!("man{MAN_SECTION}"));
    let completion_dir = out.join("completions");
    for d in [&man_dir, &completion_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut written = Vec::new();
    let mut cmd = visible_command().disable_help_subcommand(true);
    // Gives each subcommand its display name (`vmbalancer-run`) for its page.
    cmd.build();
    let pages = std::iter::once(cmd.clone()).chain(
        cmd.get_subcommands()
            .filter(|s| !s.is_hide_set())
            .cloned()
            .collect::<Vec<_>>(),
    );
    for page in pages {
        let man = clap_mangen::Man::new(page).section(MAN_SECTION);
        let path = man
            .generate_to(&man_dir)
            .with_context(|| format!("writing a man page into {}", man_dir.display()))?;
        written.push(path);
    }
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut cmd = visible_command();
        let path = clap_complete::generate_to(shell, &mut cmd, "vmbalancer", &completion_dir)
            .with_context(|| format!("writing {shell} completions"))?;
        written.push(path);
    }
    Ok(written)
}

/// The command line without its hidden subcommands: completion scripts would
/// otherwise offer them (clap_complete lists hidden subcommands).
fn visible_command() -> clap::Command {
    let full = Cli::command();
    let visible: Vec<clap::Command> = full
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    clap::Command::new("vmbalancer")
        .version(env!("CARGO_PKG_VERSION"))
        // The man page's NAME line: `vmbalancer - keeps KVM virtual machines NUMA-local`.
        .about("keeps KVM virtual machines NUMA-local")
        .args(full.get_arguments().cloned())
        .subcommands(visible)
        .subcommand_required(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_completions_cover_the_visible_commands() {
        let dir = std::env::temp_dir().join(format!("vmb-assets-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let written = generate(&dir).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "vmbalancer.8",
            "vmbalancer-run.8",
            "vmbalancer-advise.8",
            "vmbalancer.bash",
            "_vmbalancer",
            "vmbalancer.fish",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
        }
        // The generator itself is for packaging, not for operators.
        assert!(
            !names.iter().any(|n| n.contains("package-assets")),
            "{names:?}"
        );
        let page = std::fs::read_to_string(dir.join("man8/vmbalancer-run.8")).unwrap();
        assert!(page.contains(".TH vmbalancer-run 8"), "{page}");
        assert!(page.contains("dry\\-run"), "run's flags documented");
        let bash = std::fs::read_to_string(dir.join("completions/vmbalancer.bash")).unwrap();
        assert!(bash.contains("--dry-run") && !bash.contains("package-assets"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
