//! Checks before anything is loaded, in the order an operator fixes them: privileges
//! (CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN), then the kernel version. Both read
//! procfs under a root directory so tests use fixture trees.

use std::path::Path;

use super::TelemetryError;

/// Oldest kernel supported: CAP_BPF, fentry and BPF global data all exist from 5.8.
pub const MIN_KERNEL: (u32, u32) = (5, 8);

/// CAP_BPF (39) and CAP_PERFMON (38), or CAP_SYS_ADMIN (21), in the effective set.
pub(super) fn check_privileges(proc_root: &Path) -> Result<(), TelemetryError> {
    let status = std::fs::read_to_string(proc_root.join("self/status"))
        .map_err(|e| TelemetryError::io("reading /proc/self/status", e))?;
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |bit: u32| cap_eff & (1u64 << bit) != 0;
    if has(21) || (has(39) && has(38)) {
        Ok(())
    } else {
        Err(TelemetryError::MissingCapability)
    }
}

pub(super) fn check_kernel_version(proc_root: &Path) -> Result<(), TelemetryError> {
    let release = std::fs::read_to_string(proc_root.join("sys/kernel/osrelease"))
        .map_err(|e| TelemetryError::io("reading the kernel release", e))?;
    let release = release.trim();
    let version = parse_release(release);
    if version.is_some_and(|v| v < MIN_KERNEL) {
        return Err(TelemetryError::KernelTooOld {
            found: release.to_owned(),
            needed: format!("{}.{}", MIN_KERNEL.0, MIN_KERNEL.1),
        });
    }
    Ok(())
}

/// `6.18.44-foo` -> (6, 18).
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it (best effort).
pub(super) fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_release_parsing() {
        assert_eq!(parse_release("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_release("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(parse_release("6.1"), Some((6, 1)));
        assert_eq!(parse_release("garbage"), None);
        assert!(parse_release("5.4.0").unwrap() < MIN_KERNEL);
        assert!(parse_release("6.1.0").unwrap() >= MIN_KERNEL);
    }

    #[test]
    fn capabilities_from_proc_status() {
        let root = std::env::temp_dir().join(format!("vmbalancer-caps-{}", std::process::id()));
        std::fs::create_dir_all(root.join("self")).unwrap();
        let check = |cap_eff: &str| {
            std::fs::write(
                root.join("self/status"),
                format!("Name:\ttest\nCapInh:\t0000000000000000\nCapEff:\t{cap_eff}\n"),
            )
            .unwrap();
            check_privileges(&root)
        };
        assert!(check("000001ffffffffff").is_ok(), "root");
        assert!(check("000000c000000000").is_ok(), "CAP_BPF + CAP_PERFMON");
        assert!(check("0000000000200000").is_ok(), "CAP_SYS_ADMIN");
        assert!(matches!(
            check("0000008000000000"),
            Err(TelemetryError::MissingCapability)
        ));
        assert!(matches!(
            check("0000000000000000"),
            Err(TelemetryError::MissingCapability)
        ));
        std::fs::create_dir_all(root.join("sys/kernel")).unwrap();
        std::fs::write(root.join("sys/kernel/osrelease"), "5.4.0-1-amd64\n").unwrap();
        let e = check_kernel_version(&root).unwrap_err();
        assert_eq!(
            e.to_string(),
            "kernel 5.4.0-1-amd64 is too old: vmbalancer needs Linux 5.8 or newer"
        );
        std::fs::write(root.join("sys/kernel/osrelease"), "6.1.0-30-amd64\n").unwrap();
        assert!(check_kernel_version(&root).is_ok());
        std::fs::remove_dir_all(root).unwrap();
    }
}
