//! Tidy checks of the whole workspace, run by `cargo test` (rust-analyzer's habit): they walk every crate
//! the root `Cargo.toml` lists (so new crates are covered without editing this file) and check that
//! - every `.rs` file opens with a `//!` module doc;
//! - every `unsafe` block and `unsafe impl` has a `// SAFETY:` comment on its line or just above;
//! - no source file is over 600 lines;
//! - the committed PTX's entry points are exactly `Kernel::ALL`;
//! - every workspace crate appears in `docs/architecture.md`;
//! - every GPU-only test (`#[cfg(feature = "gpu")]` on a `#[test]`) has `gpu` in its name, because the
//!   bundle runs the test binaries with the filter `gpu` (`run.sh tests`) and skips any other name.

use std::path::{Path, PathBuf};

const MAX_LINES: usize = 600;
/// How many lines above an `unsafe` block its `// SAFETY:` comment may start.
const SAFETY_REACH: usize = 4;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace root").to_path_buf()
}

/// The workspace members, read from the root manifest.
fn members() -> Vec<String> {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).expect("root Cargo.toml");
    let start = manifest.find("members").expect("a members list");
    let list = &manifest[start..];
    let list = &list[list.find('[').expect("[") + 1..list.find(']').expect("]")];
    list.split(',').map(|m| m.trim().trim_matches('"').to_string()).filter(|m| !m.is_empty()).collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with('.') || name == "target" {
            continue;
        }
        if p.is_dir() {
            rust_files(&p, out);
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
}

fn workspace_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for m in members() {
        rust_files(&root().join(m), &mut files);
    }
    assert!(files.len() > 20, "found only {} Rust files: is the members list parsed right?", files.len());
    files
}

fn rel(p: &Path) -> String {
    p.strip_prefix(root()).unwrap_or(p).display().to_string()
}

/// `unsafe` blocks and impls on `lines` that lack a `// SAFETY:` comment (1-based line numbers).
fn unsafe_without_safety(text: &str) -> Vec<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut bad = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        // Code only: no comment, no string literal.
        let code: String = line.split("//").next().unwrap_or("").split('"').step_by(2).collect();
        let is_block = code.contains("unsafe {") || code.contains("unsafe impl");
        if !is_block || line.trim_start().starts_with("//") {
            continue;
        }
        let from = i.saturating_sub(SAFETY_REACH);
        if !lines[from..=i].iter().any(|l| l.contains("SAFETY:")) {
            bad.push(i + 1);
        }
    }
    bad
}

/// Names of the `#[test]` functions in `text` under `#[cfg(feature = "gpu")]` whose name lacks `gpu`.
fn gpu_tests_the_bundle_filter_skips(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let mut bad = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(rest) = line.strip_prefix("fn ").or_else(|| line.strip_prefix("pub fn ")) else { continue };
        let name = rest.split(['(', '<']).next().unwrap_or("");
        // The attributes right above the function (a doc comment may sit between them).
        let attrs: Vec<&str> =
            lines[..i].iter().rev().take_while(|l| l.starts_with("#[") || l.starts_with("///")).copied().collect();
        let is_test = attrs.contains(&"#[test]");
        let gpu_only = attrs.iter().any(|a| a.starts_with("#[cfg(feature = \"gpu\")]"));
        if is_test && gpu_only && !name.contains("gpu") {
            bad.push(name.to_string());
        }
    }
    bad
}

/// What `find` reports in each workspace file, as `path{sep}finding`.
fn findings<T: std::fmt::Display>(sep: &str, find: impl Fn(&str) -> Vec<T>) -> Vec<String> {
    let mut bad = Vec::new();
    for p in workspace_files() {
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        for f in find(&text) {
            bad.push(format!("{}{sep}{f}", rel(&p)));
        }
    }
    bad
}

#[test]
fn gpu_only_tests_match_the_bundle_filter() {
    let bad = findings(": ", gpu_tests_the_bundle_filter_skips);
    assert!(bad.is_empty(), "GPU-only tests without `gpu` in their name (the bundle's filter skips them): {bad:#?}");
}

#[test]
fn the_gpu_name_check_can_fail() {
    let skipped = "#[cfg(feature = \"gpu\")]\n#[test]\nfn edge_is_programmatic() {}\n";
    assert_eq!(gpu_tests_the_bundle_filter_skips(skipped), vec!["edge_is_programmatic"]);
    let named = "#[cfg(feature = \"gpu\")]\n#[test]\nfn edge_is_programmatic_gpu() {}\n";
    assert!(gpu_tests_the_bundle_filter_skips(named).is_empty());
    // Not a test, or not GPU-only: not this check's business.
    let not_test = "#[cfg(feature = \"gpu\")]\n#[allow(dead_code)]\nfn helper() {}\n#[test]\nfn cpu_only() {}\n";
    assert!(gpu_tests_the_bundle_filter_skips(not_test).is_empty());
}

#[test]
fn every_file_opens_with_a_module_doc() {
    let bad: Vec<String> = workspace_files()
        .into_iter()
        .filter(|p| !std::fs::read_to_string(p).unwrap_or_default().trim_start().starts_with("//!"))
        .map(|p| rel(&p))
        .collect();
    assert!(bad.is_empty(), "files without a leading `//!` doc: {bad:#?}");
}

#[test]
fn every_unsafe_has_a_safety_comment() {
    let bad = findings(":", unsafe_without_safety);
    assert!(bad.is_empty(), "`unsafe` without a `// SAFETY:` comment: {bad:#?}");
}

#[test]
fn the_safety_check_can_fail() {
    assert_eq!(unsafe_without_safety("fn f() {\n    unsafe { g() }\n}\n"), vec![2]);
    assert!(unsafe_without_safety("// SAFETY: fine.\nunsafe { g() }\n").is_empty());
    assert_eq!(unsafe_without_safety("// SAFETY: far\n\n\n\n\n\nunsafe impl Send for X {}\n"), vec![7]);
}

#[test]
fn no_source_file_is_over_600_lines() {
    let bad: Vec<String> = workspace_files()
        .into_iter()
        .filter_map(|p| {
            let n = std::fs::read_to_string(&p).unwrap_or_default().lines().count();
            (n > MAX_LINES).then(|| format!("{} ({n} lines)", rel(&p)))
        })
        .collect();
    assert!(bad.is_empty(), "files over {MAX_LINES} lines (split them along their sections): {bad:#?}");
}

#[test]
fn committed_ptx_entries_are_kernel_all() {
    let ptx = lora_kernels::PTX;
    let mut entries: Vec<&str> = ptx
        .lines()
        .filter_map(|l| {
            l.trim_start().strip_prefix(".visible .entry ").or_else(|| l.trim_start().strip_prefix(".entry "))
        })
        .map(|l| l.split('(').next().unwrap_or("").trim())
        .collect();
    entries.sort();
    let mut want: Vec<&str> = lora_kernels::Kernel::ALL.iter().map(|k| k.name()).collect();
    want.sort();
    assert_eq!(entries, want, "the committed PTX's entry points differ from Kernel::ALL (run `cargo xtask ptx`)");
}

#[test]
fn every_crate_is_in_the_architecture_doc() {
    let doc = std::fs::read_to_string(root().join("docs/architecture.md")).expect("docs/architecture.md");
    let missing: Vec<String> = members().into_iter().filter(|m| !doc.contains(&format!("**{m}**"))).collect();
    assert!(missing.is_empty(), "crates without a `**name**` entry in docs/architecture.md: {missing:?}");
}
