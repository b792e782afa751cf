#!/usr/bin/env bash
# dev/check/check_llamacpp.sh: what `make check-llamacpp` does. Our GGUF export (-L) loaded by llama.cpp
# itself: the prebuilt CPU build in the npm package node-llama-cpp, installed into build/check/llamacpp on
# first use (npm registry; offline after that). A short LoRA run on make run's base writes base.gguf,
# adapter.gguf and merged.gguf; for a fixed prompt, llama.cpp's greedy continuation and the probability of
# each chosen token must equal ours: the base alone, base + adapter (unmerged, as llama.cpp applies a
# LoRA adapter), and the merged model. Then the same for rsLoRA (alpha written as alpha * sqrt(r)) and
# for DoRA, which only the merged model can carry.
# Not part of make test or .ci/run: it needs npm, and a base with GPT-2's vocabulary.
set -euo pipefail
cd "$(dirname "$0")/../.."

DIR=build/check/llamacpp
TRAIN=./train_gpt2_lora
GREEDY=${GREEDY:-build/check/greedy}
N=32                                     # greedy tokens compared
PROMPT_IDS="50256,49,2662,44,46,25,198"  # <|endoftext|>ROMEO:\n in GPT-2's BPE
CHECK=check-llamacpp
# shellcheck source=dev/check/common.sh
source dev/check/common.sh

mkdir -p "$DIR"
if [ ! -d "$DIR/node_modules/node-llama-cpp" ]; then
    echo "check-llamacpp: installing node-llama-cpp from npm into $DIR (first use)"
    command -v npm >/dev/null || fail "npm is not installed" "apt-get install npm"
    (cd "$DIR" && { [ -f package.json ] || npm init -y >/dev/null; } && npm install --no-audit --no-fund node-llama-cpp > npm-install.log 2>&1) ||
        fail "npm install node-llama-cpp failed (see $DIR/npm-install.log)" "the npm registry must be reachable on first use"
fi
cp dev/check/llamacpp_greedy.mjs dev/check/compare_greedy.mjs "$DIR/"
echo "check-llamacpp: node-llama-cpp $(node -p "require('./$DIR/node_modules/node-llama-cpp/package.json').version"), base $BASE"

# one adapter: train it briefly, export, and compare the three models
check_variant() {
    local name=$1; shift
    local out="$DIR/$name"
    rm -rf "$out" && mkdir -p "$out"
    "$TRAIN" -e "$BASE" -i data/tiny_shakespeare_train.bin -j data/tiny_shakespeare_val.bin -b 2 -t 32 -x 20 -l 5e-3 \
             -v 0 -s 0 -o "$out" -L "$out" "$@" > "$out/train.log" 2>&1 || fail "training $name (see $out/train.log)" "check the log"
    grep '^wrote GGUF' "$out/train.log"
    local modes=("base - -" "unmerged $out/adapter.gguf $out/adapter.bin" "merged - $out/adapter.bin")
    [ -f "$out/adapter.gguf" ] || modes=("merged - $out/adapter.bin")
    for m in "${modes[@]}"; do
        read -r mode adapter_gguf ours_adapter <<< "$m"
        local model="$out/base.gguf" how=unmerged
        [ "$mode" = merged ] && { model="$out/merged.gguf"; how=merged; }
        "$GREEDY" "$BASE" "$ours_adapter" "$how" "$PROMPT_IDS" "$N" > "$out/ours_$mode.json"
        node "$DIR/llamacpp_greedy.mjs" "$model" "$adapter_gguf" "$PROMPT_IDS" "$N" > "$out/llamacpp_$mode.json" 2> "$out/llamacpp_$mode.err" ||
            fail "llama.cpp could not run $model (see $out/llamacpp_$mode.err)" "the GGUF files are rejected: read the error"
        node "$DIR/compare_greedy.mjs" "$name, $mode" "$out/ours_$mode.json" "$out/llamacpp_$mode.json" || fail "$name, $mode differs" "see $out"
    done
}

check_variant lora -r 8 -a 16
check_variant rslora -r 4 -a 8 -V rslora
check_variant dora -r 8 -a 16 -V dora
echo "check-llamacpp: all passed"
