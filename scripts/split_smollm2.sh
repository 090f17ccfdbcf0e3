#!/usr/bin/env bash
# Splits the cached SmolLM2 GGUF (98 MB; at most 64 MiB travel with one GPU call, the working tree
# included) into two halves for the GPU machine: target/smol-a/part and target/smol-b/part (both under
# the git-ignored target/). Run here, from anywhere in the checkout:
#   bash scripts/split_smollm2.sh [GGUF]     (default: target/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)
# Checks the file's sha256 against SMOLLM2_GGUF_SHA256 in lora-model/src/fetch.rs before splitting and
# the concatenated parts after, and prints the sha256 of the whole. On the GPU machine,
# scripts/gpu/smollm2.sh joins the parts again (see its header for the three calls).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
src="${1:-$root/target/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"
want="$(sed -nE 's/.*SMOLLM2_GGUF_SHA256: &str = "([0-9a-f]{64})".*/\1/p' "$root/lora-model/src/fetch.rs")"
[ -n "$want" ] || { echo "split_smollm2: no SMOLLM2_GGUF_SHA256 in lora-model/src/fetch.rs" >&2; exit 1; }
[ -f "$src" ] || { echo "split_smollm2: no GGUF at $src (cargo test -p lora-model --test smollm2 fetches it)" >&2; exit 1; }
got="$(sha256sum "$src" | cut -d' ' -f1)"
[ "$got" = "$want" ] || { echo "split_smollm2: $src has sha256 $got, expected $want" >&2; exit 1; }
size="$(stat -c %s "$src")"
half=$(( (size + 1) / 2 ))
mkdir -p "$root/target/smol-a" "$root/target/smol-b"
head -c "$half" "$src" > "$root/target/smol-a/part"
tail -c +"$(( half + 1 ))" "$src" > "$root/target/smol-b/part"
joined="$(cat "$root/target/smol-a/part" "$root/target/smol-b/part" | sha256sum | cut -d' ' -f1)"
[ "$joined" = "$want" ] || { echo "split_smollm2: the joined parts have sha256 $joined, expected $want" >&2; exit 1; }
for p in smol-a smol-b; do
  git -C "$root" check-ignore -q "target/$p/part" || { echo "split_smollm2: target/$p/part is not git-ignored" >&2; exit 1; }
  echo "target/$p/part: $(stat -c %s "$root/target/$p/part") bytes"
done
echo "sha256 of the whole ($size bytes): $joined"
