//! Fresh anonymous memory, a thread's CPU and its state, for the programs and tests
//! that make a thread fault, move, spin or sleep on purpose and then read what the
//! kernel (or the eBPF programs) counted of it.

use std::time::Duration;

/// A fresh private anonymous read-write mapping of `len` bytes, with `advice`
/// (`madvise`, e.g. `MADV_NOHUGEPAGE` for one fault per 4 KiB page) applied when
/// given. Nothing is touched yet. The caller unmaps it, or leaks it on purpose when
/// its range must not be reused while counters are read.
pub fn map(len: usize, advice: Option<libc::c_int>) -> std::io::Result<*mut u8> {
    // SAFETY: a fresh private anonymous mapping; the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    if let Some(advice) = advice {
        // SAFETY: advice on our own mapping; a refusal only loses the hint.
        unsafe { libc::madvise(p, len, advice) };
    }
    Ok(p.cast())
}

/// Pins the calling thread to `cpu` alone.
pub fn pin_self(cpu: u32) -> nix::Result<()> {
    pin_thread(0, cpu)
}

/// Pins thread `tid` (0: the calling thread) to `cpu` alone.
pub fn pin_thread(tid: u32, cpu: u32) -> nix::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu as usize)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid as i32), &set)
}

/// The CPU the calling thread runs on.
pub fn current_cpu() -> u32 {
    // SAFETY: no preconditions.
    unsafe { libc::sched_getcpu() as u32 }
}

/// The calling thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`, the scheduler's
/// `sum_exec_runtime`), ns.
pub fn thread_cpu_ns() -> u64 {
    crate::clock_ns(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
}

/// Waits until thread `tid` of this process sleeps (state `S`), so its last
/// switch-out, and the run time the scheduler charges there, has happened. Gives up
/// after `limit`.
pub fn wait_blocked(tid: u32, limit: Duration) -> Result<(), String> {
    let path = format!("/proc/self/task/{tid}/stat");
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        let stat = std::fs::read_to_string(&path).unwrap_or_default();
        // `tid (comm) S ...`: the state follows the last ')'.
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next());
        if state == Some("S") {
            // State S is set just before the thread calls into the scheduler.
            std::thread::sleep(Duration::from_millis(20));
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Err(format!("thread {tid} did not block within {limit:?}"))
}
