#!/usr/bin/env bash
# On the GPU machine: SmolLM2-135M-Instruct on the GPU backend against the committed transformers
# reference ids — the bundle's `lora-model--gpu_smollm2` test binary (lora-model/tests/gpu_smollm2.rs):
# base model (6 prompts) and the pirate adapter (adapters/pirate; 2 prompts with and without it in one
# batch), teacher-forced argmax and logits, free-running greedy tokens eagerly and as CUDA graphs, batch
# vs each sequence alone. Its `//!` says the tie rule.
#
# The 98 MB GGUF does not fit one call (64 MiB, the working tree included), so it travels in halves
# made here by `bash scripts/split_smollm2.sh`; files of earlier calls stay on a warm machine:
#   call 1: carry ["target/smol-a"],       command: ls -l target/smol-a
#   call 2: carry ["target/smol-b"],       command: ls -l target/smol-a target/smol-b
#   call 3: carry ["target/gpu-bundle"],   command: bash scripts/gpu/smollm2.sh target/gpu-bundle $OUT
# (the bundle from `cargo xtask gpu-bundle`). Run from the repository root:
#   bash scripts/gpu/smollm2.sh BUNDLE_DIR OUT_DIR
# joins target/smol-a/part + target/smol-b/part into /tmp/smollm2.gguf, checks its sha256 against
# SMOLLM2_GGUF_SHA256 in lora-model/src/fetch.rs, runs the test binary with LORA_SMOLLM2_GGUF and
# LORA_PIRATE_DIR set, writes OUT_DIR/smollm2.log and prints its summary. Exit status: the test's, or 2
# when it could not run (missing parts, wrong sha256, no binary, or the test skipped).
set -u
root="$(pwd)"
bundle="${1:?usage: bash scripts/gpu/smollm2.sh BUNDLE_DIR OUT_DIR}"
out="${2:?usage: bash scripts/gpu/smollm2.sh BUNDLE_DIR OUT_DIR}"
bundle="$(cd "$bundle" && pwd)" || exit 2
mkdir -p "$out"
log="$out/smollm2.log"
fail() { echo "smollm2.sh: $*" | tee -a "$log" >&2; exit 2; }
: > "$log"
for p in target/smol-a/part target/smol-b/part; do
  [ -f "$p" ] || fail "no $p (carry target/smol-a and target/smol-b in the two calls before; is the machine still warm?)"
done
want="$(sed -nE 's/.*SMOLLM2_GGUF_SHA256: &str = "([0-9a-f]{64})".*/\1/p' lora-model/src/fetch.rs)"
[ -n "$want" ] || fail "no SMOLLM2_GGUF_SHA256 in lora-model/src/fetch.rs (run from the repository root)"
gguf=/tmp/smollm2.gguf
cat target/smol-a/part target/smol-b/part > "$gguf" || fail "joining the parts into $gguf"
got="$(sha256sum "$gguf" | cut -d' ' -f1)"
[ "$got" = "$want" ] || fail "$gguf has sha256 $got, expected $want"
echo "smollm2.sh: $gguf ($(stat -c %s "$gguf") bytes) sha256 $got ok" | tee -a "$log"
bin="$bundle/tests/lora-model--gpu_smollm2"
[ -x "$bin" ] || fail "no test binary $bin (rebuild the bundle: cargo xtask gpu-bundle)"
[ -d adapters/pirate ] || fail "no adapters/pirate in $root"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$log"
echo "== gpu_smollm2 ($(date -u +%FT%TZ))" | tee -a "$log"
LORA_SMOLLM2_GGUF="$gguf" LORA_PIRATE_DIR="$root/adapters/pirate" RUST_BACKTRACE=1 \
  timeout 480 "$bin" --test-threads=1 --nocapture >> "$log" 2>&1
rc=$?
echo "rc=$rc" >> "$log"
grep -E "^(SKIP|teacher-forced|eager|graphs|alone|test |test result)|panicked|failures|KV pages" "$log" | grep -v "^SKIP emulator_smollm2"
echo "rc=$rc (full log: $log)"
if grep -q "SKIP gpu_smollm2" "$log"; then
  echo "smollm2.sh: the GPU test skipped (see the SKIP lines): nothing was checked" >&2
  exit 2
fi
exit "$rc"
