//! The journal of adopted VMs and actions in flight, in the state directory.
//!
//! Why: the daemon can be killed (SIGKILL, OOM, power) between writing a VM's CPU set
//! and reading it back, or in the middle of a memory move with `cpuset.mems` widened.
//! Before touching a VM the daemon writes here what the VM had (its original sets) and
//! which action it is about to apply; after the outcome it clears the action. On the
//! next start, [`decide`] says per VM whether to finish the action, revert it, or just
//! keep the record, and [`recover`] does it through the applier. A VM is never left
//! with an empty or inconsistent set: finishing re-applies a validated target, and
//! reverting writes sets the kernel accepted before.
//!
//! Every write is atomic: a temporary file in the same directory, fsync, rename over
//! the journal, fsync of the directory; mode 0600 (it names processes and cgroups).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Actuator;
use crate::model::{Action, ActionOutcome, CpuSet, NodeSet, PlannedAction, Snapshot, VmId};
use crate::model::{OriginalSets, RestoreWhat};

const VERSION: u32 = 1;

/// Why the journal could not be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One adopted VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub original: OriginalSets,
    pub in_flight: Option<InFlight>,
}

/// An action that was started and whose outcome was not recorded yet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InFlight {
    pub action: PlannedAction,
    /// Observer clock when it started.
    pub started_ns: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct File {
    version: u32,
    entries: BTreeMap<VmId, Entry>,
}

impl Default for File {
    fn default() -> Self {
        Self {
            version: VERSION,
            entries: BTreeMap::new(),
        }
    }
}

/// The journal file and its contents.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    /// Writes since opened (each is a pair of fsyncs).
    writes: u64,
}

