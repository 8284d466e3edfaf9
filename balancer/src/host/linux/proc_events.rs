//! The kernel's process event connector (netlink `NETLINK_CONNECTOR`, `CN_IDX_PROC`).
//!
//! Rescanning all of `/proc` every tick costs one directory walk and a comm read per
//! process; the connector instead pushes an event on every exec, exit and thread rename
//! (`PROC_EVENT_EXEC`, `PROC_EVENT_EXIT`, `PROC_EVENT_COMM`). The observer drains the
//! socket each tick without blocking and looks only at the processes named in events.
//! The socket needs `CAP_NET_ADMIN`, and events are lost when its buffer overflows
//! (`ENOBUFS`): both are reported so the observer falls back to a full rescan, which it
//! also does periodically as a safety net.
//!
//! Wire format (all host-endian): `nlmsghdr` (16 bytes), `cn_msg` (id.idx, id.val, seq,
//! ack: u32; len, flags: u16 = 20 bytes), then `proc_event`: what u32, cpu u32,
//! timestamp_ns u64, and the event data (exec: pid, tgid; exit: pid, tgid, code,
//! signal, parent pid, parent tgid; comm: pid, tgid, `comm[16]`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_CONNECTOR: libc::c_int = 11;
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDR: usize = 16;
const CN_MSG_HDR: usize = 20;

const PROC_EVENT_FORK: u32 = 0x1;
const PROC_EVENT_EXEC: u32 = 0x2;
const PROC_EVENT_COMM: u32 = 0x200;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;

/// One process event of interest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProcEvent {
    /// A new thread or process (`tgid` is the process; `pid` the new task).
    Fork {
        pid: u32,
        tgid: u32,
    },
    Exec {
        pid: u32,
        tgid: u32,
    },
    /// A task renamed itself (qemu names vCPU threads this way).
    Comm {
        pid: u32,
        tgid: u32,
        comm: String,
    },
    Exit {
        pid: u32,
        tgid: u32,
    },
}

/// A subscribed, non-blocking connector socket.
#[derive(Debug)]
pub struct ProcEvents {
    fd: OwnedFd,
}

/// What one drain of the socket gave.
#[derive(Debug, Default)]
pub struct Drained {
    pub events: Vec<ProcEvent>,
    /// The kernel dropped events (socket buffer overflow): rescan.
    pub overflowed: bool,
}

impl std::os::fd::AsFd for ProcEvents {
    /// Readable while events wait to be drained.
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl ProcEvents {
    /// Opens the socket and subscribes to process events.
    pub fn subscribe() -> io::Result<Self> {
        // SAFETY: plain socket syscall; the fd is owned right after.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                NETLINK_CONNECTOR,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh, valid fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // Every fork and exit on the host is an event: a large buffer rides out bursts
        // between two drains (FORCE passes rmem_max with CAP_NET_ADMIN).
        let size: libc::c_int = 8 << 20;
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
            // SAFETY: setsockopt reads one c_int.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    &size as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
            if rc == 0 {
                break;
            }
        }
        // SAFETY: zeroed sockaddr_nl is valid; fields set below.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = CN_IDX_PROC;
        addr.nl_pid = 0;
        // SAFETY: addr is a valid sockaddr_nl of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // Subscribe: nlmsghdr + cn_msg + op.
        let total = NLMSG_HDR + CN_MSG_HDR + 4;
        let mut msg = Vec::with_capacity(total);
        msg.extend_from_slice(&(total as u32).to_ne_bytes());
        msg.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&std::process::id().to_ne_bytes());
        msg.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
        msg.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&0u32.to_ne_bytes()); // ack
        msg.extend_from_slice(&4u16.to_ne_bytes()); // len
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&PROC_CN_MCAST_LISTEN.to_ne_bytes());
        // SAFETY: msg is a valid buffer of msg.len() bytes.
        let n = unsafe {
            libc::send(
                fd.as_raw_fd(),
                msg.as_ptr() as *const libc::c_void,
                msg.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// Reads every pending event without blocking.
    pub fn drain(&mut self) -> io::Result<Drained> {
        let mut out = Drained::default();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            // SAFETY: buf is valid for buf.len() bytes.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => return Ok(out),
                    Some(libc::ENOBUFS) => {
                        out.overflowed = true;
                        continue;
                    }
                    Some(libc::EINTR) => continue,
                    _ => return Err(e),
                }
            }
            if n == 0 {
                return Ok(out);
            }
            parse_datagram(&buf[..n as usize], &mut out.events);
        }
    }
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// Parses one datagram (one or more netlink messages). Short or foreign messages are
/// skipped.
pub fn parse_datagram(mut b: &[u8], events: &mut Vec<ProcEvent>) {
    while b.len() >= NLMSG_HDR {
        let Some(len) = u32_at(b, 0).map(|l| l as usize) else {
            return;
        };
        if len < NLMSG_HDR || len > b.len() {
            return;
        }
        if let Some(ev) = parse_message(&b[..len]) {
            events.push(ev);
        }
        // Messages are 4-byte aligned.
        let adv = (len + 3) & !3;
        b = b.get(adv..).unwrap_or(&[]);
    }
}

