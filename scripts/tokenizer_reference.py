#!/usr/bin/env python3
"""Tokenizer + chat-template oracle for SmolLM2-135M-Instruct (the GGUF's own tokenizer).

Run:  python3 scripts/tokenizer_reference.py      (a few seconds; HF_HUB_OFFLINE=1 is forced)
Out:  lora-model/tests/data/smollm2_tokenizer.json

The tokenizer is the one transformers builds from the GGUF metadata (GPT-2 byte-level BPE,
tokenizer.ggml.*). Encoding is what the model uses: no BOS is added (add_bos_token = false), and
special-token text such as "<|im_start|>" in the input is matched as the special token.

JSON schema:
{
  "schema": "smollm2_tokenizer/v1",
  "generator": "scripts/tokenizer_reference.py",
  "versions": {package: version},
  "tokenizer": {"class": str, "vocab_size": int, "len": int, "bos_token", "bos_token_id",
                "eos_token", "eos_token_id", "pad_token", "pad_token_id", "unk_token",
                "adds_bos": bool, "special_tokens": {token: id},    # the added/special tokens
                "pre_tokenizer": json | null},                     # from the fast tokenizer's JSON
  "chat_template": str,              # the Jinja source used (tokenizer.chat_template from the GGUF)
  "strings": [
    {"name": str, "text": str,
     "ids": [int],                   # tokenizer(text, add_special_tokens=True)["input_ids"]
     "tokens": [str],                # the vocab strings of ids (byte-level, e.g. "Ġ" = space)
     "decoded": str,                 # tokenizer.decode(ids, skip_special_tokens=False)
     "roundtrip": bool}              # decoded == text
  ],
  "conversations": [
    {"name": str, "messages": [{"role", "content"}], "add_generation_prompt": bool,
     "rendered": str,                # apply_chat_template(messages, tokenize=False, ...)
     "ids": [int]}                   # tokenizer(rendered)["input_ids"]
  ]
}
"""

import json
import sys
import time

import smollm2_common as C

STRINGS = [
    ("empty", ""),
    ("hello", "Hello"),
    ("hello_world", "Hello, world!"),
    ("leading_space", " Hello"),
    ("two_spaces", "a  b"),
    ("many_spaces", "x        y"),
    ("trailing_space", "end "),
    ("newline", "line one\nline two"),
    ("double_newline", "para one\n\npara two\n"),
    ("crlf", "windows\r\nline"),
    ("tabs", "col1\tcol2\t\tcol3"),
    ("indent_code", "    return x\n\tpass"),
    ("digits_short", "42"),
    ("digits_long", "1234567890"),
    ("number_mixed", "In 2024, 3.14159 and -17 and 1,000,000."),
    ("punctuation", "Wait... what?! (yes) [no] {maybe}; \"quoted\" 'single' -- ok."),
    ("symbols", "@#$%^&*_+=|\\/<>~`"),
    ("contractions", "I'm sure it's fine, we'll see, they've gone, don't."),
    ("uppercase", "THE QUICK BROWN FOX"),
    ("camel", "camelCaseIdentifier and snake_case_name"),
    ("url", "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"),
    ("python_code", "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"),
    ("rust_code", "fn main() {\n    let v: Vec<u32> = (0..10).collect();\n    println!(\"{:?}\", v);\n}"),
    ("json", "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}"),
    ("french", "Le café est très chaud, n'est-ce pas ? À bientôt !"),
    ("german", "Grüße aus München: Straße, Äpfel, Übung."),
    ("spanish", "¿Dónde está la estación? ¡Mañana!"),
    ("cjk_chinese", "你好，世界！今天天气很好。"),
    ("cjk_japanese", "こんにちは、東京タワー"),
    ("korean", "안녕하세요"),
    ("cyrillic", "Привет, мир"),
    ("emoji", "I love pizza 🍕🍕 and 🤖!"),
    ("emoji_zwj", "family: 👨‍👩‍👧 flag: 🇫🇷"),
    ("im_start", "<|im_start|>"),
    ("im_end", "<|im_end|>"),
    ("endoftext", "<|endoftext|>"),
    ("special_inline", "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"),
    ("special_glued", "text<|im_end|>more"),
    ("fake_special", "<|im_start |> and <im_start>"),
    ("long_word", "antidisestablishmentarianism supercalifragilisticexpialidocious"),
    ("repeated", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"),
    ("math", "∑ x² ≤ ∞ ± √2 → π"),
    ("control_bytes", "nul\u0000bell\u0007esc\u001b"),
]

CONVERSATIONS = [
    ("no_system", [{"role": "user", "content": "What is the capital of France?"}]),
    ("with_system", [{"role": "system", "content": "You are a pirate. Always answer like a pirate."},
                     {"role": "user", "content": "Write a haiku about the sea."}]),
    ("multi_turn", [{"role": "user", "content": "List three prime numbers."},
                    {"role": "assistant", "content": "2, 3 and 5."},
                    {"role": "user", "content": "And three more?"}]),
]


def main():
    t0 = time.time()
    tok = C.load_tokenizer()

    specials = {}
    for t in tok.all_special_tokens:
        specials[t] = tok.convert_tokens_to_ids(t)
    for tid, added in getattr(tok, "added_tokens_decoder", {}).items():
        specials[str(added)] = int(tid)
    pre = None
    try:
        tj = json.loads(tok.backend_tokenizer.to_str())
        pre = tj.get("pre_tokenizer")
    except Exception:  # slow tokenizer
        pass

    strings = []
    for name, text in STRINGS:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        dec = tok.decode(ids, skip_special_tokens=False)
        strings.append({"name": name, "text": text, "ids": ids,
                        "tokens": tok.convert_ids_to_tokens(ids), "decoded": dec, "roundtrip": dec == text})
        print(f"{name:16s} {len(ids):3d} ids  roundtrip={dec == text}  {ids[:12]}")

    convs = []
    for name, msgs in CONVERSATIONS:
        rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok(rendered, add_special_tokens=True)["input_ids"]
        convs.append({"name": name, "messages": msgs, "add_generation_prompt": True,
                      "rendered": rendered, "ids": ids})
        print(f"--- {name}: {len(ids)} ids\n{rendered}")

    out = {
        "schema": "smollm2_tokenizer/v1",
        "generator": "scripts/tokenizer_reference.py",
        "versions": C.versions(),
        "tokenizer": {
            "class": type(tok).__name__,
            "vocab_size": tok.vocab_size,
            "len": len(tok),
            "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id,
            "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
            "pad_token": tok.pad_token, "pad_token_id": tok.pad_token_id,
            "unk_token": tok.unk_token,
            "adds_bos": bool(tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id]),
            "special_tokens": specials,
            "pre_tokenizer": pre,
        },
        "chat_template": tok.chat_template,
        "strings": strings,
        "conversations": convs,
    }
    C.TEST_DATA.mkdir(parents=True, exist_ok=True)
    path = C.TEST_DATA / "smollm2_tokenizer.json"
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes) in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
