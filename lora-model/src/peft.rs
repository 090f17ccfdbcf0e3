//! PEFT LoRA adapters → the runtime's [`LoraAdapter`]: `adapter_config.json` (`r`, `lora_alpha`,
//! `use_rslora`, `target_modules` as a list, `"all-linear"` or a regex, `fan_in_fan_out`,
//! `exclude_modules`, `layers_to_transform`, `rank_pattern`/`alpha_pattern`) and `adapter_model.safetensors` with PEFT's
//! key names, f32/f16/bf16.
//!
//! Per-module overrides are folded, not refused: the adapter's rank is the largest module rank R,
//! smaller modules are padded with zero rows of A and zero columns of B up to R, and each module's B is
//! multiplied by `scale_m / scale_R` (its own `alpha_m / r_m`, or `/ √r_m` for rsLoRA, over the runtime's
//! one scale), so `scale_R · B' A' = scale_m · B A` exactly in real arithmetic. Without patterns every
//! value is copied bit for bit (bf16) or rounded once (f16/f32 → bf16).
//!
//! `fan_in_fan_out`: PEFT keeps `lora_A` `[r, in]` and `lora_B` `[out, r]` for every layer type (the flag
//! transposes the merged delta of GPT-2-style Conv1D bases). Files that stored the factors transposed
//! (`lora_A` `[in, r]`, `lora_B` `[r, out]`) with the flag set are transposed back; with the flag set,
//! the transposed layout is preferred when a shape is ambiguous.
//!
//! Everything else is refused with [`ModelError::Adapter`] and a precise reason: rank 0 or above the
//! maximum, a module or layer the model lacks, wrong shapes, integer dtypes, missing files, bad JSON,
//! `modules_to_save`, DoRA, biases, trainable tokens, aLoRA/QALoRA/BD-LoRA, NaN/Inf, a `lora_A` without
//! its `lora_B`, unknown keys.

use std::collections::BTreeMap;
use std::path::Path;

use half::bf16;
use lora_graph::adapter::{LoraAdapter, ModuleWeights};
use regex::Regex;
use serde_json::Value;

use crate::config::{ModelConfig, MODULES};
use crate::error::ModelError;
use crate::hf::SafetensorsFile;

/// A PEFT adapter converted for the runtime.
#[derive(Clone, Debug, PartialEq)]
pub struct PeftAdapter {
    /// The folder's name (a default name to serve it under).
    pub name_hint: String,
    /// The adapter's rank (the largest module rank).
    pub rank: u32,
    /// `lora_alpha`.
    pub alpha: f32,
    /// The modules adapted (PEFT names, in [`MODULES`] order).
    pub target_modules: Vec<String>,
    /// The runtime form.
    pub adapter: LoraAdapter,
    /// Bytes of the runtime form's weights (bf16).
    pub bytes: u64,
}

/// Full module name in the model (`model.layers.3.self_attn.q_proj`), as PEFT matches it.
pub fn module_path(layer: usize, module: usize) -> String {
    let group = if module < 4 { "self_attn" } else { "mlp" };
    format!("model.layers.{layer}.{group}.{}", MODULES[module])
}

struct Refuse<'a>(&'a str);

impl Refuse<'_> {
    fn err(&self, reason: impl Into<String>) -> ModelError {
        ModelError::Adapter { adapter: self.0.to_string(), reason: reason.into() }
    }
}

/// What `adapter_config.json` says, validated.
struct PeftConfig {
    rank: u32,
    alpha: f32,
    use_rslora: bool,
    fan_in_fan_out: bool,
    /// `[layer * 7 + module]`: targeted.
    targeted: Vec<bool>,
    /// `(pattern, value)` of `rank_pattern` and `alpha_pattern`.
    rank_pattern: Vec<(Regex, u32)>,
    alpha_pattern: Vec<(Regex, f32)>,
}

/// PEFT's pattern rule for `rank_pattern`/`alpha_pattern` keys: the key is a suffix of the module path
/// at a `.` boundary, as a regex.
fn pattern_regex(r: &Refuse, field: &str, key: &str) -> Result<Regex, ModelError> {
    Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
        .map_err(|e| r.err(format!("{field} key `{key}` is not a valid regex: {e}")))
}

