//! A stand-in VM process for actuation tests: two threads and a touched anonymous
//! mapping (`actuate_target [LEN_BYTES] [huge]`, `huge` for hugetlbfs pages). Prints `pid tid_main tid_worker addr len` on stdout, then obeys stdin
//! lines: `stop-worker` ends the worker thread; `churn` starts a thread that keeps
//! starting short-lived threads (as qemu's I/O thread pool does) until `calm`;
//! `spawn` starts a thread that lives until exit and prints its id; end of input
//! exits. Each command but `stop-worker` answers one line.

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, Ordering};

fn main() {
    let len: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(16 << 20);
    let huge = std::env::args().nth(2).is_some_and(|a| a == "huge");
    // SAFETY: a fresh private anonymous mapping; only this process uses it.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | if huge { libc::MAP_HUGETLB } else { 0 },
            -1,
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED, "mmap failed");
    // Touch every page so each one is resident somewhere.
    // SAFETY: the mapping is `len` bytes long and writable.
    unsafe { std::ptr::write_bytes(addr as *mut u8, 0x5a, len) };

    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let worker = std::thread::Builder::new()
        .name("CPU 1/KVM".into())
        .spawn(move || {
            tid_tx.send(nix::unistd::gettid().as_raw()).unwrap();
            let _ = stop_rx.recv();
        })
        .unwrap();
    let worker_tid = tid_rx.recv().unwrap();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} {} {} {} {}",
        std::process::id(),
        nix::unistd::gettid().as_raw(),
        worker_tid,
        addr as u64,
        len
    )
    .unwrap();
    out.flush().unwrap();
    drop(out);
    let mut stop = Some(stop_tx);
    let mut worker = Some(worker);
    let mut churner: Option<(std::sync::Arc<AtomicBool>, std::thread::JoinHandle<u64>)> = None;
    // Threads started by `spawn` wait on this until the process exits.
    let (_park_tx, park_rx) = std::sync::mpsc::channel::<()>();
    let park_rx = std::sync::Arc::new(std::sync::Mutex::new(park_rx));
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        match line.trim() {
            "stop-worker" => {
                stop.take();
                if let Some(w) = worker.take() {
                    w.join().unwrap();
                }
                println!("stopped");
            }
            "churn" => {
                let calm = std::sync::Arc::new(AtomicBool::new(false));
                let c = calm.clone();
                let h = std::thread::spawn(move || {
                    let mut started = 0u64;
                    while !c.load(Ordering::Relaxed) {
                        let short: Vec<_> = (0..4)
                            .map(|_| {
                                std::thread::spawn(|| {
                                    std::thread::sleep(std::time::Duration::from_micros(500))
                                })
                            })
                            .collect();
                        started += short.len() as u64;
                        for t in short {
                            t.join().unwrap();
                        }
                    }
                    started
                });
                churner = Some((calm, h));
                println!("churning");
            }
            "calm" => {
                let started = churner.take().map_or(0, |(calm, h)| {
                    calm.store(true, Ordering::Relaxed);
                    h.join().unwrap()
                });
                println!("calm {started}");
            }
            "spawn" => {
                let (tx, rx) = std::sync::mpsc::channel();
                let park = park_rx.clone();
                std::thread::spawn(move || {
                    tx.send(nix::unistd::gettid().as_raw()).unwrap();
                    let _ = park.lock().map(|r| r.recv());
                });
                println!("{}", rx.recv().unwrap());
            }
            _ => {}
        }
        std::io::stdout().flush().unwrap();
    }
}
