//! `cargo xtask gpu-bundle`: everything the GPU machine runs, built here.
//!
//! The GPU machine has a driver, CUDA 13 and cuBLAS but no Rust toolchain, so this builds the GPU test
//! binaries (`cargo test --release --features gpu --no-run`), the GPU benchmarks (the `examples` of the
//! GPU crates, built with `--features gpu`), the demo (`lora-gemm`'s example `lora_demo`) and the release
//! binaries `lora-engine` and `lora-server` (into `bin/`, with `scripts/gpu/engine_bench.sh`) in release
//! mode (symbols stripped), copies them into `target/gpu-bundle/` (each executable as a self-extracting
//! wrapper around its gzipped bytes)
//! (at most 60 MiB, checked), and writes `run.sh`, which runs every suite there with one summary line each
//! and a final `N passed, N failed` line, then the benchmarks, keeping logs under `$OUT` when that is set.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Crates whose tests and examples go into the bundle.
const GPU_CRATES: &[&str] = &["lora-device", "lora-gemm", "lora-graph", "lora-model", "lora-engine"];
/// Release binaries shipped in `bin/` (`cargo build --release -p lora-engine -p lora-server --bins`):
/// `scripts/gpu/engine_bench.sh` and `scripts/gpu/serve_bench.sh` take `bin/` as their bundle.
const BINS: &[(&str, &str)] =
    &[("lora-engine", "lora-engine"), ("lora-server", "lora-server"), ("lora-server", "lora-serve-bench")];
/// The demo: an example of `lora-gemm`, shipped as `lora-demo` (not among the benchmarks).
const DEMO: &str = "lora_demo";
const LIMIT: u64 = 60 << 20;

pub fn run(root: &Path) -> Result<()> {
    let out = root.join("target/gpu-bundle");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(out.join("tests"))?;
    std::fs::create_dir_all(out.join("bench"))?;
    std::fs::create_dir_all(out.join("bin"))?;

    let mut pkgs = Vec::new();
    for c in GPU_CRATES {
        pkgs.push("-p".to_string());
        pkgs.push(c.to_string());
    }
    // Integration tests named `device_*` (one body per backend) or `gpu_*` (GPU only) are the GPU suites;
    // the rest are CPU tests that CI already runs (and some, like insta snapshots, need the source tree).
    let tests = artifacts(root, &["test", "--release", "--features", "gpu", "--no-run"], &pkgs, |kind| kind == "test")?
        .into_iter()
        .filter(|(name, _)| name.contains("--device_") || name.contains("--gpu_"))
        .collect::<Vec<_>>();
    let (demo, benches): (Vec<_>, Vec<_>) =
        artifacts(root, &["build", "--release", "--features", "gpu", "--examples"], &pkgs, |kind| kind == "example")?
            .into_iter()
            .partition(|(name, _)| name.ends_with(&format!("--{DEMO}")));
    if demo.is_empty() {
        bail!("the demo example {DEMO} was not built");
    }
    let mut bin_pkgs: Vec<String> = Vec::new();
    for (p, _) in BINS {
        if !bin_pkgs.iter().any(|q| q == p) {
            bin_pkgs.extend(["-p".to_string(), p.to_string()]);
        }
    }
    let bins = artifacts(root, &["build", "--release", "--bins"], &bin_pkgs, |kind| kind == "bin")?;
    for (pkg, bin) in BINS {
        let Some((_, path)) = bins.iter().find(|(name, _)| name.ends_with(&format!("--{bin}"))) else {
            bail!("the binary {bin} of {pkg} was not built");
        };
        copy(path, &out.join("bin").join(bin))?;
    }
    std::fs::copy(root.join("scripts/gpu/engine_bench.sh"), out.join("engine_bench.sh"))?;
    for (_, path) in &demo {
        copy(path, &out.join("lora-demo"))?;
    }
    for (name, path) in &tests {
        copy(path, &out.join("tests").join(name))?;
    }
    for (name, path) in &benches {
        copy(path, &out.join("bench").join(name))?;
    }
    std::fs::copy(root.join("lora-kernels/ptx/lora_kernels.ptx"), out.join("lora_kernels.ptx"))?;
    // The PyTorch peer of bench_attention (run on the GPU machine, where torch is installed).
    std::fs::copy(root.join("lora-kernels/bench/sdpa_peer.py"), out.join("sdpa_peer.py"))?;
    std::fs::write(out.join("run.sh"), RUN_SH)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for f in ["run.sh", "engine_bench.sh"] {
            std::fs::set_permissions(out.join(f), std::fs::Permissions::from_mode(0o755))?;
        }
    }
    // Every executable becomes a self-extracting wrapper (a few shell lines that unpack the gzipped
    // binary once into $TMPDIR and `exec` it: the same path, arguments, pid and signals), about a third
    // of the size, so the bundle stays under 60 MiB.
    for dir in ["tests", "bench", "bin"] {
        for e in std::fs::read_dir(out.join(dir))? {
            self_extracting(&e?.path())?;
        }
    }
    let size = dir_size(&out)?;
    if size > LIMIT {
        bail!("bundle is {} MiB, over the 60 MiB limit", size >> 20);
    }
    eprintln!(
        "gpu-bundle: {} test suites, {} benchmarks, {} binaries, {:.1} MiB in {}",
        tests.len(),
        benches.len(),
        BINS.len(),
        size as f64 / (1 << 20) as f64,
        out.display()
    );
    Ok(())
}

