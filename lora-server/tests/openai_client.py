"""Checks a running lora-server with the official `openai` Python client (and the stdlib for vLLM's
adapter endpoints): completions, chat, streaming, stop strings, models.list, load/unload, errors.

Started by lora-server/tests/openai_client.rs, which sets:
  LORA_BASE_URL      http://127.0.0.1:PORT/v1
  LORA_API_KEY       the server's --api-key
  LORA_BASE_MODEL    the base model's served name
  LORA_ADAPTER       an adapter loaded at start (--lora-modules)
  LORA_NEW_ADAPTER   a PEFT folder not yet loaded
  LORA_BAD_ADAPTER   a malformed PEFT folder
  LORA_MAX_MODEL_LEN the server's max_model_len
Exits non-zero on the first failed check.
"""

import json
import os
import sys
import time
import urllib.error
import urllib.request

import openai

BASE_URL = os.environ["LORA_BASE_URL"]
KEY = os.environ["LORA_API_KEY"]
BASE = os.environ["LORA_BASE_MODEL"]
ADAPTER = os.environ["LORA_ADAPTER"]
NEW_PATH = os.environ["LORA_NEW_ADAPTER"]
BAD_PATH = os.environ["LORA_BAD_ADAPTER"]
MAX_LEN = int(os.environ["LORA_MAX_MODEL_LEN"])

client = openai.OpenAI(base_url=BASE_URL, api_key=KEY, max_retries=0, timeout=60)
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True})
passed = 0


def check(cond, what):
    global passed
    if not cond:
        print(f"FAIL: {what}", flush=True)
        sys.exit(1)
    passed += 1


