//! Starts and stops the balancer under test, and reports what it did.
//!
//! vmbalancer can also be killed and started again during the run (scenario
//! events), started as its systemd unit would start it (`unit_like`, with a
//! notification socket whose messages are recorded when `notify`), and asked for
//! `vmbalancer status --json` before it stops.
//!
//! In the stack guest (scenario `guest = "stack"`) vmbalancer is the installed
//! service: `systemctl start vmbalancer` (Type=notify, so it returns once the daemon
//! said READY=1), signals through `systemctl kill`, its log from the journal.

use std::fs::OpenOptions;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use vmbalancer_tests::lab::protocol::Record;
use vmbalancer_tests::lab::scenario::{Balancer, Guest, Scenario};

use crate::emit;

const NUMAD_LOG: &str = "/var/log/numad.log";
const NUMAD_PID: &str = "/var/run/numad.pid";
pub const VMBALANCER_LOG: &str = "/run/lab/vmbalancer.log";
const NOTIFY_SOCKET: &str = "/run/lab/notify.sock";
/// How long vmbalancer may take to stop after SIGTERM (it stops migrations at a
/// batch boundary and restores CPU sets) before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(20);
/// The unit's paths (systemd/vmbalancer.service: ExecStart, ConfigurationDirectory,
/// StateDirectory, RuntimeDirectory).
const UNIT_CONFIG: &str = "/etc/vmbalancer/config.toml";
const UNIT_STATE_DIR: &str = "/var/lib/vmbalancer";
const UNIT_RUNTIME_DIR: &str = "/run/vmbalancer";

/// Notification messages received, with seconds since the first start.
pub type NotifyLog = Arc<Mutex<Vec<(f64, String)>>>;

/// How to (re)start vmbalancer.
struct Recipe {
    args: Vec<String>,
    env: Vec<(String, String)>,
    config_path: Option<PathBuf>,
}

/// A running balancer; `stop` ends it and reports its log.
pub struct Guard {
    kind: Balancer,
    child: Option<Child>,
    log_lines: usize,
    recipe: Option<Recipe>,
    notify: Option<NotifyLog>,
    /// `vmbalancer status --json` taken by [`Guard::take_status`], or why not.
    pub status: Option<Result<serde_json::Value, String>>,
    /// Every refusal the samples' status showed ([`Guard::note_refusals`]): status
    /// keeps a refusal only for a while after it was last made, and one made early
    /// (a VM that then went where it could) is gone by the end of the run.
    refusals_seen: Vec<serde_json::Value>,
    /// vmbalancer's state directory (its journal).
    pub state_dir: PathBuf,
    /// vmbalancer is the systemd service (stack guest).
    service: bool,
}

