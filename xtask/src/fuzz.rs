//! `cargo xtask fuzz [--seconds N] [TARGET...]`: seeds the corpora from the fixture
//! trees, builds the libFuzzer targets of `fuzz/` (cargo-fuzz, nightly, AddressSanitizer
//! and debug assertions, so an overflow is a finding too) and runs each for N seconds,
//! then prints executions and findings per target. A finding fails the command; its
//! input is left in `fuzz/artifacts/TARGET/` for `cargo fuzz run TARGET FILE`.
//!
//! Seeds come from what the parsers read in real life: the captured and hand-made trees
//! of `tests/fixtures`, the shipped configuration example, the eBPF object's own BTF, and
//! the running kernel's tracefs format files when tracefs is mounted. The corpora grow
//! with each run and are not committed (`fuzz/.gitignore`); seeding again is idempotent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::build::workspace_root;

/// Every fuzz target of `fuzz/Cargo.toml`, in the order they run.
pub const TARGETS: &[&str] = &[
    "proc_stat",
    "proc_status",
    "proc_cmdline",
    "proc_maps",
    "proc_numa_maps",
    "proc_cgroup",
    "task_list",
    "proc_events",
    "idset",
    "meminfo",
    "sysfs_topology",
    "cgroup_cpuset",
    "tracefs_format",
    "btf",
    "journal",
    "config",
    "control",
    "libvirt_status",
    "qmp_reply",
];

/// Header of a file in a tree listing (the format `fuzz/src/lib.rs` reads).
const FILE_HEADER: &str = ">>> ";

/// Arguments of `cargo xtask fuzz`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds of fuzzing per target.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Only write the seed corpora, do not build or run.
    #[arg(long)]
    pub seed_only: bool,
    /// Targets to run (default: all).
    #[arg(value_name = "TARGET")]
    pub targets: Vec<String>,
}

/// What one target's run gave.
#[derive(Debug)]
pub struct Outcome {
    pub target: String,
    pub executions: u64,
    pub seconds: u64,
    pub corpus_files: usize,
    /// Inputs that crashed, overflowed, leaked, ran out of memory or time.
    pub findings: Vec<PathBuf>,
}

pub fn main(args: Args) -> anyhow::Result<()> {
    let targets = chosen(&args.targets)?;
    let seeded = seed(&fuzz_dir())?;
    for (t, n) in &seeded {
        eprintln!("xtask fuzz: {t}: {n} seed(s)");
    }
    if args.seed_only {
        return Ok(());
    }
    let outcomes = run(&targets, args.seconds)?;
    print_table(&outcomes);
    let found: usize = outcomes.iter().map(|o| o.findings.len()).sum();
    if found > 0 {
        bail!("fuzzing found {found} input(s) that break a parser (see above)");
    }
    Ok(())
}

fn chosen(names: &[String]) -> anyhow::Result<Vec<String>> {
    if names.is_empty() {
        return Ok(TARGETS.iter().map(|t| t.to_string()).collect());
    }
    for n in names {
        if !TARGETS.contains(&n.as_str()) {
            bail!("no fuzz target {n:?}; targets: {}", TARGETS.join(", "));
        }
    }
    Ok(names.to_vec())
}

fn fuzz_dir() -> PathBuf {
    workspace_root().join("fuzz")
}

/// `cargo +nightly fuzz ...` in `fuzz/`, without the outer stable cargo's settings.
fn cargo_fuzz() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.current_dir(fuzz_dir())
        .args(["run", "nightly", "cargo", "fuzz"]);
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "CARGO",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// Builds every target once, then runs the chosen ones `seconds` each, in turn (the
/// machine's cores go to one fuzzer at a time).
pub fn run(targets: &[String], seconds: u64) -> anyhow::Result<Vec<Outcome>> {
    if !crate::setup::cargo_fuzz_present() {
        bail!(
            "cargo-fuzz {} is not installed: run `cargo xtask setup`",
            crate::setup::CARGO_FUZZ_VERSION
        );
    }
    seed(&fuzz_dir())?;
    crate::build::run_step("fuzz build", cargo_fuzz().args(["build", "-a"]))?;
    targets.iter().map(|t| run_one(t, seconds)).collect()
}

