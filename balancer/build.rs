//! Builds the eBPF programs (`balancer-ebpf`) and leaves the object in `OUT_DIR`, where
//! `telemetry::loader` embeds it with `include_bytes_aligned!`. This is the only way the
//! object reaches the binary, so a plain `cargo build -p balancer` is enough once
//! `cargo xtask setup` has installed the nightly's `rust-src` and `bpf-linker`.
//!
//! The eBPF crate needs the nightly toolchain, `-Z build-std=core` and bpf-linker, so it
//! is built by a separate cargo with an environment scrubbed of everything the outer
//! (stable) cargo set for this build script.

use std::path::{Path, PathBuf};
use std::process::Command;

const SETUP_HINT: &str = "run `cargo xtask setup`";

fn main() {
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let ebpf_dir = manifest_dir
        .parent()
        .expect("balancer/ has a parent")
        .join("balancer-ebpf");
    let out_dir = PathBuf::from(env("OUT_DIR"));
    let target_dir = out_dir.join("ebpf-target");

    for rel in [
        "Cargo.toml",
        "Cargo.lock",
        "src",
        "common/Cargo.toml",
        "common/src",
    ] {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(rel).display());
    }

    check_prerequisites();

    let mut cmd = Command::new("rustup");
    cmd.current_dir(&ebpf_dir)
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    scrub_env(&mut cmd);
    // Keep debug info for BTF and ask bpf-linker to emit .BTF/.BTF.ext, which aya
    // needs for global data and which helps the verifier's messages.
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        ["-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f"),
    );
    let status = cmd.status().unwrap_or_else(|e| {
        fail(&format!(
            "could not start `rustup run nightly cargo build` for the eBPF programs: {e}; \
             {SETUP_HINT}"
        ))
    });
    if !status.success() {
        fail(&format!(
            "building the eBPF programs in {} failed ({status}); if the toolchain is \
             incomplete, {SETUP_HINT}",
            ebpf_dir.display()
        ));
    }
    let object = target_dir.join("bpfel-unknown-none/release/balancer-ebpf");
    let dest = out_dir.join("balancer-ebpf.o");
    std::fs::copy(&object, &dest).unwrap_or_else(|e| {
        fail(&format!(
            "copying {} to {}: {e}",
            object.display(),
            dest.display()
        ))
    });
}

/// Fails early, with the one command that fixes it, when the nightly's `rust-src`
/// or bpf-linker is missing.
fn check_prerequisites() {
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .output();
    let sysroot = match sysroot {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        _ => fail(&format!(
            "the nightly toolchain is missing (needed to build the eBPF programs); \
             install it with `rustup toolchain install nightly`, then {SETUP_HINT}"
        )),
    };
    let core_src = Path::new(&sysroot).join("lib/rustlib/src/rust/library/core");
    if !core_src.is_dir() {
        fail(&format!(
            "rust-src for the nightly toolchain is missing (needed by -Z build-std); \
             {SETUP_HINT}"
        ));
    }
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !matches!(linker, Ok(o) if o.status.success()) {
        fail(&format!(
            "bpf-linker is missing or does not start (it must be built against the \
             nightly's LLVM); {SETUP_HINT}"
        ));
    }
}

/// Removes what the outer cargo set for this build script so the inner cargo starts
/// from a clean slate (its own toolchain, flags, target and profile).
fn scrub_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let scrub = matches!(
            key,
            "RUSTC"
                | "RUSTC_WRAPPER"
                | "RUSTC_WORKSPACE_WRAPPER"
                | "RUSTDOC"
                | "RUSTFLAGS"
                | "RUSTUP_TOOLCHAIN"
                | "TARGET"
                | "HOST"
                | "OUT_DIR"
                | "OPT_LEVEL"
                | "PROFILE"
                | "DEBUG"
                | "NUM_JOBS"
                | "RUSTC_LINKER"
        ) || (key.starts_with("CARGO") && key != "CARGO_HOME")
            || key.starts_with("DEP_");
        if scrub {
            cmd.env_remove(key);
        }
    }
}

fn env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| fail(&format!("{key} is not set")))
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    println!("cargo:warning={msg}");
    std::process::exit(1);
}
