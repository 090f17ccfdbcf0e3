//! The `lora-engine` binary end to end: `gen` writes a tiny checkpoint and adapters, `generate` runs a
//! prompts file through them (the same prompt twice must give the same greedy tokens; an adapter must
//! change them), `bench` prints its table.

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lora-engine"))
}

#[test]
fn gen_generate_and_bench_run_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let st = bin()
        .args([
            "gen",
            "--shape",
            "tiny",
            "--adapters",
            "2",
            "--ranks",
            "4,8",
            "--targets",
            "q_proj,v_proj,down_proj",
            "--out",
        ])
        .arg(out)
        .status()
        .unwrap();
    assert!(st.success());
    for f in [
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
        "adapters/adapter-1/adapter_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let prompts = out.join("p.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"hello\", \"adapter\": null, \"max_tokens\": 6}\n\
         {\"prompt\": \"hello\", \"adapter\": \"x\", \"max_tokens\": 6}\n\
         {\"prompt\": \"hello\", \"adapter\": null, \"max_tokens\": 6}\n",
    )
    .unwrap();
    let res = bin()
        .args(["generate", "--num-pages", "64", "--threads", "1", "--model"])
        .arg(out.join("model"))
        .arg("--prompts")
        .arg(&prompts)
        .arg("--lora")
        .arg(format!("x={}", out.join("adapters/adapter-1").display()))
        .output()
        .unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8(res.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    let tokens: Vec<Vec<u64>> =
        lines.iter().map(|l| l["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect()).collect();
    assert_eq!(tokens[0], tokens[2], "greedy is deterministic");
    assert_ne!(tokens[0], tokens[1], "the adapter changes the output");
    assert!(tokens.iter().all(|t| !t.is_empty() && t.len() <= 6));

    let bad =
        bin().args(["generate", "--model"]).arg(out.join("nope")).arg("--prompts").arg(&prompts).output().unwrap();
    assert!(!bad.status.success(), "a missing model is an error");

    let res = bin()
        .args([
            "bench",
            "--requests",
            "4",
            "--input-len",
            "8",
            "--output-len",
            "4",
            "--adapters",
            "2",
            "--threads",
            "1",
        ])
        .output()
        .unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let table = String::from_utf8(res.stdout).unwrap();
    assert!(table.contains("output tok/s") && table.lines().count() == 3, "{table}");
}
