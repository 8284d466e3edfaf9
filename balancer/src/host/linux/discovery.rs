//! Which processes are VMs, and what their qemu command line says about them.
//!
//! A qemu process is recognised by its comm (`qemu-kvm`, `qemu-system-*`, truncated
//! by the kernel to 15 bytes), the basename of its executable, or `argv[0]`. Its
//! command line is the one place that states the guest's size (`-m`, `-smp`), how guest
//! RAM is backed (`memory-backend-{ram,file,memfd}`, `-mem-path`), the guest NUMA cells
//! (`-numa node,...`) and any memory binding the operator asked for (`host-nodes=`,
//! `policy=`). libvirt writes `-object` either as qemu keyval (`a=b,c=d`, commas
//! doubled inside values) or as JSON; both are read.
//!
//! Two more facts come from it: the QMP monitor sockets that can name the vCPU
//! threads when qemu runs without `debug-threads=on` ([`super::qmp`]), and whether
//! the guest's memory may be migrated at all ([`super::confidential`]).

use super::confidential::{self, ObjectSeen};
use super::qmp::{self, QmpSocket};
use crate::model::{GuestCell, MemoryBacking, MemoryNotMovable, NodeSet, ThreadKind};

/// Is this process qemu?
pub fn is_qemu(comm: &str, exe_basename: Option<&str>, argv0: Option<&str>) -> bool {
    let named = |n: &str| n == "qemu-kvm" || n.starts_with("qemu-system-");
    named(comm)
        || exe_basename.is_some_and(named)
        || argv0
            .map(|a| a.rsplit('/').next().unwrap_or(a))
            .is_some_and(named)
}

/// Classifies a thread of a qemu process by its name (`-name ...,debug-threads=on`
/// names vCPU threads `CPU n/KVM` (`CPU n/TCG` under emulation) and I/O threads
/// `IO <id>`).
pub fn classify_thread(pid: u32, tid: u32, comm: &str) -> ThreadKind {
    if let Some(n) = comm
        .strip_prefix("CPU ")
        .and_then(|r| r.strip_suffix("/KVM").or_else(|| r.strip_suffix("/TCG")))
        .and_then(|n| n.parse().ok())
    {
        return ThreadKind::Vcpu(n);
    }
    if comm.starts_with("IO ") || comm.starts_with("iothread") {
        return ThreadKind::Io;
    }
    if tid == pid {
        return ThreadKind::Emulator;
    }
    ThreadKind::Other
}

/// How one memory backend stores its RAM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum BackendKind {
    /// `memory-backend-ram`: anonymous memory.
    #[default]
    Ram,
    /// `memory-backend-file` with its `mem-path` (hugetlbfs when under a hugepage
    /// mount; the exact page size is confirmed from numa_maps).
    File { mem_path: String },
    /// `memory-backend-memfd`, optionally `hugetlb=on` with `hugetlbsize`.
    Memfd {
        hugetlb: bool,
        hugetlbsize_bytes: Option<u64>,
    },
}

/// One `-object memory-backend-*`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemBackend {
    pub id: String,
    pub kind: BackendKind,
    pub size_bytes: u64,
    pub host_nodes: Option<NodeSet>,
    /// `default`, `preferred`, `bind` or `interleave`.
    pub policy: Option<String>,
}

/// What a qemu command line says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QemuConfig {
    pub name: Option<String>,
    pub smp_cpus: Option<u32>,
    /// `-m` in bytes.
    pub mem_bytes: Option<u64>,
    pub backends: Vec<MemBackend>,
    /// Legacy `-mem-path DIR`.
    pub mem_path: Option<String>,
    /// `-machine ...,memory-backend=ID`.
    pub machine_memory_backend: Option<String>,
    /// `-machine TYPE,...` (or `type=TYPE`).
    pub machine_type: Option<String>,
    pub cells: Vec<GuestCell>,
    /// `memdev=` of each cell, parallel to `cells` (empty for `mem=` cells).
    pub cell_backend_ids: Vec<String>,
    /// QMP monitors listening on a unix socket (`-qmp`, `-chardev` + `-mon
    /// mode=control`), in command-line order.
    pub qmp_sockets: Vec<QmpSocket>,
    /// Why the guest's memory must never be migrated, when it must not.
    pub not_movable: Option<MemoryNotMovable>,
    /// Things that could not be understood, for the debug log.
    pub warnings: Vec<QemuArgError>,
}

