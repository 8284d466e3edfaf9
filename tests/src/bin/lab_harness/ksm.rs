//! Kernel samepage merging around a run: the scenario's settings written before
//! the VMs start, a wait for merging to settle before the balancer starts, and
//! `pages_sharing`/`pages_shared` at the start and the end for the results.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use vmbalancer_tests::lab::protocol::Record;
use vmbalancer_tests::lab::scenario::KsmSpec;

use crate::emit;

const KSM: &str = "/sys/kernel/mm/ksm";

/// KSM's counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KsmFigures {
    /// Page mappings that point at a merged page (the memory saved, in pages).
    pub pages_sharing: u64,
    /// Merged pages in use.
    pub pages_shared: u64,
}

fn read(name: &str) -> anyhow::Result<u64> {
    let path = Path::new(KSM).join(name);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{}: not a number: {:?}", path.display(), text.trim()))
}

fn write(name: &str, value: &str) -> anyhow::Result<()> {
    let path = Path::new(KSM).join(name);
    std::fs::write(&path, value).with_context(|| format!("writing {value:?} to {}", path.display()))
}

/// Reads the counters.
pub fn figures() -> anyhow::Result<KsmFigures> {
    Ok(KsmFigures {
        pages_sharing: read("pages_sharing")?,
        pages_shared: read("pages_shared")?,
    })
}

/// Writes the scenario's settings, `merge_across_nodes` first (the kernel refuses
/// to change it once pages are merged), then starts ksmd.
pub fn setup(spec: &KsmSpec) -> anyhow::Result<()> {
    write("merge_across_nodes", &spec.merge_across_nodes.to_string())?;
    if let Some(p) = spec.pages_to_scan {
        write("pages_to_scan", &p.to_string())?;
    }
    if let Some(ms) = spec.sleep_millisecs {
        write("sleep_millisecs", &ms.to_string())?;
    }
    write("run", "1")?;
    emit(&Record::Event {
        source: "harness".into(),
        text: format!(
            "KSM running: merge_across_nodes={}, pages_to_scan={}, sleep_millisecs={}",
            read("merge_across_nodes")?,
            read("pages_to_scan")?,
            read("sleep_millisecs")?
        ),
    });
    Ok(())
}

/// Waits until `pages_sharing` reaches the scenario's level and stops growing (two
/// readings 5 s apart within 1 %), or the timeout. Returns the figures then.
pub fn settle(spec: &KsmSpec) -> anyhow::Result<KsmFigures> {
    let start = Instant::now();
    let limit = Duration::from_secs_f64(spec.settle_timeout_s);
    let mut last = figures()?;
    loop {
        std::thread::sleep(Duration::from_secs(5));
        let now = figures()?;
        let steady = now.pages_sharing.abs_diff(last.pages_sharing) * 100 <= now.pages_sharing;
        if (now.pages_sharing >= spec.settle_pages_sharing && steady) || start.elapsed() >= limit {
            emit(&Record::Event {
                source: "harness".into(),
                text: format!(
                    "KSM after {:.0} s of merging: pages_sharing {}, pages_shared {}{}",
                    start.elapsed().as_secs_f64(),
                    now.pages_sharing,
                    now.pages_shared,
                    if now.pages_sharing >= spec.settle_pages_sharing {
                        String::new()
                    } else {
                        format!(
                            " (below the {} asked; timed out)",
                            spec.settle_pages_sharing
                        )
                    }
                ),
            });
            return Ok(now);
        }
        last = now;
    }
}
