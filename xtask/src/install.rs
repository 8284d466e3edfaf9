//! `cargo xtask install [--root DIR]`: the binary to `DIR/usr/sbin`, the systemd unit
//! to `DIR/lib/systemd/system`, an example configuration to
//! `DIR/etc/vmbalancer/config.toml.example`. The real configuration is never
//! overwritten. `cargo xtask test` installs into a temporary root to verify the unit.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::build;

/// Arguments of `cargo xtask install`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Install under this root instead of `/` (packaging, tests).
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// Install the debug build instead of the release build.
    #[arg(long)]
    pub debug: bool,
}

pub fn main(args: Args) -> anyhow::Result<()> {
    let release = !args.debug;
    build::build(release)?;
    for path in install_files(&args.root, &build::binary_path(release))? {
        eprintln!("xtask install: {}", path.display());
    }
    if args.root == Path::new("/") {
        eprintln!(
            "xtask install: without /etc/vmbalancer/config.toml the daemon runs on its \
             defaults (copy config.toml.example there to change them); then \
             `systemctl daemon-reload && systemctl enable --now vmbalancer`"
        );
    }
    Ok(())
}

/// Copies the three files under `root`; returns the installed paths.
pub fn install_files(root: &Path, binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let repo = build::workspace_root();
    let files = [
        (binary.to_path_buf(), "usr/sbin/vmbalancer", 0o755),
        (
            repo.join("systemd/vmbalancer.service"),
            "lib/systemd/system/vmbalancer.service",
            0o644,
        ),
        (
            repo.join("systemd/config.toml.example"),
            "etc/vmbalancer/config.toml.example",
            0o644,
        ),
    ];
    let mut installed = Vec::new();
    for (src, rel, mode) in files {
        let dest = root.join(rel);
        let dir = dest.parent().context("install path has no parent")?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // Copy to a temporary name and rename: replacing a running binary in place
        // fails with ETXTBSY.
        let tmp = dest.with_extension("xtask-new");
        std::fs::copy(&src, &tmp)
            .with_context(|| format!("copying {} to {}", src.display(), tmp.display()))?;
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        std::fs::rename(&tmp, &dest)
            .with_context(|| format!("moving {} to {}", tmp.display(), dest.display()))?;
        installed.push(dest);
    }
    Ok(installed)
}
