//! Hugging Face folders: tiny random models written by the test (config.json + safetensors, single and
//! sharded, bf16/f16/f32) and read back through the real loader; config.json variants (rope_scaling,
//! eos lists, head_dim default, Qwen2 biases); typed errors for wrong, missing and mis-shaped tensors,
//! bad dtypes, bad JSON, unknown architectures and truncated files; and `load_model` on a full folder.

use std::collections::HashMap;
use std::path::Path;

use half::{bf16, f16};
use lora_model::hf::{config_from_json, config_to_json, hf_tensors, load_hf_weights, write_hf_folder};
use lora_model::loader::load_model;
use lora_model::{ModelConfig, ModelError, ModelWeights, RopeScaling};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

/// `(name, dtype, shape, bytes)` of a safetensors file.
type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn tiny(tied: bool, bias: bool) -> ModelWeights {
    let mut c = ModelConfig::tiny();
    c.tie_embeddings = tied;
    c.qkv_bias = bias;
    if bias {
        c.architecture = "qwen2".into();
    }
    c.bos_token_id = Some(1);
    c.eos_token_ids = vec![2, 3];
    ModelWeights::random(&c, 11)
}

/// Writes tensors `(name, dtype, shape, bytes)` as one safetensors file.
fn write_st(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn bf16_bytes(v: &[bf16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn model_tensors(w: &ModelWeights) -> Tensors {
    hf_tensors(w).into_iter().map(|(n, t)| (n, Dtype::BF16, t.shape.clone(), bf16_bytes(&t.data))).collect()
}

fn write_config(dir: &Path, w: &ModelWeights) {
    std::fs::write(dir.join("config.json"), config_to_json(&w.config).to_string()).unwrap();
}

#[test]
fn single_file_round_trip_is_bit_exact() {
    for (tied, bias) in [(false, false), (true, false), (false, true)] {
        let dir = tempfile::tempdir().unwrap();
        let w = tiny(tied, bias);
        write_hf_folder(&w, dir.path()).unwrap();
        let back = load_hf_weights(dir.path()).unwrap();
        assert_eq!(back, w, "tied={tied} bias={bias}");
    }
}

#[test]
fn sharded_folder_with_f16_and_f32_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let w = tiny(false, false);
    write_config(dir.path(), &w);
    let mut all = model_tensors(&w);
    // Store one tensor as f32 and one as f16: they come back rounded to bf16 like `half` does.
    let f32_name = "model.layers.0.mlp.up_proj.weight";
    let f16_name = "model.layers.1.self_attn.o_proj.weight";
    let scale = 1.0 + 1.0 / 64.0 + 1.0 / 1024.0; // moves values and needs rounding back to bf16
    let mut want = w.clone();
    for t in all.iter_mut() {
        if t.0 == f32_name {
            let vals: Vec<f32> = w.layers[0].up.data.iter().map(|v| v.to_f32() * scale).collect();
            want.layers[0].up.data = vals.iter().map(|&v| bf16::from_f32(v)).collect();
            *t = (t.0.clone(), Dtype::F32, t.2.clone(), vals.iter().flat_map(|v| v.to_le_bytes()).collect());
        } else if t.0 == f16_name {
            let vals: Vec<f16> = w.layers[1].o.data.iter().map(|v| f16::from_f32(v.to_f32() * scale)).collect();
            want.layers[1].o.data = vals.iter().map(|v| bf16::from_f32(v.to_f32())).collect();
            *t = (t.0.clone(), Dtype::F16, t.2.clone(), vals.iter().flat_map(|v| v.to_le_bytes()).collect());
        }
    }
    let (a, b) = all.split_at(all.len() / 2);
    write_st(&dir.path().join("model-00001-of-00002.safetensors"), a);
    write_st(&dir.path().join("model-00002-of-00002.safetensors"), b);
    let mut map = HashMap::new();
    for (i, part) in [a, b].iter().enumerate() {
        for t in part.iter() {
            map.insert(t.0.clone(), format!("model-0000{}-of-00002.safetensors", i + 1));
        }
    }
    let index = json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let back = load_hf_weights(dir.path()).unwrap();
    assert!(back.layers[0].up.data != w.layers[0].up.data, "the f32 tensor was scaled");
    assert!(back == want, "sharded load differs from the expected weights");
}

#[test]
fn config_json_variants() {
    let p = Path::new("config.json");
    let base = json!({
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": true,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    });
    let c = config_from_json(p, &base).unwrap();
    assert_eq!(c.head_dim, 64, "head_dim defaults to hidden / heads");
    assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
    assert_eq!(c.rope_theta, 500000.0);
    assert_eq!(
        c.rope_scaling,
        Some(RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 8192
        })
    );
    assert!(c.tie_embeddings && !c.qkv_bias);

    let mut v = base.clone();
    v["rope_scaling"] = json!({"type": "linear", "factor": 4.0});
    v["eos_token_id"] = json!(2);
    v["head_dim"] = json!(128);
    let c = config_from_json(p, &v).unwrap();
    assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 4.0 }));
    assert_eq!((c.eos_token_ids.clone(), c.head_dim), (vec![2], 128));

    let mut v = base.clone();
    v["model_type"] = json!("qwen2");
    v["sliding_window"] = json!(4096);
    v["use_sliding_window"] = json!(false);
    let c = config_from_json(p, &v).unwrap();
    assert!(c.qkv_bias);
    assert_eq!(c.max_position, 131072, "an unused sliding window does not cap the context");
    v["model_type"] = json!("mistral");
    assert_eq!(config_from_json(p, &v).unwrap().max_position, 4096);

    let mut v = base.clone();
    v["model_type"] = json!("gpt_neox");
    assert!(matches!(config_from_json(p, &v), Err(ModelError::Unsupported(m)) if m.contains("gpt_neox")));
    let mut v = base.clone();
    v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
    assert!(matches!(config_from_json(p, &v), Err(ModelError::Unsupported(m)) if m.contains("yarn")));
    let mut v = base.clone();
    v.as_object_mut().unwrap().remove("num_hidden_layers");
    assert!(
        matches!(config_from_json(p, &v), Err(ModelError::Format { reason, .. }) if reason.contains("num_hidden_layers"))
    );
    let mut v = base;
    v["hidden_size"] = json!("big");
    assert!(
        matches!(config_from_json(p, &v), Err(ModelError::Format { reason, .. }) if reason.contains("hidden_size"))
    );
}