/// A qemu option [`parse_qemu_cmdline`] could not understand: noted in
/// [`QemuConfig::warnings`], never fatal.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QemuArgError {
    #[error("bad -m size {0:?}")]
    MemSize(String),
    #[error("bad -smp {0:?}")]
    Smp(String),
    /// The JSON form of `-object`; `detail` is serde_json's message.
    #[error("bad JSON -object: {detail}")]
    ObjectJson { detail: String },
    #[error("JSON -object is not an object")]
    ObjectNotMap,
    #[error("bad host-nodes {value:?}: {source}")]
    HostNodes {
        value: String,
        source: crate::model::IdSetParseError,
    },
    #[error("memory backend {id:?} without size")]
    BackendNoSize { id: String },
    #[error("bad size {size:?} of memory backend {id:?}")]
    BackendSize { id: String, size: String },
    #[error("bad -numa nodeid {0:?}")]
    NumaNodeId(String),
    #[error("bad -numa cpus {value:?}: {source}")]
    NumaCpus {
        value: String,
        source: crate::model::IdSetParseError,
    },
    #[error("bad -numa mem {0:?}")]
    NumaMem(String),
}

impl QemuConfig {
    /// `-machine none`: a qemu without a guest, as libvirt starts one for a few
    /// seconds to ask an emulator for its capabilities over QMP (`-S -machine
    /// none,accel=...`). It has no vCPUs and no guest RAM: not a VM to balance.
    pub fn has_no_guest(&self) -> bool {
        self.machine_type.as_deref() == Some("none")
    }

    /// The backends holding guest RAM: those named by `-numa memdev=` or
    /// `-machine memory-backend=`; all memory backends when neither names any.
    pub fn ram_backends(&self) -> Vec<&MemBackend> {
        let mut ids: Vec<&str> = Vec::new();
        ids.extend(self.machine_memory_backend.as_deref());
        let named: Vec<&MemBackend> = self
            .backends
            .iter()
            .filter(|b| {
                ids.contains(&b.id.as_str()) || self.cell_memdevs().contains(&b.id.as_str())
            })
            .collect();
        if named.is_empty() {
            self.backends.iter().collect()
        } else {
            named
        }
    }

    fn cell_memdevs(&self) -> Vec<&str> {
        self.cell_backend_ids.iter().map(String::as_str).collect()
    }

    /// The guest RAM backing as the command line states it.
    pub fn backing(&self) -> MemoryBacking {
        if let Some(p) = &self.mem_path {
            return file_backing(p);
        }
        match self.ram_backends().first().map(|b| &b.kind) {
            None | Some(BackendKind::Ram) => MemoryBacking::Anonymous,
            Some(BackendKind::File { mem_path }) => file_backing(mem_path),
            Some(BackendKind::Memfd {
                hugetlb: true,
                hugetlbsize_bytes,
            }) => MemoryBacking::HugeTlb {
                page_size_bytes: hugetlbsize_bytes.unwrap_or(DEFAULT_HUGE_PAGE_BYTES),
            },
            Some(BackendKind::Memfd { .. }) => MemoryBacking::Memfd,
        }
    }

    /// Host nodes guest RAM is bound to by `host-nodes=` with `policy=bind` or
    /// `interleave`, with the policy: an operator's explicit placement.
    pub fn strict_memory_binding(&self) -> Option<(NodeSet, String)> {
        let mut nodes = NodeSet::new();
        let mut policy = None;
        for b in self.ram_backends() {
            if let (Some(h), Some(p)) = (&b.host_nodes, &b.policy)
                && (p == "bind" || p == "interleave")
            {
                nodes = nodes.union(h);
                policy.get_or_insert_with(|| p.clone());
            }
        }
        policy.map(|p| (nodes, p))
    }
}

/// The usual x86 huge page size, assumed until numa_maps shows the real one.
const DEFAULT_HUGE_PAGE_BYTES: u64 = 2 << 20;

fn file_backing(path: &str) -> MemoryBacking {
    if path.contains("hugepages") || path.contains("hugetlb") {
        MemoryBacking::HugeTlb {
            page_size_bytes: DEFAULT_HUGE_PAGE_BYTES,
        }
    } else {
        MemoryBacking::File
    }
}

