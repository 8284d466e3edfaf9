//! The daemon's configuration: `/etc/vmbalancer/config.toml`, then CLI flags on top.
//!
//! Why a strict parser: a typo in a config key that silently falls back to a default
//! would make the daemon balance VMs the operator meant to exclude. So unknown keys and
//! bad values are errors that name the key, and nothing on the host is touched before
//! the configuration is valid. Every field has a default (see `systemd/config.toml.example`,
//! which a unit test proves equal to [`Config::default`]), so an empty file is valid.
//!
//! Reload (`systemctl reload`, SIGHUP) reads the file and the same flags again. A file
//! that does not validate changes nothing: the daemon keeps running on the
//! configuration it has. Of a valid file, the knobs of the policy and of the moves
//! take effect at the next tick; the keys in [`RESTART_ONLY`] name resources the
//! daemon set up at start (directories, the control socket's group, the metrics
//! listener, the roots it reads, the mover threads and what the observer samples),
//! so a changed value there is reported and keeps its running value until a restart
//! ([`Config::reloaded`]). Why not rebuild those too: the journal, the socket and
//! the movers hold state that a half-finished switch could lose; a restart puts
//! them back through the same recovery as a crash.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::control::SocketAccess;
use crate::model::{CpuSet, DEFAULT_TARGET_LOCALITY_PCT, Vm};

/// Where the daemon looks for its configuration when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/vmbalancer/config.toml";

/// The shipped example: every field with its default and what it does.
pub const EXAMPLE_TOML: &str = include_str!("../../../systemd/config.toml.example");

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {why}")]
    Invalid { key: &'static str, why: String },
    #[error("configuration not representable as TOML: {0}")]
    Encode(String),
}

/// Keys a reload cannot change while running (see the module doc).
pub const RESTART_ONLY: &[&str] = &[
    "state_dir",
    "runtime_dir",
    "status_group",
    "prometheus_listen",
    "proc_root",
    "sys_root",
    "cgroup_root",
    "libvirt_status_dir",
    "migration_threads",
    "migration_nice",
    "migration_batch_pages",
    "write_heat_sampling",
];

/// The outcome of a reload: the configuration to run with and what differs.
#[derive(Clone, Debug, PartialEq)]
pub struct Reloaded {
    /// The new file's values, with the running values kept for [`RESTART_ONLY`] keys.
    pub config: Config,
    /// Keys whose new value takes effect now.
    pub changed: Vec<String>,
    /// Keys whose new value waits for a restart.
    pub needs_restart: Vec<String>,
}

/// What to do with VMs an operator pinned by hand (vcpupin, numatune, taskset).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PinnedVms {
    /// Report them, never move them.
    #[default]
    Leave,
    /// Balance them like any other VM.
    Balance,
}

/// Selects VMs by pid (a TOML integer) or by name (a string, `*` matches any run).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum VmSelector {
    Pid(u32),
    Name(String),
}

impl VmSelector {
    pub fn matches(&self, vm: &Vm) -> bool {
        match self {
            VmSelector::Pid(pid) => vm.pid == *pid,
            VmSelector::Name(pattern) => glob_match(pattern, &vm.name),
        }
    }
}

