//! Optional Prometheus text endpoint on a loopback address (off by default).
//!
//! Why hand-written: the exposition format is a few lines of text and the endpoint
//! serves one page; a web framework would cost more than the feature. Any request
//! gets the metrics; the numbers come from the same [`StatusDoc`] as `status`.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::status::StatusDoc;

/// The metrics page for a status document.
pub fn render(doc: &StatusDoc) -> String {
    let mut s = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        let _ = writeln!(s, "# HELP vmbalancer_{name} {help}");
        let _ = writeln!(s, "# TYPE vmbalancer_{name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(s, "vmbalancer_{name}{labels} {v}");
        }
    };
    let d = &doc.daemon;
    let one = |v: f64| vec![(String::new(), v)];
    metric("ticks_total", "counter", "Ticks run.", one(d.ticks as f64));
    metric(
        "last_tick_seconds",
        "gauge",
        "Duration of the last tick.",
        one(d.last_tick_ns as f64 / 1e9),
    );
    metric(
        "tick_seconds",
        "gauge",
        "Tick duration percentiles over the recent ticks.",
        vec![
            ("{quantile=\"0.5\"}".into(), d.tick_p50_ns as f64 / 1e9),
            ("{quantile=\"0.99\"}".into(), d.tick_p99_ns as f64 / 1e9),
        ],
    );
    metric(
        "wakes_total",
        "counter",
        "Kernel events that started a tick early, by kind.",
        d.wakes
            .iter()
            .map(|(k, n)| (format!("{{kind=\"{k}\"}}"), *n as f64))
            .collect(),
    );
    metric(
        "woken_ticks_total",
        "counter",
        "Ticks started early by kernel events.",
        one(d.woken_ticks as f64),
    );
    metric(
        "observe_errors_total",
        "counter",
        "Failed host observations.",
        one(d.observe_errors as f64),
    );
    metric(
        "config_reloads_total",
        "counter",
        "Configuration reloads, by result.",
        vec![
            ("{result=\"applied\"}".into(), d.reloads as f64),
            ("{result=\"refused\"}".into(), d.reload_failures as f64),
        ],
    );
    metric(
        "cpu_seconds_total",
        "counter",
        "CPU time of the daemon.",
        one(d.cpu_time_ns as f64 / 1e9),
    );
    metric(
        "resident_memory_bytes",
        "gauge",
        "Resident memory of the daemon.",
        one(d.rss_bytes as f64),
    );
    let c = &doc.counters;
    metric(
        "quiet_events_total",
        "counter",
        "VMs, threads and cgroups that vanished under an action.",
        vec![
            ("{what=\"vm_gone\"}".into(), c.vm_gone as f64),
            ("{what=\"thread_gone\"}".into(), c.threads_gone as f64),
            ("{what=\"cgroup_gone\"}".into(), c.cgroups_gone as f64),
        ],
    );
    metric(
        "refused_total",
        "counter",
        "Actions refused before touching the host.",
        one(c.refused as f64),
    );
    metric(
        "vm_locality_ratio",
        "gauge",
        "Share of a VM's resident memory on its home nodes.",
        doc.vms
            .iter()
            .filter_map(|v| {
                Some((
                    format!("{{pid=\"{}\",name=\"{}\"}}", v.pid, escape(&v.name)),
                    v.locality_pct? / 100.0,
                ))
            })
            .collect(),
    );
    metric(
        "migration_moved_bytes",
        "gauge",
        "Bytes moved so far by migrations in flight.",
        doc.migrations
            .iter()
            .map(|m| (format!("{{pid=\"{}\"}}", m.vm), m.moved_bytes as f64))
            .collect(),
    );
    metric(
        "probations",
        "gauge",
        "CPU-first moves on probation.",
        one(doc.probations.len() as f64),
    );
    if let Some(e) = &doc.ebpf {
        metric(
            "ebpf_run_seconds_total",
            "counter",
            "Time spent in the eBPF programs.",
            one(e.run_time_ns as f64 / 1e9),
        );
    }
    s
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves the page on `addr` until `stop` resolves.
pub async fn serve(
    addr: SocketAddr,
    page: Arc<dyn Fn() -> String + Send + Sync>,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "prometheus endpoint");
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            conn = listener.accept() => {
                let Ok((mut sock, _)) = conn else { continue };
                let page = page.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await;
                    let body = page();
                    let head = format!(
                        "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = sock.write_all(head.as_bytes()).await;
                    let _ = sock.write_all(body.as_bytes()).await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::status::VmStatus;

    #[test]
    fn renders_and_serves() {
        let mut doc = StatusDoc::default();
        doc.daemon.ticks = 7;
        doc.vms.push(VmStatus {
            pid: 3,
            name: "a\"b".into(),
            locality_pct: Some(50.0),
            ..Default::default()
        });
        let page = render(&doc);
        assert!(page.contains("vmbalancer_ticks_total 7\n"), "{page}");
        assert!(page.contains("vmbalancer_vm_locality_ratio{pid=\"3\",name=\"a\\\"b\"} 0.5"));
        // An operator's VM name with a quote, a backslash and a newline stays one
        // sample line, escaped as the text format asks.
        doc.vms[0].name = "web\"1\\\nx".into();
        let page = render(&doc);
        assert!(
            page.contains(
                "vmbalancer_vm_locality_ratio{pid=\"3\",name=\"web\\\"1\\\\\\nx\"} 0.5\n"
            ),
            "{page}"
        );
        assert!(page.lines().all(|l| !l.starts_with('x')), "{page}");

        let rt = tokio::runtime::Runtime::new().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let text = page.clone();
        let h = rt.spawn(serve(addr, Arc::new(move || text.clone()), async {
            let _ = rx.await;
        }));
        let got = rt.block_on(async {
            for _ in 0..50 {
                if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
                    let mut out = String::new();
                    s.read_to_string(&mut out).await.unwrap();
                    return out;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("endpoint did not come up");
        });
        assert!(got.starts_with("HTTP/1.0 200 OK"));
        assert!(got.ends_with(&page));
        tx.send(()).unwrap();
        rt.block_on(h).unwrap().unwrap();
    }
}
