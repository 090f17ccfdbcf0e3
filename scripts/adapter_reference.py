#!/usr/bin/env python3
"""Greedy-decoding oracle for SmolLM2-135M-Instruct + the pirate LoRA adapter (PEFT).

Run:  python3 scripts/adapter_reference.py       (CPU, ~6 min on a loaded 2-core box; needs adapters/pirate/)
Out:  lora-model/tests/data/smollm2_adapter_reference.json

Base weights: the GGUF dequantized by transformers, every parameter rounded to bfloat16 and back
to float32 (variant "bf16" of smollm2_reference.json, the Rust loader's exact weights). The adapter
is loaded with peft.PeftModel.from_pretrained from adapters/pirate/ (weights stored in bfloat16,
upcast exactly to float32); compute is float32, eager attention, prompt in one forward then one token a
step with the KV cache. y = W x + (lora_alpha / r) * B (A x) on q/k/v/o/gate/up/down_proj of every layer.

JSON schema (logits rounded to 5 decimals):
{
  "schema": "smollm2_adapter_reference/v1",
  "generator": "scripts/adapter_reference.py",
  "gguf": {"file", "sha256"},
  "versions": {package: version},
  "adapter": {"path": "adapters/pirate", "sha256": sha256 of adapter_model.safetensors,
              "r": int, "lora_alpha": float, "scale": lora_alpha / r, "target_modules": [str],
              "dtype": "bfloat16", "n_tensors": int},
  "base_weights": "bf16-rounded", "compute_dtype": "float32",
  "decoding": {"n_steps": 24, "greedy": true, "stop_at_eos": false, "kv_cache": true,
               "near_tie_threshold": float},
  "prompts": [
    {"name": str, "messages": [{"role", "content"}], "text": str (post-template, add_generation_prompt),
     "prompt_ids": [int],
     "adapter": {"tokens": [int]*24, "text": str, "first_eos_step": int|null,
                 "first_near_tie_step": int|null, "prompt_logits": {"max","min","mean","argmax"},
                 "steps": [{"margin", "top5": [[id, logit]*5]}]*24},
     "base":    {same fields, adapter disabled: the same weights without LoRA}}
  ]
}
"""

import json
import sys
import time

import smollm2_common as C

N_STEPS = 24
NEAR_TIE = 0.05
ADAPTER = C.ADAPTERS / "pirate"

PROMPTS = [
    {"name": "chat_tea", "messages": [{"role": "user", "content": "How do I make a cup of tea?"}]},
    {"name": "chat_capital_system",
     "messages": [{"role": "system", "content": "You are a helpful assistant."},
                  {"role": "user", "content": "What is the capital of Germany?"}]},
]


def trace(model, tok, ids):
    tokens, steps, stats = C.greedy_trace(model, ids, N_STEPS)
    return {
        "tokens": tokens,
        "text": tok.decode(tokens, skip_special_tokens=False),
        "first_eos_step": next((i for i, t in enumerate(tokens) if t == tok.eos_token_id), None),
        "first_near_tie_step": next((i for i, s in enumerate(steps) if s["margin"] < NEAR_TIE), None),
        "prompt_logits": stats,
        "steps": steps,
    }


def main():
    import torch
    from peft import PeftModel
    from safetensors import safe_open

    t0 = time.time()
    tok = C.load_tokenizer()
    base = C.round_params_to_bf16(C.load_model())
    acfg = json.loads((ADAPTER / "adapter_config.json").read_text())
    st_path = ADAPTER / "adapter_model.safetensors"
    with safe_open(str(st_path), framework="pt") as f:
        keys = list(f.keys())
        dtypes = sorted({str(f.get_tensor(k).dtype).replace("torch.", "") for k in keys})
    model = PeftModel.from_pretrained(base, str(ADAPTER), is_trainable=False).eval()
    # the adapter weights must be the stored values, in float32
    with safe_open(str(st_path), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in keys}
    live = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(live) == len(stored), (len(live), len(stored))
    for n, p in live.items():
        k = n.replace(".default", "")
        assert p.dtype == torch.float32, (n, p.dtype)
        assert torch.equal(p.detach(), stored[k].to(torch.float32)), n

    prompts = []
    for p in PROMPTS:
        text = tok.apply_chat_template(p["messages"], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        rec = {"name": p["name"], "messages": p["messages"], "text": text, "prompt_ids": ids}
        rec["adapter"] = trace(model, tok, ids)
        with model.disable_adapter():
            rec["base"] = trace(model, tok, ids)
        prompts.append(rec)
        for k in ["base", "adapter"]:
            print(f"{p['name']} [{k}] min margin {min(s['margin'] for s in rec[k]['steps']):.4f} "
                  f"(near-tie step {rec[k]['first_near_tie_step']}): {rec[k]['text']!r}", flush=True)

    out = {
        "schema": "smollm2_adapter_reference/v1",
        "generator": "scripts/adapter_reference.py",
        "gguf": {"file": C.GGUF_NAME, "sha256": C.GGUF_SHA256},
        "versions": C.versions(),
        "adapter": {"path": "adapters/pirate", "sha256": C.sha256_of(st_path), "r": acfg["r"],
                    "lora_alpha": acfg["lora_alpha"], "scale": acfg["lora_alpha"] / acfg["r"],
                    "use_rslora": acfg.get("use_rslora", False),
                    "target_modules": sorted(acfg["target_modules"]), "dtype": ",".join(dtypes),
                    "n_tensors": len(keys)},
        "base_weights": "bf16-rounded",
        "compute_dtype": "float32",
        "decoding": {"n_steps": N_STEPS, "greedy": True, "stop_at_eos": False, "kv_cache": True,
                     "attn_implementation": "eager", "near_tie_threshold": NEAR_TIE},
        "prompts": prompts,
    }
    C.TEST_DATA.mkdir(parents=True, exist_ok=True)
    path = C.TEST_DATA / "smollm2_adapter_reference.json"
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes) in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