fn parse_config(r: &Refuse, v: &Value, config: &ModelConfig, max_rank: u32) -> Result<PeftConfig, ModelError> {
    let obj = v.as_object().ok_or_else(|| r.err("adapter_config.json is not a JSON object"))?;
    if let Some(t) = obj.get("peft_type").and_then(Value::as_str) {
        if t != "LORA" {
            return Err(r.err(format!("peft_type `{t}` is not supported (only LORA)")));
        }
    }
    if obj.get("use_dora").and_then(Value::as_bool) == Some(true) {
        return Err(r.err("DoRA (`use_dora: true`) is not supported"));
    }
    match obj.get("modules_to_save") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(m) => return Err(r.err(format!("`modules_to_save` ({m}) is not supported: only LoRA factors are served"))),
    }
    match obj.get("bias").and_then(Value::as_str) {
        None | Some("none") => {}
        Some(b) => return Err(r.err(format!("bias `{b}` is not supported (only \"none\")"))),
    }
    if obj.get("lora_bias").and_then(Value::as_bool) == Some(true) {
        return Err(r.err("`lora_bias: true` is not supported"));
    }
    for (flag, what) in [("use_qalora", "QALoRA"), ("use_bdlora", "BD-LoRA")] {
        if obj.get(flag).and_then(Value::as_bool) == Some(true) {
            return Err(r.err(format!("{what} (`{flag}: true`) is not supported")));
        }
    }
    for unsupported in ["layer_replication", "target_parameters", "trainable_token_indices", "alora_invocation_tokens"]
    {
        match obj.get(unsupported) {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(x) => return Err(r.err(format!("`{unsupported}` ({x}) is not supported"))),
        }
    }
    let rank = match obj.get("r") {
        Some(Value::Number(n)) => {
            n.as_u64().ok_or_else(|| r.err(format!("`r` = {n} is not a non-negative integer")))?
        }
        None => return Err(r.err("`r` is missing from adapter_config.json")),
        Some(x) => return Err(r.err(format!("`r` = {x} is not an integer"))),
    };
    if rank == 0 {
        return Err(r.err("rank 0 (`r` must be at least 1)"));
    }
    if rank > max_rank as u64 {
        return Err(r.err(format!("rank {rank} is above the maximum rank {max_rank}")));
    }
    let alpha = match obj.get("lora_alpha") {
        None | Some(Value::Null) => 8.0, // PEFT's default
        Some(x) => x.as_f64().ok_or_else(|| r.err(format!("`lora_alpha` = {x} is not a number")))? as f32,
    };
    if !alpha.is_finite() {
        return Err(r.err(format!("`lora_alpha` = {alpha} is not finite")));
    }
    let flag = |k: &str| obj.get(k).and_then(Value::as_bool).unwrap_or(false);
    let n_layers = config.num_layers;
    let mut targeted = vec![false; n_layers * MODULES.len()];
    match obj.get("target_modules") {
        Some(Value::String(s)) if s == "all-linear" => targeted.iter_mut().for_each(|t| *t = true),
        Some(Value::String(s)) => {
            let re = Regex::new(&format!("^(?:{s})$"))
                .map_err(|e| r.err(format!("target_modules regex `{s}` is invalid: {e}")))?;
            for (i, t) in targeted.iter_mut().enumerate() {
                *t = re.is_match(&module_path(i / MODULES.len(), i % MODULES.len()));
            }
            if !targeted.contains(&true) {
                return Err(r.err(format!("target_modules regex `{s}` matches no module of the model")));
            }
        }
        Some(Value::Array(list)) => {
            if list.is_empty() {
                return Err(r.err("target_modules is empty"));
            }
            for item in list {
                let name =
                    item.as_str().ok_or_else(|| r.err(format!("target_modules entry {item} is not a string")))?;
                let mut hit = false;
                for (i, t) in targeted.iter_mut().enumerate() {
                    let path = module_path(i / MODULES.len(), i % MODULES.len());
                    if path == name || path.ends_with(&format!(".{name}")) {
                        *t = true;
                        hit = true;
                    }
                }
                if !hit {
                    return Err(r.err(format!(
                        "target module `{name}`: the model lacks it (adaptable: {})",
                        MODULES.join(", ")
                    )));
                }
            }
        }
        None | Some(Value::Null) => return Err(r.err("`target_modules` is missing")),
        Some(x) => return Err(r.err(format!("target_modules {x} is neither a list nor a string"))),
    }
    // `exclude_modules`: a list (names matched like target_modules) or a regex (full match).
    match obj.get("exclude_modules") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            let re = Regex::new(&format!("^(?:{s})$"))
                .map_err(|e| r.err(format!("exclude_modules regex `{s}` is invalid: {e}")))?;
            for (i, t) in targeted.iter_mut().enumerate() {
                *t &= !re.is_match(&module_path(i / MODULES.len(), i % MODULES.len()));
            }
        }
        Some(Value::Array(list)) => {
            for item in list {
                let name =
                    item.as_str().ok_or_else(|| r.err(format!("exclude_modules entry {item} is not a string")))?;
                for (i, t) in targeted.iter_mut().enumerate() {
                    let path = module_path(i / MODULES.len(), i % MODULES.len());
                    *t &= !(path == name || path.ends_with(&format!(".{name}")));
                }
            }
        }
        Some(x) => return Err(r.err(format!("exclude_modules {x} is neither a list nor a string"))),
    }
    let layers: Option<Vec<u64>> = match obj.get("layers_to_transform") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(vec![n.as_u64().ok_or_else(|| r.err(format!("layers_to_transform {n}")))?]),
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|x| x.as_u64().ok_or_else(|| r.err(format!("layers_to_transform entry {x} is not a layer index"))))
                .collect::<Result<_, _>>()?,
        ),
        Some(x) => return Err(r.err(format!("layers_to_transform {x} is not a list of layers"))),
    };
    if let Some(layers) = layers {
        if let Some(bad) = layers.iter().find(|&&l| l as usize >= n_layers) {
            return Err(
                r.err(format!("layers_to_transform has layer {bad}, out of range (the model has {n_layers} layers)"))
            );
        }
        for (i, t) in targeted.iter_mut().enumerate() {
            *t &= layers.contains(&((i / MODULES.len()) as u64));
        }
    }
    let patterns = |field: &str| -> Result<Vec<(Regex, f64)>, ModelError> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, x)| {
                    let val = x.as_f64().ok_or_else(|| r.err(format!("{field}[`{k}`] = {x} is not a number")))?;
                    Ok((pattern_regex(r, field, k)?, val))
                })
                .collect(),
            Some(x) => Err(r.err(format!("{field} {x} is not an object"))),
        }
    };
    let mut rank_pattern = Vec::new();
    for (re, v) in patterns("rank_pattern")? {
        if v.fract() != 0.0 || v < 1.0 {
            return Err(r.err(format!("rank_pattern rank {v} for `{}` is not a positive integer", re.as_str())));
        }
        if v > max_rank as f64 {
            return Err(r.err(format!("rank_pattern rank {v} is above the maximum rank {max_rank}")));
        }
        rank_pattern.push((re, v as u32));
    }
    let mut alpha_pattern = Vec::new();
    for (re, v) in patterns("alpha_pattern")? {
        if !v.is_finite() {
            return Err(r.err(format!("alpha_pattern alpha {v} is not finite")));
        }
        alpha_pattern.push((re, v as f32));
    }
    Ok(PeftConfig {
        rank: rank as u32,
        alpha,
        use_rslora: flag("use_rslora"),
        fan_in_fan_out: flag("fan_in_fan_out"),
        targeted,
        rank_pattern,
        alpha_pattern,
    })
}