def raw(method, path, body=None, key=KEY, data=None):
    """(status, parsed JSON or text) of a raw request."""
    if data is None and body is not None:
        data = json.dumps(body).encode()
    req = urllib.request.Request(BASE_URL + path, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def expect_error(fn, exc, status, what, param=None):
    try:
        fn()
    except exc as e:
        check(e.status_code == status, f"{what}: status {e.status_code} != {status}")
        err = e.body if isinstance(e.body, dict) else {}
        check("message" in err and "type" in err, f"{what}: OpenAI error object, got {e.body!r}")
        if param is not None:
            check(err.get("param") == param, f"{what}: param {err.get('param')!r} != {param!r}")
        return
    check(False, f"{what}: no error raised")


def metric(name):
    with urllib.request.urlopen(BASE_URL.removesuffix("/v1") + "/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return None


# models.list: the base and the adapter, with parent = base.
models = {m.id: m for m in client.models.list().data}
check(BASE in models and ADAPTER in models, f"models.list has base and adapter: {list(models)}")
check(getattr(models[ADAPTER], "parent", None) == BASE, "adapter's parent is the base")

# Completions: greedy is deterministic, max_tokens is honoured, usage adds up.
c1 = client.completions.create(model=BASE, prompt="Hello there", max_tokens=12, **GREEDY)
c2 = client.completions.create(model=BASE, prompt="Hello there", max_tokens=12, **GREEDY)
check(isinstance(c1.choices[0].text, str), "completion text is a string")
check(c1.choices[0].finish_reason == "length", f"ignore_eos + max_tokens ends by length: {c1.choices[0].finish_reason}")
check(c1.usage.completion_tokens == 12, f"12 completion tokens: {c1.usage}")
check(c1.usage.total_tokens == c1.usage.prompt_tokens + 12, "usage totals")
check(c1.choices[0].text == c2.choices[0].text, "greedy completions repeat")
base_ids = c1.choices[0].model_extra["token_ids"]
check(len(base_ids) == 12, "return_token_ids gives the 12 tokens")

# The adapter changes the answer (model picks the adapter).
ca = client.completions.create(model=ADAPTER, prompt="Hello there", max_tokens=12, **GREEDY)
check(ca.choices[0].model_extra["token_ids"] != base_ids, "the adapter's greedy tokens differ from the base's")
check(ca.model == ADAPTER, "response names the adapter")

# Streaming completions: the chunks join to the non-streamed text.
chunks = list(client.completions.create(model=ADAPTER, prompt="Hello there", max_tokens=12, stream=True, **GREEDY))
check("".join(ch.choices[0].text or "" for ch in chunks) == ca.choices[0].text, "streamed completion == whole")
check(chunks[-1].choices[0].finish_reason == "length", "last chunk has the finish reason")

# Chat, whole and streamed (with usage), on the adapter.
msgs = [{"role": "user", "content": "Say something."}]
chat = client.chat.completions.create(model=ADAPTER, messages=msgs, max_tokens=10, **GREEDY)
check(chat.choices[0].message.role == "assistant", "assistant message")
check(chat.usage.completion_tokens == 10, f"chat usage: {chat.usage}")
stream = client.chat.completions.create(
    model=ADAPTER, messages=msgs, max_tokens=10, stream=True, stream_options={"include_usage": True}, **GREEDY
)
parts, usage, finish = [], None, None
for ch in stream:
    if ch.usage is not None:
        usage = ch.usage
    for choice in ch.choices:
        parts.append(choice.delta.content or "")
        finish = choice.finish_reason or finish
check("".join(parts) == chat.choices[0].message.content, "streamed chat == whole chat")
check(usage is not None and usage.completion_tokens == 10, f"include_usage chunk: {usage}")
check(finish == "length", f"stream finish reason: {finish}")

# Stop strings: cut before the first occurrence, not emitted, finish_reason stop.
full = client.completions.create(model=BASE, prompt="Once", max_tokens=24, **GREEDY).choices[0].text
stop = next((full[i : i + 2] for i in range(3, len(full) - 2) if "\ufffd" not in full[i : i + 2]), None)
if stop is not None:
    cut = client.completions.create(model=BASE, prompt="Once", max_tokens=24, stop=[stop], **GREEDY).choices[0]
    check(cut.text == full[: full.find(stop)], f"stop {stop!r}: {cut.text!r} vs {full!r}")
    check(cut.finish_reason == "stop", "a stop string ends with finish_reason stop")

# Errors.
expect_error(
    lambda: client.completions.create(model="no-such-model", prompt="x", max_tokens=2),
    openai.NotFoundError, 404, "unknown model", "model",
)
expect_error(
    lambda: client.completions.create(model=BASE, prompt="x", max_tokens=2, extra_body={"guided_json": {}}),
    openai.BadRequestError, 400, "unsupported field", "guided_json",
)
expect_error(
    lambda: client.chat.completions.create(model=BASE, messages=msgs, n=2),
    openai.BadRequestError, 400, "n = 2", "n",
)
expect_error(
    lambda: client.completions.create(model=BASE, prompt=[5] * MAX_LEN, max_tokens=1),
    openai.BadRequestError, 400, "prompt longer than the context",
)
expect_error(
    lambda: client.completions.create(model=BASE, prompt="x", max_tokens=MAX_LEN),
    openai.BadRequestError, 400, "max_tokens beyond the context", "max_tokens",
)
bad_key = openai.OpenAI(base_url=BASE_URL, api_key="wrong", max_retries=0)
expect_error(lambda: bad_key.models.list(), openai.AuthenticationError, 401, "wrong API key")
status, body = raw("POST", "/completions", data=b'{"model": ')
check(status == 400 and "error" in body, f"malformed JSON: {status} {body}")

# Load / unload (vLLM's endpoints).
status, body = raw("POST", "/load_lora_adapter", {"lora_name": "new", "lora_path": NEW_PATH})
check(status == 200, f"load: {status} {body}")
check("new" in {m.id for m in client.models.list().data}, "loaded adapter listed")
r = client.completions.create(model="new", prompt="Hello there", max_tokens=4, **GREEDY)
check(r.usage.completion_tokens == 4, "the loaded adapter serves")
status, body = raw("POST", "/load_lora_adapter", {"lora_name": "new", "lora_path": NEW_PATH})
check(status == 400, f"loading a name twice: {status}")
status, body = raw("POST", "/load_lora_adapter", {"lora_name": "bad", "lora_path": BAD_PATH})
check(status == 400 and "error" in body, f"malformed adapter: {status} {body}")
status, body = raw("POST", "/load_lora_adapter", {"lora_name": "gone", "lora_path": "/no/such/dir"})
check(status == 400 and "error" in body, f"missing adapter folder: {status} {body}")
check("bad" not in {m.id for m in client.models.list().data}, "a refused adapter is not listed")

# Unloading an adapter in use is refused; a client disconnect aborts its request.
steps_before = metric("lora_engine_steps_total")
s = client.completions.create(model="new", prompt="Hi", max_tokens=MAX_LEN - 8, stream=True, **GREEDY)
it = iter(s)
next(it)
status, body = raw("POST", "/unload_lora_adapter", {"lora_name": "new"})
check(status == 409, f"unload while in use: {status} {body}")
s.close()
deadline = time.time() + 20
while time.time() < deadline and metric("lora_requests_running") != 0:
    time.sleep(0.05)
check(metric("lora_requests_running") == 0, "the disconnected stream was aborted")
check(metric("lora_kv_pages_used") == 0, "its KV pages are free")
steps = metric("lora_engine_steps_total") - steps_before
check(steps < (MAX_LEN - 8) / 2, f"the aborted request stopped early: {steps} steps for {MAX_LEN - 8} tokens asked")
status, body = raw("POST", "/unload_lora_adapter", {"lora_name": "new"})
check(status == 200, f"unload: {status} {body}")
check("new" not in {m.id for m in client.models.list().data}, "unloaded adapter gone")
expect_error(
    lambda: client.completions.create(model="new", prompt="x", max_tokens=2), openai.NotFoundError, 404, "unloaded"
)
status, body = raw("POST", "/unload_lora_adapter", {"lora_name": "new"})
check(status == 404, f"unload unknown: {status}")
status, body = raw("POST", "/load_lora_adapter", {"lora_name": "x"})
check(status == 400, f"load without lora_path: {status}")

print(f"openai client: {passed} passed, 0 failed", flush=True)