/// Run cargo with JSON messages and collect (name, executable) of the artifacts whose target kind passes.
fn artifacts(
    root: &Path,
    args: &[&str],
    pkgs: &[String],
    keep: impl Fn(&str) -> bool,
) -> Result<Vec<(String, PathBuf)>> {
    let output = Command::new("cargo")
        .current_dir(root)
        .args(args)
        .args(pkgs)
        .arg("--message-format=json-render-diagnostics")
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        .output()
        .context("running cargo")?;
    if !output.status.success() {
        bail!("cargo {args:?} failed:\n{}", String::from_utf8_lossy(&output.stderr));
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        if !line.contains("\"reason\":\"compiler-artifact\"") || !line.contains("\"executable\":\"") {
            continue;
        }
        let field = |key: &str| -> Option<String> {
            let start = line.find(key)? + key.len();
            Some(line[start..start + line[start..].find('"')?].to_string())
        };
        let kind = field("\"kind\":[\"").unwrap_or_default();
        let name = field("\"target\":{").and(field("\"name\":\"")).unwrap_or_default();
        // The first "name" in the message is the target's; prefix with the package for uniqueness.
        let pkg = field("\"package_id\":\"").unwrap_or_default();
        let pkg = GPU_CRATES.iter().find(|c| pkg.contains(*c)).copied().unwrap_or("x");
        if keep(&kind) {
            if let Some(exe) = field("\"executable\":\"") {
                found.push((format!("{pkg}--{name}"), PathBuf::from(exe)));
            }
        }
    }
    found.sort();
    found.dedup();
    Ok(found)
}

/// The wrapper's shell lines; the gzipped binary follows them.
const SFX_HEAD: &str = r#"#!/bin/sh
# Self-extracting executable of the GPU bundle: unpacks the gzipped binary below once and execs it.
d="${TMPDIR:-/tmp}/lora-gpu-bundle-$(id -u)/@HASH@"
x="$d/@NAME@"
if [ ! -x "$x" ]; then
  mkdir -p "$d" && tail -n +@SKIP@ "$0" | gzip -cd > "$x.$$" && chmod 755 "$x.$$" && mv -f "$x.$$" "$x" || { echo "cannot unpack $0" >&2; exit 127; }
fi
exec "$x" "$@"
"#;

