//! What the operator told libvirt about a running domain's placement.
//!
//! Why: a thread's affinity or a cgroup's `cpuset.cpus` says where a vCPU may run, not
//! who decided it. vmbalancer narrows them itself, other tools narrow them too, and
//! none of that is an operator's intent. libvirt keeps the live definition of every
//! running domain, with the operator's placement in it, in its status file
//! (`/run/libvirt/qemu/NAME.xml` for the system instance: a `<domstatus>` document
//! holding the `<domain>`). For a libvirt VM that file is the evidence:
//! - `<cputune><vcpupin vcpu=.. cpuset=..>` and `<emulatorpin cpuset=..>`;
//! - `<vcpu placement='static' cpuset=..>`;
//! - `<numatune><memory mode=.. nodeset=..>` and `<memnode>`;
//! - `placement='auto'` on `<vcpu>` or `<numatune><memory>`: libvirt bound the VM to the
//!   nodes its placement helper advised (`<numad nodeset=..>` in the status), and keeps
//!   the memory there with a strict `cpuset.mems`.
//!
//! `virsh vcpupin` on a running domain rewrites this file, so a change of its
//! modification time is all the daemon needs to notice an operator's new pins.
//!
//! The XML is read with `roxmltree` (a small read-only XML parser): libvirt writes
//! plain XML with entities and comments, which no hand parser should second-guess.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use crate::model::{CpuSet, NodeSet, OperatorPins};

/// Why a status file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not XML libvirt writes: {why}")]
    Malformed {
        path: PathBuf,
        why: Box<IntentError>,
    },
}

/// What is wrong with a domain document; [`LibvirtError::Malformed`] adds the path.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IntentError {
    #[error(transparent)]
    Xml(#[from] roxmltree::Error),
    #[error("no <domain> in <{root}>")]
    NoDomain { root: String },
    #[error("<{tag} {attr}='{value}'>: {source}")]
    BadList {
        tag: String,
        attr: String,
        value: String,
        source: crate::model::IdSetParseError,
    },
    #[error("<{tag}> without {attr}")]
    MissingAttr { tag: String, attr: String },
    #[error("<{tag} {attr}='{value}'>: not a number")]
    NotNumber {
        tag: String,
        attr: String,
        value: String,
    },
    #[error("<domstatus pid='{0}'>: not a pid")]
    BadPid(String),
}

/// The placement an operator set for one domain. Empty when nothing was set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DomainIntent {
    /// The qemu process the status file describes (`<domstatus pid=..>`), so a file
    /// left behind by an earlier process of the same name is not taken for this one.
    pub pid: Option<u32>,
    /// `<vcpupin>`: vCPU index and its CPUs.
    pub vcpupins: Vec<(u32, CpuSet)>,
    /// `<vcpu cpuset=..>` with static placement: every vCPU's CPUs.
    pub vcpu_cpuset: Option<CpuSet>,
    /// `<emulatorpin cpuset=..>`.
    pub emulatorpin: Option<CpuSet>,
    /// `<numatune><memory mode=.. nodeset=..>`: the mode and the nodes.
    pub memory: Option<(String, NodeSet)>,
    /// `<numatune><memnode cellid=.. nodeset=..>`: guest cell and its nodes.
    pub memnodes: Vec<(u32, NodeSet)>,
    /// `placement='auto'`: the nodes libvirt's placement helper advised, when known.
    pub auto_placement: Option<Option<NodeSet>>,
}

impl DomainIntent {
    /// The operator's placement in words, or `None` when the domain leaves placement
    /// free.
    pub fn evidence(&self) -> Option<String> {
        let mut parts = Vec::new();
        if !self.vcpupins.is_empty() {
            let pins: Vec<String> = self
                .vcpupins
                .iter()
                .map(|(v, cpus)| format!("{v}->{cpus}"))
                .collect();
            parts.push(format!("vcpupin {}", pins.join(" ")));
        }
        if let Some(cpus) = &self.vcpu_cpuset {
            parts.push(format!("<vcpu cpuset='{cpus}'>"));
        }
        if let Some(cpus) = &self.emulatorpin {
            parts.push(format!("emulatorpin {cpus}"));
        }
        if let Some((mode, nodes)) = &self.memory {
            parts.push(format!("numatune memory mode={mode} nodeset={nodes}"));
        }
        for (cell, nodes) in &self.memnodes {
            parts.push(format!("numatune memnode cell {cell} nodeset={nodes}"));
        }
        match &self.auto_placement {
            Some(Some(nodes)) => parts.push(format!("placement='auto' on node(s) {nodes}")),
            Some(None) => parts.push("placement='auto'".into()),
            None => {}
        }
        (!parts.is_empty()).then(|| format!("libvirt domain XML: {}", parts.join(", ")))
    }

