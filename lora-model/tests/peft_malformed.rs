//! PEFT adapters written by the test (real `adapter_config.json` + `adapter_model.safetensors` files in
//! temp folders): more than 20 malformed ones, each refused with `ModelError::Adapter` for its own reason,
//! and valid ones converted exactly (values, scale alpha/r vs rsLoRA alpha/√r, fan_in_fan_out, "all-linear",
//! regex targets, rank/alpha patterns folded into B).

use std::path::Path;

use half::{bf16, f16};
use lora_model::peft::{load_peft, PeftAdapter};
use lora_model::{ModelConfig, ModelError, MODULES};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};

type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

const MAX_RANK: u32 = 8;

fn cfg() -> ModelConfig {
    ModelConfig::tiny()
}

fn key(layer: usize, module: usize, ab: char) -> String {
    let group = if module < 4 { "self_attn" } else { "mlp" };
    format!("base_model.model.model.layers.{layer}.{group}.{}.lora_{ab}.weight", MODULES[module])
}

/// Deterministic values, exactly representable in bf16.
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| bf16::from_f32((((i * 7919 + seed * 104729) % 2001) as f32 - 1000.0) / 4096.0).to_f32()).collect()
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect()
}

/// lora_A `[r, in]` and lora_B `[out, r]` values of (layer, module).
fn ab(layer: usize, module: usize, r: usize) -> (Vec<f32>, Vec<f32>) {
    let (k, n) = cfg().module_shapes()[module];
    (values(r * k, layer * 16 + module), values(n * r, layer * 16 + module + 8))
}

fn tensors(r: usize, layers: &[usize], modules: &[usize]) -> Tensors {
    let mut t = Vec::new();
    for &l in layers {
        for &m in modules {
            let (k, n) = cfg().module_shapes()[m];
            let (a, b) = ab(l, m, r);
            t.push((key(l, m, 'A'), Dtype::BF16, vec![r, k], bf16_bytes(&a)));
            t.push((key(l, m, 'B'), Dtype::BF16, vec![n, r], bf16_bytes(&b)));
        }
    }
    t
}

fn config(r: u64, targets: Value) -> Value {
    json!({"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": targets, "bias": "none",
           "use_rslora": false, "use_dora": false, "fan_in_fan_out": false, "modules_to_save": null,
           "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny"})
}

fn write(dir: &Path, config: Option<&Value>, tensors: Option<&Tensors>) {
    std::fs::create_dir_all(dir).unwrap();
    if let Some(c) = config {
        std::fs::write(dir.join("adapter_config.json"), c.to_string()).unwrap();
    }
    if let Some(t) = tensors {
        let views: Vec<(String, TensorView)> =
            t.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
        safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors")).unwrap();
    }
}

fn valid() -> (Value, Tensors) {
    (config(4, json!(["q_proj", "v_proj", "down_proj"])), tensors(4, &[0, 1], &[0, 2, 6]))
}

fn load(dir: &Path) -> Result<PeftAdapter, ModelError> {
    load_peft(dir, &cfg(), MAX_RANK)
}

/// One malformed adapter: a name, how to build it from the valid one, and a distinctive part of the reason.
struct Case {
    name: &'static str,
    build: Box<dyn Fn(&Path)>,
    reason: &'static str,
}

fn case(name: &'static str, reason: &'static str, build: impl Fn(&Path) + 'static) -> Case {
    Case { name, build: Box::new(build), reason }
}

fn with_config(edit: impl Fn(&mut Value) + 'static) -> impl Fn(&Path) {
    move |d| {
        let (mut c, t) = valid();
        edit(&mut c);
        write(d, Some(&c), Some(&t));
    }
}

fn with_tensors(edit: impl Fn(&mut Tensors) + 'static) -> impl Fn(&Path) {
    move |d| {
        let (c, mut t) = valid();
        edit(&mut t);
        write(d, Some(&c), Some(&t));
    }
}