/// Splits qemu keyval `a,b=c,d=e,,f` into (key, value) pairs; an element without `=`
/// has no key (`-name foo`, `-numa node`). `,,` is an escaped comma.
pub fn split_keyval(s: &str) -> Vec<(Option<String>, String)> {
    let mut elems = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                elems.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    elems.push(cur);
    elems
        .into_iter()
        .filter(|e| !e.is_empty())
        .map(|e| match e.split_once('=') {
            Some((k, v)) => (Some(k.to_string()), v.to_string()),
            None => (None, e),
        })
        .collect()
}

/// Parses a qemu size: a number with an optional K/M/G/T/P/E suffix (powers of 1024,
/// optional trailing `B`); a bare number is in `default_unit` bytes.
pub fn parse_size(s: &str, default_unit: u64) -> Option<u64> {
    let s = s.trim();
    let s = s
        .strip_suffix(['b', 'B'])
        .filter(|r| r.ends_with(|c: char| c.is_ascii_alphabetic()))
        .unwrap_or(s);
    let (digits, mult) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 1u64 << 10),
        'm' | 'M' => (&s[..s.len() - 1], 1 << 20),
        'g' | 'G' => (&s[..s.len() - 1], 1 << 30),
        't' | 'T' => (&s[..s.len() - 1], 1 << 40),
        'p' | 'P' => (&s[..s.len() - 1], 1 << 50),
        'e' | 'E' => (&s[..s.len() - 1], 1 << 60),
        _ => (s, default_unit),
    };
    if let Ok(n) = digits.parse::<u64>() {
        return n.checked_mul(mult);
    }
    // qemu accepts fractions (`1.5G`).
    let f: f64 = digits.parse().ok()?;
    let v = f * mult as f64;
    (f.is_finite() && f >= 0.0 && v < u64::MAX as f64).then_some(v as u64)
}

/// Parses the command line of a qemu process. Never fails: what cannot be understood is
/// noted in `warnings` and left unset.
pub fn parse_qemu_cmdline(argv: &[String]) -> QemuConfig {
    let mut cfg = QemuConfig::default();
    let mut monitors = qmp::MonitorOptions::default();
    let mut objects: Vec<ObjectSeen> = Vec::new();
    let mut machine_cgs: Option<(String, String)> = None;
    let mut i = 1;
    while i < argv.len() {
        let opt = argv[i].trim_start_matches('-');
        let is_opt = argv[i].starts_with('-');
        let val = argv.get(i + 1).map(String::as_str);
        i += 1;
        if !is_opt {
            continue;
        }
        let Some(val) = val else { break };
        let known = matches!(
            opt,
            "name"
                | "m"
                | "smp"
                | "object"
                | "numa"
                | "mem-path"
                | "machine"
                | "M"
                | "qmp"
                | "qmp-pretty"
                | "chardev"
                | "mon"
        );
        if !known {
            continue;
        }
        i += 1;
        match opt {
            "name" => {
                for (k, v) in split_keyval(val) {
                    match k.as_deref() {
                        None | Some("guest") => {
                            cfg.name.get_or_insert(v);
                        }
                        _ => {}
                    }
                }
            }
            "m" => {
                for (k, v) in split_keyval(val) {
                    if matches!(k.as_deref(), None | Some("size")) {
                        match parse_size(&v, 1 << 20) {
                            Some(b) => cfg.mem_bytes = Some(b),
                            None => cfg.warnings.push(QemuArgError::MemSize(v)),
                        }
                    }
                }
            }
            "smp" => {
                cfg.smp_cpus = parse_smp(val).or_else(|| {
                    cfg.warnings.push(QemuArgError::Smp(val.to_string()));
                    None
                })
            }
            "mem-path" => cfg.mem_path = Some(val.to_string()),
            "machine" | "M" => {
                for (k, v) in split_keyval(val) {
                    match k.as_deref() {
                        None | Some("type") => cfg.machine_type = Some(v),
                        Some("memory-backend") => cfg.machine_memory_backend = Some(v),
                        Some(key @ ("confidential-guest-support" | "memory-encryption")) => {
                            machine_cgs = Some((key.to_string(), v));
                        }
                        _ => {}
                    }
                }
            }
            "object" => match object_pairs(val) {
                Ok(pairs) => {
                    objects.push(ObjectSeen::from_pairs(&pairs));
                    match backend_of(&pairs) {
                        Ok(Some(b)) => cfg.backends.push(b),
                        Ok(None) => {}
                        Err(w) => cfg.warnings.push(w),
                    }
                }
                Err(w) => cfg.warnings.push(w),
            },
            "qmp" | "qmp-pretty" => monitors.qmp(val),
            "chardev" => monitors.chardev(val),
            "mon" => monitors.mon(val),
            "numa" => {
                if let Err(w) = parse_numa(val, &mut cfg) {
                    cfg.warnings.push(w);
                }
            }
            _ => {}
        }
    }
    cfg.qmp_sockets = monitors.sockets();
    cfg.not_movable = confidential::detect(&objects, machine_cgs.as_ref());
    // Fill cell sizes and bindings from their backends.
    for (cell, id) in cfg.cells.iter_mut().zip(cfg.cell_backend_ids.iter()) {
        if let Some(b) = cfg.backends.iter().find(|b| &b.id == id) {
            cell.memory_bytes = b.size_bytes;
            cell.host_nodes = b.host_nodes.clone();
        }
    }
    cfg
}

