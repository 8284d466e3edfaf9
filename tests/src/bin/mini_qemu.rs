//! A minimal stand-in for a qemu-kvm process, for observation tests.
//!
//! It looks to `/proc` the way a real guest does where discovery looks: its comm is
//! `qemu-kvm` (set with `prctl(PR_SET_NAME)`), its command line carries `-name`,
//! `-smp` and `-m`, it has one thread per vCPU named `CPU n/KVM`, and its guest RAM is
//! one anonymous mapping of `-m` MiB, fully touched before it reports ready. The vCPU
//! threads keep writing to their share of that memory, so they use some CPU.
//!
//! With `-idle`, each vCPU thread writes one page of its share per second instead,
//! as the vCPUs of an idle guest mostly halt: hundreds of such VMs fit on a small
//! host, for the daemon's cost at scale.
//!
//! Usage: `mini_qemu -name guest=NAME,debug-threads=on -smp N -m MIB [-idle] [-seconds S]`.
//! Prints `ready PID` on stdout once every thread is named and the memory is touched,
//! then runs until killed or for `S` seconds.

use std::io::Write;
use std::time::{Duration, Instant};

fn arg_after(args: &[String], flag: &str) -> Option<String> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let vcpus: usize = arg_after(&args, "-smp")
        .and_then(|s| s.split(',').next()?.parse().ok())
        .unwrap_or(1);
    let mem_mib: usize = arg_after(&args, "-m")
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let seconds: Option<u64> = arg_after(&args, "-seconds").and_then(|s| s.parse().ok());
    let idle = args.iter().any(|a| a == "-idle");

    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_NAME,
            c"qemu-kvm".as_ptr() as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    anyhow::ensure!(
        rc == 0,
        "prctl(PR_SET_NAME): {}",
        std::io::Error::last_os_error()
    );

    let len = mem_mib << 20;
    let page = 4096;
    // Reserve a guard page on each side (PROT_NONE, as qemu does) so the kernel never
    // merges guest RAM with a neighbouring anonymous mapping such as a thread stack.
    // SAFETY: a fresh private anonymous reservation; checked for MAP_FAILED below.
    let reserved = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len + 2 * page,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    anyhow::ensure!(
        reserved != libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    let ptr = (reserved as usize + page) as *mut libc::c_void;
    // SAFETY: the range lies inside the reservation made above.
    let rc = unsafe { libc::mprotect(ptr, len, libc::PROT_READ | libc::PROT_WRITE) };
    anyhow::ensure!(rc == 0, "mprotect: {}", std::io::Error::last_os_error());
    let base = ptr as usize;
    for off in (0..len).step_by(page) {
        // SAFETY: off < len, inside the mapping.
        unsafe { ((base + off) as *mut u8).write_volatile(1) };
    }

    let (tx, rx) = std::sync::mpsc::channel();
    for n in 0..vcpus {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name(format!("CPU {n}/KVM"))
            .spawn(move || {
                tx.send(()).ok();
                let share = len / vcpus.max(1);
                let start = base + n * share;
                let mut round = 0u8;
                let mut next = 0;
                loop {
                    round = round.wrapping_add(1);
                    if idle {
                        // SAFETY: next < share, inside this thread's share.
                        unsafe { ((start + next) as *mut u8).write_volatile(round) };
                        next = (next + page) % share.max(page);
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                    for off in (0..share).step_by(page) {
                        // SAFETY: inside this thread's share of the mapping.
                        unsafe { ((start + off) as *mut u8).write_volatile(round) };
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })?;
    }
    drop(tx);
    for _ in 0..vcpus {
        rx.recv()?;
    }
    println!("ready {}", std::process::id());
    std::io::stdout().flush()?;

    let started = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        if seconds.is_some_and(|s| started.elapsed() >= Duration::from_secs(s)) {
            return Ok(());
        }
    }
}