fn set(t: &mut Tensors, name: &str, f: impl Fn(&mut (String, Dtype, Vec<usize>, Vec<u8>))) {
    f(t.iter_mut().find(|x| x.0 == name).unwrap_or_else(|| panic!("no {name}")));
}

fn cases() -> Vec<Case> {
    vec![
        case("no folder", "not a folder", |d| std::fs::remove_dir_all(d).unwrap()),
        case("no config", "missing file adapter_config.json", |d| write(d, None, Some(&valid().1))),
        case("bad json", "bad JSON", |d| {
            write(d, None, Some(&valid().1));
            std::fs::write(d.join("adapter_config.json"), "{\"r\": 4,, }").unwrap();
        }),
        case("config not an object", "not a JSON object", |d| write(d, Some(&json!([1, 2])), Some(&valid().1))),
        case("no weights", "missing file adapter_model.safetensors", |d| write(d, Some(&valid().0), None)),
        case("pickle weights", "pickle", |d| {
            write(d, Some(&valid().0), None);
            std::fs::write(d.join("adapter_model.bin"), b"\x80\x02}q\x00.").unwrap();
        }),
        case("rank above max", "rank 16 is above the maximum rank 8", with_config(|c| c["r"] = json!(16))),
        case("rank zero", "rank 0", with_config(|c| c["r"] = json!(0))),
        case(
            "rank missing",
            "`r` is missing",
            with_config(|c| {
                c.as_object_mut().unwrap().remove("r");
            }),
        ),
        case("rank a string", "is not an integer", with_config(|c| c["r"] = json!("4"))),
        case(
            "target the model lacks",
            "target module `fc1`: the model lacks it",
            with_config(|c| c["target_modules"] = json!(["q_proj", "fc1"])),
        ),
        case("bad target regex", "is invalid", with_config(|c| c["target_modules"] = json!("(q_proj"))),
        case("regex matching nothing", "matches no module", with_config(|c| c["target_modules"] = json!(".*\\.wte"))),
        case(
            "modules_to_save",
            "`modules_to_save` ([\"lm_head\"]) is not supported",
            with_config(|c| c["modules_to_save"] = json!(["lm_head"])),
        ),
        case("dora", "DoRA (`use_dora: true`) is not supported", with_config(|c| c["use_dora"] = json!(true))),
        case("bias", "bias `lora_only` is not supported", with_config(|c| c["bias"] = json!("lora_only"))),
        case("peft type", "peft_type `IA3` is not supported", with_config(|c| c["peft_type"] = json!("IA3"))),
        case(
            "rank pattern above max",
            "rank_pattern rank 12 is above the maximum",
            with_config(|c| c["rank_pattern"] = json!({"q_proj": 12})),
        ),
        case(
            "layers_to_transform out of range",
            "layer 9, out of range",
            with_config(|c| c["layers_to_transform"] = json!([0, 9])),
        ),
        case(
            "key for a module the model lacks",
            "module `fc1`: the model lacks it",
            with_tensors(|t| {
                let a = t[0].clone();
                t.push(("base_model.model.model.layers.0.mlp.fc1.lora_A.weight".into(), a.1, a.2, a.3));
            }),
        ),
        case(
            "layer out of range",
            "layer 2 out of range (the model has 2 layers)",
            with_tensors(|t| {
                for x in t.iter_mut() {
                    x.0 = x.0.replace("layers.1.", "layers.2.");
                }
            }),
        ),
        case(
            "lora_A wrong in-features",
            "lora_A has shape [4, 63], expected [4, 64]",
            with_tensors(|t| {
                set(t, &key(0, 0, 'A'), |x| {
                    x.2 = vec![4, 63];
                    x.3.truncate(4 * 63 * 2);
                })
            }),
        ),
        case(
            "lora_B wrong out-features",
            "lora_B has shape [31, 4], expected [32, 4]",
            with_tensors(|t| {
                set(t, &key(1, 2, 'B'), |x| {
                    x.2 = vec![31, 4];
                    x.3.truncate(31 * 4 * 2);
                })
            }),
        ),
        case(
            "factors of another rank",
            "lora_A has shape [2, 64], expected [4, 64]",
            with_tensors(|t| {
                *t = tensors(2, &[0, 1], &[0, 2, 6]);
            }),
        ),
        case(
            "integer dtype",
            "dtype I32 is not supported",
            with_tensors(|t| {
                set(t, &key(0, 6, 'A'), |x| {
                    x.1 = Dtype::I32;
                    x.2 = vec![4, 64];
                    x.3 = vec![0; 4 * 64 * 4];
                })
            }),
        ),
        case(
            "NaN",
            "non-finite value (NaN)",
            with_tensors(|t| set(t, &key(1, 0, 'B'), |x| x.3[10..12].copy_from_slice(&bf16::NAN.to_le_bytes()))),
        ),
        case(
            "Inf",
            "non-finite value (inf)",
            with_tensors(|t| set(t, &key(0, 2, 'A'), |x| x.3[0..2].copy_from_slice(&bf16::INFINITY.to_le_bytes()))),
        ),
        case(
            "A without B",
            "layer 1 v_proj: lora_A without lora_B",
            with_tensors(|t| t.retain(|x| x.0 != key(1, 2, 'B'))),
        ),
        case(
            "B without A",
            "layer 0 down_proj: lora_B without lora_A",
            with_tensors(|t| t.retain(|x| x.0 != key(0, 6, 'A'))),
        ),
        case(
            "unknown key",
            "unknown key `base_model.model.lm_head.lora_A.weight`",
            with_tensors(|t| {
                let a = t[0].clone();
                t.push(("base_model.model.lm_head.lora_A.weight".into(), a.1, a.2, a.3));
            }),
        ),
        case(
            "dora magnitude",
            "DoRA weights",
            with_tensors(|t| {
                t.push((
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector".into(),
                    Dtype::BF16,
                    vec![64],
                    vec![0; 128],
                ));
            }),
        ),
        case(
            "weights outside target_modules",
            "layer 0 k_proj is not in target_modules",
            with_tensors(|t| {
                t.extend(tensors(4, &[0], &[1]));
            }),
        ),
        case("no lora weights", "holds no LoRA weights", with_tensors(|t| t.clear())),
        case("truncated safetensors", "adapter_model.safetensors", |d| {
            let (c, t) = valid();
            write(d, Some(&c), Some(&t));
            let p = d.join("adapter_model.safetensors");
            let b = std::fs::read(&p).unwrap();
            std::fs::write(&p, &b[..b.len() - 7]).unwrap();
        }),
        case(
            "trainable tokens",
            "`trainable_token_indices` ([1,2]) is not supported",
            with_config(|c| c["trainable_token_indices"] = json!([1, 2])),
        ),
        case("qalora", "QALoRA (`use_qalora: true`) is not supported", with_config(|c| c["use_qalora"] = json!(true))),
        case(
            "excluded module with weights",
            "layer 1 down_proj is not in target_modules",
            with_config(|c| c["exclude_modules"] = json!(["model.layers.1.mlp.down_proj"])),
        ),
        case(
            "alpha not a number",
            "`lora_alpha` = \"16\" is not a number",
            with_config(|c| c["lora_alpha"] = json!("16")),
        ),
    ]
}

