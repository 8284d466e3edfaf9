//! Helpers shared by vmbalancer's test programs and integration tests.

pub mod actuate_target;
pub mod anon;
pub mod cgroup_v1;
pub mod fake_sys;
pub mod fault;
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

/// Fails the calling test unless `ok`, naming what it needs (`what`). A test whose
/// precondition is missing fails rather than returning early as a pass: it is
/// `#[ignore]`d by default, and where it is asked for (CI) it must really run.
pub fn require(ok: bool, what: impl std::fmt::Display) {
    assert!(
        ok,
        "this test needs {what}; run it where that holds (CI does)"
    );
}

/// A clock's reading in nanoseconds (0 if the clock cannot be read).
pub fn clock_ns(clock: nix::time::ClockId) -> u64 {
    nix::time::clock_gettime(clock).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    })
}