    /// Which of the domain's CPU sets the operator set. libvirt applies `<vcpu
    /// cpuset>` and an automatic placement to every vCPU and, without an
    /// `emulatorpin`, to the emulator threads too; `vcpupin` covers the listed vCPUs
    /// only. A memory binding alone pins no CPU.
    pub fn pins(&self) -> OperatorPins {
        let whole = self.vcpu_cpuset.is_some() || self.auto_placement.is_some();
        OperatorPins {
            all_vcpus: whole,
            vcpus: self.vcpupins.iter().map(|(v, _)| *v).collect(),
            emulator: whole || self.emulatorpin.is_some(),
        }
    }
}

/// The status file of domain `name` under `dir` (libvirt's qemu state directory).
pub fn status_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.xml"))
}

/// The intent of the qemu process `pid` named `name`, cached by the status file's
/// modification time so an unchanged file is read once.
#[derive(Clone, Debug, Default)]
pub struct IntentCache {
    read: Option<(SystemTime, Result<DomainIntent, Arc<LibvirtError>>)>,
}

impl IntentCache {
    /// `Ok(None)`: no status file for this process (not a libvirt domain, or one of
    /// another libvirt instance); `Err`: the file exists but cannot be used.
    pub fn get(
        &mut self,
        dir: &Path,
        name: &str,
        pid: u32,
    ) -> Result<Option<&DomainIntent>, &LibvirtError> {
        let path = status_path(dir, name);
        let Some(mtime) = modified(&path) else {
            self.read = None;
            return Ok(None);
        };
        if self.read.as_ref().is_none_or(|(t, _)| *t != mtime) {
            let parsed = read_intent(&path).map_err(Arc::new);
            if let Err(why) = &parsed {
                tracing::warn!(%why, "libvirt status file unusable; the VM's pins are judged from its threads");
            }
            self.read = Some((mtime, parsed));
        }
        match &self.read {
            Some((_, Ok(i))) if i.pid.is_none_or(|p| p == pid) => Ok(Some(i)),
            Some((_, Ok(_))) | None => Ok(None),
            Some((_, Err(why))) => Err(why),
        }
    }
}