fn expect_tensor_err(dir: &Path, tensor: &str, reason: &str) {
    match load_hf_weights(dir) {
        Err(ModelError::Tensor { tensor: t, reason: why, path }) => {
            assert_eq!(t, tensor);
            assert!(why.contains(reason), "{why}");
            assert!(path.starts_with(dir), "{path:?}");
        }
        other => panic!("expected tensor error on {tensor}: {other:?}"),
    }
}

#[test]
fn bad_tensors_and_files_give_typed_errors() {
    let w = tiny(false, false);
    let case = |edit: &dyn Fn(&mut Tensors)| {
        let dir = tempfile::tempdir().unwrap();
        write_config(dir.path(), &w);
        let mut t = model_tensors(&w);
        edit(&mut t);
        write_st(&dir.path().join("model.safetensors"), &t);
        dir
    };
    let d = case(&|t| t.retain(|x| x.0 != "model.layers.1.mlp.down_proj.weight"));
    expect_tensor_err(d.path(), "model.layers.1.mlp.down_proj.weight", "missing");
    let d = case(&|t| t.retain(|x| x.0 != "lm_head.weight"));
    expect_tensor_err(d.path(), "lm_head.weight", "missing");
    let d = case(&|t| {
        let x = t.iter_mut().find(|x| x.0 == "model.layers.0.self_attn.k_proj.weight").unwrap();
        x.2 = vec![x.2[1], x.2[0]];
    });
    expect_tensor_err(d.path(), "model.layers.0.self_attn.k_proj.weight", "shape");
    let d = case(&|t| {
        let x = t.iter_mut().find(|x| x.0 == "model.norm.weight").unwrap();
        x.1 = Dtype::I16;
    });
    expect_tensor_err(d.path(), "model.norm.weight", "I16");

    // Truncated safetensors: a typed format error naming the file, at any cut.
    let d = case(&|_| {});
    let st = d.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    for cut in [0, 4, 8, 9, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&st, &bytes[..cut]).unwrap();
        match load_hf_weights(d.path()) {
            Err(ModelError::Format { path, .. }) => assert_eq!(path, st),
            other => panic!("cut {cut}: {other:?}"),
        }
    }
    std::fs::remove_file(&st).unwrap();
    assert!(matches!(load_hf_weights(d.path()), Err(ModelError::Io { .. })));

    let d = case(&|_| {});
    std::fs::write(d.path().join("config.json"), "{\"model_type\": \"llama\",").unwrap();
    match load_hf_weights(d.path()) {
        Err(ModelError::Format { path, reason }) => {
            assert!(path.ends_with("config.json") && reason.contains("bad JSON"), "{path:?} {reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn load_model_reads_a_full_folder() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = tiny(true, false);
    // The byte-level fallback tokenizer has 259 tokens: give the model room for them.
    w.config.vocab_size = 259;
    w = ModelWeights::random(&w.config, 4);
    write_hf_folder(&w, dir.path()).unwrap();
    let tok = lora_model::tokenizer::Tokenizer::byte_level_fallback();
    std::fs::write(dir.path().join("tokenizer.json"), tok.inner().to_string(false).unwrap()).unwrap();
    let tmpl = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}";
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        json!({"chat_template": tmpl, "bos_token": null, "eos_token": {"content": "<|im_end|>"}}).to_string(),
    )
    .unwrap();
    std::fs::write(dir.path().join("generation_config.json"), json!({"eos_token_id": [2, 258]}).to_string()).unwrap();
    let m = load_model(dir.path()).unwrap();
    assert_eq!(m.weights.embed, w.embed);
    assert_eq!(m.weights.config.eos_token_ids, vec![2, 3, 258], "generation_config adds EOS ids");
    assert_eq!(m.tokenizer.eos_ids(), &[2, 3, 258]);
    assert_eq!(m.tokenizer.encode("hi", true).unwrap(), vec![104, 105]);
    let chat = m.chat_template.unwrap();
    let msgs = [lora_model::chat::ChatMessage::new("user", "x")];
    assert_eq!(chat.render(&msgs, false).unwrap(), "[user]x<|im_end|>");
    assert_eq!(m.name, dir.path().file_name().unwrap().to_string_lossy());
    assert!(load_model(&dir.path().join("nope")).is_err());
}
