//! Captures a fixture tree from a live host (or from another tree) for the observer's
//! tests: exactly the files `host::linux` reads, for the qemu processes found, plus an
//! `expected.json` of what the observer saw at capture time.
//!
//! Usage: `capture_fixture OUTDIR [--from DIR] [--pid PID]...`
//!
//! OUTDIR gets `proc/`, `sys/` and `cgroup/` (see `HostPaths::under`). Every qemu
//! process is captured (as discovery recognises them) and every `--pid` given (for
//! test programs). Files that vanish during the copy are skipped. `expected.json`
//! holds, per VM: pid, name, vCPU (index, tid) pairs and guest bytes per node, as
//! `LinuxObserver` reported them from the source; `tests/tests/trace_fixtures.rs`
//! checks every `tests/fixtures/lab-*` tree against its own expected.json.

use std::path::{Path, PathBuf};

use anyhow::Context;
use balancer::host::Observer;
use balancer::host::linux::cgroup::{CgroupVersion, cgroup_dir, parse_proc_cgroup};
use balancer::host::linux::{HostPaths, LinuxObserver, ObserverConfig, discovery, procfs};

struct Capture {
    from: HostPaths,
    to: HostPaths,
}

impl Capture {
    /// Copies `rel` below `src` to the same place below `dst`, if it exists.
    fn copy(&self, src: &Path, dst: &Path, rel: &str) {
        let (s, d) = (src.join(rel), dst.join(rel));
        if let Ok(meta) = std::fs::symlink_metadata(&s)
            && meta.file_type().is_symlink()
        {
            if let Ok(target) = std::fs::read_link(&s) {
                let _ = std::fs::create_dir_all(d.parent().unwrap_or(dst));
                let _ = std::os::unix::fs::symlink(target, &d);
            }
            return;
        }
        if let Ok(bytes) = std::fs::read(&s) {
            let _ = std::fs::create_dir_all(d.parent().unwrap_or(dst));
            let _ = std::fs::write(&d, bytes);
        }
    }

    fn sys(&self, rel: &str) {
        self.copy(&self.from.sys, &self.to.sys, rel);
    }

    fn proc(&self, rel: &str) {
        self.copy(&self.from.proc, &self.to.proc, rel);
    }

    fn list(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn topology(&self) {
        let node_dir = self.from.sys.join("devices/system/node");
        self.sys("devices/system/node/online");
        self.sys("devices/system/node/possible");
        for n in Self::list(&node_dir)
            .iter()
            .filter(|n| n.starts_with("node"))
        {
            for f in ["cpulist", "distance", "meminfo"] {
                self.sys(&format!("devices/system/node/{n}/{f}"));
            }
            for hp in Self::list(&node_dir.join(n).join("hugepages")) {
                for f in ["nr_hugepages", "free_hugepages", "surplus_hugepages"] {
                    self.sys(&format!("devices/system/node/{n}/hugepages/{hp}/{f}"));
                }
            }
        }
        self.sys("devices/system/cpu/online");
        let cpu_dir = self.from.sys.join("devices/system/cpu");
        for c in Self::list(&cpu_dir) {
            if c.strip_prefix("cpu")
                .is_some_and(|n| n.parse::<u32>().is_ok())
            {
                self.sys(&format!(
                    "devices/system/cpu/{c}/topology/thread_siblings_list"
                ));
                self.sys(&format!("devices/system/cpu/{c}/topology/core_id"));
            }
        }
        for f in ["run", "merge_across_nodes", "pages_sharing", "pages_shared"] {
            self.sys(&format!("kernel/mm/ksm/{f}"));
        }
        self.proc("sys/kernel/numa_balancing");
        self.proc("meminfo");
    }

    fn cgroup_of(&self, cgroup_file: &Path) {
        let Ok(text) = std::fs::read_to_string(cgroup_file) else {
            return;
        };
        let Ok(Some(cg)) = parse_proc_cgroup(&text) else {
            return;
        };
        let src = cgroup_dir(&self.from, &cg);
        let dst = cgroup_dir(&self.to, &cg);
        let files: &[&str] = match cg.version {
            CgroupVersion::V1 => &[
                "cpuset.cpus",
                "cpuset.mems",
                "cpuset.effective_cpus",
                "cpuset.effective_mems",
            ],
            CgroupVersion::V2 => &[
                "cpuset.cpus",
                "cpuset.mems",
                "cpuset.cpus.effective",
                "cpuset.mems.effective",
            ],
        };
        for f in files {
            self.copy(&src, &dst, f);
        }
        self.copy(&self.from.cgroup, &self.to.cgroup, "cgroup.controllers");
    }

    fn process(&self, pid: u32) {
        for f in [
            "comm",
            "stat",
            "status",
            "cmdline",
            "cgroup",
            "numa_maps",
            "maps",
            "exe",
        ] {
            self.proc(&format!("{pid}/{f}"));
        }
        self.cgroup_of(&self.from.proc.join(format!("{pid}/cgroup")));
        for tid in procfs::list_tasks(&self.from.proc, pid).unwrap_or_default() {
            for f in ["comm", "stat", "status", "cgroup"] {
                self.proc(&format!("{pid}/task/{tid}/{f}"));
            }
            self.cgroup_of(&self.from.proc.join(format!("{pid}/task/{tid}/cgroup")));
        }
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut out = None;
    let mut from = HostPaths::system();
    let mut pids = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--from" => from = HostPaths::under(&PathBuf::from(args.next().context("--from DIR")?)),
            "--pid" => pids.push(args.next().context("--pid PID")?.parse::<u32>()?),
            _ => out = Some(PathBuf::from(a)),
        }
    }
    let out = out.context("usage: capture_fixture OUTDIR [--from DIR] [--pid PID]...")?;
    anyhow::ensure!(
        !out.exists(),
        "{} exists; capture into a new directory",
        out.display()
    );
    let cap = Capture {
        to: HostPaths::under(&out),
        from,
    };
    // Observe first, so expected.json describes the captured moment as closely as can be.
    let mut observer = LinuxObserver::new(
        cap.from.clone(),
        ObserverConfig {
            use_proc_events: false,
            ..Default::default()
        },
    )?;
    let snapshot = observer.observe()?;
    cap.topology();
    for pid in procfs::list_pids(&cap.from.proc)? {
        let Ok(comm) = procfs::read_comm(&cap.from.proc, pid) else {
            continue;
        };
        let exe = procfs::read_exe_basename(&cap.from.proc, pid);
        if pids.contains(&pid) || discovery::is_qemu(&comm, exe.as_deref(), None) {
            cap.process(pid);
        }
    }
    let expected: Vec<serde_json::Value> = snapshot
        .vms
        .iter()
        .map(|vm| {
            serde_json::json!({
                "pid": vm.pid,
                "name": vm.name,
                "vcpus": vm.vcpus.iter().map(|v| [v.index, v.tid]).collect::<Vec<_>>(),
                "bytes_per_node": vm.memory.bytes_per_node,
                "node_ids": snapshot.topology.nodes.iter().map(|n| n.id).collect::<Vec<_>>(),
            })
        })
        .collect();
    std::fs::write(
        out.join("expected.json"),
        serde_json::to_string_pretty(&serde_json::json!({ "vms": expected }))?,
    )?;
    println!(
        "captured {} VM(s) into {}",
        snapshot.vms.len(),
        out.display()
    );
    Ok(())
}
