//! bench_layer's command line: the flags of the module docs of `main.rs`, and the geometry overrides
//! (`--path`, `--grid-cap`, `--expand-order`, `--pdl`) applied to every group's planned geometry.

use anyhow::{anyhow, bail, Context, Result};
use lora_gemm::launch::Geometry;
use lora_gemm::plan::{ItemOrder, LoraPath};

/// Overrides of the planned launch geometry, for experiments (each `None`: the planner's choice).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Overrides {
    /// Every group's LoRA path.
    pub(crate) path: Option<LoraPath>,
    /// Cut every persistent LoRA grid to this many blocks (`Geometry::with_grid_cap`; the same bits).
    pub(crate) grid_cap: Option<u32>,
    /// The expand's item order (the same bits).
    pub(crate) expand_order: Option<ItemOrder>,
    /// Launch each expand as a programmatic dependent launch of its shrink (the same bits).
    pub(crate) programmatic: bool,
}

impl Overrides {
    /// `geo` with these overrides applied.
    pub(crate) fn apply(&self, geo: Geometry) -> Geometry {
        let geo = Geometry {
            path: self.path.unwrap_or(geo.path),
            expand_order: self.expand_order.unwrap_or(geo.expand_order),
            ..geo
        };
        self.grid_cap.map_or(geo, |c| geo.with_grid_cap(c)).with_programmatic(self.programmatic)
    }
}

/// Command line.
#[derive(Clone, Debug)]
pub(crate) struct Args {
    pub(crate) quick: bool,
    pub(crate) dry_run: bool,
    pub(crate) emu_check: bool,
    pub(crate) check_all: bool,
    pub(crate) sms: u32,
    pub(crate) tokens: Option<Vec<u32>>,
    pub(crate) ranks: Option<Vec<u32>>,
    pub(crate) distinct: Option<Vec<u32>>,
    /// Geometry overrides (`--path`, `--grid-cap`, `--expand-order`).
    pub(crate) over: Overrides,
}

pub(crate) const USAGE: &str = "usage: bench_layer [--quick] [--dry-run [--sms N]] [--emu-check] [--check-all] \
                     [--tokens 16,256] [--ranks 16] [--distinct 1,16] [--path fused|shrink-expand] [--grid-cap N] \
                     [--expand-order runs|grid-stride] [--pdl]";

pub(crate) fn parse_args() -> Result<Args> {
    let mut a = Args {
        quick: false,
        dry_run: false,
        emu_check: false,
        check_all: false,
        sms: 132,
        tokens: None,
        ranks: None,
        distinct: None,
        over: Overrides { path: None, grid_cap: None, expand_order: None, programmatic: false },
    };
    let mut it = std::env::args().skip(1);
    let list = |v: Option<String>, name: &str| -> Result<Option<Vec<u32>>> {
        let v = v.ok_or_else(|| anyhow!("{name} needs a value ({USAGE})"))?;
        let l = v
            .split(',')
            .map(|x| x.trim().parse::<u32>().with_context(|| format!("{name} {v:?}")))
            .collect::<Result<Vec<_>>>()?;
        if l.is_empty() || l.contains(&0) {
            bail!("{name} {v:?}: give positive values");
        }
        Ok(Some(l))
    };
    while let Some(s) = it.next() {
        match s.as_str() {
            "--quick" => a.quick = true,
            "--dry-run" => a.dry_run = true,
            "--emu-check" => a.emu_check = true,
            "--check-all" => a.check_all = true,
            "--sms" => {
                a.sms = it.next().ok_or_else(|| anyhow!("--sms needs a value"))?.parse().context("--sms")?;
            }
            "--tokens" => a.tokens = list(it.next(), "--tokens")?,
            "--ranks" => a.ranks = list(it.next(), "--ranks")?,
            "--distinct" => a.distinct = list(it.next(), "--distinct")?,
            "--path" => {
                a.over.path = Some(match it.next().as_deref() {
                    Some("fused") => LoraPath::Fused,
                    Some("shrink-expand") => LoraPath::ShrinkExpand,
                    other => bail!("--path {other:?}: give fused or shrink-expand ({USAGE})"),
                })
            }
            "--grid-cap" => {
                let v: u32 =
                    it.next().ok_or_else(|| anyhow!("--grid-cap needs a value"))?.parse().context("--grid-cap")?;
                if v == 0 {
                    bail!("--grid-cap 0: give at least one block");
                }
                a.over.grid_cap = Some(v);
            }
            "--pdl" => a.over.programmatic = true,
            "--expand-order" => {
                a.over.expand_order = Some(match it.next().as_deref() {
                    Some("runs") => ItemOrder::Runs,
                    Some("grid-stride") => ItemOrder::Strided,
                    other => bail!("--expand-order {other:?}: give runs or grid-stride ({USAGE})"),
                })
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} ({USAGE})"),
        }
    }
    Ok(a)
}