/// Removes the fuzz targets' build (about 2.5 GiB; rebuilt by the next run). The
/// corpora and any findings stay.
pub fn remove_build() -> anyhow::Result<()> {
    let dir = fuzz_dir().join("target");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        eprintln!("xtask: fuzz: removed its build ({})", dir.display());
    }
    Ok(())
}

fn run_one(target: &str, seconds: u64) -> anyhow::Result<Outcome> {
    let artifacts = fuzz_dir().join("artifacts").join(target);
    let before = files_in(&artifacts);
    let mut cmd = cargo_fuzz();
    cmd.args(["run", "-a", target, "--"])
        .arg(format!("-max_total_time={seconds}"))
        // One slow input (a file tree, a big BTF) is a finding past 10 s; memory past
        // 2 GiB is one too (the parsers must bound what they allocate).
        .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"]);
    eprintln!("xtask: fuzz {target}: {cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("could not start {cmd:?}"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    let executions = stat(&log, "stat::number_of_executed_units:").unwrap_or(0);
    let findings: Vec<PathBuf> = files_in(&artifacts)
        .into_iter()
        .filter(|f| !before.contains(f))
        .collect();
    if !out.status.success() {
        // Show what libFuzzer said about the failure (the end of its log).
        let lines: Vec<&str> = log.lines().collect();
        eprintln!("{}", lines[lines.len().saturating_sub(40)..].join("\n"));
        if findings.is_empty() {
            bail!(
                "fuzz target {target} failed ({}) without an artifact",
                out.status
            );
        }
    }
    Ok(Outcome {
        target: target.to_string(),
        executions,
        seconds,
        corpus_files: files_in(&fuzz_dir().join("corpus").join(target)).len(),
        findings,
    })
}

/// A `stat::NAME: VALUE` line of libFuzzer's final statistics.
fn stat(log: &str, key: &str) -> Option<u64> {
    log.lines()
        .rev()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default();
    files.sort();
    files
}

/// Prints one line per target (the table `tests/results/fuzz.md` records).
pub fn print_table(outcomes: &[Outcome]) {
    println!("| target | seconds | executions | exec/s | corpus files | findings |");
    println!("|---|---:|---:|---:|---:|---:|");
    for o in outcomes {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            o.target,
            o.seconds,
            o.executions,
            o.executions / o.seconds.max(1),
            o.corpus_files,
            o.findings.len()
        );
        for f in &o.findings {
            println!("|   finding: {} | | | | | |", f.display());
        }
    }
    let total: u64 = outcomes.iter().map(|o| o.executions).sum();
    let found: usize = outcomes.iter().map(|o| o.findings.len()).sum();
    println!(
        "| all {} targets | | {total} | | | {found} |",
        outcomes.len()
    );
}

