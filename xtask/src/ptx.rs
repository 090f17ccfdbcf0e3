//! `cargo xtask ptx`: Rust kernels → self-contained sm_90 PTX, by hand-linking LLVM bitcode, plus the
//! `ptxas` resource check and its insta snapshot.
//!
//! Steps: (1) the pinned nightly with `rust-src` and `llvm-tools` (installed when missing); (2) `cargo rustc`
//! of `lora-kernels` as a plain lib for `nvptx64-nvidia-cuda` with `-Zbuild-std=core`,
//! `-Ctarget-cpu=sm_90`, emitting LLVM bitcode; (3) `llvm-link` of that bitcode with the bitcode objects of
//! `core` and `compiler_builtins` (their rlib members are bitcode on this target); (4) `opt` internalizing
//! everything but the kernel entry points named by `lora_kernels::Kernel`, then global DCE and O3;
//! (5) `llc -mcpu=sm_90`; (6) checks: no `.extern .func`, exactly the named entries; (7) `ptxas -v` for sm_90
//! from the PyPI package `nvidia-cuda-nvcc` 13.0 (installed into `target/tools/`), failing on any spill or
//! stack frame, with registers / shared memory / stack kept in `lora-kernels/ptx/ptxas.snap`.

use anyhow::{bail, Context, Result};
use lora_kernels::Kernel;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The nightly the kernels are built with (commit date as printed by `rustc -V`).
pub const NIGHTLY_DATE: &str = "2026-05-19";
const TARGET: &str = "nvptx64-nvidia-cuda";
const NVCC_PIP: &str = "nvidia-cuda-nvcc==13.0.*";

pub fn run(root: &Path, check: bool) -> Result<()> {
    let toolchain = nightly()?;
    let ptx = build_ptx(root, &toolchain)?;
    let ptx_path = root.join("lora-kernels/ptx/lora_kernels.ptx");
    let committed = std::fs::read_to_string(&ptx_path).unwrap_or_default();
    if check {
        if committed != ptx {
            bail!("{} is stale: run `cargo xtask ptx` and commit the result", ptx_path.display());
        }
        eprintln!("ptx: {} is up to date", ptx_path.display());
    } else if committed != ptx {
        std::fs::write(&ptx_path, &ptx)?;
        eprintln!("ptx: wrote {}", ptx_path.display());
    } else {
        eprintln!("ptx: {} unchanged", ptx_path.display());
    }
    let report = ptxas_report(root, &ptx_path)?;
    snapshot(root, &report, check)?;
    eprintln!("ptx: ptxas sm_90: no spills, no stack frames\n{report}");
    Ok(())
}