impl PeftConfig {
    /// `(rank, alpha)` of one module after the patterns.
    fn module_rank_alpha(&self, layer: usize, module: usize) -> (u32, f32) {
        let path = module_path(layer, module);
        let rank = self.rank_pattern.iter().find(|(re, _)| re.is_match(&path)).map_or(self.rank, |(_, v)| *v);
        let alpha = self.alpha_pattern.iter().find(|(re, _)| re.is_match(&path)).map_or(self.alpha, |(_, v)| *v);
        (rank, alpha)
    }

    fn scale(&self, rank: u32, alpha: f32) -> f64 {
        if self.use_rslora {
            alpha as f64 / (rank as f64).sqrt()
        } else {
            alpha as f64 / rank as f64
        }
    }
}

/// A PEFT key's (layer, module, is_b), or the reason it is not one.
fn parse_key(key: &str, config: &ModelConfig) -> Result<(usize, usize, bool), String> {
    let unknown = || {
        format!("unknown key `{key}` (expected base_model.model.model.layers.N.{{self_attn,mlp}}.MODULE.lora_{{A,B}}.weight)")
    };
    if key.contains("lora_magnitude_vector") {
        return Err(format!("DoRA weights (`{key}`) are not supported"));
    }
    let rest = key.strip_prefix("base_model.model.").ok_or_else(unknown)?;
    let rest = rest.strip_prefix("model.layers.").ok_or_else(unknown)?;
    let (layer, rest) = rest.split_once('.').ok_or_else(unknown)?;
    let layer: usize = layer.parse().map_err(|_| unknown())?;
    let (path, is_b) = if let Some(p) = rest.strip_suffix(".lora_A.weight") {
        (p, false)
    } else if let Some(p) = rest.strip_suffix(".lora_B.weight") {
        (p, true)
    } else {
        return Err(unknown());
    };
    let (group, module) = path.split_once('.').ok_or_else(unknown)?;
    let m = ModelConfig::module_index(module)
        .ok_or_else(|| format!("`{key}`: module `{module}`: the model lacks it (adaptable: {})", MODULES.join(", ")))?;
    if group != if m < 4 { "self_attn" } else { "mlp" } {
        return Err(unknown());
    }
    if layer >= config.num_layers {
        return Err(format!("`{key}`: layer {layer} out of range (the model has {} layers)", config.num_layers));
    }
    Ok((layer, m, is_b))
}

