//! How the guest's result lines are shown on the host terminal.
//!
//! The lines themselves (record types, prefix, parsing) are defined once, in the
//! `lab-protocol` crate, for the harness that prints them and for this host side
//! that reads them; xtask cannot depend on the harness crate (it needs the balancer
//! and the eBPF toolchain, and xtask must build first). Record types and fields the
//! host does not know are tolerated there, so a newer guest does not break the host.

pub use lab_protocol::{MoverBench, Record, Sample, Summary, parse_line};

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
    let record = match parse_line(line) {
        Ok(Some(record)) => record,
        Ok(None) => return Some(strip_ansi(line)),
        Err(e) => return Some(strip_ansi(&e.to_string())),
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
                        (Some(h), Some(c)) => match v.queried_present_share {
                            Some(p) if p < 0.995 => {
                                format!("(hot {h:.2} cold {c:.2} of the {p:.2} found)")
                            }
                            _ => format!("(hot {h:.2} cold {c:.2})"),
                        },
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
            let access = match (s.access_locality_mean, s.hot_locality_mean) {
                (Some(a), Some(h)) => format!(
                    " access {a:.3} hot {h:.3} off-node ~{:.0}/s",
                    s.offnode_accesses_per_s.unwrap_or(0.0)
                ),
                _ => String::new(),
            };
            format!(
                "t={:>5.1}s locality mean {:.3} min {:.3}{access} | vCPU load/node [{}] | {}",
                s.t_s,
                s.locality_mean,
                s.locality_min,
                load.join(" "),
                per_vm.join(" ")
            )
        }
        Record::Event { source, text } => format!("[{source}] {text}"),
        Record::Summary(s) => format!(
            "summary: {} VMs, t->0.9 {:?} s, t->0.95 {:?} s (access {:?} s, hot set {:?} s), first CPU move {:?} s (status {:?} s), tick late while moving {:?} s, balancer CPU {:?} s, numa_pages_migrated {}, pgmigrate_success {}, CPU balance {:.2}, {:.0} touches/vCPU/s",
            s.vms,
            s.time_to_090_s,
            s.time_to_095_s,
            s.access_time_to_095_s,
            s.hot_time_to_095_s,
            s.first_cpu_move_affinity_s,
            s.first_cpu_move_status_s,
            s.tick_late_moving_s,
            s.balancer_cpu_s,
            s.numa_pages_migrated,
            s.pgmigrate_success,
            s.cpu_balance,
            s.touches_per_vcpu_s
        ),
        Record::MoverBench(b) => format!(
            "bench-mover: {} | {}: {} pages in {:.2} s ({:.0} pages/s), {:.3} on target, {} calls",
            b.layout,
            b.method,
            b.pages,
            b.seconds,
            b.pages as f64 / b.seconds.max(1e-9),
            b.on_target,
            b.calls
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
    use lab_protocol::PREFIX;

    #[test]
    fn renders_results_and_passes_other_lines_through() {
        let done = format!(r#"{PREFIX}{{"type":"done","ok":false,"failed":["nodes == 5"]}}"#);
        assert_eq!(
            render(&done).as_deref(),
            Some("scenario FAILED: nodes == 5")
        );
        let future = format!(r#"{PREFIX}{{"type":"future_kind","x":1}}"#);
        assert_eq!(render(&future), Some(future.clone()));
        let capture = format!(r#"{PREFIX}{{"type":"capture","path":"p","data":"d"}}"#);
        assert_eq!(render(&capture), None);
        let cut = format!(r#"{PREFIX}{{"type":"done","ok":tr"#);
        let shown = render(&cut).unwrap();
        assert!(
            shown.starts_with("malformed lab result line (") && shown.ends_with("ok\":tr"),
            "{shown}"
        );
        assert_eq!(render("plain").as_deref(), Some("plain"));
        assert_eq!(render("a\x1b[?7l\x1b[2Jb\x1bcc").as_deref(), Some("abc"));
    }
}