/// Writes the seed corpora (`fuzz/corpus/TARGET/seed-*`); returns how many per target.
pub fn seed(fuzz: &Path) -> anyhow::Result<BTreeMap<String, usize>> {
    let root = fuzz.parent().context("fuzz/ has a parent")?;
    let mut seeds: BTreeMap<String, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
    let mut add = |target: &str, name: String, bytes: Vec<u8>| {
        seeds
            .entry(target.to_string())
            .or_default()
            .insert(name.replace(['/', '\\'], "_"), bytes);
    };
    let fixtures = root.join("tests/fixtures");
    for fixture in files_in(&fixtures).into_iter().filter(|p| p.is_dir()) {
        let tag = fixture.file_name().unwrap_or_default().to_string_lossy();
        let files = walk(&fixture)?;
        for (rel, path) in &files {
            let name = rel.file_name().unwrap_or_default().to_string_lossy();
            let in_proc = rel.starts_with("proc");
            let target = match name.as_ref() {
                "stat" | "schedstat" if in_proc => "proc_stat",
                "status" if in_proc => "proc_status",
                "cmdline" if in_proc => "proc_cmdline",
                "maps" if in_proc => "proc_maps",
                "numa_maps" if in_proc => "proc_numa_maps",
                "cgroup" if in_proc => "proc_cgroup",
                "meminfo" => "meminfo",
                "online"
                | "possible"
                | "cpulist"
                | "thread_siblings_list"
                | "cpuset.cpus"
                | "cpuset.mems"
                | "cpuset.effective_cpus"
                | "cpuset.effective_mems"
                | "cpuset.cpus.effective"
                | "cpuset.mems.effective" => "idset",
                _ => continue,
            };
            let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
            add(target, format!("seed-{tag}-{}", rel.display()), bytes);
        }
        add("task_list", format!("seed-{tag}"), task_listing(&files));
        add(
            "sysfs_topology",
            format!("seed-{tag}"),
            sysfs_listing(&files)?,
        );
        for (i, listing) in cgroup_listings(&fixture, &files)?.into_iter().enumerate() {
            add("cgroup_cpuset", format!("seed-{tag}-{i}"), listing);
        }
    }
    let example = root.join("systemd/config.toml.example");
    add(
        "config",
        "seed-example".into(),
        std::fs::read(&example).with_context(|| format!("{}", example.display()))?,
    );
    for (i, line) in [
        r#"{"cmd":"status"}"#,
        r#"{"cmd":"advise","cpus":2,"mem_mb":1024}"#,
        r#"{"result":"advice","nodes":"0-1"}"#,
        r#"{"result":"error","error":"permission denied"}"#,
    ]
    .iter()
    .enumerate()
    {
        add("control", format!("seed-{i}"), line.as_bytes().to_vec());
    }
    // qemu command lines the fixtures do not hold: monitors and confidential guests.
    for (i, argv) in [
        "qemu-system-x86_64\0-name\0vm1\0-qmp\0unix:/run/vm1.qmp,server=on,wait=off\0-smp\0cpus=2\0",
        "qemu-system-x86_64\0-chardev\0socket,id=m,path=/run/m.sock,server,nowait\0-mon\0chardev=m,mode=control,pretty=on\0",
        "qemu-system-x86_64\0-machine\0q35,confidential-guest-support=sev0\0-object\0sev-guest,id=sev0,cbitpos=47,reduced-phys-bits=1\0",
        "qemu-system-x86_64\0-machine\0q35,confidential-guest-support=lsec0\0-object\0{\"qom-type\":\"tdx-guest\",\"id\":\"lsec0\"}\0",
        "qemu-system-x86_64\0-object\0memory-backend-memfd,id=ram0,size=1G,x-guest-memfd=on,share=on\0-machine\0q35,memory-backend=ram0\0",
    ]
    .iter()
    .enumerate()
    {
        add("proc_cmdline", format!("seed-qemu-{i}"), argv.as_bytes().to_vec());
    }
    // What monitors say: a whole exchange, a pretty one with an event, a refusal.
    let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;
    for (i, transcript) in [
        format!(
            "{greeting}\r\n{{\"return\": {{}}, \"id\": 1}}\r\n{{\"return\": [{{\"thread-id\": 501, \"cpu-index\": 0, \"qom-path\": \"/machine/unattached/device[0]\", \"target\": \"x86_64\", \"props\": {{\"socket-id\": 0}}}}], \"id\": 2}}\r\n"
        ),
        format!(
            "{greeting}\n{{\n  \"return\": {{}},\n  \"id\": 1\n}}\n{{\"event\": \"RTC_CHANGE\", \"data\": {{\"offset\": 0}}, \"timestamp\": {{\"seconds\": 1, \"microseconds\": 2}}}}\n{{\"return\": [], \"id\": 2}}\n"
        ),
        format!(
            "{greeting}\r\n{{\"return\": {{}}, \"id\": 1}}\r\n{{\"id\": 2, \"error\": {{\"class\": \"CommandNotFound\", \"desc\": \"The command query-cpus-fast has not been found\"}}}}\r\n"
        ),
    ]
    .iter()
    .enumerate()
    {
        add("qmp_reply", format!("seed-{i}"), transcript.as_bytes().to_vec());
    }
    for (i, journal) in [
        r#"{"version":1,"entries":{}}"#,
        r#"{"version":1,"entries":{"4242":{"original":{"vm":4242,"start_time_ticks":123456,"threads":{"4243":"0-3","4244":"0-3"},"groups":[{"dir":"/sys/fs/cgroup/machine.slice/vm.scope","cpus":"0-7","mems":"0-1","memory_migrate":null}]},"in_flight":null}}}"#,
    ]
    .iter()
    .enumerate()
    {
        add("journal", format!("seed-{i}"), journal.as_bytes().to_vec());
    }
    for (i, status) in [
        "<domstatus state='running' pid='1234'><vcpus><vcpu id='0' pid='1240'/></vcpus>\
         <domain type='qemu' id='1'><name>vm0</name><vcpu placement='static'>2</vcpu>\
         </domain></domstatus>",
        "<domstatus pid='7'><numad nodeset='1' cpuset='2-3'/><domain type='kvm'>\
         <vcpu placement='auto' cpuset='0-3'>2</vcpu><cputune><vcpupin vcpu='0' cpuset='2'/>\
         <emulatorpin cpuset='0-1'/></cputune><numatune><memory mode='strict' nodeset='1'/>\
         <memnode cellid='0' mode='strict' nodeset='1'/></numatune></domain></domstatus>",
    ]
    .iter()
    .enumerate()
    {
        add(
            "libvirt_status",
            format!("seed-{i}"),
            status.as_bytes().to_vec(),
        );
    }
    if let Some(btf) = ebpf_btf(root) {
        add("btf", "seed-ebpf-object".into(), btf);
    }
    for (name, bytes) in tracefs_formats() {
        add("tracefs_format", format!("seed-{name}"), bytes);
    }
    let mut counts = BTreeMap::new();
    for target in TARGETS {
        let dir = fuzz.join("corpus").join(target);
        std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
        let mine = seeds.remove(*target).unwrap_or_default();
        counts.insert(target.to_string(), mine.len());
        for (name, bytes) in mine {
            std::fs::write(dir.join(&name), bytes)
                .with_context(|| format!("{}", dir.join(&name).display()))?;
        }
    }
    Ok(counts)
}

