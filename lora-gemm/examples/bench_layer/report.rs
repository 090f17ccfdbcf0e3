//! The benchmark's output: the table, the CSV, the goals and the breakdown.

#[allow(unused_imports)]
use super::*;

// ------------------------------------------------------------------------------------------------------
// Output.
// ------------------------------------------------------------------------------------------------------

pub(crate) fn header() -> String {
    format!(
        "{:>6} {:>4} {:>4} | {:>8} {:>8} {:>8} | {:>8} {:>7} {:>5} | {:>9} {:>9} {:>7} | {:>9} {:>6} | {}",
        "tokens",
        "rank",
        "dist",
        "graph µs",
        "hot µs",
        "eager µs",
        "min MB",
        "GB/s",
        "%BW",
        "bl gr µs",
        "bl eag µs",
        "speedup",
        "base µs",
        "LoRA%",
        "check (ours~bl / ours~f64 / bl~f64)"
    )
}

pub(crate) fn row_line(r: &Row, copy_bw: f64) -> String {
    let c = r.cfg;
    let check = match r.check {
        Some(k) => format!(
            "{:.1e} / {:.1e} / {:.1e}{}",
            k.ours_vs_base,
            k.ours_vs_f64,
            k.base_vs_f64,
            if k.ok() { "" } else { "  <-- WARNING" }
        ),
        None => "-".into(),
    };
    format!(
        "{:>6} {:>4} {:>4} | {:>8.1} {:>8.1} {:>8.1} | {:>8.2} {:>7.0} {:>5.1} | {:>9.1} {:>9.1} {:>6.1}x | {:>9.1} {:>5.1}% | {}{}",
        c.tokens,
        c.rank,
        c.distinct,
        r.ours,
        r.ours_hot,
        r.ours_eager,
        mb(r.bytes.total()),
        r.gbps(),
        100.0 * r.gbps() / copy_bw,
        r.base,
        r.base_eager,
        r.base / r.ours,
        r.gemm,
        100.0 * r.ours / r.gemm,
        check,
        if r.notes.is_empty() { String::new() } else { format!("  [{}]", r.notes) }
    )
}

pub(crate) fn csv(rows: &[Row], copy_bw: f64, device: &str) -> String {
    let mut s = String::from(
        "device,copy_gbps,tokens,rank,distinct,requests,min_bytes,x_bytes,ab_bytes,y_bytes,ours_graph_us,ours_hot_us,\
         ours_eager_us,gbps,pct_copy_bw,prep_us,qkv_us,o_us,gate_up_us,down_us,splits,baseline_graph_us,\
         baseline_eager_us,speedup,base_gemm_us,base_gemm_hot_us,lora_pct_of_base,ours_vs_baseline,ours_vs_f64,\
         baseline_vs_f64,notes\n",
    );
    for r in rows {
        let c = r.cfg;
        let g = |i: usize| r.groups.get(i).copied().unwrap_or(f64::NAN);
        let (cb, co, cf) = match r.check {
            Some(k) => {
                (format!("{:.3e}", k.ours_vs_base), format!("{:.3e}", k.ours_vs_f64), format!("{:.3e}", k.base_vs_f64))
            }
            None => (String::new(), String::new(), String::new()),
        };
        let splits: Vec<String> = r.splits.iter().map(|s| s.to_string()).collect();
        let _ = writeln!(
            s,
            "\"{device}\",{copy_bw:.1},{},{},{},{},{},{},{},{},{:.2},{:.2},{:.2},{:.1},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},{},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2},{cb},{co},{cf},\"{}\"",
            c.tokens,
            c.rank,
            c.distinct,
            r.reqs,
            r.bytes.total(),
            r.bytes.x,
            r.bytes.ab,
            r.bytes.y,
            r.ours,
            r.ours_hot,
            r.ours_eager,
            r.gbps(),
            100.0 * r.gbps() / copy_bw,
            r.prep,
            g(0),
            g(1),
            g(2),
            g(3),
            splits.join("/"),
            r.base,
            r.base_eager,
            r.base / r.ours,
            r.gemm,
            r.gemm_hot,
            100.0 * r.ours / r.gemm,
            r.notes.replace('"', "'")
        );
    }
    s
}

