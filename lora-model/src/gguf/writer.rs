//! A small GGUF (version 3) writer: metadata of every value type, tensors of F32/F16/BF16/Q8_0/Q4_0/Q4_1
//! encoded from bf16 values, the data section aligned. Used by tests (files written by the test, read
//! back through the real reader) and for generated models; [`llama_gguf`] lays out a [`ModelWeights`] as
//! llama.cpp's converter does (names, metadata, q/k rows permuted, `output` omitted when tied).

use std::path::Path;

use half::{bf16, f16};

use super::llama::permute_qk_to_gguf;
use super::{GgufValue, DEFAULT_ALIGNMENT, MAGIC};
use crate::dequant::{quantize_q4_1, quantize_q8_0, GgmlType};
use crate::weights::ModelWeights;

/// A GGUF file being assembled in memory.
#[derive(Clone, Debug, Default)]
pub struct GgufWriter {
    /// Metadata entries in write order.
    pub metadata: Vec<(String, GgufValue)>,
    /// Tensors: name, PyTorch shape, type, encoded bytes.
    pub tensors: Vec<(String, Vec<usize>, GgmlType, Vec<u8>)>,
}

/// Encodes bf16 values as `ty` (F32, F16, BF16 exactly; Q8_0, Q4_1 with ggml's reference rounding; Q4_0
/// is not offered). Returns `None` for other types or a length that is not a multiple of the block.
pub fn encode_values(values: &[bf16], ty: GgmlType) -> Option<Vec<u8>> {
    let f32s = || values.iter().map(|v| v.to_f32()).collect::<Vec<_>>();
    match ty {
        GgmlType::F32 => Some(values.iter().flat_map(|v| v.to_f32().to_le_bytes()).collect()),
        GgmlType::F16 => Some(values.iter().flat_map(|v| f16::from_f32(v.to_f32()).to_le_bytes()).collect()),
        GgmlType::Bf16 => Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        GgmlType::Q8_0 if values.len().is_multiple_of(32) => Some(quantize_q8_0(&f32s())),
        GgmlType::Q4_1 if values.len().is_multiple_of(32) => Some(quantize_q4_1(&f32s())),
        _ => None,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.push(*x as u8),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(*x as u8),
        GgufValue::Str(s) => put_str(out, s),
        GgufValue::Array { elem_type, items } => {
            out.extend_from_slice(&elem_type.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            items.iter().for_each(|i| put_value(out, i));
        }
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a metadata entry.
    pub fn meta(&mut self, key: &str, value: GgufValue) -> &mut Self {
        self.metadata.push((key.to_string(), value));
        self
    }

    /// Adds a tensor of PyTorch `shape` with already-encoded bytes.
    pub fn tensor_bytes(&mut self, name: &str, shape: &[usize], ty: GgmlType, bytes: Vec<u8>) -> &mut Self {
        self.tensors.push((name.to_string(), shape.to_vec(), ty, bytes));
        self
    }

    /// Adds a tensor encoded from bf16 values (see [`encode_values`]); F32 if `ty` cannot encode them.
    pub fn tensor(&mut self, name: &str, shape: &[usize], values: &[bf16], ty: GgmlType) -> &mut Self {
        let (ty, bytes) = match encode_values(values, ty) {
            Some(b) => (ty, b),
            None => (GgmlType::F32, encode_values(values, GgmlType::F32).unwrap_or_default()),
        };
        self.tensor_bytes(name, shape, ty, bytes)
    }

    fn alignment(&self) -> u64 {
        self.metadata
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u64())
            .filter(|a| a.is_power_of_two())
            .unwrap_or(DEFAULT_ALIGNMENT)
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let align = self.alignment() as usize;
        let pad = |n: usize| n.div_ceil(align) * align;
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&v.type_code().to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0usize;
        for (name, shape, ty, bytes) in &self.tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
            for d in shape.iter().rev() {
                out.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            out.extend_from_slice(&ty.code().to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offset = pad(offset + bytes.len());
        }
        out.resize(pad(out.len()), 0);
        for (_, _, _, bytes) in &self.tensors {
            out.extend_from_slice(bytes);
            out.resize(pad(out.len()), 0);
        }
        out
    }

    /// Writes the file.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.to_bytes())
    }
}

/// A string-array metadata value.
pub fn str_array<S: AsRef<str>>(items: &[S]) -> GgufValue {
    GgufValue::Array {
        elem_type: super::value_type::STRING,
        items: items.iter().map(|s| GgufValue::Str(s.as_ref().to_string())).collect(),
    }
}

/// `weights` as llama.cpp lays out a llama-architecture GGUF: `llama.*` metadata, tensors named
/// `token_embd`, `blk.N.*`, `output_norm`, `output` (omitted when tied), q/k rows permuted to the
/// interleaved order, norms F32 and every 2-D weight as `weight_type`. No tokenizer metadata.
pub fn llama_gguf(weights: &ModelWeights, weight_type: GgmlType) -> GgufWriter {
    let c = &weights.config;
    let mut w = GgufWriter::new();
    let u32v = |v: usize| GgufValue::U32(v as u32);
    w.meta("general.architecture", GgufValue::Str("llama".into()))
        .meta("general.name", GgufValue::Str("generated".into()))
        .meta("llama.block_count", u32v(c.num_layers))
        .meta("llama.context_length", u32v(c.max_position))
        .meta("llama.embedding_length", u32v(c.hidden_size))
        .meta("llama.feed_forward_length", u32v(c.intermediate_size))
        .meta("llama.attention.head_count", u32v(c.num_heads))
        .meta("llama.attention.head_count_kv", u32v(c.num_kv_heads))
        .meta("llama.attention.key_length", u32v(c.head_dim))
        .meta("llama.rope.dimension_count", u32v(c.head_dim))
        .meta("llama.rope.freq_base", GgufValue::F32(c.rope_theta))
        .meta("llama.attention.layer_norm_rms_epsilon", GgufValue::F32(c.rms_norm_eps))
        .meta("llama.vocab_size", u32v(c.vocab_size));
    if let Some(crate::config::RopeScaling::Linear { factor }) = c.rope_scaling {
        w.meta("llama.rope.scaling.type", GgufValue::Str("linear".into()))
            .meta("llama.rope.scaling.factor", GgufValue::F32(factor));
    }
    if let Some(b) = c.bos_token_id {
        w.meta("tokenizer.ggml.bos_token_id", GgufValue::U32(b));
    }
    if let Some(e) = c.eos_token_ids.first() {
        w.meta("tokenizer.ggml.eos_token_id", GgufValue::U32(*e));
    }
    let (h, hd) = (c.hidden_size, c.head_dim);
    w.tensor("token_embd.weight", &weights.embed.shape, &weights.embed.data, weight_type);
    for (l, layer) in weights.layers.iter().enumerate() {
        let n = |t: &str| format!("blk.{l}.{t}");
        w.tensor(&n("attn_norm.weight"), &layer.attn_norm.shape, &layer.attn_norm.data, GgmlType::F32);
        let q = permute_qk_to_gguf(&layer.q.data, c.num_heads, hd, h);
        let k = permute_qk_to_gguf(&layer.k.data, c.num_kv_heads, hd, h);
        w.tensor(&n("attn_q.weight"), &layer.q.shape, &q, weight_type);
        w.tensor(&n("attn_k.weight"), &layer.k.shape, &k, weight_type);
        w.tensor(&n("attn_v.weight"), &layer.v.shape, &layer.v.data, weight_type);
        if let Some([bq, bk, bv]) = &layer.qkv_bias {
            let bq2 = permute_qk_to_gguf(&bq.data, c.num_heads, hd, 1);
            let bk2 = permute_qk_to_gguf(&bk.data, c.num_kv_heads, hd, 1);
            w.tensor(&n("attn_q.bias"), &bq.shape, &bq2, GgmlType::F32);
            w.tensor(&n("attn_k.bias"), &bk.shape, &bk2, GgmlType::F32);
            w.tensor(&n("attn_v.bias"), &bv.shape, &bv.data, GgmlType::F32);
        }
        w.tensor(&n("attn_output.weight"), &layer.o.shape, &layer.o.data, weight_type);
        w.tensor(&n("ffn_norm.weight"), &layer.mlp_norm.shape, &layer.mlp_norm.data, GgmlType::F32);
        w.tensor(&n("ffn_gate.weight"), &layer.gate.shape, &layer.gate.data, weight_type);
        w.tensor(&n("ffn_up.weight"), &layer.up.shape, &layer.up.data, weight_type);
        w.tensor(&n("ffn_down.weight"), &layer.down.shape, &layer.down.data, weight_type);
    }
    w.tensor("output_norm.weight", &weights.final_norm.shape, &weights.final_norm.data, GgmlType::F32);
    if let Some(head) = &weights.lm_head {
        w.tensor("output.weight", &head.shape, &head.data, weight_type);
    }
    w
}