/// Runs `systemctl ARGS`, failing with its message.
fn systemctl(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("systemctl")
        .args(args)
        .output()
        .context("running systemctl")?;
    if !out.status.success() {
        anyhow::bail!(
            "systemctl {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Where the image carries the package; the harness installs it as an operator does.
const PACKAGE: &str = "/var/cache/vmbalancer/vmbalancer.deb";

/// Installs vmbalancer where the scenario needs it, before the run's clock starts:
/// an operator installs the package once, and the balancing is timed from
/// `systemctl start` (in the stack guest `dpkg -i` alone takes half a minute of
/// emulated time, which the tables must not charge to the daemon).
pub fn prepare(kind: Balancer, scenario: &Scenario) -> anyhow::Result<()> {
    if kind == Balancer::Vmbalancer && scenario.guest == Guest::Stack {
        install_package()?;
        if scenario.advisor_first() {
            install_numad_wrapper()?;
        }
    }
    Ok(())
}

/// The package's libvirt `numad` wrapper, where libvirt calls `numad` (its path is
/// fixed when libvirt is built: /usr/bin/numad on Debian), as the README tells
/// operators. It replaces the image's own numad binary, which only the numad
/// comparison runs use.
const NUMAD_WRAPPER: &str = "/usr/share/vmbalancer/numad";
const LIBVIRT_NUMAD: &str = "/usr/bin/numad";

fn install_numad_wrapper() -> anyhow::Result<()> {
    let out = Command::new("install")
        .args(["-m", "755", NUMAD_WRAPPER, LIBVIRT_NUMAD])
        .output()
        .context("running install")?;
    if !out.status.success() {
        anyhow::bail!(
            "install -m 755 {NUMAD_WRAPPER} {LIBVIRT_NUMAD}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    emit(&Record::Event {
        source: "harness".into(),
        text: format!(
            "libvirt's numad is vmbalancer's wrapper: install -m 755 {NUMAD_WRAPPER} {LIBVIRT_NUMAD}"
        ),
    });
    Ok(())
}

/// `dpkg -i` of the project's package, once per boot (an image without it has the
/// files installed already).
fn install_package() -> anyhow::Result<()> {
    let installed = Command::new("dpkg")
        .args(["-s", "vmbalancer"])
        .output()
        .is_ok_and(|o| o.status.success());
    if installed || !std::path::Path::new(PACKAGE).exists() {
        return Ok(());
    }
    let start = Instant::now();
    let out = Command::new("dpkg")
        .args(["-i", PACKAGE])
        .output()
        .context("running dpkg")?;
    if !out.status.success() {
        anyhow::bail!(
            "dpkg -i {PACKAGE}: {}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // Installing enables and starts nothing.
    let enabled = Command::new("systemctl")
        .args(["is-enabled", "--quiet", "vmbalancer"])
        .status()
        .is_ok_and(|s| s.success());
    emit(&Record::Event {
        source: "harness".into(),
        text: format!(
            "dpkg -i vmbalancer.deb: {:.1} s; unit enabled after install: {enabled}",
            start.elapsed().as_secs_f64()
        ),
    });
    Ok(())
}

/// Starts the vmbalancer service and waits until systemd calls it active (READY=1).
fn start_service(scenario: &Scenario) -> anyhow::Result<()> {
    install_package()?;
    if let Some(config) = &scenario.vmbalancer.config {
        std::fs::write(UNIT_CONFIG, config)?;
    }
    if let Some(filter) = &scenario.vmbalancer.log_filter {
        let dir = "/run/systemd/system/vmbalancer.service.d";
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            format!("{dir}/lab-log.conf"),
            format!("[Service]\nEnvironment=\"VMBALANCER_LOG={filter}\"\n"),
        )?;
        systemctl(&["daemon-reload"])?;
    }
    let start = Instant::now();
    systemctl(&["start", "vmbalancer"])?;
    loop {
        let active = Command::new("systemctl")
            .args(["is-active", "--quiet", "vmbalancer"])
            .status()
            .is_ok_and(|s| s.success());
        if active {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            anyhow::bail!("vmbalancer.service not active 60 s after `systemctl start`");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    emit(&Record::Event {
        source: "harness".into(),
        text: format!(
            "vmbalancer.service active (READY) {:.1} s after `systemctl start`",
            start.elapsed().as_secs_f64()
        ),
    });
    Ok(())
}

/// The service's journal since boot, into the log file the reports read.
fn save_journal() {
    if let Ok(o) = Command::new("journalctl")
        .args(["-u", "vmbalancer", "-o", "short-monotonic", "--no-pager"])
        .output()
    {
        let _ = std::fs::write(VMBALANCER_LOG, o.stdout);
    }
}

/// The value of a top-level `key = "value"` of a TOML config, if any.
fn config_path_value(config: Option<&str>, key: &str) -> Option<PathBuf> {
    let table: toml::Table = toml::from_str(config?).ok()?;
    table.get(key)?.as_str().map(PathBuf::from)
}

fn spawn_vmbalancer(recipe: &Recipe, append: bool) -> anyhow::Result<Child> {
    let out = OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(VMBALANCER_LOG)?;
    Command::new("vmbalancer")
        .args(&recipe.args)
        .envs(recipe.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("starting vmbalancer")
}

/// Binds the notification socket and records what arrives on it.
fn listen_notify(started: Instant) -> anyhow::Result<NotifyLog> {
    let _ = std::fs::remove_file(NOTIFY_SOCKET);
    let sock = UnixDatagram::bind(NOTIFY_SOCKET).context("binding the notification socket")?;
    let log: NotifyLog = Arc::default();
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = sock.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if let Ok(mut l) = sink.lock() {
                l.push((started.elapsed().as_secs_f64(), text));
            }
        }
    });
    Ok(log)
}

fn vmbalancer_recipe(scenario: &Scenario) -> anyhow::Result<Recipe> {
    let spec = &scenario.vmbalancer;
    let mut env = Vec::new();
    if let Some(filter) = &spec.log_filter {
        env.push(("VMBALANCER_LOG".to_string(), filter.clone()));
    }
    let (mut args, config_path) = if spec.unit_like {
        let config = spec.config.clone().unwrap_or_default();
        std::fs::create_dir_all("/etc/vmbalancer")?;
        std::fs::write(UNIT_CONFIG, config)?;
        for (dir, mode, var) in [
            ("/etc/vmbalancer", 0o755, "CONFIGURATION_DIRECTORY"),
            (UNIT_STATE_DIR, 0o755, "STATE_DIRECTORY"),
            (UNIT_RUNTIME_DIR, 0o700, "RUNTIME_DIRECTORY"),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(dir)?;
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
            env.push((var.to_string(), dir.to_string()));
        }
        (
            vec!["run".into(), "--config".into(), UNIT_CONFIG.into()],
            Some(PathBuf::from(UNIT_CONFIG)),
        )
    } else if let Some(config) = &spec.config {
        std::fs::write("/run/lab/vmbalancer.toml", config)?;
        (
            spec.args.clone(),
            Some(PathBuf::from("/run/lab/vmbalancer.toml")),
        )
    } else {
        (spec.args.clone(), None)
    };
    if !spec.unit_like
        && let Some(p) = &config_path
    {
        args.extend(["--config".into(), p.display().to_string()]);
    }
    if spec.notify {
        env.push(("NOTIFY_SOCKET".into(), NOTIFY_SOCKET.into()));
        if spec.watchdog_usec > 0 {
            env.push(("WATCHDOG_USEC".into(), spec.watchdog_usec.to_string()));
        }
    }
    Ok(Recipe {
        args,
        env,
        config_path,
    })
}

pub fn start(kind: Balancer, scenario: &Scenario) -> anyhow::Result<Guard> {
    let mut child = None;
    let mut recipe = None;
    let mut notify = None;
    let started = Instant::now();
    let service = scenario.guest == Guest::Stack;
    match kind {
        Balancer::Vmbalancer if service => {
            start_service(scenario)?;
            recipe = Some(Recipe {
                args: Vec::new(),
                env: Vec::new(),
                config_path: Some(PathBuf::from(UNIT_CONFIG)),
            });
        }
        Balancer::None => {}
        Balancer::Autonuma => std::fs::write("/proc/sys/kernel/numa_balancing", "1")
            .context("enabling kernel.numa_balancing")?,
        Balancer::Numad => {
            let _ = std::fs::remove_file(NUMAD_LOG);
            // numad daemonises and writes its pid file.
            let status = Command::new("numad")
                .args(&scenario.numad.args)
                .status()
                .context("starting numad")?;
            anyhow::ensure!(status.success(), "numad exited with {status}");
        }
        Balancer::Vmbalancer => {
            let r = vmbalancer_recipe(scenario)?;
            if scenario.vmbalancer.notify {
                notify = Some(listen_notify(started)?);
            }
            child = Some(spawn_vmbalancer(&r, false)?);
            recipe = Some(r);
        }
    }
    emit(&Record::Event {
        source: "harness".into(),
        text: format!("balancer {} started", kind.name()),
    });
    let config = scenario.vmbalancer.config.as_deref();
    let state_dir = config_path_value(config, "state_dir").unwrap_or_else(|| UNIT_STATE_DIR.into());
    Ok(Guard {
        kind,
        child,
        log_lines: scenario.vmbalancer.log_lines,
        recipe,
        notify,
        status: None,
        refusals_seen: Vec::new(),
        state_dir,
        service,
    })
}

/// numad's pid, from the file it writes when it daemonises.
fn numad_pid() -> Option<i32> {
    std::fs::read_to_string(NUMAD_PID).ok()?.trim().parse().ok()
}

fn report_log(source: &str, path: &str, max_lines: usize, keep: impl Fn(&str) -> bool) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| keep(l)).collect();
    for l in &lines[lines.len().saturating_sub(max_lines)..] {
        emit(&Record::Event {
            source: source.into(),
            text: (*l).to_string(),
        });
    }
}

/// Where each thread of `pid` waits in the kernel (`wchan` and its kernel stack), for
/// runs that study a daemon that stopped making progress.
fn report_stacks(pid: u32) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for t in tasks.flatten() {
        let dir = t.path();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let stack: Vec<String> = read("stack")
            .lines()
            .take(12)
            .map(|l| l.split_whitespace().nth(1).unwrap_or(l).to_string())
            .collect();
        emit(&Record::Event {
            source: "harness".into(),
            text: format!(
                "thread {} {}: wchan {} stack {}",
                t.file_name().to_string_lossy(),
                read("comm").trim(),
                read("wchan").trim(),
                stack.join(" < ")
            ),
        });
    }
}

impl Guard {
    /// Sends `signal` to vmbalancer (and reaps it when the signal ends it).
    pub fn kill(&mut self, signal: i32) {
        if self.service {
            let r = systemctl(&["kill", "-s", &signal.to_string(), "vmbalancer"]);
            emit(&Record::Event {
                source: "harness".into(),
                text: format!("systemctl kill -s {signal} vmbalancer: {r:?}"),
            });
            return;
        }
        let Some(c) = self.child.as_mut() else {
            emit(&Record::Event {
                source: "harness".into(),
                text: format!("signal {signal}: vmbalancer is not running"),
            });
            return;
        };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id() as i32, signal) };
        if signal == libc::SIGKILL || signal == libc::SIGTERM || signal == libc::SIGINT {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let status = c.try_wait().ok().flatten();
            emit(&Record::Event {
                source: "harness".into(),
                text: format!("vmbalancer sent signal {signal}: {status:?}"),
            });
            if status.is_some() {
                self.child = None;
            }
        }
    }

    /// Waits up to `limit` until vmbalancer's journal shows a memory move in flight;
    /// reports what it saw.
    pub fn wait_for_migration(&self, limit: Duration) {
        let path = self.state_dir.join("journal.json");
        let start = Instant::now();
        let found = loop {
            let moving = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .map(|j| vmbalancer_tests::lab::judge::journal_migrating(&j))
                .unwrap_or_default();
            if !moving.is_empty() {
                break Some(moving);
            }
            if start.elapsed() >= limit {
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        emit(&Record::Event {
            source: "harness".into(),
            text: match found {
                Some(vms) => format!(
                    "memory move in flight for VMs {vms:?} after waiting {:.1} s",
                    start.elapsed().as_secs_f64()
                ),
                None => format!("no memory move in flight within {limit:?}"),
            },
        });
    }

    /// Starts vmbalancer again the same way, appending to its log.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.service {
            systemctl(&["start", "vmbalancer"])?;
            emit(&Record::Event {
                source: "harness".into(),
                text: "vmbalancer.service started again".into(),
            });
            return Ok(());
        }
        let Some(recipe) = &self.recipe else {
            return Ok(());
        };
        if let Some(mut c) = self.child.take() {
            if let Ok(None) = c.try_wait() {
                anyhow::bail!("vmbalancer is still running; kill it first");
            }
            let _ = c.wait();
        }
        self.child = Some(spawn_vmbalancer(recipe, true)?);
        emit(&Record::Event {
            source: "harness".into(),
            text: "vmbalancer started again".into(),
        });
        Ok(())
    }

    /// Adds the refusals vmbalancer's status shows now to those seen so far.
    pub fn note_refusals(&mut self) {
        self.take_status();
        if let Some(Ok(st)) = &self.status
            && let Some(list) = st.get("refusals").and_then(|r| r.as_array())
        {
            for r in list {
                if !self.refusals_seen.contains(r) {
                    self.refusals_seen.push(r.clone());
                }
            }
        }
    }

    /// Records `vmbalancer status --json` (vmbalancer only), its `refusals` list
    /// completed with those seen earlier in the run ([`Guard::note_refusals`]).
    pub fn take_status(&mut self) {
        let Some(recipe) = &self.recipe else {
            return;
        };
        let mut cmd = Command::new("vmbalancer");
        cmd.args(["status", "--json"]);
        if let Some(p) = &recipe.config_path {
            cmd.arg("--config").arg(p);
        }
        let result = match cmd.stdin(Stdio::null()).output() {
            Ok(o) if o.status.success() => serde_json::from_slice(&o.stdout)
                .map_err(|e| format!("status --json did not parse: {e}")),
            Ok(o) => Err(format!(
                "status --json: {}: {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => Err(format!("cannot run vmbalancer status: {e}")),
        };
        self.status = Some(result.map(|mut st: serde_json::Value| {
            if let Some(list) = st.get_mut("refusals").and_then(|r| r.as_array_mut()) {
                for r in &self.refusals_seen {
                    if !list.contains(r) {
                        list.push(r.clone());
                    }
                }
            }
            st
        }));
    }

    /// Notification messages so far (`None` without `notify`).
    pub fn notifications(&self) -> Option<Vec<(f64, String)>> {
        self.notify
            .as_ref()
            .map(|n| n.lock().map(|l| l.clone()).unwrap_or_default())
    }

    /// CPU time (user + system, every thread, exited ones included) the balancer's
    /// process has used since it started, seconds: vmbalancer's daemon (the child,
    /// or the unit's main process in the stack guest) or numad. `None` for the other
    /// balancers, or when the process cannot be read.
    pub fn cpu_s(&self) -> Option<f64> {
        let pid: i32 = match self.kind {
            Balancer::Numad => numad_pid()?,
            Balancer::Vmbalancer if self.service => {
                let out = Command::new("systemctl")
                    .args(["show", "--property=MainPID", "--value", "vmbalancer"])
                    .output()
                    .ok()?;
                String::from_utf8_lossy(&out.stdout).trim().parse().ok()?
            }
            Balancer::Vmbalancer => i32::try_from(self.child.as_ref()?.id()).ok()?,
            Balancer::None | Balancer::Autonuma => return None,
        };
        if pid <= 0 {
            return None;
        }
        let stat = procfs::process::Process::new(pid).ok()?.stat().ok()?;
        Some((stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64)
    }

    pub fn stop(&mut self) {
        match self.kind {
            Balancer::None => {}
            Balancer::Autonuma => {
                let _ = std::fs::write("/proc/sys/kernel/numa_balancing", "0");
            }
            Balancer::Numad => {
                if let Some(pid) = numad_pid() {
                    // SAFETY: signalling a pid numad itself recorded.
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                }
                report_log("numad", NUMAD_LOG, 60, |l| {
                    !l.contains("Nodes:") && !l.contains("Node ") && !l.trim().is_empty()
                });
            }
            Balancer::Vmbalancer if self.service => {
                let start = Instant::now();
                let r = systemctl(&["stop", "vmbalancer"]);
                emit(&Record::Event {
                    source: "harness".into(),
                    text: format!(
                        "systemctl stop vmbalancer: {} in {:.1} s",
                        r.map_or_else(|e| format!("{e:#}"), |()| "stopped".into()),
                        start.elapsed().as_secs_f64()
                    ),
                });
                save_journal();
                report_log("vmbalancer", VMBALANCER_LOG, self.log_lines, |_| true);
            }
            Balancer::Vmbalancer => {
                if let Some(mut c) = self.child.take() {
                    match c.try_wait() {
                        Ok(Some(status)) => emit(&Record::Event {
                            source: "vmbalancer".into(),
                            text: format!("exited early: {status}"),
                        }),
                        _ => {
                            if self.log_lines > 60 {
                                report_stacks(c.id());
                            }
                            // SAFETY: signalling our own child.
                            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                            let start = Instant::now();
                            let exited = loop {
                                if let Ok(Some(_)) = c.try_wait() {
                                    break true;
                                }
                                if start.elapsed() > STOP_GRACE {
                                    break false;
                                }
                                std::thread::sleep(Duration::from_millis(50));
                            };
                            if !exited {
                                let _ = c.kill();
                            }
                            let _ = c.wait();
                            emit(&Record::Event {
                                source: "harness".into(),
                                text: format!(
                                    "vmbalancer {} after SIGTERM in {:.1} s",
                                    if exited { "exited" } else { "was SIGKILLed" },
                                    start.elapsed().as_secs_f64()
                                ),
                            });
                        }
                    }
                    let _ = c.wait();
                }
                report_log("vmbalancer", VMBALANCER_LOG, self.log_lines, |_| true);
                for (t, m) in self.notifications().unwrap_or_default() {
                    emit(&Record::Event {
                        source: "notify".into(),
                        text: format!("t={t:.2} s: {}", m.replace('\n', " | ")),
                    });
                }
            }
        }
    }
}
