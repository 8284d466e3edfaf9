//! The journal (`journal.json` in the state directory), loaded at start.
#![no_main]
use balancer::daemon::journal::Journal;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let state = vmbalancer_fuzz::scratch_dir();
    std::fs::write(state.join("journal.json"), data).expect("write journal");
    let journal = Journal::open(&state).expect("a bad journal is moved aside, not an error");
    let _ = journal.entries().len();
});