fn parse_smp(val: &str) -> Option<u32> {
    let mut cpus = None;
    let mut product: u32 = 1;
    let mut any_topo = false;
    for (k, v) in split_keyval(val) {
        let n: u32 = v.parse().ok()?;
        match k.as_deref() {
            None | Some("cpus") => cpus = Some(n),
            Some("sockets" | "dies" | "clusters" | "cores" | "threads" | "books" | "drawers") => {
                product = product.checked_mul(n)?;
                any_topo = true;
            }
            _ => {}
        }
    }
    cpus.or(any_topo.then_some(product)).filter(|&n| n > 0)
}

/// The `(key, value)` pairs of an `-object` in keyval or JSON form; the keyval form's
/// leading type becomes `qom-type`, as in JSON.
fn object_pairs(val: &str) -> Result<Vec<(String, String)>, QemuArgError> {
    Ok(if val.trim_start().starts_with('{') {
        let v: serde_json::Value =
            serde_json::from_str(val).map_err(|e| QemuArgError::ObjectJson {
                detail: e.to_string(),
            })?;
        let obj = v.as_object().ok_or(QemuArgError::ObjectNotMap)?;
        obj.iter()
            .map(|(k, v)| {
                let s = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Array(a) => a
                        .iter()
                        .map(|x| x.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                    serde_json::Value::Bool(b) => if *b { "on" } else { "off" }.to_string(),
                    other => other.to_string(),
                };
                (k.clone(), s)
            })
            .collect()
    } else {
        split_keyval(val)
            .into_iter()
            .map(|(k, v)| match k {
                None => ("qom-type".to_string(), v),
                Some(k) => (k, v),
            })
            .collect()
    })
}

/// The memory backend an `-object` describes; other objects give None.
fn backend_of(pairs: &[(String, String)]) -> Result<Option<MemBackend>, QemuArgError> {
    let get = |key: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    // host-nodes may repeat in keyval form (`host-nodes=0,host-nodes=2` becomes
    // separate pairs; ranges as `0-1`).
    let host_nodes = {
        let lists: Vec<&str> = pairs
            .iter()
            .filter(|(k, _)| k == "host-nodes")
            .map(|(_, v)| v.as_str())
            .collect();
        if lists.is_empty() {
            None
        } else {
            let mut set = NodeSet::new();
            for l in lists {
                let s = NodeSet::parse_list(l).map_err(|source| QemuArgError::HostNodes {
                    value: l.to_string(),
                    source,
                })?;
                set = set.union(&s);
            }
            Some(set)
        }
    };
    let on = |k: &str| matches!(get(k), Some("on" | "yes" | "true"));
    let kind = match get("qom-type") {
        Some("memory-backend-ram") => BackendKind::Ram,
        Some("memory-backend-file") => BackendKind::File {
            mem_path: get("mem-path").unwrap_or_default().to_string(),
        },
        Some("memory-backend-memfd") => BackendKind::Memfd {
            hugetlb: on("hugetlb"),
            hugetlbsize_bytes: get("hugetlbsize").and_then(|s| parse_size(s, 1)),
        },
        _ => return Ok(None),
    };
    let id = get("id").unwrap_or_default().to_string();
    let Some(size) = get("size") else {
        return Err(QemuArgError::BackendNoSize { id });
    };
    Ok(Some(MemBackend {
        size_bytes: parse_size(size, 1).ok_or_else(|| QemuArgError::BackendSize {
            id: id.clone(),
            size: size.to_string(),
        })?,
        id,
        kind,
        host_nodes,
        policy: get("policy").map(str::to_string),
    }))
}