/// A POSIX-portable group name as `groupadd` accepts it, or a numeric gid.
fn is_group_name(s: &str) -> bool {
    let mut chars = s.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit());
    s.len() <= 32
        && first_ok
        && (s.parse::<u32>().is_ok() || !s.starts_with(|c: char| c.is_ascii_digit()))
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// `*` matches any (possibly empty) run of characters; everything else literally.
fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !name.starts_with(first) || name.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    if !name.ends_with(last) {
        return false;
    }
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// The whole configuration. Field docs state the default; `systemd/config.toml.example` says
/// the same for operators.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Time between two observe-plan-apply rounds, milliseconds. Default 1000.
    pub tick_ms: u64,
    /// A node counts as busy above this share of its CPUs in use, percent. Default 85.
    pub target_utilisation_pct: u32,
    /// Memory is moved while a VM has less than this share local, percent. Default 90
    /// ([`DEFAULT_TARGET_LOCALITY_PCT`], numad's `-m` default).
    pub target_locality_pct: u32,
    /// Balance only these VMs (pids or name patterns); empty = all VMs. Default [].
    pub include_vms: Vec<VmSelector>,
    /// Never touch these VMs (pids or name patterns); wins over include. Default [].
    pub exclude_vms: Vec<VmSelector>,
    /// CPUs never given to VMs, kernel list format (`0,8-9`). Default "" (none).
    pub reserved_cpus: CpuSet,
    /// Upper bound of page migration, bytes per second, all VMs together.
    /// Default 268435456 (256 MiB/s).
    pub migration_rate_limit_bytes_per_s: u64,
    /// Most pages per move_pages call; shutdown stops a move between two batches.
    /// Default 8192 (32 MiB of 4 KiB pages): every call pays a fixed cost on every CPU
    /// (the kernel drains its per-CPU page lists), which on a host whose CPUs are
    /// busy made 512-page calls 4 times slower than 8192-page ones
    /// (tests/results/lab-bench-mover.md).
    pub migration_batch_pages: u64,
    /// Mover threads, shared by all moves (1..=64): each takes the next batch of the
    /// most urgent move (hot regions first, VMs taking turns). Default 4.
    pub migration_threads: usize,
    /// Nice value of the threads that move pages and of the tick loop that starts
    /// them (-20..=19). Default -10: on a host whose CPUs are all busy with vCPUs,
    /// movers at nice 0 get a fraction of a CPU each and a move meant to take a
    /// second takes many; the rate limit still bounds what they take from the VMs.
    /// The loop shares their priority so its own movers never starve it.
    pub migration_nice: i32,
    /// Find hot regions of resident memory from soft-dirty bits, for VMs whose memory
    /// is away from their vCPUs. Default true.
    pub write_heat_sampling: bool,
    /// Start a tick early when the kernel reports a new VM, a vCPU moved to another
    /// node or memory faulting remotely (`daemon::wake`). Default true.
    pub wake_on_events: bool,
    /// Free memory a target node must keep after a move, bytes. Default 536870912.
    pub memory_headroom_bytes: u64,
    /// How long a CPU-first move must keep paying off before memory follows,
    /// milliseconds. Default 10000.
    pub probation_window_ms: u64,
    /// "leave" (report only) or "balance" operator-pinned VMs. Default "leave".
    pub pinned_vms: PinnedVms,
    /// Put back the CPU sets VMs had when vmbalancer adopted them, on exit. Default true.
    pub restore_on_exit: bool,
    /// Journal of moves in flight (survives crashes). Default "/var/lib/vmbalancer".
    pub state_dir: PathBuf,
    /// Control socket directory. Default "/run/vmbalancer".
    pub runtime_dir: PathBuf,
    /// Group (name or gid) whose members may run the read-only `status` and `advise`
    /// over the control socket; "" = root only. Default "".
    pub status_group: String,
    /// Prometheus text endpoint, loopback only (`127.0.0.1:9767`); "" = off. Default "".
    pub prometheus_listen: String,
    /// Decisions kept for `vmbalancer status`. Default 32.
    pub status_history: usize,
    /// Root of procfs, for tests and containers. Default "/proc".
    pub proc_root: PathBuf,
    /// Root of sysfs. Default "/sys".
    pub sys_root: PathBuf,
    /// Root of the cgroup mount(s). Default "/sys/fs/cgroup".
    pub cgroup_root: PathBuf,
    /// libvirt's status files of running qemu domains, where the operator's pins
    /// (vcpupin, emulatorpin, numatune) are read. Default "/run/libvirt/qemu".
    pub libvirt_status_dir: PathBuf,
}

impl Default for Config {
    /// The knobs that map onto the engine take the engine's defaults
    /// ([`crate::daemon::policy::engine_config`] maps them back), so each default has
    /// one definition; the documented numbers above are checked by a test.
    fn default() -> Self {
        let engine = crate::engine::EngineConfig::default();
        let ns_per_ms = 1_000_000;
        Self {
            tick_ms: engine.tick_ns / ns_per_ms,
            target_utilisation_pct: engine.busy_floor_pct.round() as u32,
            target_locality_pct: DEFAULT_TARGET_LOCALITY_PCT,
            include_vms: Vec::new(),
            exclude_vms: Vec::new(),
            reserved_cpus: CpuSet::new(),
            migration_rate_limit_bytes_per_s: 256 << 20,
            migration_batch_pages: 8192,
            migration_threads: 4,
            migration_nice: -10,
            write_heat_sampling: true,
            wake_on_events: true,
            memory_headroom_bytes: engine.free_headroom_bytes,
            probation_window_ms: engine.probation_ns / ns_per_ms,
            pinned_vms: PinnedVms::Leave,
            restore_on_exit: true,
            state_dir: PathBuf::from("/var/lib/vmbalancer"),
            runtime_dir: PathBuf::from("/run/vmbalancer"),
            status_group: String::new(),
            prometheus_listen: String::new(),
            status_history: 32,
            proc_root: PathBuf::from("/proc"),
            sys_root: PathBuf::from("/sys"),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            libvirt_status_dir: PathBuf::from("/run/libvirt/qemu"),
        }
    }
}

