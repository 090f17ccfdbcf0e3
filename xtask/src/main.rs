//! Project automation (`cargo xtask <command>`), in the style of rust-analyzer's xtask:
//!
//! - `ptx [--check]`: build the kernels of `lora-kernels` to PTX for sm_90 (see `docs/toolchain.md`), write
//!   `lora-kernels/ptx/lora_kernels.ptx`, assemble it with `ptxas` and keep each kernel's resources in an
//!   insta snapshot. `--check` changes nothing and fails when the committed PTX or snapshot is stale, or a
//!   kernel spills or uses a stack frame.
//! - `gpu-bundle`: build every GPU test and benchmark in release mode, with the PTX, into
//!   `target/gpu-bundle/` together with a `run.sh` for a GPU machine without a Rust toolchain.

mod bundle;
mod ptx;

use anyhow::{bail, Result};
use std::path::PathBuf;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    match args.first().map(String::as_str) {
        Some("ptx") => ptx::run(&root, args.iter().any(|a| a == "--check")),
        Some("gpu-bundle") => bundle::run(&root),
        _ => bail!("usage: cargo xtask ptx [--check] | cargo xtask gpu-bundle"),
    }
}

/// The workspace root (the parent of this crate's manifest directory).
fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives inside the workspace").to_path_buf()
}
