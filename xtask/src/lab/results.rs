//! Host-side view of the guest's result lines (the harness's protocol).
//!
//! Mirrors only the fields the host uses; unknown record types are ignored so
//! the guest can report more without breaking the host.

use serde::Deserialize;

pub const PREFIX: &str = "@@VMBLAB@@ ";

#[derive(Debug, Clone, Deserialize)]
#[allow(dead_code)] // mirrored for completeness of the protocol
pub struct Summary {
    pub balancer: String,
    pub kernel: String,
    pub vms: usize,
    pub locality: Vec<(f64, f64)>,
    pub time_to_090_s: Option<f64>,
    pub time_to_095_s: Option<f64>,
    pub numa_pages_migrated: u64,
    pub pgmigrate_success: u64,
    pub cpu_balance: f64,
    pub work_touches: u64,
    pub touches_per_vcpu_s: f64,
    pub run_s: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VmTruth {
    pub name: String,
    pub main_node: Option<usize>,
    pub locality: f64,
    pub bytes_per_node: Vec<u64>,
    /// Per-page truth, when the scenario asks for it.
    #[serde(default)]
    pub hot_locality: Option<f64>,
    #[serde(default)]
    pub cold_locality: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Sample {
    pub t_s: f64,
    pub locality_mean: f64,
    pub locality_min: f64,
    pub vcpu_load_per_node: Vec<f64>,
    pub vms: Vec<VmTruth>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    Start {
        scenario: String,
        balancer: String,
        kernel: String,
    },
    Check {
        name: String,
        ok: bool,
        allowed_failure: bool,
        detail: String,
    },
    Sample(Sample),
    Event {
        source: String,
        text: String,
    },
    Summary(Summary),
    Capture {
        path: String,
        data: String,
    },
    Done {
        ok: bool,
        failed: Vec<String>,
    },
    #[serde(other)]
    Other,
}

pub fn parse(line: &str) -> Option<Record> {
    let json = line.split_once(PREFIX)?.1;
    serde_json::from_str(json).ok()
}

/// Drops ANSI escape sequences (the firmware clears the screen on boot).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'[') {
            chars.next();
            // Parameters and intermediates, then one final byte in '@'..='~'.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            chars.next();
        }
    }
    out
}

/// How a console line is shown on the host terminal (`None` hides it).
pub fn render(line: &str) -> Option<String> {
    let Some(record) = parse(line) else {
        return Some(strip_ansi(line));
    };
    Some(match record {
        Record::Start {
            scenario,
            balancer,
            kernel,
        } => format!("== scenario {scenario}, balancer {balancer}, kernel {kernel}"),
        Record::Check {
            name,
            ok,
            allowed_failure,
            detail,
        } => {
            let verdict = match (ok, allowed_failure) {
                (true, _) => "ok  ",
                (false, true) => "WARN (allowed to fail)",
                (false, false) => "FAIL",
            };
            format!("check {verdict} {name}: {detail}")
        }
        Record::Sample(s) => {
            let per_vm: Vec<String> = s
                .vms
                .iter()
                .map(|v| {
                    let node = v.main_node.map_or("-".into(), |n| n.to_string());
                    let hot_cold = match (v.hot_locality, v.cold_locality) {
                        (Some(h), Some(c)) => format!("(hot {h:.2} cold {c:.2})"),
                        _ => String::new(),
                    };
                    format!("{}@n{node}:{:.2}{hot_cold}", v.name, v.locality)
                })
                .collect();
            let load: Vec<String> = s
                .vcpu_load_per_node
                .iter()
                .map(|l| format!("{l:.1}"))
                .collect();
            format!(
                "t={:>5.1}s locality mean {:.3} min {:.3} | vCPU load/node [{}] | {}",
                s.t_s,
                s.locality_mean,
                s.locality_min,
                load.join(" "),
                per_vm.join(" ")
            )
        }
        Record::Event { source, text } => format!("[{source}] {text}"),
        Record::Summary(s) => format!(
            "summary: {} VMs, t->0.9 {:?} s, t->0.95 {:?} s, numa_pages_migrated {}, pgmigrate_success {}, CPU balance {:.2}, {:.0} touches/vCPU/s",
            s.vms,
            s.time_to_090_s,
            s.time_to_095_s,
            s.numa_pages_migrated,
            s.pgmigrate_success,
            s.cpu_balance,
            s.touches_per_vcpu_s
        ),
        Record::Capture { .. } => return None,
        Record::Done { ok, failed } => {
            if ok {
                "scenario PASSED".into()
            } else {
                format!("scenario FAILED: {}", failed.join("; "))
            }
        }
        Record::Other => line.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_guest_lines() {
        let line = format!(r#"{PREFIX}{{"type":"done","ok":false,"failed":["nodes == 5"]}}"#);
        assert!(matches!(parse(&line), Some(Record::Done { ok: false, .. })));
        assert!(matches!(
            parse(&format!(r#"{PREFIX}{{"type":"future_kind","x":1}}"#)),
            Some(Record::Other)
        ));
        assert!(parse("[    0.000000] Linux version 6.1.0").is_none());
        assert_eq!(render("plain").as_deref(), Some("plain"));
        assert_eq!(render("a\x1b[?7l\x1b[2Jb\x1bcc").as_deref(), Some("abc"));
    }
}