fn parse_message(m: &[u8]) -> Option<ProcEvent> {
    let cn = m.get(NLMSG_HDR..)?;
    if u32_at(cn, 0)? != CN_IDX_PROC || u32_at(cn, 4)? != CN_VAL_PROC {
        return None;
    }
    let ev = cn.get(CN_MSG_HDR..)?;
    let what = u32_at(ev, 0)?;
    let data = ev.get(16..)?;
    let (a, b) = (u32_at(data, 0)?, u32_at(data, 4)?);
    match what {
        // fork: parent_pid, parent_tgid, child_pid, child_tgid
        PROC_EVENT_FORK => Some(ProcEvent::Fork {
            pid: u32_at(data, 8)?,
            tgid: u32_at(data, 12)?,
        }),
        PROC_EVENT_EXEC => Some(ProcEvent::Exec { pid: a, tgid: b }),
        PROC_EVENT_EXIT => Some(ProcEvent::Exit { pid: a, tgid: b }),
        PROC_EVENT_COMM => {
            let raw = data.get(8..24)?;
            let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
            Some(ProcEvent::Comm {
                pid: a,
                tgid: b,
                comm: String::from_utf8_lossy(&raw[..end]).into_owned(),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(what: u32, data: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        let total = NLMSG_HDR + CN_MSG_HDR + 16 + data.len();
        m.extend_from_slice(&(total as u32).to_ne_bytes());
        m.extend_from_slice(&[0; 12]);
        m.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
        m.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
        m.extend_from_slice(&[0; 12]);
        m.extend_from_slice(&what.to_ne_bytes());
        m.extend_from_slice(&[0; 12]);
        m.extend_from_slice(data);
        m
    }

    #[test]
    fn parses_events() {
        let mut d = Vec::new();
        for v in [7u32, 7] {
            d.extend_from_slice(&v.to_ne_bytes());
        }
        let mut comm_data = d.clone();
        comm_data.extend_from_slice(b"CPU 0/KVM\0\0\0\0\0\0\0");
        let mut buf = message(PROC_EVENT_EXEC, &d);
        buf.extend(message(PROC_EVENT_COMM, &comm_data));
        buf.extend(message(0x4, &d)); // uid change: ignored
        let mut exit = d.clone();
        exit.extend_from_slice(&[0; 16]);
        buf.extend(message(PROC_EVENT_EXIT, &exit));
        buf.extend_from_slice(&[1, 2, 3]); // trailing garbage
        let mut events = Vec::new();
        parse_datagram(&buf, &mut events);
        assert_eq!(
            events,
            vec![
                ProcEvent::Exec { pid: 7, tgid: 7 },
                ProcEvent::Comm {
                    pid: 7,
                    tgid: 7,
                    comm: "CPU 0/KVM".into()
                },
                ProcEvent::Exit { pid: 7, tgid: 7 },
            ]
        );
        // Truncated message: nothing, no panic.
        let mut events = Vec::new();
        parse_datagram(&message(PROC_EVENT_EXEC, &[1, 2])[..40], &mut events);
        parse_datagram(&message(PROC_EVENT_EXEC, &[1, 2]), &mut events);
        assert!(events.is_empty());
    }
}