/// Every file below `dir`: (path relative to `dir`, full path), sorted.
fn walk(dir: &Path) -> anyhow::Result<Vec<(PathBuf, PathBuf)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("{}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(rel) = path.strip_prefix(dir) {
                out.push((rel.to_path_buf(), path.clone()));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn listing(entries: impl IntoIterator<Item = (String, Vec<u8>)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, content) in entries {
        out.extend_from_slice(format!("{FILE_HEADER}{name}\n").as_bytes());
        out.extend_from_slice(&content);
        if !content.ends_with(b"\n") && !content.is_empty() {
            out.push(b'\n');
        }
    }
    out
}

/// The fixture's `/proc` task directories, as a listing rooted at `/proc`.
fn task_listing(files: &[(PathBuf, PathBuf)]) -> Vec<u8> {
    listing(files.iter().filter_map(|(rel, _)| {
        let rel = rel.strip_prefix("proc").ok()?;
        let parts: Vec<_> = rel.iter().collect();
        (parts.len() == 4 && parts[1] == "task" && parts[3] == "comm")
            .then(|| (rel.display().to_string(), Vec::new()))
    }))
}

/// The fixture's sysfs node/CPU/KSM files and meminfo/numa_balancing, as a listing
/// rooted where `HostPaths::under` looks.
fn sysfs_listing(files: &[(PathBuf, PathBuf)]) -> anyhow::Result<Vec<u8>> {
    let wanted = |rel: &Path| {
        rel.starts_with("sys/devices/system")
            || rel.starts_with("sys/kernel/mm/ksm")
            || rel == Path::new("proc/meminfo")
            || rel == Path::new("proc/sys/kernel/numa_balancing")
    };
    let mut entries = Vec::new();
    for (rel, path) in files.iter().filter(|(rel, _)| wanted(rel)) {
        entries.push((rel.display().to_string(), std::fs::read(path)?));
    }
    Ok(listing(entries))
}

