//! Builds the guest's initramfs: busybox, our binaries, numad/numactl with their
//! shared libraries, an `/init`, and the scenario.
//!
//! Two newc cpio archives are concatenated (the kernel unpacks both): a base
//! archive with everything that does not depend on the run, and a small per-run
//! archive with the scenario and the harness arguments. Dynamic binaries get the
//! libraries `ldd` lists, copied to the same paths.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

use super::host::Binaries;

/// The guest's PID 1. Mounts the kernel filesystems, then runs the harness with
/// the arguments in /lab/args (or a shell), then powers off.
const INIT: &str = r#"#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run /tmp /var/log /var/run
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
ulimit -l unlimited
echo "@@VMBLAB-INIT@@ kernel $(uname -r), $(ls -d /sys/devices/system/node/node* | wc -l) nodes, $(cat /proc/uptime | cut -d' ' -f1) s since boot"
if [ -e /lab/shell ]; then
  echo "lab shell: the harness is /usr/bin/lab-harness $(cat /lab/args); 'poweroff -f' ends the guest"
  setsid cttyhack sh
else
  # The heartbeat the lab host watches: see ALIVE_MARK in qemu.rs.
  ( while sleep 5; do echo @@VMBLAB-ALIVE@@; done ) &
  /usr/bin/lab-harness $(cat /lab/args)
  echo "@@VMBLAB-EXIT@@ $?"
fi
poweroff -f
"#;

fn copy_exec(src: &Path, dst: &Path) -> anyhow::Result<()> {
    if let Some(p) = dst.parent() {
        fs::create_dir_all(p)?;
    }
    fs::copy(src, dst)
        .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    fs::set_permissions(dst, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Copies our own (large, debug-info carrying) binaries without debug info.
fn copy_stripped(src: &Path, dst: &Path) -> anyhow::Result<()> {
    if let Some(p) = dst.parent() {
        fs::create_dir_all(p)?;
    }
    let ok = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(src)
        .arg(dst)
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        fs::set_permissions(dst, fs::Permissions::from_mode(0o755))?;
        Ok(())
    } else {
        copy_exec(src, dst)
    }
}

/// The shared libraries `ldd` lists for `binary` (empty for static ones).
fn libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .with_context(|| format!("running ldd {}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or
            // `/lib64/ld-linux-x86-64.so.2 (0x...)`
            let path = match l.split_once("=>") {
                Some((_, rhs)) => rhs.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

fn add_libraries(root: &Path, binary: &Path) -> anyhow::Result<()> {
    for lib in libraries(binary)? {
        let dst = root.join(lib.strip_prefix("/").unwrap_or(&lib));
        if !dst.exists() {
            copy_exec(&lib, &dst)?;
        }
    }
    Ok(())
}

/// Packs `dir` into a newc cpio archive at `out`.
fn pack(dir: &Path, out: &Path) -> anyhow::Result<()> {
    let find = Command::new("find")
        .arg(".")
        .current_dir(dir)
        .output()
        .context("listing the initramfs tree")?;
    let mut cpio = Command::new("cpio")
        .args(["--quiet", "-o", "-H", "newc", "-R", "0:0"])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(fs::File::create(out)?)
        .spawn()
        .context("starting cpio")?;
    cpio.stdin
        .take()
        .context("cpio stdin")?
        .write_all(&find.stdout)?;
    let status = cpio.wait()?;
    if !status.success() {
        bail!("cpio failed ({status}) packing {}", dir.display());
    }
    Ok(())
}

/// Builds the base archive under `work` and returns its path.
pub fn build_base(work: &Path, bins: &Binaries) -> anyhow::Result<PathBuf> {
    let root = work.join("base");
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "run", "tmp", "etc", "lab",
        "var/log", "var/run",
    ] {
        fs::create_dir_all(root.join(d))?;
    }
    copy_exec(Path::new("/bin/busybox"), &root.join("bin/busybox"))?;
    let list = Command::new("/bin/busybox")
        .arg("--list-full")
        .output()
        .context("running busybox --list-full")?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let link = root.join(applet);
        if applet.is_empty() || link.exists() {
            continue;
        }
        if let Some(p) = link.parent() {
            fs::create_dir_all(p)?;
        }
        symlink("/bin/busybox", &link)?;
    }
    for tool in [
        "/usr/bin/numad",
        "/usr/bin/numactl",
        "/usr/bin/numastat",
        "/usr/bin/migratepages",
    ] {
        let src = Path::new(tool);
        if src.exists() {
            let dst = root.join(&tool[1..]);
            if dst.exists() {
                fs::remove_file(&dst)?;
            }
            copy_exec(src, &dst)?;
            add_libraries(&root, src)?;
        }
    }
    let ours: Vec<(&Path, &str)> = [
        Some((bins.harness.as_path(), "usr/bin/lab-harness")),
        Some((bins.fake_qemu.as_path(), "usr/bin/fake-qemu")),
        bins.vmbalancer
            .as_deref()
            .map(|p| (p, "usr/bin/vmbalancer")),
    ]
    .into_iter()
    .flatten()
    .collect();
    for (src, dst) in ours {
        copy_stripped(src, &root.join(dst))?;
        add_libraries(&root, src)?;
    }
    // comm comes from the executed file name: `qemu-kvm`, as on a real host.
    symlink("fake-qemu", root.join("usr/bin/qemu-kvm"))?;
    let init = root.join("init");
    fs::write(&init, INIT)?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n")?;
    fs::write(root.join("etc/group"), "root:x:0:\n")?;
    let out = work.join("base.cpio");
    pack(&root, &out)?;
    Ok(out)
}

/// What one run puts into /lab.
pub struct RunFiles<'a> {
    pub scenario_toml: &'a str,
    pub harness_args: &'a str,
    pub shell: bool,
}

/// Writes base + per-run archive into one initrd file and returns its path.
pub fn build_initrd(
    work: &Path,
    base: &Path,
    run: &RunFiles<'_>,
    tag: &str,
) -> anyhow::Result<PathBuf> {
    let dir = work.join(format!("run-{tag}"));
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::create_dir_all(dir.join("lab"))?;
    fs::write(dir.join("lab/scenario.toml"), run.scenario_toml)?;
    fs::write(dir.join("lab/args"), run.harness_args)?;
    if run.shell {
        fs::write(dir.join("lab/shell"), "")?;
    }
    let run_cpio = work.join(format!("run-{tag}.cpio"));
    pack(&dir, &run_cpio)?;
    let initrd = work.join(format!("initrd-{tag}.cpio"));
    let mut out = fs::File::create(&initrd)?;
    out.write_all(&fs::read(base)?)?;
    out.write_all(&fs::read(&run_cpio)?)?;
    Ok(initrd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lists_libc_for_a_dynamic_binary() {
        let libs = libraries(Path::new("/bin/sh")).unwrap();
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
    }
}
