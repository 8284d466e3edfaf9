//! A scenario with a deliberately false assertion (`tests/scenarios/false-assertion.toml`
//! asserts 5 NUMA nodes on the 4-node guest) must make `cargo xtask lab` fail.
//! Without this, a lab that never evaluates its assertions would look green.
//!
//! Boots the real lab guest, so it needs root and qemu-system-x86_64: it is ignored
//! unless asked for (`-- --include-ignored`, as `cargo xtask test` does).

use std::path::Path;
use std::process::Command;

/// Why this machine cannot boot the lab guest, if it cannot.
fn missing() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    if !Path::new("/usr/bin/qemu-system-x86_64").exists() {
        return Some("qemu-system-x86_64 is not installed (cargo xtask lab installs it)".into());
    }
    None
}

#[test]
#[ignore = "needs root and qemu-system-x86_64: boots the lab guest (minutes)"]
fn false_assertion_fails_the_lab_command() {
    if let Some(why) = missing() {
        panic!("cannot boot the lab guest: {why}");
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new(env!("CARGO"))
        .args(["xtask", "lab", "false-assertion"])
        .current_dir(workspace)
        .output()
        .expect("running cargo xtask lab");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the lab passed a false assertion:\n{stderr}"
    );
    assert!(
        stderr.contains("check FAIL nodes == 5: 4 online nodes"),
        "the lab failed for another reason than the false assertion:\n{stderr}"
    );
    assert!(
        stderr.contains("lab scenario(s) failed: false-assertion"),
        "{stderr}"
    );
}