/// Row-major `[rows, cols]` → `[cols, rows]`.
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    for i in 0..rows {
        for j in 0..cols {
            out[j * rows + i] = v[i * cols + j];
        }
    }
    out
}

/// Loads a PEFT adapter folder for a model of `config`, refusing ranks above `max_rank`.
pub fn load_peft(dir: &Path, config: &ModelConfig, max_rank: u32) -> Result<PeftAdapter, ModelError> {
    let shown = dir.display().to_string();
    let r = Refuse(&shown);
    if !dir.is_dir() {
        return Err(r.err(format!("{} is not a folder", dir.display())));
    }
    let cfg_path = dir.join("adapter_config.json");
    if !cfg_path.is_file() {
        return Err(r.err("missing file adapter_config.json"));
    }
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| r.err(format!("adapter_config.json: {e}")))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| r.err(format!("adapter_config.json: bad JSON: {e}")))?;
    let pc = parse_config(&r, &v, config, max_rank)?;

    let st_path = dir.join("adapter_model.safetensors");
    if !st_path.is_file() {
        if dir.join("adapter_model.bin").exists() {
            return Err(r.err("adapter_model.bin (a pickle) is not supported: convert it to adapter_model.safetensors"));
        }
        return Err(r.err("missing file adapter_model.safetensors"));
    }
    let st = SafetensorsFile::open(&st_path).map_err(|e| r.err(format!("adapter_model.safetensors: {e}")))?;

    // (layer, module) → (key of A, key of B).
    let mut found: BTreeMap<(usize, usize), [Option<String>; 2]> = BTreeMap::new();
    for key in st.names() {
        let (l, m, is_b) = parse_key(&key, config).map_err(|e| r.err(e))?;
        if !pc.targeted[l * MODULES.len() + m] {
            return Err(r.err(format!("`{key}`: layer {l} {} is not in target_modules", MODULES[m])));
        }
        found.entry((l, m)).or_default()[is_b as usize] = Some(key);
    }
    if found.is_empty() {
        return Err(r.err("adapter_model.safetensors holds no LoRA weights"));
    }
    let shapes = config.module_shapes();
    let max_module_rank = found.keys().map(|&(l, m)| pc.module_rank_alpha(l, m).0).max().unwrap_or(pc.rank);
    let big_r = max_module_rank as usize;
    let global_scale = pc.scale(max_module_rank, pc.alpha);
    let mut modules: Vec<Option<ModuleWeights>> = vec![None; config.num_layers * MODULES.len()];
    let mut bytes = 0u64;
    for (&(l, m), keys) in &found {
        let name = format!("layer {l} {}", MODULES[m]);
        let [Some(ka), Some(kb)] = keys else {
            let (has, lacks) = if keys[0].is_some() { ("lora_A", "lora_B") } else { ("lora_B", "lora_A") };
            return Err(r.err(format!("{name}: {has} without {lacks}")));
        };
        let (rm, alpha_m) = pc.module_rank_alpha(l, m);
        let rm_u = rm as usize;
        let (k_in, n_out) = shapes[m];
        let read = |key: &str| {
            st.read_f32(key).map_err(|e| match e {
                ModelError::Tensor { reason, .. } => r.err(format!("`{key}`: {reason}")),
                other => r.err(other.to_string()),
            })
        };
        let (sa, mut a) = read(ka)?;
        let (sb, mut b) = read(kb)?;
        let normal = (sa == [rm_u, k_in], sb == [n_out, rm_u]);
        let transposed = (sa == [k_in, rm_u], sb == [rm_u, n_out]);
        if pc.fan_in_fan_out && transposed == (true, true) {
            a = transpose(&a, k_in, rm_u);
            b = transpose(&b, rm_u, n_out);
        } else if normal != (true, true) {
            let (which, got, want) =
                if !normal.0 { ("lora_A", &sa, vec![rm_u, k_in]) } else { ("lora_B", &sb, vec![n_out, rm_u]) };
            return Err(r.err(format!("{name}: {which} has shape {got:?}, expected {want:?} (rank {rm})")));
        }
        for (key, vals) in [(ka, &a), (kb, &b)] {
            if let Some(bad) = vals.iter().find(|v| !v.is_finite()) {
                return Err(r.err(format!("`{key}` holds a non-finite value ({bad}): NaN/Inf weights are refused")));
            }
        }
        // A: rank rows padded to R with zeros. B: [n, rm] → [n, R], scaled into the runtime's one scale.
        let mut a_bits: Vec<u16> = a.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        a_bits.resize(big_r * k_in, 0);
        let fold = pc.scale(rm, alpha_m) / global_scale;
        let mut b_bits = vec![0u16; n_out * big_r];
        for row in 0..n_out {
            for c in 0..rm_u {
                let v = b[row * rm_u + c];
                let v = if fold == 1.0 { v } else { (v as f64 * fold) as f32 };
                b_bits[row * big_r + c] = bf16::from_f32(v).to_bits();
            }
        }
        if !b_bits.iter().all(|&x| bf16::from_bits(x).is_finite()) {
            return Err(r.err(format!("{name}: lora_B overflows bf16 after folding alpha_pattern/rank_pattern")));
        }
        bytes += 2 * (a_bits.len() + b_bits.len()) as u64;
        modules[l * MODULES.len() + m] = Some(ModuleWeights { a: a_bits, b: b_bits });
    }
    let mut target_modules: Vec<String> = Vec::new();
    for (m, name) in MODULES.iter().enumerate() {
        if found.keys().any(|&(_, mm)| mm == m) {
            target_modules.push(name.to_string());
        }
    }
    let name_hint = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| shown.clone());
    Ok(PeftAdapter {
        name_hint,
        rank: max_module_rank,
        alpha: pc.alpha,
        target_modules,
        adapter: LoraAdapter { rank: max_module_rank, alpha: pc.alpha, use_rslora: pc.use_rslora, modules },
        bytes,
    })
}