/// The toolchain name to use with `cargo +NAME`, installing the pinned nightly and its components.
fn nightly() -> Result<String> {
    let pinned = format!("nightly-{NIGHTLY_DATE}");
    let date_of = |tc: &str| -> Option<String> {
        let out = Command::new("rustc").arg(format!("+{tc}")).arg("-V").output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let toolchain = match (date_of(&pinned), date_of("nightly")) {
        (Some(_), _) => pinned,
        (None, Some(v)) if v.contains(NIGHTLY_DATE) => "nightly".to_string(),
        _ => {
            eprintln!("ptx: installing toolchain {pinned}");
            run_ok(Command::new("rustup").args(["toolchain", "install", &pinned, "--profile", "minimal"]))?;
            pinned
        }
    };
    let installed =
        Command::new("rustup").args(["component", "list", "--installed", "--toolchain", &toolchain]).output()?;
    let installed = String::from_utf8_lossy(&installed.stdout);
    if !installed.contains("rust-src") || !installed.contains("llvm-tools") {
        eprintln!("ptx: adding rust-src and llvm-tools to {toolchain}");
        run_ok(Command::new("rustup").args(["component", "add", "rust-src", "llvm-tools", "--toolchain", &toolchain]))?;
    }
    Ok(toolchain)
}

fn run_ok(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn output_ok(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed with {}:\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn llvm_bin(toolchain: &str, tool: &str) -> Result<PathBuf> {
    let sysroot = output_ok(Command::new("rustc").arg(format!("+{toolchain}")).args(["--print", "sysroot"]))?;
    let host = output_ok(Command::new("rustc").arg(format!("+{toolchain}")).arg("-vV"))?;
    let host = host.lines().find_map(|l| l.strip_prefix("host: ")).context("rustc -vV has no host line")?.to_string();
    let path = PathBuf::from(sysroot.trim()).join("lib/rustlib").join(host).join("bin").join(tool);
    if !path.exists() {
        bail!("{} not found: is the llvm-tools component installed for {toolchain}?", path.display());
    }
    Ok(path)
}

/// Build, link and lower the kernels; returns the PTX text.
pub fn build_ptx(root: &Path, toolchain: &str) -> Result<String> {
    let target_dir = root.join("target/ptx-build");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root)
        .arg(format!("+{toolchain}"))
        .args(["rustc", "-p", "lora-kernels", "--lib", "--release", "--target", TARGET, "-Zbuild-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .args(["--message-format=json-render-diagnostics", "--", "--emit=llvm-bc", "-Ccodegen-units=1"])
        .env("RUSTFLAGS", "-Ctarget-cpu=sm_90 -Cpanic=abort")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTC_WRAPPER");
    let json = output_ok(&mut cmd)?;
    let mut rlibs = Vec::new();
    for line in json.lines().filter(|l| l.contains("\"compiler-artifact\"")) {
        for name in ["core", "compiler_builtins"] {
            if line.contains(&format!("\"name\":\"{name}\"")) {
                let start = line.find("\"filenames\":[\"").context("artifact without filenames")? + 14;
                let end = line[start..].find('"').context("unterminated filename")? + start;
                let file = &line[start..end];
                if file.ends_with(".rlib") {
                    rlibs.push(PathBuf::from(file));
                }
            }
        }
    }
    if rlibs.len() != 2 {
        bail!("expected the core and compiler_builtins rlibs in cargo's output, found {rlibs:?}");
    }
    let deps = target_dir.join(TARGET).join("release/deps");
    let kernel_bc = newest(&deps, "lora_kernels-", ".bc")?;

    let work = target_dir.join("link");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let mut objects = Vec::new();
    for rlib in &rlibs {
        let dir = work.join(rlib.file_stem().unwrap());
        std::fs::create_dir_all(&dir)?;
        run_ok(Command::new(llvm_bin(toolchain, "llvm-ar")?).current_dir(&dir).arg("x").arg(rlib))?;
        let mut members: Vec<PathBuf> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "o"))
            .collect();
        members.sort();
        objects.extend(members);
    }
    let linked = work.join("linked.bc");
    run_ok(
        Command::new(llvm_bin(toolchain, "llvm-link")?)
            .arg(&kernel_bc)
            .arg("--only-needed")
            .args(&objects)
            .arg("-o")
            .arg(&linked),
    )?;
    let names: Vec<&str> = Kernel::ALL.iter().map(|k| k.name()).collect();
    let opt = work.join("opt.bc");
    run_ok(
        Command::new(llvm_bin(toolchain, "opt")?)
            .arg("-passes=internalize,globaldce,default<O3>,globaldce")
            .arg(format!("-internalize-public-api-list={}", names.join(",")))
            .arg(&linked)
            .arg("-o")
            .arg(&opt),
    )?;
    let out = work.join("lora_kernels.ptx");
    run_ok(Command::new(llvm_bin(toolchain, "llc")?).args(["-mcpu=sm_90", "-O3"]).arg(&opt).arg("-o").arg(&out))?;
    let body = std::fs::read_to_string(&out)?;
    verify_ptx(&body)?;
    Ok(format!(
        "//\n// Generated by `cargo xtask ptx` from lora-kernels/src with rustc nightly {NIGHTLY_DATE}; do not edit.\n//\n{body}"
    ))
}

fn newest(dir: &Path, prefix: &str, suffix: &str) -> Result<PathBuf> {
    std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(prefix) && n.ends_with(suffix)
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
        .with_context(|| format!("no {prefix}*{suffix} in {}", dir.display()))
}

/// The PTX must be self-contained and name exactly the kernels of `Kernel::ALL`.
pub fn verify_ptx(ptx: &str) -> Result<()> {
    if let Some(line) = ptx.lines().find(|l| l.contains(".extern .func")) {
        bail!("unresolved function in PTX: {line}");
    }
    let mut entries: Vec<&str> = ptx
        .lines()
        .filter_map(|l| l.trim().strip_prefix(".visible .entry "))
        .map(|l| l.trim_end_matches('(').trim())
        .collect();
    entries.sort();
    let mut expected: Vec<&str> = Kernel::ALL.iter().map(|k| k.name()).collect();
    expected.sort();
    if entries != expected {
        bail!("PTX entries {entries:?} differ from lora_kernels::Kernel::ALL {expected:?}");
    }
    Ok(())
}

/// `ptxas` from `target/tools/nvcc`, installed from PyPI when missing.
fn ptxas(root: &Path) -> Result<PathBuf> {
    let dir = root.join("target/tools/nvcc");
    let bin = dir.join("nvidia/cu13/bin/ptxas");
    if !bin.exists() {
        eprintln!("ptx: installing {NVCC_PIP} (for ptxas) into {}", dir.display());
        run_ok(
            Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check", "--target"])
                .arg(&dir)
                .arg(NVCC_PIP),
        )?;
    }
    Ok(bin)
}

/// One line per kernel: registers, stack, spills, shared memory, barriers. Fails on spills or stack.
pub fn ptxas_report(root: &Path, ptx_path: &Path) -> Result<String> {
    let out =
        Command::new(ptxas(root)?).args(["-arch=sm_90", "-v"]).arg(ptx_path).args(["-o", "/dev/null"]).output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("ptxas failed:\n{text}");
    }
    let mut rows = Vec::new();
    let mut current: Option<String> = None;
    let mut frame = String::new();
    for line in text.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            current = Some(rest.split('\'').next().unwrap_or_default().to_string());
        } else if line.contains("bytes stack frame") && current.is_some() {
            frame = line.trim().to_string();
        } else if line.contains("Used ") && line.contains("registers") {
            if let Some(name) = current.take() {
                if !frame.starts_with("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads") {
                    bail!("kernel {name} uses local memory: {frame}");
                }
                let used = line.split("info    : ").nth(1).unwrap_or(line).trim();
                rows.push(format!("{name}: {used}; {frame}"));
            }
        }
    }
    if rows.len() != Kernel::ALL.len() {
        bail!("ptxas reported {} kernels, expected {}:\n{text}", rows.len(), Kernel::ALL.len());
    }
    rows.sort();
    Ok(rows.join("\n"))
}

fn snapshot(root: &Path, report: &str, check: bool) -> Result<()> {
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(root.join("lora-kernels/ptx"));
    settings.set_prepend_module_to_snapshot(false);
    settings.set_omit_expression(true);
    settings.set_description("ptxas -arch=sm_90 -v resources per kernel (regenerate with `cargo xtask ptx`)");
    // `cargo xtask ptx` accepts the new report; `--check` (and CI) only compares.
    std::env::set_var("INSTA_UPDATE", if check { "no" } else { "always" });
    std::env::set_var("INSTA_FORCE_PASS", "0");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        settings.bind(|| insta::assert_snapshot!("ptxas", report))
    }));
    if result.is_err() {
        bail!("ptxas resource snapshot lora-kernels/ptx/ptxas.snap is stale: run `cargo xtask ptx` and review it");
    }
    Ok(())
}