impl Journal {
    /// Opens (creating the state directory, mode 0700) and loads the journal. A journal
    /// that does not parse is moved aside (`journal.json.corrupt`), one of another
    /// version too (`journal.json.old`), never deleted: a name already taken by an
    /// earlier one gets a number (`journal.json.corrupt.1`), so none is overwritten.
    /// When it cannot be moved aside (a read-only state directory), opening fails.
    pub fn open(state_dir: &Path) -> Result<Self, JournalError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JournalError::Io { path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(io(state_dir))?;
        let path = state_dir.join("journal.json");
        let file = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<File>(&bytes) {
                Ok(f) if f.version == VERSION => f,
                Ok(f) => {
                    let aside = set_aside(&path, "old").map_err(io(&path))?;
                    tracing::warn!(version = f.version, aside = %aside.display(), "journal of another version moved aside");
                    File::default()
                }
                Err(e) => {
                    let aside = set_aside(&path, "corrupt").map_err(io(&path))?;
                    tracing::warn!(error = %e, aside = %aside.display(), "journal unreadable, moved aside");
                    File::default()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => File::default(),
            Err(e) => return Err(io(&path)(e)),
        };
        Ok(Self {
            path,
            file,
            writes: 0,
        })
    }

    /// The VMs a running (or killed) daemon holds, read without changing anything:
    /// for `trace`, so a CPU set the daemon applied is not taken for an operator's
    /// pin. No journal: none held.
    pub fn held(state_dir: &Path) -> Result<Vec<OriginalSets>, JournalError> {
        let path = state_dir.join("journal.json");
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(JournalError::Io { path, source }),
        };
        let file: File = serde_json::from_slice(&bytes).map_err(|e| JournalError::Io {
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        Ok(file.entries.into_values().map(|e| e.original).collect())
    }

    /// How many times the journal was written since it was opened.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn entries(&self) -> &BTreeMap<VmId, Entry> {
        &self.file.entries
    }

    /// Records a VM's original sets (kept if already recorded).
    pub fn adopt(&mut self, original: OriginalSets) -> Result<(), JournalError> {
        self.update(|f| {
            if f.entries.contains_key(&original.vm) {
                return false;
            }
            f.entries.insert(
                original.vm,
                Entry {
                    original,
                    in_flight: None,
                },
            );
            true
        })
    }

    /// Marks an action as started; call after [`Journal::adopt`] of its VM.
    pub fn begin(&mut self, action: &PlannedAction, now_ns: u64) -> Result<(), JournalError> {
        self.update(|f| {
            let Some(e) = f.entries.get_mut(&action.vm) else {
                return false;
            };
            e.in_flight = Some(InFlight {
                action: action.clone(),
                started_ns: now_ns,
            });
            true
        })
    }

    /// Records every action of a tick before any is applied, in one write: each VM's
    /// original sets (kept if already recorded) and its action in flight (a VM with
    /// several actions keeps the last). One write, so one pair of fsyncs, whatever
    /// the number of actions: on a disk where a flush costs a fraction of a second
    /// (a busy disk, a VM's virtual disk), one write per action made a tick of a dozen
    /// actions seconds late.
    pub fn begin_all<'a>(
        &mut self,
        actions: impl IntoIterator<Item = (OriginalSets, &'a PlannedAction)>,
        now_ns: u64,
    ) -> Result<(), JournalError> {
        self.update(|f| {
            let mut changed = false;
            for (original, action) in actions {
                let e = f.entries.entry(original.vm).or_insert_with(|| Entry {
                    original,
                    in_flight: None,
                });
                e.in_flight = Some(InFlight {
                    action: action.clone(),
                    started_ns: now_ns,
                });
                changed = true;
            }
            changed
        })
    }

    /// Marks the actions of several VMs as finished, in one write.
    pub fn end_all(&mut self, vms: &[VmId]) -> Result<(), JournalError> {
        self.update(|f| {
            let mut changed = false;
            for vm in vms {
                changed |= f
                    .entries
                    .get_mut(vm)
                    .is_some_and(|e| e.in_flight.take().is_some());
            }
            changed
        })
    }

    /// Marks a VM's action as finished.
    pub fn end(&mut self, vm: VmId) -> Result<(), JournalError> {
        self.end_all(&[vm])
    }

    /// Drops a VM (it exited, or was restored for good).
    pub fn forget(&mut self, vm: VmId) -> Result<(), JournalError> {
        self.update(|f| f.entries.remove(&vm).is_some())
    }

    /// Applies `change` (which says whether it changed anything) to a copy of the
    /// contents, writes the copy, and only then keeps it. A write that fails (state
    /// directory full or read-only) leaves the journal in memory as it is on disk:
    /// otherwise the next write that succeeds would persist a change that never
    /// happened, such as an action refused for want of a journal, which a recovery
    /// after a crash would then "finish".
    fn update(&mut self, change: impl FnOnce(&mut File) -> bool) -> Result<(), JournalError> {
        let mut next = self.file.clone();
        if !change(&mut next) {
            return Ok(());
        }
        self.save(&next)?;
        self.file = next;
        self.writes += 1;
        Ok(())
    }

    fn save(&self, file: &File) -> Result<(), JournalError> {
        let err = |source| JournalError::Io {
            path: self.path.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(file).map_err(|e| err(e.into()))?;
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(&bytes).map_err(err)?;
        f.sync_all().map_err(err)?;
        drop(f);
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(err)?;
        }
        Ok(())
    }
}

/// Renames `path` to `path.KIND`, or `path.KIND.N` with the first free N, and
/// returns the new name.
fn set_aside(path: &Path, kind: &str) -> std::io::Result<PathBuf> {
    let base = path.with_extension(format!("json.{kind}"));
    let mut aside = base.clone();
    let mut n = 0u32;
    while aside.symlink_metadata().is_ok() {
        n += 1;
        aside = PathBuf::from(format!("{}.{n}", base.display()));
    }
    std::fs::rename(path, &aside)?;
    Ok(aside)
}

/// What the host looks like now, for recovery decisions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostFacts {
    /// The journaled process still runs (same pid and start time).
    pub alive: bool,
    pub online_cpus: CpuSet,
    /// Nodes that have memory.
    pub memory_nodes: NodeSet,
}

/// What to do with one journal entry at start.
#[derive(Clone, Debug, PartialEq)]
pub enum Recovery {
    /// The VM is gone: drop the entry.
    Forget,
    /// Nothing was in flight: keep the record for later restores.
    Keep,
    /// Apply the interrupted action again (it is idempotent and still valid).
    Finish(PlannedAction),
    /// Put back the original sets.
    Revert(RestoreWhat),
}