/// Replaces the executable `path` by a self-extracting wrapper around its gzipped bytes.
fn self_extracting(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3));
    let gz = Command::new("gzip").arg("-c").arg("-6").arg(path).output().context("running gzip")?;
    if !gz.status.success() {
        bail!("gzip {} failed", path.display());
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("bin");
    let skip = SFX_HEAD.lines().count() + 1;
    let head = SFX_HEAD
        .replace("@NAME@", name)
        .replace("@HASH@", &format!("{hash:016x}"))
        .replace("@SKIP@", &skip.to_string());
    let mut out = head.into_bytes();
    out.extend_from_slice(&gz.stdout);
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    Ok(())
}

fn dir_size(p: &Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(p)? {
        let e = e?;
        total += if e.file_type()?.is_dir() { dir_size(&e.path())? } else { e.metadata()?.len() };
    }
    Ok(total)
}

const RUN_SH: &str = r#"#!/usr/bin/env bash
# Runs the GPU bundle built by `cargo xtask gpu-bundle` on a machine with an NVIDIA GPU and no Rust
# toolchain: every test suite (one summary line each, then a total), then every benchmark.
# Usage: run.sh [tests|bench|attention|sdpa|all] [extra args passed to benchmarks]
# (Every executable is a self-extracting wrapper: it unpacks itself into $TMPDIR once and execs.)
#   bench: every benchmark, then PyTorch's SDPA on the attention shapes (sdpa_peer.py, needs python3 + torch);
#   attention: bench_attention and sdpa_peer.py only (side by side); sdpa: sdpa_peer.py only.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
logs="${OUT:-$here/logs}"
mkdir -p "$logs"
what="${1:-all}"; shift || true
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader 2>/dev/null || echo "nvidia-smi: no GPU visible"
passed=0; failed=0; summary=""
if [ "$what" = all ] || [ "$what" = tests ]; then
  echo "== demo"; "$here/lora-demo" || failed=$((failed + 1))
  for t in "$here"/tests/*; do
    name="$(basename "$t")"
    # Only the GPU arms (`::gpu`, `*_gpu`, `gpu_*`): the emulator arms already ran in CI.
    "$t" --test-threads=1 --nocapture gpu >"$logs/$name.log" 2>&1
    rc=$?
    line="$(grep -E '^test result:' "$logs/$name.log" | tail -n 1)"
    p="$(echo "$line" | sed -nE 's/.* ([0-9]+) passed.*/\1/p')"; f="$(echo "$line" | sed -nE 's/.* ([0-9]+) failed.*/\1/p')"
    skips="$(grep -c '^SKIP' "$logs/$name.log")"
    passed=$((passed + ${p:-0})); failed=$((failed + ${f:-0}))
    [ "$rc" -ne 0 ] && [ "${f:-0}" = 0 ] && failed=$((failed + 1))
    summary="$summary\nSUITE $name: rc=$rc ${line:-no result line} (skips: $skips)"
    if [ "$rc" -ne 0 ]; then grep -E 'panicked|FAILED|error' "$logs/$name.log" | head -n 20; fi
  done
  printf "$summary\n"
  echo "bundle tests: $passed passed, $failed failed"
fi
if [ "$what" = all ] || [ "$what" = bench ] || [ "$what" = attention ]; then
  for b in "$here"/bench/*; do
    [ -x "$b" ] || continue
    name="$(basename "$b")"
    [ "$what" = attention ] && [ "${name##*--}" != bench_attention ] && continue
    echo "== bench $name"
    "$b" "$@" 2>&1 | tee "$logs/$name.bench.log"
  done
fi
if [ "$what" = all ] || [ "$what" = bench ] || [ "$what" = attention ] || [ "$what" = sdpa ]; then
  echo "== bench sdpa_peer.py (PyTorch scaled_dot_product_attention)"
  python3 "$here/sdpa_peer.py" 2>&1 | tee "$logs/sdpa_peer.bench.log"
fi
[ "$failed" = 0 ]
"#;
