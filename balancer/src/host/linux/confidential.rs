//! Guests whose memory must never be migrated, as the qemu command line declares them.
//!
//! A confidential guest's memory is encrypted or hidden from the host (AMD SEV,
//! SEV-SNP, Intel TDX, POWER PEF, s390x PV, Arm CCA). Its pages are pinned by KVM
//! (SEV registers its regions with long-term pins) or live in guest_memfd (SEV-SNP,
//! TDX), which the kernel does not migrate; where a move does go through, operators
//! have reported guests breaking. So vmbalancer moves none of such a VM's pages: not
//! its guest RAM, and not the qemu process's own memory either, so the rule an
//! operator reads is one sentence with no exception. qemu spells it so:
//!
//! - `-object sev-guest,id=X` (also `sev-snp-guest`, `tdx-guest`, `pef-guest`,
//!   `s390-pv-guest`, `rme-guest`), keyval or JSON as libvirt writes it
//!   (`<launchSecurity>`);
//! - `-machine ...,confidential-guest-support=X` naming such an object (the older
//!   spelling is `memory-encryption=X`): any object so named counts, even of a type
//!   not listed here;
//! - a memory backend with `x-guest-memfd=on` (qemu's experimental fully shared
//!   guest_memfd RAM, non-confidential but just as unmovable). `guest-memfd=on` is
//!   read too, the name the option would take when it stops being experimental.
//!
//! A listed object without the machine property is still taken as confidential: a
//! wrong "yes" costs only memory moves, a wrong "no" can break a guest.
//!
//! The vCPUs of such a VM may still move: a vCPU thread's affinity is ordinary
//! scheduling (the kernel's scheduler moves these threads all the time) and does not
//! touch guest memory. But since the memory can never follow, the engine only ever
//! places them where the memory is, and never moves them away for CPU balance.

use crate::model::MemoryNotMovable;

/// The QOM types of qemu's confidential-guest-support objects.
const CONFIDENTIAL_TYPES: &[&str] = &[
    "sev-guest",
    "sev-snp-guest",
    "tdx-guest",
    "pef-guest",
    "s390-pv-guest",
    "rme-guest",
];

/// What one `-object` says that matters here.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectSeen {
    pub qom_type: String,
    pub id: String,
    /// `x-guest-memfd=on` (or `guest-memfd=on`) on a memory backend.
    pub guest_memfd: bool,
}

impl ObjectSeen {
    /// From the `(key, value)` pairs of an `-object` (`qom-type` first or anywhere).
    pub fn from_pairs(pairs: &[(String, String)]) -> Self {
        let get = |key: &str| {
            pairs
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        let on = |k: &str| matches!(get(k), Some("on" | "yes" | "true"));
        Self {
            qom_type: get("qom-type").unwrap_or_default().to_string(),
            id: get("id").unwrap_or_default().to_string(),
            guest_memfd: get("qom-type").is_some_and(|t| t.starts_with("memory-backend-"))
                && (on("x-guest-memfd") || on("guest-memfd")),
        }
    }
}

/// Whether the objects and the machine's `confidential-guest-support` (or
/// `memory-encryption`) property, as `(key, id)`, make the guest's memory unmovable.
pub fn detect(
    objects: &[ObjectSeen],
    machine_cgs: Option<&(String, String)>,
) -> Option<MemoryNotMovable> {
    if let Some((key, id)) = machine_cgs.filter(|(_, id)| !id.is_empty()) {
        let kind = objects
            .iter()
            .find(|o| &o.id == id)
            .map_or("confidential-guest-support", |o| o.qom_type.as_str());
        return Some(MemoryNotMovable {
            kind: kind.to_string(),
            option: format!("-machine {key}={id}"),
        });
    }
    if let Some(o) = objects
        .iter()
        .find(|o| CONFIDENTIAL_TYPES.contains(&o.qom_type.as_str()))
    {
        return Some(MemoryNotMovable {
            kind: o.qom_type.clone(),
            option: format!("-object {},id={}", o.qom_type, o.id),
        });
    }
    objects
        .iter()
        .find(|o| o.guest_memfd)
        .map(|o| MemoryNotMovable {
            kind: "guest_memfd".to_string(),
            option: format!("-object {},id={},x-guest-memfd=on", o.qom_type, o.id),
        })
}

#[cfg(test)]
mod tests {
    use crate::host::linux::discovery::parse_qemu_cmdline;
    use crate::model::MemoryNotMovable;