/// Decides finish or revert for one entry. Pure.
pub fn decide(entry: &Entry, facts: &HostFacts) -> Recovery {
    if !facts.alive {
        return Recovery::Forget;
    }
    let Some(flight) = &entry.in_flight else {
        return Recovery::Keep;
    };
    match &flight.action.action {
        Action::SetCpus { cpus, .. } => {
            if !cpus.is_empty() && cpus.is_subset(&facts.online_cpus) {
                Recovery::Finish(flight.action.clone())
            } else {
                Recovery::Revert(RestoreWhat {
                    cpus: true,
                    mems: false,
                })
            }
        }
        Action::MigrateMemory { to, .. } | Action::MigrateProcessMemory { to, .. } => {
            if facts.memory_nodes.contains(*to) {
                Recovery::Finish(flight.action.clone())
            } else {
                Recovery::Revert(RestoreWhat {
                    cpus: false,
                    mems: true,
                })
            }
        }
    }
}

/// Recovers every journal entry through the actuator. A finish that the host refuses
/// falls back to a revert. Returns what was done per VM.
///
/// A journal that cannot be written (state directory full or read-only) does not
/// stop the recovery of the other entries: every VM is put right all the same, the
/// failed write is logged, and the entry it left is recovered again at the next
/// start (finishing and reverting are idempotent).
pub fn recover<A: Actuator>(
    journal: &mut Journal,
    actuator: &mut A,
    snapshot: &Snapshot,
    online_cpus: &CpuSet,
    memory_nodes: &NodeSet,
) -> Result<Vec<(VmId, Recovery, ActionOutcome)>, JournalError> {
    let entries: Vec<Entry> = journal.entries().values().cloned().collect();
    let mut done = Vec::new();
    for entry in entries {
        let vm = entry.original.vm;
        let facts = HostFacts {
            alive: actuator.alive(&entry.original),
            online_cpus: online_cpus.clone(),
            memory_nodes: memory_nodes.clone(),
        };
        let decision = decide(&entry, &facts);
        let outcome = match &decision {
            Recovery::Forget => {
                if let Err(e) = journal.forget(vm) {
                    tracing::error!(vm, error = %e, "journal not writable: the entry of an exited VM stays");
                }
                ActionOutcome::VmGone
            }
            Recovery::Keep => {
                actuator.readopt(entry.original.clone());
                ActionOutcome::Done { moved_bytes: 0 }
            }
            Recovery::Finish(action) => {
                actuator.readopt(entry.original.clone());
                let out = actuator.apply(snapshot, action);
                match out {
                    ActionOutcome::Refused { .. } => {
                        let mems = action.action.moves_memory();
                        let what = RestoreWhat { cpus: !mems, mems };
                        actuator.restore(&entry.original, what)
                    }
                    other => other,
                }
            }
            Recovery::Revert(what) => {
                actuator.readopt(entry.original.clone());
                actuator.restore(&entry.original, *what)
            }
        };
        if !matches!(decision, Recovery::Forget)
            && let Err(e) = journal.end(vm)
        {
            tracing::error!(vm, error = %e, "journal not writable: the action stays in flight for the next start");
        }
        tracing::info!(vm, ?decision, ?outcome, "recovered journal entry");
        done.push((vm, decision, outcome));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Reason;
    use std::os::unix::fs::PermissionsExt;

    pub(crate) fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmb-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn set_cpus(vm: VmId, cpus: &str) -> PlannedAction {
        PlannedAction {
            vm,
            action: Action::SetCpus {
                vcpus: None,
                cpus: CpuSet::parse_list(cpus).unwrap(),
            },
            reason: Reason::CpuImbalance {
                from: 0,
                to: 1,
                imbalance_pct: 30.0,
            },
        }
    }

    fn original(vm: VmId) -> OriginalSets {
        OriginalSets {
            vm,
            start_time_ticks: 1234,
            threads: [(vm, CpuSet::parse_list("0-3").unwrap())].into(),
            groups: Vec::new(),
        }
    }

    #[test]
    fn round_trip_is_atomic_and_private() {
        let dir = temp_dir("journal-rt");
        let mut j = Journal::open(&dir).unwrap();
        j.adopt(original(10)).unwrap();
        j.adopt(original(11)).unwrap();
        j.begin(&set_cpus(10, "4-7"), 99).unwrap();
        let mode = std::fs::metadata(j.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!dir.join("journal.json.tmp").exists());
        let dir_mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700);

        // A new process (after a crash) sees exactly what was written.
        let j2 = Journal::open(&dir).unwrap();
        assert_eq!(j2.entries(), j.entries());
        let e = &j2.entries()[&10];
        assert_eq!(e.in_flight.as_ref().unwrap().started_ns, 99);
        assert!(j2.entries()[&11].in_flight.is_none());

        j.end(10).unwrap();
        j.forget(11).unwrap();
        let j3 = Journal::open(&dir).unwrap();
        assert!(j3.entries()[&10].in_flight.is_none());
        assert!(!j3.entries().contains_key(&11));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn corrupt_journal_is_kept_aside() {
        let dir = temp_dir("journal-corrupt");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("journal.json"), b"{ half a jour").unwrap();
        let j = Journal::open(&dir).unwrap();
        assert!(j.entries().is_empty());
        assert_eq!(
            std::fs::read(dir.join("journal.json.corrupt")).unwrap(),
            b"{ half a jour"
        );
        // A second bad journal does not overwrite the first one set aside, and one
        // of another version is kept too.
        std::fs::write(dir.join("journal.json"), b"\0\xff garbage").unwrap();
        assert!(Journal::open(&dir).unwrap().entries().is_empty());
        std::fs::write(dir.join("journal.json"), br#"{"version":99,"entries":{}}"#).unwrap();
        assert!(Journal::open(&dir).unwrap().entries().is_empty());
        let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
        assert_eq!(read("journal.json.corrupt"), b"{ half a jour");
        assert_eq!(read("journal.json.corrupt.1"), b"\0\xff garbage");
        assert_eq!(read("journal.json.old"), br#"{"version":99,"entries":{}}"#);
        assert!(!dir.join("journal.json").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_failed_write_changes_nothing_in_memory() {
        let dir = temp_dir("journal-failed-write");
        let mut j = Journal::open(&dir).unwrap();
        j.adopt(original(10)).unwrap();
        // The next writes cannot happen, as on a full or read-only state directory.
        std::fs::create_dir(dir.join("journal.json.tmp")).unwrap();
        assert!(j.adopt(original(11)).is_err());
        assert!(j.begin(&set_cpus(10, "4-7"), 1).is_err());
        assert!(!j.entries().contains_key(&11));
        assert!(j.entries()[&10].in_flight.is_none());
        // Writable again: a later change does not carry what failed to disk (a
        // recovery would otherwise finish an action that was refused).
        std::fs::remove_dir(dir.join("journal.json.tmp")).unwrap();
        j.adopt(original(12)).unwrap();
        let on_disk = Journal::open(&dir).unwrap();
        assert_eq!(on_disk.entries(), j.entries());
        assert_eq!(
            on_disk.entries().keys().copied().collect::<Vec<_>>(),
            [10, 12]
        );
        assert!(on_disk.entries()[&10].in_flight.is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn recovery_decisions() {
        let facts = HostFacts {
            alive: true,
            online_cpus: CpuSet::parse_list("0-7").unwrap(),
            memory_nodes: NodeSet::parse_list("0-1").unwrap(),
        };
        let entry = |action: Option<PlannedAction>| Entry {
            original: original(5),
            in_flight: action.map(|action| InFlight {
                action,
                started_ns: 1,
            }),
        };
        let mem = |to| PlannedAction {
            vm: 5,
            action: Action::MigrateMemory {
                from: 0,
                to,
                regions: vec![],
                max_bytes: 1 << 30,
                within: None,
            },
            reason: Reason::ProbationCommitted { node: to },
        };
        let cpus_back = Recovery::Revert(RestoreWhat {
            cpus: true,
            mems: false,
        });
        let mems_back = Recovery::Revert(RestoreWhat {
            cpus: false,
            mems: true,
        });
        let dead = HostFacts {
            alive: false,
            ..facts.clone()
        };
        for (e, f, want) in [
            (entry(None), &facts, Recovery::Keep),
            (entry(Some(set_cpus(5, "4-7"))), &dead, Recovery::Forget),
            (
                entry(Some(set_cpus(5, "4-7"))),
                &facts,
                Recovery::Finish(set_cpus(5, "4-7")),
            ),
            // CPUs went offline meanwhile: back to where the VM was.
            (entry(Some(set_cpus(5, "6-9"))), &facts, cpus_back.clone()),
            (entry(Some(set_cpus(5, ""))), &facts, cpus_back),
            (entry(Some(mem(1))), &facts, Recovery::Finish(mem(1))),
            (entry(Some(mem(3))), &facts, mems_back),
        ] {
            assert_eq!(decide(&e, f), want, "{e:?}");
        }
    }
}