/// Command-line values that override the file (`None` = keep the file's value).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub tick_ms: Option<u64>,
    pub target_utilisation_pct: Option<u32>,
    pub target_locality_pct: Option<u32>,
    pub include_vms: Vec<VmSelector>,
    pub exclude_vms: Vec<VmSelector>,
    pub reserved_cpus: Option<CpuSet>,
    pub migration_rate_limit_bytes_per_s: Option<u64>,
    pub probation_window_ms: Option<u64>,
    pub pinned_vms: Option<PinnedVms>,
    pub restore_on_exit: Option<bool>,
    pub state_dir: Option<PathBuf>,
    pub runtime_dir: Option<PathBuf>,
    pub prometheus_listen: Option<String>,
}

impl Config {
    /// Parses TOML text; `origin` names the file in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a file. A missing file at the default path means all defaults; a missing
    /// file the operator named explicitly is an error.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_or_default(path, Path::new(DEFAULT_CONFIG_PATH))
    }

    /// [`Config::load`] with the default path given (tests).
    fn load_or_default(path: Option<&Path>, default: &Path) -> Result<Self, ConfigError> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (default.to_path_buf(), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::from_toml(&text, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                tracing::info!(path = %path.display(), "no configuration file: built-in defaults");
                Ok(Self::default())
            }
            Err(source) => Err(ConfigError::Read { path, source }),
        }
    }

    /// Applies CLI flags, then validates the result again.
    pub fn apply(mut self, o: Overrides) -> Result<Self, ConfigError> {
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = o.$f { self.$f = v; } )* };
        }
        set!(
            tick_ms,
            target_utilisation_pct,
            target_locality_pct,
            reserved_cpus,
            migration_rate_limit_bytes_per_s,
            probation_window_ms,
            pinned_vms,
            restore_on_exit,
            state_dir,
            runtime_dir,
            prometheus_listen
        );
        if !o.include_vms.is_empty() {
            self.include_vms = o.include_vms;
        }
        self.exclude_vms.extend(o.exclude_vms);
        self.validate()?;
        Ok(self)
    }

    /// Checks values that parse but make no sense, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &'static str, why: String| Err(ConfigError::Invalid { key, why });
        if !(100..=60_000).contains(&self.tick_ms) {
            return bad(
                "tick_ms",
                format!("{} is outside 100..=60000", self.tick_ms),
            );
        }
        for (key, v) in [
            ("target_utilisation_pct", self.target_utilisation_pct),
            ("target_locality_pct", self.target_locality_pct),
        ] {
            if !(1..=100).contains(&v) {
                return bad(key, format!("{v} is outside 1..=100"));
            }
        }
        if self.migration_rate_limit_bytes_per_s < 4096 {
            return bad(
                "migration_rate_limit_bytes_per_s",
                format!(
                    "{} is below one page per second",
                    self.migration_rate_limit_bytes_per_s
                ),
            );
        }
        if !(1..=65_536).contains(&self.migration_batch_pages) {
            return bad(
                "migration_batch_pages",
                format!("{} is outside 1..=65536", self.migration_batch_pages),
            );
        }
        if !(-20..=19).contains(&self.migration_nice) {
            return bad(
                "migration_nice",
                format!("{} is outside -20..=19", self.migration_nice),
            );
        }
        if !(1..=64).contains(&self.migration_threads) {
            return bad(
                "migration_threads",
                format!("{} is outside 1..=64", self.migration_threads),
            );
        }
        if self.probation_window_ms < self.tick_ms {
            return bad(
                "probation_window_ms",
                format!(
                    "{} is shorter than one tick ({} ms)",
                    self.probation_window_ms, self.tick_ms
                ),
            );
        }
        if self.status_history == 0 || self.status_history > 10_000 {
            return bad(
                "status_history",
                format!("{} is outside 1..=10000", self.status_history),
            );
        }
        for (key, sel) in self
            .include_vms
            .iter()
            .map(|s| ("include_vms", s))
            .chain(self.exclude_vms.iter().map(|s| ("exclude_vms", s)))
        {
            match sel {
                VmSelector::Pid(0) => return bad(key, "pid 0 is not a VM".into()),
                VmSelector::Name(n) if n.is_empty() => {
                    return bad(key, "an empty name matches nothing".into());
                }
                _ => {}
            }
        }
        for (key, dir) in [
            ("state_dir", &self.state_dir),
            ("runtime_dir", &self.runtime_dir),
            ("proc_root", &self.proc_root),
            ("sys_root", &self.sys_root),
            ("cgroup_root", &self.cgroup_root),
            ("libvirt_status_dir", &self.libvirt_status_dir),
        ] {
            if !dir.is_absolute() {
                return bad(key, format!("{} is not an absolute path", dir.display()));
            }
        }
        if !self.status_group.is_empty() && !is_group_name(&self.status_group) {
            return bad(
                "status_group",
                format!(
                    "{:?} is neither a group name ([a-z_][a-z0-9_-]*, at most 32) nor a gid",
                    self.status_group
                ),
            );
        }
        if self.status_group == "0" || self.status_group == "root" {
            return bad(
                "status_group",
                "root's group would let every root-group process read; leave it empty".into(),
            );
        }
        self.prometheus_addr()?;
        Ok(())
    }

    /// Who may use the control socket besides root: the `status_group` looked up in the
    /// group database (a gid that has no name is taken as it is).
    pub fn socket_access(&self) -> Result<SocketAccess, ConfigError> {
        use nix::unistd::{Gid, Group};
        if self.status_group.is_empty() {
            return Ok(SocketAccess::default());
        }
        let invalid = |why: String| ConfigError::Invalid {
            key: "status_group",
            why,
        };
        let name = &self.status_group;
        let found = match name.parse::<u32>() {
            Ok(gid) => Group::from_gid(Gid::from_raw(gid))
                .map(|g| Some(g.map_or((gid, name.clone()), |g| (gid, g.name))))
                .map_err(|e| invalid(format!("looking up gid {gid}: {e}")))?,
            Err(_) => Group::from_name(name)
                .map(|g| g.map(|g| (g.gid.as_raw(), g.name)))
                .map_err(|e| invalid(format!("looking up group {name:?}: {e}")))?,
        };
        let group = found.ok_or_else(|| invalid(format!("no group named {name:?}")))?;
        Ok(SocketAccess {
            status_group: Some(group),
        })
    }

    /// The Prometheus listen address, `None` when the endpoint is off.
    pub fn prometheus_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.prometheus_listen.is_empty() {
            return Ok(None);
        }
        let addr: SocketAddr =
            self.prometheus_listen
                .parse()
                .map_err(|e| ConfigError::Invalid {
                    key: "prometheus_listen",
                    why: format!(
                        "{:?} is not an IP:port address: {e}",
                        self.prometheus_listen
                    ),
                })?;
        if !addr.ip().is_loopback() {
            return Err(ConfigError::Invalid {
                key: "prometheus_listen",
                why: format!("{addr} is not a loopback address; metrics stay on the host"),
            });
        }
        Ok(Some(addr))
    }

    /// Whether the daemon may balance `vm` at all (include/exclude and pinning).
    pub fn manages(&self, vm: &Vm) -> bool {
        if self.exclude_vms.iter().any(|s| s.matches(vm)) {
            return false;
        }
        if !self.include_vms.is_empty() && !self.include_vms.iter().any(|s| s.matches(vm)) {
            return false;
        }
        match vm.pinning {
            crate::model::Pinning::None => true,
            crate::model::Pinning::Operator { .. } => self.pinned_vms == PinnedVms::Balance,
            crate::model::Pinning::Excluded => false,
        }
    }

    /// What running on `new` after `self` means: `new` for the live keys, `self` for
    /// the [`RESTART_ONLY`] ones. Compared key by key in the TOML form, so a field
    /// added to [`Config`] is covered without being listed here.
    pub fn reloaded(&self, new: Config) -> Result<Reloaded, ConfigError> {
        let table =
            |c: &Config| toml::Table::try_from(c).map_err(|e| ConfigError::Encode(e.to_string()));
        let old = table(self)?;
        let mut merged = table(&new)?;
        let (mut changed, mut needs_restart) = (Vec::new(), Vec::new());
        for (key, old_value) in &old {
            if merged.get(key) == Some(old_value) {
                continue;
            }
            if RESTART_ONLY.contains(&key.as_str()) {
                merged.insert(key.clone(), old_value.clone());
                needs_restart.push(key.clone());
            } else {
                changed.push(key.clone());
            }
        }
        // Keys the running configuration leaves out (empty lists) may appear now.
        changed.extend(merged.keys().filter(|k| !old.contains_key(*k)).cloned());
        let config: Config = merged
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Encode(e.to_string()))?;
        config.validate()?;
        Ok(Reloaded {
            config,
            changed,
            needs_restart,
        })
    }

    pub fn control_socket_path(&self) -> PathBuf {
        self.runtime_dir.join("control.sock")
    }

    pub fn journal_path(&self) -> PathBuf {
        self.state_dir.join("journal.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Pinning;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("test.toml"))
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn shipped_example_parses_and_equals_defaults() {
        assert_eq!(parse(EXAMPLE_TOML).unwrap(), Config::default());
    }

    #[test]
    fn example_documents_every_field() {
        let doc = toml::to_string(&Config::default()).unwrap();
        for line in doc.lines().filter(|l| l.contains(" = ")) {
            let key = line.split(" = ").next().unwrap();
            assert!(
                EXAMPLE_TOML.contains(&format!("\n{key} = ")),
                "example lacks {key}"
            );
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("tick_ms = 500\ntick_msec = 5\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("tick_msec"), "{err}");
        assert!(err.contains("test.toml"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        for (text, key) in [
            ("tick_ms = \"fast\"", "tick_ms"),
            ("tick_ms = 5", "tick_ms"),
            ("target_locality_pct = 150", "target_locality_pct"),
            ("migration_nice = -21", "migration_nice"),
            ("migration_nice = 20", "migration_nice"),
            ("reserved_cpus = \"3-1\"", "reserved_cpus"),
            ("pinned_vms = \"sometimes\"", "pinned_vms"),
            ("prometheus_listen = \"0.0.0.0:9767\"", "prometheus_listen"),
            ("prometheus_listen = \"localhost\"", "prometheus_listen"),
            ("state_dir = \"relative\"", "state_dir"),
            ("probation_window_ms = 10", "probation_window_ms"),
            ("exclude_vms = [0]", "exclude_vms"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn values_and_overrides() {
        let cfg = parse(
            "tick_ms = 500\nreserved_cpus = \"0,8-9\"\ninclude_vms = [\"web-*\", 4242]\n\
             pinned_vms = \"balance\"\nprometheus_listen = \"127.0.0.1:9767\"\n",
        )
        .unwrap();
        assert_eq!(cfg.tick_ms, 500);
        assert_eq!(cfg.reserved_cpus.to_string(), "0,8-9");
        assert_eq!(
            cfg.include_vms,
            vec![VmSelector::Name("web-*".into()), VmSelector::Pid(4242)]
        );
        assert!(cfg.prometheus_addr().unwrap().is_some());
        let cfg = cfg
            .apply(Overrides {
                tick_ms: Some(2000),
                exclude_vms: vec![VmSelector::Name("web-db".into())],
                ..Default::default()
            })
            .unwrap();
        assert_eq!(cfg.tick_ms, 2000);
        let vm = |pid, name: &str, pinning| Vm {
            pid,
            name: name.into(),
            pinning,
            ..Default::default()
        };
        assert!(cfg.manages(&vm(1, "web-1", Pinning::None)));
        assert!(cfg.manages(&vm(4242, "other", Pinning::None)));
        assert!(!cfg.manages(&vm(2, "db", Pinning::None)));
        assert!(!cfg.manages(&vm(3, "web-db", Pinning::None)));
        let pinned = Pinning::Operator {
            why: "vcpupin".into(),
        };
        assert!(cfg.manages(&vm(4, "web-2", pinned.clone())));
        let leave = Config::default();
        assert!(!leave.manages(&vm(4, "web-2", pinned)));
        let err = Config::default()
            .apply(Overrides {
                target_utilisation_pct: Some(0),
                ..Default::default()
            })
            .unwrap_err();
        assert!(err.to_string().contains("target_utilisation_pct"));
    }

    #[test]
    fn reload_takes_live_keys_and_keeps_restart_only_ones() {
        let running = Config::default();
        let new = parse(
            "tick_ms = 500\ntarget_locality_pct = 80\nexclude_vms = [\"db-*\"]\n\
             reserved_cpus = \"0\"\nmigration_threads = 8\nstate_dir = \"/elsewhere\"\n",
        )
        .unwrap();
        let r = running.reloaded(new).unwrap();
        assert_eq!(r.config.tick_ms, 500);
        assert_eq!(r.config.target_locality_pct, 80);
        assert_eq!(r.config.exclude_vms, vec![VmSelector::Name("db-*".into())]);
        assert_eq!(r.config.reserved_cpus, CpuSet::from_iter([0]));
        assert_eq!(r.config.migration_threads, running.migration_threads);
        assert_eq!(r.config.state_dir, running.state_dir);
        let mut changed = r.changed.clone();
        changed.sort();
        assert_eq!(
            changed,
            [
                "exclude_vms",
                "reserved_cpus",
                "target_locality_pct",
                "tick_ms"
            ]
        );
        let mut kept = r.needs_restart.clone();
        kept.sort();
        assert_eq!(kept, ["migration_threads", "state_dir"]);
        // The same file again changes nothing.
        let again = r.config.reloaded(r.config.clone()).unwrap();
        assert!(again.changed.is_empty() && again.needs_restart.is_empty());
        assert_eq!(again.config, r.config);
    }

    #[test]
    fn every_restart_only_key_is_a_config_key() {
        let keys = toml::Table::try_from(Config::default()).unwrap();
        for k in RESTART_ONLY {
            assert!(
                keys.contains_key(*k),
                "{k} is not a key of the configuration"
            );
        }
    }

    #[test]
    fn glob() {
        assert!(glob_match("a*", "abc"));
        assert!(glob_match("*c", "abc"));
        assert!(glob_match("a*b*c", "aXbYc"));
        assert!(!glob_match("a*b*c", "aXc"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("ab*ba", "aba"));
        assert!(glob_match("abc", "abc"));
    }

    #[test]
    fn missing_default_file_is_defaults_but_named_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/vmb.toml"))).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmb.toml"));
        let missing_default = Path::new("/nonexistent/default.toml");
        assert_eq!(
            Config::load_or_default(None, missing_default).unwrap(),
            Config::default()
        );
        // A named file wins over the default path and must exist.
        assert!(Config::load_or_default(Some(missing_default), missing_default).is_err());
        // The default path when present is read (and checked) like a named file.
        let dir = std::env::temp_dir().join(format!("vmb-cfg-default-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let present = dir.join("config.toml");
        std::fs::write(&present, "tick_ms = 500\n").unwrap();
        assert_eq!(
            Config::load_or_default(None, &present).unwrap().tick_ms,
            500
        );
        std::fs::write(&present, "tick_ms = 5\n").unwrap();
        assert!(Config::load_or_default(None, &present).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn status_group_is_checked_and_looked_up() {
        let parse = |v: &str| Config::from_toml(&format!("status_group = {v:?}"), Path::new("t"));
        for bad in ["Admins", "-x", "a b", "0", "root", "9x", &"a".repeat(33)] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("status_group"), "{bad}: {e}");
        }
        assert_eq!(
            Config::default().socket_access().unwrap(),
            SocketAccess::default()
        );
        // Looked up in the group database (root and nogroup exist on any Debian).
        let by_name = parse("nogroup").unwrap().socket_access().unwrap();
        assert_eq!(by_name.status_group, Some((65534, "nogroup".into())));
        let by_gid = parse("65534").unwrap().socket_access().unwrap();
        assert_eq!(by_gid.status_group, Some((65534, "nogroup".into())));
        // A gid without a name is taken as it is; a name that does not exist is an error.
        let unnamed = parse("4000123").unwrap().socket_access().unwrap();
        assert_eq!(unnamed.status_group, Some((4000123, "4000123".into())));
        let e = parse("no_such_group_vmb")
            .unwrap()
            .socket_access()
            .unwrap_err();
        assert!(e.to_string().contains("no group named"), "{e}");
    }
}