/// Modification time of the status file, `None` when there is none (not a libvirt
/// domain, or another libvirt instance).
pub fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Reads and parses a status (or plain domain) file.
pub fn read_intent(path: &Path) -> Result<DomainIntent, LibvirtError> {
    let text = std::fs::read_to_string(path).map_err(|source| LibvirtError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_intent(&text).map_err(|why| LibvirtError::Malformed {
        path: path.to_path_buf(),
        why: Box::new(why),
    })
}

/// Parses the operator's placement out of a `<domstatus>` or `<domain>` document.
pub fn parse_intent(text: &str) -> Result<DomainIntent, IntentError> {
    let doc = roxmltree::Document::parse(text)?;
    let root = doc.root_element();
    let domain = root
        .descendants()
        .find(|n| n.has_tag_name("domain"))
        .ok_or_else(|| IntentError::NoDomain {
            root: root.tag_name().name().to_string(),
        })?;
    let tag = |node: roxmltree::Node<'_, '_>| node.tag_name().name().to_string();
    let list = |node: roxmltree::Node<'_, '_>, attr: &str| -> Result<Option<CpuSet>, IntentError> {
        node.attribute(attr)
            .map(|v| {
                CpuSet::parse_list(v).map_err(|source| IntentError::BadList {
                    tag: tag(node),
                    attr: attr.to_string(),
                    value: v.to_string(),
                    source,
                })
            })
            .transpose()
    };
    let index = |node: roxmltree::Node<'_, '_>, attr: &str| -> Result<u32, IntentError> {
        let v = node
            .attribute(attr)
            .ok_or_else(|| IntentError::MissingAttr {
                tag: tag(node),
                attr: attr.to_string(),
            })?;
        v.parse().map_err(|_| IntentError::NotNumber {
            tag: tag(node),
            attr: attr.to_string(),
            value: v.to_string(),
        })
    };

    let mut intent = DomainIntent {
        pid: root
            .has_tag_name("domstatus")
            .then(|| root.attribute("pid"))
            .flatten()
            .map(|v| v.parse().map_err(|_| IntentError::BadPid(v.to_string())))
            .transpose()?,
        ..DomainIntent::default()
    };
    let mut auto = false;
    if let Some(vcpu) = child(domain, "vcpu") {
        match vcpu.attribute("placement") {
            Some("auto") => auto = true,
            _ => intent.vcpu_cpuset = list(vcpu, "cpuset")?,
        }
    }
    if let Some(cputune) = child(domain, "cputune") {
        for pin in cputune.children().filter(|n| n.has_tag_name("vcpupin")) {
            if let Some(cpus) = list(pin, "cpuset")? {
                intent.vcpupins.push((index(pin, "vcpu")?, cpus));
            }
        }
        if let Some(pin) = child(cputune, "emulatorpin") {
            intent.emulatorpin = list(pin, "cpuset")?;
        }
    }
    if let Some(numatune) = child(domain, "numatune") {
        if let Some(memory) = child(numatune, "memory") {
            let mode = memory.attribute("mode").unwrap_or("strict").to_string();
            if memory.attribute("placement") == Some("auto") {
                auto = true;
            } else if let Some(nodes) = list(memory, "nodeset")? {
                intent.memory = Some((mode, nodes));
            }
        }
        for memnode in numatune.children().filter(|n| n.has_tag_name("memnode")) {
            if let Some(nodes) = list(memnode, "nodeset")? {
                intent.memnodes.push((index(memnode, "cellid")?, nodes));
            }
        }
    }
    if auto {
        // The status document records what the placement helper advised.
        let advised = root
            .descendants()
            .find(|n| n.has_tag_name("numad"))
            .map(|n| list(n, "nodeset"))
            .transpose()?
            .flatten();
        intent.auto_placement = Some(advised);
    }
    Ok(intent)
}

/// The first child element of `parent` named `tag`.
fn child<'a, 'i>(parent: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
    parent.children().find(|n| n.has_tag_name(tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &str) -> CpuSet {
        CpuSet::parse_list(s).unwrap()
    }

    /// The shape libvirt 9 writes for a running domain nobody pinned.
    const FREE: &str = r#"<!--
WARNING: THIS IS AN AUTO-GENERATED FILE.
-->
<domstatus state='running' reason='booted' pid='1234'>
  <monitor path='/var/lib/libvirt/qemu/domain-1-vm0/monitor.sock' type='unix'/>
  <vcpus>
    <vcpu id='0' pid='1240'/>
  </vcpus>
  <domain type='qemu' id='1'>
    <name>vm0</name>
    <memory unit='KiB'>262144</memory>
    <vcpu placement='static'>2</vcpu>
    <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>
  </domain>
</domstatus>
"#;

    #[test]
    fn a_free_domain_has_no_evidence() {
        let intent = parse_intent(FREE).unwrap();
        assert_eq!(
            intent,
            DomainIntent {
                pid: Some(1234),
                ..DomainIntent::default()
            }
        );
        assert_eq!(intent.evidence(), None);
    }

    #[test]
    fn pins_and_numatune_are_the_operators() {
        let xml = FREE.replace(
            "<vcpu placement='static'>2</vcpu>",
            "<vcpu placement='static'>2</vcpu>
    <cputune>
      <vcpupin vcpu='0' cpuset='2'/>
      <vcpupin vcpu='1' cpuset='3'/>
      <emulatorpin cpuset='0-1'/>
    </cputune>
    <numatune>
      <memory mode='strict' nodeset='1'/>
      <memnode cellid='0' mode='strict' nodeset='1'/>
    </numatune>",
        );
        let intent = parse_intent(&xml).unwrap();
        assert_eq!(intent.vcpupins, vec![(0, set("2")), (1, set("3"))]);
        assert_eq!(intent.emulatorpin, Some(set("0-1")));
        assert_eq!(intent.memory, Some(("strict".into(), set("1"))));
        assert_eq!(intent.memnodes, vec![(0, set("1"))]);
        let why = intent.evidence().unwrap();
        assert!(why.contains("vcpupin 0->2 1->3"), "{why}");
        assert_eq!(
            intent.pins(),
            OperatorPins {
                all_vcpus: false,
                vcpus: vec![0, 1],
                emulator: true
            }
        );
        // A memory binding alone pins no CPU; `vcpupin` of one vCPU only that one.
        let memory_only = DomainIntent {
            memory: Some(("strict".into(), set("1"))),
            ..DomainIntent::default()
        };
        assert_eq!(memory_only.pins(), OperatorPins::default());
        let one = DomainIntent {
            vcpupins: vec![(1, set("3"))],
            ..DomainIntent::default()
        };
        assert!(one.pins().covers_vcpu(1) && !one.pins().covers_vcpu(0) && !one.pins().emulator);
        assert!(
            why.contains("numatune memory mode=strict nodeset=1"),
            "{why}"
        );
    }

    #[test]
    fn static_cpuset_and_auto_placement() {
        let pinned = FREE.replace(
            "<vcpu placement='static'>2</vcpu>",
            "<vcpu placement='static' cpuset='4-7'>2</vcpu>",
        );
        assert_eq!(parse_intent(&pinned).unwrap().vcpu_cpuset, Some(set("4-7")));
        assert_eq!(
            parse_intent(&pinned).unwrap().pins(),
            OperatorPins::everything()
        );

        let auto = FREE
            .replace(
                "<vcpu placement='static'>2</vcpu>",
                "<vcpu placement='auto'>2</vcpu>
    <numatune><memory mode='strict' placement='auto'/></numatune>",
            )
            .replace("<vcpus>", "<numad nodeset='2' cpuset='4-5'/>\n  <vcpus>");
        let intent = parse_intent(&auto).unwrap();
        assert_eq!(intent.auto_placement, Some(Some(set("2"))));
        assert_eq!(intent.memory, None);
        assert!(
            intent
                .evidence()
                .unwrap()
                .contains("placement='auto' on node(s) 2")
        );
    }

    #[test]
    fn a_plain_domain_document_works_too() {
        let xml = "<domain type='kvm'><name>x</name><cputune><vcpupin vcpu='0' cpuset='1'/></cputune></domain>";
        assert_eq!(parse_intent(xml).unwrap().vcpupins, vec![(0, set("1"))]);
    }

    #[test]
    fn malformed_documents_say_what_is_wrong() {
        for (xml, expect) in [
            ("<domstatus><vcpus/>", "never closed"),
            ("<domstatus/>", "no <domain> in <domstatus>"),
            (
                "<domain><cputune><vcpupin vcpu='x' cpuset='1'/></cputune></domain>",
                "<vcpupin vcpu='x'>: not a number",
            ),
            (
                "<domain><cputune><vcpupin cpuset='1'/></cputune></domain>",
                "<vcpupin> without vcpu",
            ),
            (
                "<domain><numatune><memory mode='strict' nodeset='1-'/></numatune></domain>",
                "nodeset='1-'",
            ),
        ] {
            let err = parse_intent(xml).unwrap_err().to_string();
            assert!(err.contains(expect), "{xml}: {err}");
        }
    }

    #[test]
    fn read_intent_names_the_file() {
        let dir = std::env::temp_dir().join(format!("vmb-libvirt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = status_path(&dir, "vm0");
        assert!(matches!(read_intent(&path), Err(LibvirtError::Io { .. })));
        assert_eq!(modified(&path), None);
        std::fs::write(&path, "<domstatus/>").unwrap();
        let err = read_intent(&path).unwrap_err().to_string();
        assert!(
            err.contains("vm0.xml") && err.contains("no <domain>"),
            "{err}"
        );
        assert!(modified(&path).is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
