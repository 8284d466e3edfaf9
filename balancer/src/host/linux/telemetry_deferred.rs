//! Telemetry that loads on its own thread while the daemon already balances.
//!
//! Why: loading and verifying the eBPF programs takes a while (about 8 s on the
//! emulated 4-node lab guest, well under a second on real hardware), and nothing the
//! first ticks need depends on it: placement and memory come from procfs and
//! numa_maps. So the daemon starts with a source that says "loading", and the real
//! source takes over at the first observation after it is ready; it is then told the
//! threads to watch at once, so no VM is missed.

use std::sync::mpsc::{self, Receiver, TryRecvError};

use super::telemetry_input::{NoTelemetry, TelemetrySource, TelemetryStatus, TrackedVm};
use crate::model::{Snapshot, VmId};
use std::collections::BTreeSet;

/// A [`TelemetrySource`] whose real source is still being loaded.
pub struct DeferredTelemetry {
    pending: Option<Receiver<Box<dyn TelemetrySource>>>,
    current: Box<dyn TelemetrySource>,
    tracked: Vec<TrackedVm>,
}

impl DeferredTelemetry {
    /// Runs `load` on a new thread; until it returns, the source reports "loading".
    pub fn spawn(load: impl FnOnce() -> Box<dyn TelemetrySource> + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("ebpf-load".into())
            .spawn(move || {
                // The receiver may be gone when the daemon stopped meanwhile.
                let _ = tx.send(load());
            });
        let (pending, current): (_, Box<dyn TelemetrySource>) = match spawned {
            Ok(_) => (
                Some(rx),
                Box::new(NoTelemetry::new("the eBPF programs are still loading")),
            ),
            Err(e) => (
                None,
                Box::new(NoTelemetry::new(format!(
                    "cannot start the loader thread: {e}"
                ))),
            ),
        };
        Self {
            pending,
            current,
            tracked: Vec::new(),
        }
    }

    /// Takes over the loaded source once it is there.
    fn poll(&mut self) {
        let Some(rx) = &self.pending else {
            return;
        };
        match rx.try_recv() {
            Ok(source) => {
                self.current = source;
                self.pending = None;
                self.current.track(&self.tracked);
                let st = self.current.status();
                let active: Vec<&str> = st
                    .features
                    .iter()
                    .filter(|f| f.available)
                    .map(|f| f.name.as_str())
                    .collect();
                match (&st.reason, st.available) {
                    (Some(why), false) => tracing::warn!(
                        %why,
                        "eBPF telemetry unavailable: balancing from procfs alone"
                    ),
                    _ => tracing::info!(features = ?active, "eBPF telemetry loaded"),
                }
            }
            Err(TryRecvError::Empty) => {}
            Err(TryRecvError::Disconnected) => {
                self.pending = None;
                self.current = Box::new(NoTelemetry::new("the eBPF loader thread failed"));
                tracing::warn!("the eBPF loader thread failed: balancing from procfs alone");
            }
        }
    }
}

impl TelemetrySource for DeferredTelemetry {
    fn status(&self) -> TelemetryStatus {
        self.current.status()
    }

    fn track(&mut self, vms: &[TrackedVm]) {
        self.poll();
        self.tracked = vms.to_vec();
        self.current.track(vms);
    }

    fn fill(&mut self, snapshot: &mut Snapshot, quiet: &BTreeSet<VmId>) {
        self.poll();
        self.current.fill(snapshot, quiet);
    }

    fn active(&self) -> bool {
        self.current.active()
    }

    fn wake_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.current.wake_fd()
    }

    fn take_wakes(&mut self) -> Vec<crate::telemetry::WakeEvent> {
        self.current.take_wakes()
    }

    fn cost(&self) -> Option<crate::telemetry::ProgramCost> {
        self.current.cost()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Records what it was told to track.
    struct Recorder(Arc<Mutex<Vec<u32>>>);

    impl TelemetrySource for Recorder {
        fn status(&self) -> TelemetryStatus {
            TelemetryStatus {
                available: true,
                reason: None,
                features: Vec::new(),
            }
        }
        fn track(&mut self, vms: &[TrackedVm]) {
            *self.0.lock().unwrap() = vms.iter().map(|v| v.pid).collect();
        }
        fn fill(&mut self, _snapshot: &mut Snapshot, _quiet: &BTreeSet<VmId>) {}
    }

    #[test]
    fn says_loading_then_hands_over_with_the_tracked_vms() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let s2 = seen.clone();
        let mut d = DeferredTelemetry::spawn(move || {
            let _ = go_rx.recv();
            Box::new(Recorder(s2))
        });
        assert!(!d.status().available);
        assert!(d.status().reason.unwrap().contains("loading"));
        let vm = TrackedVm {
            pid: 42,
            ..Default::default()
        };
        d.track(std::slice::from_ref(&vm));
        go_tx.send(()).unwrap();
        // The loader thread hands over soon; each observation polls.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !d.status().available && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
            d.fill(&mut Snapshot::default(), &BTreeSet::new());
        }
        assert!(d.status().available);
        assert_eq!(*seen.lock().unwrap(), vec![42]);
    }

    #[test]
    fn a_failed_loader_leaves_a_reason() {
        let mut d = DeferredTelemetry::spawn(|| panic!("loader failed"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while d.pending.is_some() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
            d.fill(&mut Snapshot::default(), &BTreeSet::new());
        }
        assert!(d.status().reason.unwrap().contains("failed"));
    }
}