    fn parse(s: &str) -> Option<MemoryNotMovable> {
        let argv: Vec<String> = s.split_whitespace().map(str::to_string).collect();
        parse_qemu_cmdline(&argv).not_movable
    }

    fn kind(s: &str) -> Option<String> {
        parse(s).map(|n| n.kind)
    }

    #[test]
    fn every_spelling_of_a_confidential_guest() {
        // The documented SEV form, and the pre-5.2 machine property.
        let sev = parse(
            "qemu-system-x86_64 -machine q35,confidential-guest-support=sev0 \
             -object sev-guest,id=sev0,cbitpos=47,reduced-phys-bits=1",
        )
        .unwrap();
        assert_eq!(sev.kind, "sev-guest");
        assert_eq!(sev.option, "-machine confidential-guest-support=sev0");
        assert_eq!(
            kind("qemu-system-x86_64 -object sev-guest,id=s -machine pc,memory-encryption=s")
                .as_deref(),
            Some("sev-guest")
        );
        assert_eq!(
            kind("q -machine q35,confidential-guest-support=snp -object sev-snp-guest,id=snp,cbitpos=51")
                .as_deref(),
            Some("sev-snp-guest")
        );
        assert_eq!(
            kind("q -object tdx-guest,id=tdx0 -machine q35,kernel-irqchip=split,confidential-guest-support=tdx0")
                .as_deref(),
            Some("tdx-guest")
        );
        assert_eq!(
            kind("q -M pseries -object pef-guest,id=pef0").as_deref(),
            Some("pef-guest")
        );
        assert_eq!(
            kind(
                "q -M s390-ccw-virtio,confidential-guest-support=pv0 -object s390-pv-guest,id=pv0"
            )
            .as_deref(),
            Some("s390-pv-guest")
        );
        // The object alone (no machine property) still counts.
        let alone = parse("q -object tdx-guest,id=t").unwrap();
        assert_eq!(alone.option, "-object tdx-guest,id=t");
        // A machine property naming an object of a type this list does not know.
        assert_eq!(
            kind("q -machine q35,confidential-guest-support=x -object future-guest,id=x")
                .as_deref(),
            Some("future-guest")
        );
        assert_eq!(
            kind("q -machine q35,confidential-guest-support=missing").as_deref(),
            Some("confidential-guest-support")
        );
    }

    #[test]
    fn libvirt_json_launch_security() {
        let argv: Vec<String> = [
            "/usr/bin/qemu-system-x86_64",
            "-machine",
            "pc-q35-8.2,usb=off,dump-guest-core=off,memory-backend=pc.ram,confidential-guest-support=lsec0",
            "-object",
            r#"{"qom-type":"memory-backend-ram","id":"pc.ram","size":2147483648}"#,
            "-object",
            r#"{"qom-type":"sev-snp-guest","id":"lsec0","cbitpos":51,"reduced-phys-bits":1,"policy":196608}"#,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let cfg = parse_qemu_cmdline(&argv);
        assert_eq!(cfg.not_movable.unwrap().kind, "sev-snp-guest");
        assert_eq!(cfg.backends.len(), 1);
    }

    #[test]
    fn guest_memfd_backing() {
        let n = parse(
            "q -machine q35,memory-backend=ram0 -object memory-backend-memfd,id=ram0,size=1G,x-guest-memfd=on,share=on",
        )
        .unwrap();
        assert_eq!(n.kind, "guest_memfd");
        assert!(n.to_string().contains("guest_memfd"), "{n}");
        assert_eq!(
            kind(r#"q -object {"qom-type":"memory-backend-memfd","id":"m","size":1024,"guest-memfd":true}"#)
                .as_deref(),
            Some("guest_memfd")
        );
    }

    #[test]
    fn ordinary_guests_are_movable() {
        for s in [
            "qemu-system-x86_64 -m 1G -smp 2",
            "q -object memory-backend-memfd,id=m,size=1G,x-guest-memfd=off",
            "q -object memory-backend-ram,id=m,size=1G -machine q35,memory-backend=m",
            "q -object secret,id=sec0,data=x -object iothread,id=io1",
            "q -machine q35,confidential-guest-support=",
            // Words that only look alike.
            "q -name sev-guest -append sev-guest",
        ] {
            assert_eq!(parse(s), None, "{s}");
        }
    }
}