#[test]
fn every_malformed_adapter_is_refused_for_its_reason() {
    let root = tempfile::tempdir().unwrap();
    let cases = cases();
    assert!(cases.len() >= 20);
    for (i, c) in cases.iter().enumerate() {
        let dir = root.path().join(format!("case{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        (c.build)(&dir);
        match load(&dir) {
            Err(ModelError::Adapter { adapter, reason }) => {
                assert!(reason.contains(c.reason), "case `{}`: reason `{reason}` lacks `{}`", c.name, c.reason);
                assert!(adapter.contains(&format!("case{i}")), "case `{}`: adapter named `{adapter}`", c.name);
            }
            other => panic!("case `{}`: expected ModelError::Adapter, got {other:?}", c.name),
        }
    }
}

fn bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|x| bf16::from_f32(*x).to_bits()).collect()
}

#[test]
fn valid_adapter_round_trips_values_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (c, t) = valid();
    write(dir.path(), Some(&c), Some(&t));
    let p = load(dir.path()).unwrap();
    assert_eq!((p.rank, p.alpha), (4, 16.0));
    assert_eq!(p.target_modules, ["q_proj", "v_proj", "down_proj"]);
    assert_eq!(p.adapter.modules.len(), 2 * 7);
    assert!(!p.adapter.use_rslora);
    assert_eq!(p.adapter.scale(), 16.0 / 4.0);
    let mut want_bytes = 0;
    for l in 0..2 {
        for (m, module) in MODULES.iter().enumerate() {
            let got = &p.adapter.modules[l * 7 + m];
            if [0, 2, 6].contains(&m) {
                let (a, b) = ab(l, m, 4);
                let w = got.as_ref().unwrap();
                assert_eq!(w.a, bits(&a), "layer {l} {module}");
                assert_eq!(w.b, bits(&b), "layer {l} {module}");
                want_bytes += 2 * (a.len() + b.len()) as u64;
            } else {
                assert!(got.is_none());
            }
        }
    }
    assert_eq!(p.bytes, want_bytes);
    assert_eq!(p.name_hint, dir.path().file_name().unwrap().to_string_lossy());
}

