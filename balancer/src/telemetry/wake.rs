//! The programs' wake channel: a ring buffer of [`WakeEvent`]s and the switch that
//! lets them send one.
//!
//! Why a switch and not a rate in the programs: a rate needs a clock read on every
//! event the programs consider, and the programs read no clock (see the eBPF
//! crate's docs). The daemon sets the switch when it observes; the first event after
//! that is sent and clears it. So whatever the programs see, the daemon is woken at
//! most once per observation (one per CPU in a race), and it decides what a wake is
//! worth from the events it reads.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use aya::Ebpf;
use aya::maps::{Array, MapData, RingBuf};
use balancer_common::{WakeEvent, names};

use super::TelemetryError;

/// The ring buffer the programs send wakes through, and its switch.
pub struct WakeChannel {
    ring: RingBuf<MapData>,
    armed: Array<MapData, u32>,
}

impl std::fmt::Debug for WakeChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WakeChannel")
            .field("fd", &self.ring.as_raw_fd())
            .finish()
    }
}

impl WakeChannel {
    /// Takes the two maps out of the loaded object.
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, TelemetryError> {
        let ring = ebpf
            .take_map(names::WAKE_EVENTS)
            .ok_or_else(|| TelemetryError::map(names::WAKE_EVENTS, "not in the object"))?;
        let ring =
            RingBuf::try_from(ring).map_err(|e| TelemetryError::map(names::WAKE_EVENTS, e))?;
        let armed = ebpf
            .take_map(names::WAKE_ARMED)
            .ok_or_else(|| TelemetryError::map(names::WAKE_ARMED, "not in the object"))?;
        let armed =
            Array::try_from(armed).map_err(|e| TelemetryError::map(names::WAKE_ARMED, e))?;
        Ok(Self { ring, armed })
    }

    /// Lets the programs send the next wake.
    pub fn arm(&mut self) -> Result<(), TelemetryError> {
        self.armed
            .set(0, 1, 0)
            .map_err(|e| TelemetryError::map(names::WAKE_ARMED, e))
    }

    /// The wakes sent since the last call, oldest first. Records of another size
    /// (an object of another version) are skipped.
    pub fn drain(&mut self) -> Vec<WakeEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() == std::mem::size_of::<WakeEvent>() {
                // SAFETY: `WakeEvent` is plain old data of exactly this size; the
                // record may be unaligned, hence the unaligned read.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<WakeEvent>()) });
            }
        }
        out
    }
}

impl AsFd for WakeChannel {
    /// Readable while the ring buffer holds wakes: what the daemon polls.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}