/// Parses `-numa node,nodeid=N,cpus=A-B[,cpus=C],memdev=ID|mem=SIZE`; other `-numa`
/// kinds (dist, cpu, hmat-lb) are skipped.
fn parse_numa(val: &str, cfg: &mut QemuConfig) -> Result<(), QemuArgError> {
    let kv = split_keyval(val);
    if kv.first().map(|(k, v)| (k.as_deref(), v.as_str())) != Some((None, "node")) {
        return Ok(());
    }
    let mut cell = GuestCell {
        id: cfg.cells.len() as u32,
        ..Default::default()
    };
    let mut memdev = String::new();
    for (k, v) in kv.into_iter().skip(1) {
        match k.as_deref() {
            Some("nodeid") => cell.id = v.parse().map_err(|_| QemuArgError::NumaNodeId(v))?,
            Some("cpus") => {
                let s = NodeSet::parse_list(&v).map_err(|source| QemuArgError::NumaCpus {
                    value: v.clone(),
                    source,
                })?;
                cell.vcpus.extend(s.iter());
            }
            Some("memdev") => memdev = v,
            Some("mem") => {
                cell.memory_bytes = parse_size(&v, 1 << 20).ok_or(QemuArgError::NumaMem(v))?;
            }
            _ => {}
        }
    }
    cell.vcpus.sort_unstable();
    cell.vcpus.dedup();
    cfg.cells.push(cell);
    cfg.cell_backend_ids.push(memdev);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn recognises_qemu() {
        assert!(is_qemu("qemu-kvm", None, None));
        assert!(is_qemu("qemu-system-x86", None, None));
        assert!(is_qemu("CPU 0/KVM", Some("qemu-system-x86_64"), None));
        assert!(is_qemu("x", None, Some("/usr/libexec/qemu-kvm")));
        assert!(!is_qemu("bash", Some("bash"), Some("bash")));
        assert!(!is_qemu("qemu-img", Some("qemu-img"), None));
    }

    #[test]
    fn classifies_threads() {
        assert_eq!(classify_thread(10, 12, "CPU 3/KVM"), ThreadKind::Vcpu(3));
        assert_eq!(classify_thread(10, 10, "qemu-kvm"), ThreadKind::Emulator);
        assert_eq!(classify_thread(10, 13, "IO iothread1"), ThreadKind::Io);
        assert_eq!(classify_thread(10, 14, "worker"), ThreadKind::Other);
        assert_eq!(classify_thread(10, 14, "CPU x/KVM"), ThreadKind::Other);
    }

    #[test]
    fn libvirts_capability_probe_has_no_guest() {
        let probe = parse_qemu_cmdline(&argv(
            "/usr/bin/qemu-system-x86_64 -S -no-user-config -nodefaults -nographic \
             -machine none,accel=kvm:tcg -qmp unix:/var/lib/libvirt/qemu/qmp-IMC8Z3/qmp.monitor,server=on,wait=off \
             -pidfile /var/lib/libvirt/qemu/qmp-IMC8Z3/qmp.pid -daemonize",
        ));
        assert!(probe.has_no_guest());
        let vm = parse_qemu_cmdline(&argv("qemu-system-x86_64 -machine type=pc,usb=off -m 256"));
        assert_eq!(vm.machine_type.as_deref(), Some("pc"));
        assert!(!vm.has_no_guest());
        assert!(!parse_qemu_cmdline(&argv("qemu-kvm -m 256")).has_no_guest());
    }

    #[test]
    fn parses_libvirt_keyval_cmdline() {
        let cfg = parse_qemu_cmdline(&argv(
            "/usr/bin/qemu-system-x86_64 -name guest=db,,1,debug-threads=on -S \
             -machine pc-q35-7.2,usb=off -m 8192 -smp 8,sockets=2,cores=4,threads=1 \
             -object memory-backend-file,id=ram-node0,mem-path=/dev/hugepages/libvirt/qemu/1-db,prealloc=yes,size=4294967296,host-nodes=0,policy=bind \
             -numa node,nodeid=0,cpus=0-3,memdev=ram-node0 \
             -object memory-backend-file,id=ram-node1,mem-path=/dev/hugepages/libvirt/qemu/1-db,prealloc=yes,size=4294967296,host-nodes=1,policy=bind \
             -numa node,nodeid=1,cpus=4-7,memdev=ram-node1 -numa dist,src=0,dst=1,val=21",
        ));
        assert_eq!(cfg.name.as_deref(), Some("db,1"));
        assert_eq!(cfg.mem_bytes, Some(8 << 30));
        assert_eq!(cfg.smp_cpus, Some(8));
        assert_eq!(cfg.cells.len(), 2);
        assert_eq!(cfg.cells[1].vcpus, vec![4, 5, 6, 7]);
        assert_eq!(cfg.cells[1].memory_bytes, 4 << 30);
        assert_eq!(cfg.cells[1].host_nodes.as_ref().unwrap().to_string(), "1");
        assert_eq!(
            cfg.backing(),
            MemoryBacking::HugeTlb {
                page_size_bytes: 2 << 20
            }
        );
        let (nodes, policy) = cfg.strict_memory_binding().unwrap();
        assert_eq!(
            (nodes.to_string().as_str(), policy.as_str()),
            ("0-1", "bind")
        );
        assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
    }

    #[test]
    fn parses_json_objects_and_memfd() {
        let cfg = parse_qemu_cmdline(&[
            "qemu-kvm".into(),
            "-name".into(),
            "guest=web,debug-threads=on".into(),
            "-machine".into(),
            "pc,memory-backend=pc.ram".into(),
            "-m".into(),
            "size=2G,slots=4,maxmem=8G".into(),
            "-object".into(),
            r#"{"qom-type":"memory-backend-memfd","id":"pc.ram","hugetlb":true,"hugetlbsize":1073741824,"size":2147483648,"host-nodes":[1],"policy":"preferred"}"#.into(),
            "-smp".into(),
            "2".into(),
        ]);
        assert_eq!(cfg.mem_bytes, Some(2 << 30));
        assert_eq!(
            cfg.backing(),
            MemoryBacking::HugeTlb {
                page_size_bytes: 1 << 30
            }
        );
        // preferred is a hint, not a binding.
        assert_eq!(cfg.strict_memory_binding(), None);
        assert_eq!(
            cfg.ram_backends()[0]
                .host_nodes
                .as_ref()
                .unwrap()
                .to_string(),
            "1"
        );
    }

    #[test]
    fn odd_cmdlines_do_not_panic() {
        for s in [
            "qemu-kvm -m",
            "qemu-kvm -m 99999999999999999999",
            "qemu-kvm -m 1.5G -smp cpus=x",
            "qemu-kvm -object memory-backend-ram,id=a",
            "qemu-kvm -object {bad -numa node,cpus=3-1",
            "qemu-kvm -name -m 64",
            "",
        ] {
            let cfg = parse_qemu_cmdline(&argv(s));
            let _ = cfg.backing();
        }
        assert_eq!(
            parse_qemu_cmdline(&argv("q -m 1.5G")).mem_bytes,
            Some(3 << 29)
        );
        assert_eq!(
            parse_qemu_cmdline(&argv("q -name vm1 -mem-path /mnt/x"))
                .name
                .as_deref(),
            Some("vm1")
        );
        let warnings = parse_qemu_cmdline(&argv("q -m 99999999999999999999")).warnings;
        assert_eq!(
            warnings,
            vec![QemuArgError::MemSize("99999999999999999999".into())]
        );
        assert_eq!(
            warnings[0].to_string(),
            "bad -m size \"99999999999999999999\""
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64", 1 << 20), Some(64 << 20));
        assert_eq!(parse_size("4G", 1), Some(4 << 30));
        assert_eq!(parse_size("512MB", 1), Some(512 << 20));
        assert_eq!(parse_size("16E", 1), None);
        assert_eq!(parse_size("", 1), None);
        assert_eq!(parse_size("-1", 1), None);
    }
}