/// One listing per distinct `/proc/PID/cgroup` of the fixture: that file as
/// `self.cgroup`, and the cpuset files of the groups on its paths, rooted at the
/// cgroup mount (`cgroup/`, or `sys/fs/cgroup/` in captured trees).
fn cgroup_listings(fixture: &Path, files: &[(PathBuf, PathBuf)]) -> anyhow::Result<Vec<Vec<u8>>> {
    let mount = if fixture.join("cgroup").is_dir() {
        PathBuf::from("cgroup")
    } else {
        PathBuf::from("sys/fs/cgroup")
    };
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for (rel, path) in files {
        if !(rel.starts_with("proc") && rel.file_name() == Some("cgroup".as_ref())) {
            continue;
        }
        let text = std::fs::read_to_string(path)?;
        if !seen.insert(text.clone()) {
            continue;
        }
        let group_paths: Vec<&str> = text
            .lines()
            .filter_map(|l| Some(l.splitn(3, ':').nth(2)?.trim_start_matches('/')))
            .collect();
        let mut entries = vec![("self.cgroup".to_string(), text.as_bytes().to_vec())];
        for (rel, path) in files {
            let Ok(in_mount) = rel.strip_prefix(&mount) else {
                continue;
            };
            let name = in_mount.file_name().unwrap_or_default().to_string_lossy();
            if !(name.starts_with("cpuset.") || name == "cgroup.controllers") {
                continue;
            }
            let dir = in_mount.parent().unwrap_or(Path::new(""));
            let dir = dir
                .strip_prefix("cpuset")
                .or_else(|_| dir.strip_prefix("unified"))
                .unwrap_or(dir)
                .to_string_lossy()
                .into_owned();
            if group_paths.iter().any(|g| g.starts_with(&dir)) {
                entries.push((in_mount.display().to_string(), std::fs::read(path)?));
            }
        }
        out.push(listing(entries));
    }
    Ok(out)
}

/// The `.BTF` section of the embedded eBPF object of a previous build, if there is one.
fn ebpf_btf(root: &Path) -> Option<Vec<u8>> {
    let build = crate::build::target_dir().join("debug/build");
    let object = std::fs::read_dir(build)
        .ok()?
        .filter_map(|e| Some(e.ok()?.path().join("out/balancer-ebpf.o")))
        .find(|p| p.is_file())?;
    let out = std::env::temp_dir().join(format!("vmbalancer-btf-{}", std::process::id()));
    let copy = out.with_extension("o");
    let ok = Command::new("objcopy")
        .args(["-I", "elf64-little", "--dump-section"])
        .arg(format!(".BTF={}", out.display()))
        .arg(&object)
        .arg(&copy)
        .current_dir(root)
        .status()
        .is_ok_and(|s| s.success());
    let bytes = if ok { std::fs::read(&out).ok() } else { None };
    let _ = std::fs::remove_file(&out);
    let _ = std::fs::remove_file(&copy);
    bytes
}

/// The running kernel's format files of the event systems the loader reads.
fn tracefs_formats() -> Vec<(String, Vec<u8>)> {
    let Some(events) = [
        "/sys/kernel/tracing/events",
        "/sys/kernel/debug/tracing/events",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_dir()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for system in ["sched", "kvm", "migrate"] {
        for event in files_in(&events.join(system)) {
            if let Ok(bytes) = std::fs::read(event.join("format")) {
                let name = event.file_name().unwrap_or_default().to_string_lossy();
                out.push((format!("{system}-{name}"), bytes));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_match_the_fuzz_crate() {
        let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
        let doc: toml::Value = manifest.parse().unwrap();
        let bins: Vec<&str> = doc["bin"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["name"].as_str().unwrap())
            .collect();
        let mut listed = TARGETS.to_vec();
        listed.sort_unstable();
        let mut bins_sorted = bins.clone();
        bins_sorted.sort_unstable();
        assert_eq!(listed, bins_sorted);
    }

    #[test]
    fn every_target_gets_seeds_from_the_fixtures() {
        let dir = std::env::temp_dir().join(format!("xtask-fuzz-seed-{}", std::process::id()));
        let fuzz = dir.join("fuzz");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&fuzz).unwrap();
        let root = workspace_root();
        for sub in ["tests/fixtures", "systemd"] {
            let status = Command::new("cp")
                .arg("-a")
                .arg(root.join(sub))
                .arg(
                    dir.join(sub)
                        .parent()
                        .map(|p| {
                            std::fs::create_dir_all(p).unwrap();
                            p.to_path_buf()
                        })
                        .unwrap(),
                )
                .status()
                .unwrap();
            assert!(status.success());
        }
        let counts = seed(&fuzz).unwrap();
        // Not seeded from files: netlink datagrams; from the build or the host: BTF
        // and tracefs (present on this project's machines, but optional).
        for (target, n) in &counts {
            if !["proc_events", "btf", "tracefs_format"].contains(&target.as_str()) {
                assert!(*n > 0, "{target} has no seed");
            }
        }
        // Idempotent.
        assert_eq!(seed(&fuzz).unwrap(), counts);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
