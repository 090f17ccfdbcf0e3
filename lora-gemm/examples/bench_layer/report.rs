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

pub(crate) fn goals(rows: &[Row], copy_bw: f64) -> String {
    let find = |t, r, d| rows.iter().find(|x| x.cfg == Config { tokens: t, rank: r, distinct: d });
    let verdict = |met: bool| if met { "MET" } else { "MISSED" };
    let mut s =
        String::from("GOALS (H100 targets; \"graph\" times, L2 flushed before each replay; hot-L2 in parentheses)\n");
    // 1.
    match find(16, 16, 16) {
        Some(r) => {
            let pct = 100.0 * r.gbps() / copy_bw;
            let pct_hot = 100.0 * r.bytes.total() as f64 / (r.ours_hot * 1e-6) / 1e9 / copy_bw;
            let need = r.bytes.total() as f64 / (0.7 * copy_bw * 1e9) * 1e6;
            let _ = writeln!(
                s,
                "  1. 16 distinct rank-16 adapters, 16 tokens, >= 70% of copy BW: {pct:.1}% ({:.1} µs; hot {pct_hot:.1}%, {:.1} µs) \
                 -> {}{}",
                r.ours,
                r.ours_hot,
                verdict(pct >= 70.0),
                if pct >= 70.0 { String::new() } else { format!(" by {:.1} points (needs <= {need:.1} µs)", 70.0 - pct) }
            );
        }
        None => s.push_str("  1. 16 distinct rank-16 adapters at 16 tokens: not measured\n"),
    }
    // 2.
    match find(16, 16, 1) {
        Some(r) => {
            let _ = writeln!(
                s,
                "  2. one rank-16 adapter, 16 tokens, <= 10 µs per layer: {:.1} µs (hot {:.1}) -> {}{}",
                r.ours,
                r.ours_hot,
                verdict(r.ours <= 10.0),
                if r.ours <= 10.0 {
                    String::new()
                } else {
                    format!(" by {:.1} µs ({:.2}x)", r.ours - 10.0, r.ours / 10.0)
                }
            );
        }
        None => s.push_str("  2. one adapter at 16 tokens: not measured\n"),
    }
    // 3.
    match find(16, 16, 16) {
        Some(r) => {
            let sp = r.base / r.ours;
            let _ = write!(
                s,
                "  3. >= 10x faster than the baseline, 16 distinct adapters (16 tokens, rank 16): {sp:.1}x -> {}{}",
                verdict(sp >= 10.0),
                if sp >= 10.0 { String::new() } else { format!(" by {:.1}x", 10.0 / sp) }
            );
            let worst = rows
                .iter()
                .filter(|x| x.cfg.distinct == 16)
                .min_by(|a, b| (a.base / a.ours).total_cmp(&(b.base / b.ours)));
            if let Some(w) = worst {
                let _ = write!(
                    s,
                    "; lowest over all 16-adapter configs: {:.1}x (tokens {}, rank {})",
                    w.base / w.ours,
                    w.cfg.tokens,
                    w.cfg.rank
                );
            }
            s.push('\n');
        }
        None => s.push_str("  3. speedup at 16 distinct adapters: not measured\n"),
    }
    // 4.
    let big: Vec<&Row> = rows.iter().filter(|r| r.cfg.tokens == 2048).collect();
    if big.is_empty() {
        s.push_str("  4. LoRA <= 10% of the base GEMMs at 2048 tokens: not measured (run without --quick)\n");
    } else {
        let pct = |r: &Row| 100.0 * r.ours / r.gemm;
        let r16: Vec<String> = big
            .iter()
            .filter(|r| r.cfg.rank == 16)
            .map(|r| format!("{} adapters {:.1}%", r.cfg.distinct, pct(r)))
            .collect();
        let met = big.iter().filter(|r| r.cfg.rank == 16).all(|r| pct(r) <= 10.0);
        let worst = big.iter().max_by(|a, b| pct(a).total_cmp(&pct(b))).copied();
        let _ = write!(
            s,
            "  4. 2048 tokens, LoRA <= 10% of the base GEMMs (rank 16): {} -> {}",
            r16.join(", "),
            verdict(met)
        );
        if let Some(w) = worst {
            let _ = write!(
                s,
                "; worst over all ranks: {:.1}% (rank {}, {} adapters; base GEMMs {:.1} µs)",
                pct(w),
                w.cfg.rank,
                w.cfg.distinct,
                w.gemm
            );
        }
        s.push('\n');
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
