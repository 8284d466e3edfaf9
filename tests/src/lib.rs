//! Helpers shared by vmbalancer's test programs and integration tests.

pub mod actuate_target;
pub mod lab;

/// Fails the calling test with a plain message unless it runs as root. Tests that
/// need root are `#[ignore = "needs root: ..."]`: a plain `cargo test` reports them
/// as ignored rather than passed, and `-- --include-ignored` (CI, as root) runs them.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root; run it as root (CI does) or leave it ignored"
    );
}
