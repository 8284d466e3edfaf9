//! The host's view of scenario files: names, descriptions, timeouts, default
//! comparison balancers. The guest's harness parses the full format; the host only
//! needs these few fields, read from the same TOML.

use anyhow::Context;

use super::Paths;

/// What the host needs to know of a scenario (the guest parses the full format).
pub struct ScenarioFile {
    pub name: String,
    pub text: String,
    pub description: String,
    pub timeout_s: u64,
    pub compare: Vec<String>,
    /// The scenario's own balancer (its assertions are about this one).
    pub balancer: String,
    /// Runs in the stack guest (`guest = "stack"`: Debian, systemd, libvirt).
    pub stack: bool,
    /// More kernel command line for the busybox guest (`kernel_args`), e.g. huge
    /// page pools only the boot can reserve.
    pub kernel_args: String,
    /// Memory of each guest node, MiB (`node_memory_mib`, busybox guest; default
    /// [`super::qemu::MIB_PER_NODE`]).
    pub node_memory_mib: usize,
}

pub fn load_scenario(paths: &Paths, name: &str) -> anyhow::Result<ScenarioFile> {
    let path = paths.scenarios.join(format!("{name}.toml"));
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("no scenario {name:?} ({}); try --list", path.display()))?;
    let value: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let num = |k: &str| {
        value
            .get(k)
            .and_then(|v| v.as_float().or(v.as_integer().map(|i| i as f64)))
    };
    let compare = value
        .get("compare")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|b| b.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_else(|| vec!["none".into(), "autonuma".into(), "numad".into()]);
    Ok(ScenarioFile {
        name: name.to_string(),
        description: value
            .get("description")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string(),
        timeout_s: num("timeout_s").unwrap_or(300.0) as u64,
        compare,
        balancer: value
            .get("balancer")
            .and_then(|v| v.as_str())
            .unwrap_or("none")
            .to_string(),
        stack: value.get("guest").and_then(|v| v.as_str()) == Some("stack"),
        kernel_args: value
            .get("kernel_args")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string(),
        node_memory_mib: value
            .get("node_memory_mib")
            .and_then(toml::Value::as_integer)
            .and_then(|m| usize::try_from(m).ok())
            .unwrap_or(super::qemu::MIB_PER_NODE),
        text,
    })
}

pub fn list(paths: &Paths) -> anyhow::Result<()> {
    let mut names: Vec<String> = std::fs::read_dir(&paths.scenarios)?
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".toml")
                .map(String::from)
        })
        .collect();
    names.sort();
    for n in names {
        let s = load_scenario(paths, &n)?;
        println!("{n:<20} {}", s.description);
    }
    Ok(())
}