#[test]
fn rslora_scale_and_f32_f16_sources() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(4, json!(["o_proj"]));
    c["use_rslora"] = json!(true);
    c["lora_alpha"] = json!(6.0);
    let (k, n) = cfg().module_shapes()[3];
    let a: Vec<f32> = (0..4 * k).map(|i| (i as f32 * 0.37).sin() / 3.0).collect();
    let b: Vec<f32> = (0..n * 4).map(|i| (i as f32 * 0.11).cos() / 5.0).collect();
    let t: Tensors = vec![
        (key(1, 3, 'A'), Dtype::F32, vec![4, k], a.iter().flat_map(|v| v.to_le_bytes()).collect()),
        (key(1, 3, 'B'), Dtype::F16, vec![n, 4], b.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect()),
    ];
    write(dir.path(), Some(&c), Some(&t));
    let p = load(dir.path()).unwrap();
    assert!(p.adapter.use_rslora);
    assert_eq!(p.adapter.scale(), 6.0 / 2.0, "rsLoRA: alpha / sqrt(r)");
    let w = p.adapter.modules[7 + 3].as_ref().unwrap();
    assert_eq!(w.a, bits(&a));
    let b16: Vec<f32> = b.iter().map(|v| f16::from_f32(*v).to_f32()).collect();
    assert_eq!(w.b, bits(&b16));
    assert!(p.adapter.modules[3].is_none());
}

#[test]
fn fan_in_fan_out_factors_are_transposed_back() {
    let (c, t) = valid();
    let normal = tempfile::tempdir().unwrap();
    write(normal.path(), Some(&c), Some(&t));
    let mut c2 = c.clone();
    c2["fan_in_fan_out"] = json!(true);
    let transposed: Tensors = t
        .iter()
        .map(|(name, d, s, bytes)| {
            let (rows, cols) = (s[0], s[1]);
            let v: Vec<[u8; 2]> = bytes.chunks(2).map(|c| [c[0], c[1]]).collect();
            let mut out = Vec::with_capacity(bytes.len());
            for j in 0..cols {
                for i in 0..rows {
                    out.extend_from_slice(&v[i * cols + j]);
                }
            }
            (name.clone(), *d, vec![cols, rows], out)
        })
        .collect();
    let fifo = tempfile::tempdir().unwrap();
    write(fifo.path(), Some(&c2), Some(&transposed));
    let (a, b) = (load(normal.path()).unwrap(), load(fifo.path()).unwrap());
    assert_eq!(a.adapter, b.adapter);
    // With the flag but the usual [r, in] layout (what PEFT itself writes), the factors are taken as is.
    let plain = tempfile::tempdir().unwrap();
    write(plain.path(), Some(&c2), Some(&t));
    assert_eq!(load(plain.path()).unwrap().adapter, a.adapter);
}