/// Issue 13's goals for one layer (written for the H200), each with its verdict; a goal whose row was not
/// measured says so. `copy_bw` is the measured copy bandwidth in GB/s.
pub(crate) fn goals(rows: &[Row], copy_bw: f64) -> String {
    let find = |t, r, d| rows.iter().find(|x| x.cfg == Config { tokens: t, rank: r, distinct: d });
    let verdict = |met: bool| if met { "MET" } else { "MISSED" };
    let mut s = String::from(
        "GOALS (issue 13, written for the H200; \"graph\" times, L2 flushed before each replay; hot-L2 in parentheses)\n",
    );
    // 1. and 2.: decode, one adapter and 16 distinct, against a time bound.
    for (i, distinct, bound) in [(1, 1, 8.0), (2, 16, 18.0)] {
        match find(16, 16, distinct) {
            Some(r) => {
                let _ = writeln!(
                    s,
                    "  {i}. 16 tokens, {distinct} distinct rank-16 adapter(s), <= {bound:.0} µs per layer: {:.1} µs (hot {:.1}), \
                     {:.1}% of copy BW -> {} ({:.2}x the bound)",
                    r.ours,
                    r.ours_hot,
                    100.0 * r.gbps() / copy_bw,
                    verdict(r.ours <= bound),
                    r.ours / bound
                );
            }
            None => {
                let _ = writeln!(s, "  {i}. 16 tokens, {distinct} distinct rank-16 adapter(s): not measured");
            }
        }
    }
    // 3. prefill.
    match find(2048, 16, 1) {
        Some(r) => {
            let _ = writeln!(
                s,
                "  3. 2048 tokens, one rank-16 adapter, <= 150 µs per layer: {:.1} µs ({:.1}% of the base GEMMs' {:.1} µs) -> {}",
                r.ours,
                100.0 * r.ours / r.gemm,
                r.gemm,
                verdict(r.ours <= 150.0)
            );
        }
        None => s.push_str("  3. 2048 tokens, one rank-16 adapter: not measured (--tokens 2048)\n"),
    }
    // 4. against the gather + cuBLAS baseline (issue 4's goal, kept as a regression guard).
    match find(16, 16, 16) {
        Some(r) => {
            let sp = r.base / r.ours;
            let _ = writeln!(
                s,
                "  4. >= 10x faster than the gather + cuBLAS baseline, 16 distinct adapters at 16 tokens: {sp:.1}x -> {}",
                verdict(sp >= 10.0)
            );
        }
        None => s.push_str("  4. speedup at 16 distinct adapters: not measured\n"),
    }
    s
}

pub(crate) fn breakdown(rows: &[Row], names: &[String]) -> String {
    let mut s = String::from("Breakdown (hot, each part alone, µs):\n");
    let _ = write!(s, "{:>6} {:>4} {:>4} | {:>7}", "tokens", "rank", "dist", "prep");
    for n in names {
        let _ = write!(s, " {:>8}", n);
    }
    let _ = writeln!(s, " | {:>8} {:>8} | splits", "sum", "layer");
    for r in rows {
        let _ = write!(s, "{:>6} {:>4} {:>4} | {:>7.1}", r.cfg.tokens, r.cfg.rank, r.cfg.distinct, r.prep);
        for g in &r.groups {
            let _ = write!(s, " {:>8.1}", g);
        }
        let sum = r.prep + r.groups.iter().sum::<f64>();
        let splits: Vec<String> = r.splits.iter().map(|x| x.to_string()).collect();
        let _ = writeln!(s, " | {:>8.1} {:>8.1} | {}", sum, r.ours_hot, splits.join("/"));
    }
    s
}
