//! The demo adapters trained by PEFT (`adapters/pirate`, `adapters/french`, real `save_pretrained`
//! output) load for the real SmolLM2 config, every factor equal bit for bit to the bf16 tensors read
//! straight from the file with the `safetensors` crate, scale lora_alpha / r as in the oracle JSON.

use std::path::PathBuf;

use lora_model::gguf::{llama::config_from_gguf, GgufFile};
use lora_model::peft::{load_peft, module_path};
use lora_model::MODULES;
use safetensors::SafeTensors;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn pirate_and_french_load_exactly() {
    let gguf = lora_model::fetch::smollm2_gguf_for_tests().unwrap_or_else(|e| panic!("SmolLM2 GGUF unavailable: {e}"));
    let config = config_from_gguf(&GgufFile::open(&gguf).unwrap()).unwrap();
    let oracle: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("lora-model/tests/data/smollm2_adapter_reference.json")).unwrap(),
    )
    .unwrap();
    let want_scale = oracle["adapter"]["scale"].as_f64().unwrap() as f32;
    for name in ["pirate", "french"] {
        let dir = root().join("adapters").join(name);
        let p = load_peft(&dir, &config, 64).unwrap();
        assert_eq!(p.name_hint, name);
        assert_eq!((p.rank, p.alpha), (8, 16.0));
        assert_eq!(p.adapter.scale(), want_scale);
        assert_eq!(p.target_modules, MODULES);
        let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), 2 * 7 * config.num_layers);
        for l in 0..config.num_layers {
            for (m, module) in MODULES.iter().enumerate() {
                let w = p.adapter.modules[l * 7 + m].as_ref().unwrap_or_else(|| panic!("{name}: layer {l} {module}"));
                for (ab, got) in [("A", &w.a), ("B", &w.b)] {
                    let t = st.tensor(&format!("base_model.model.{}.lora_{ab}.weight", module_path(l, m))).unwrap();
                    assert_eq!(t.dtype(), safetensors::Dtype::BF16);
                    let file: Vec<u16> = t.data().chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
                    assert!(&file == got, "{name}: layer {l} {module} lora_{ab} differs from the file");
                }
            }
        }
        assert_eq!(p.bytes, st.tensors().iter().map(|(_, t)| t.data().len() as u64).sum::<u64>());
    }
}