#[test]
fn all_linear_and_regex_targets() {
    let dir = tempfile::tempdir().unwrap();
    let all: Vec<usize> = (0..7).collect();
    write(dir.path(), Some(&config(2, json!("all-linear"))), Some(&tensors(2, &[0, 1], &all)));
    let p = load(dir.path()).unwrap();
    assert!(p.adapter.modules.iter().all(Option::is_some));
    assert_eq!(p.target_modules, MODULES);

    let dir = tempfile::tempdir().unwrap();
    let re = json!(r"model\.layers\.1\.self_attn\.(q|k)_proj");
    write(dir.path(), Some(&config(2, re.clone())), Some(&tensors(2, &[1], &[0, 1])));
    let p = load(dir.path()).unwrap();
    let adapted: Vec<usize> = (0..14).filter(|&i| p.adapter.modules[i].is_some()).collect();
    assert_eq!(adapted, [7, 8]);
    // Layer 0's q_proj does not match the regex: refused.
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), Some(&config(2, re)), Some(&tensors(2, &[0, 1], &[0, 1])));
    assert!(
        matches!(load(dir.path()), Err(ModelError::Adapter { reason, .. }) if reason.contains("not in target_modules"))
    );
}

#[test]
fn rank_and_alpha_patterns_fold_into_b() {
    // r = 2 overall; q_proj of every layer has rank 4 and alpha 32; v_proj keeps r = 2, alpha 16.
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(2, json!(["q_proj", "v_proj"]));
    c["rank_pattern"] = json!({"q_proj": 4});
    c["alpha_pattern"] = json!({"model.layers.0.self_attn.q_proj": 32});
    let mut t = tensors(4, &[0, 1], &[0]);
    t.extend(tensors(2, &[0, 1], &[2]));
    write(dir.path(), Some(&c), Some(&t));
    let p = load(dir.path()).unwrap();
    assert_eq!(p.rank, 4, "the adapter's rank is the largest module rank");
    let s = p.adapter.scale() as f64; // 16 / 4
    assert_eq!(s, 4.0);
    for (l, m, r, alpha) in [(0, 0, 4, 32.0), (1, 0, 4, 16.0), (0, 2, 2, 16.0), (1, 2, 2, 16.0)] {
        let (a, b) = ab(l, m, r);
        let (k, n) = cfg().module_shapes()[m];
        let w = p.adapter.modules[l * 7 + m].as_ref().unwrap();
        assert_eq!(w.a.len(), 4 * k);
        assert_eq!(w.b.len(), n * 4);
        // Effective delta: scale · B' A' must equal (alpha_m / r_m) · B A.
        let want_scale = alpha / r as f64;
        for row in (0..n).step_by(5) {
            for col in (0..k).step_by(7) {
                let want: f64 = (0..r).map(|j| b[row * r + j] as f64 * a[j * k + col] as f64).sum::<f64>() * want_scale;
                let got: f64 = (0..4)
                    .map(|j| bf16::from_bits(w.b[row * 4 + j]).to_f64() * bf16::from_bits(w.a[j * k + col]).to_f64())
                    .sum::<f64>()
                    * s;
                assert!((got - want).abs() <= 1e-2 * want.abs() + 1e-6, "layer {l} {}: {got} vs {want}", MODULES[m]);
            }
        }
        if r == 2 {
            assert!(w.a[2 * k..].iter().all(|&x| x == 0), "padding rows of A are zero");
        }
    }
}
