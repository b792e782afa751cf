#!/usr/bin/env bash
# dev/compare.sh: what `make compare` does. Every adaptation method trains from the same base on
# tinyshakespeare with the same batches (same B, T, steps, no shuffling) and the same evaluation
# (the first VAL_BATCHES validation batches every VAL_EVERY steps). dev/compare.py then parses the
# trainer's fixed-format logs into dev/results/compare.md (+ compare_val_loss.png) with the rank study.
#   dev/compare.sh [-e base.bin]     default base: data/brown_base.bin (make run), else a small one made here
# Knobs (environment): B T STEPS VAL_EVERY VAL_BATCHES OMP_NUM_THREADS. Logs and outputs go to build/compare/.
set -euo pipefail
cd "$(dirname "$0")/.."

# 200 steps of 4 x 64 tokens (51k tokens, a sixth of an epoch): on make run's Brown base, long enough for
# the methods to move apart (LoRA r=8: -0.48 nats, full fine-tuning: -0.95); 14m37s for all 24 runs on a shared 2-core machine
B="${B:-4}"
T="${T:-64}"
STEPS="${STEPS:-200}"
VAL_EVERY="${VAL_EVERY:-50}"
VAL_BATCHES="${VAL_BATCHES:-8}"
# one thread: the 2 cores are shared, and OpenMP barriers under oversubscription make ms/step meaningless
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
RUN_DIR=build/compare
BASE=data/brown_base.bin
if [ "${1:-}" = "-e" ]; then BASE="${2:?-e needs a checkpoint path}"; fi

fail() { printf 'make compare: FAILED: %s\n---> HINT: %s\n' "$1" "$2" >&2; exit 1; }

make -s train_gpt2_lora || fail "building the trainer" "run make and fix the build first"
mkdir -p "$RUN_DIR" dev/results
cp train_gpt2_lora "$RUN_DIR/train_gpt2_lora" # a private copy: a rebuild during the runs must not mix versions
TRAIN="$RUN_DIR/train_gpt2_lora"
for f in data/tiny_shakespeare_train.bin data/tiny_shakespeare_val.bin; do
    [ -s "$f" ] || make -s data || fail "make data" "see the error above"
done

if [ ! -s "$BASE" ]; then
    # no base from make run: pretrain a small one on Brown here (a few minutes), once
    BASE="$RUN_DIR/small_base.bin"
    if [ ! -s "$BASE" ]; then
        echo "make compare: no data/brown_base.bin; pretraining a small base -> $BASE"
        mkdir -p build/compare_tools "$RUN_DIR/pretrain"
        g++ -O3 -std=c++17 -fopenmp dev/make_random_model.cpp -lm -o build/compare_tools/make_random_model \
            || fail "building dev/make_random_model.cpp" "see the compiler error above"
        build/compare_tools/make_random_model -o "$RUN_DIR/base_init.bin" -l 4 -c 128 -n 4 -t 128
        "$TRAIN" -e "$RUN_DIR/base_init.bin" -i data/brown_train.bin -j data/brown_val.bin -f 1 -b 4 -t 64 \
            -x 60 -v 30 -m 2 -s 0 -l 3e-3 -o "$RUN_DIR/pretrain" > "$RUN_DIR/pretrain.log" \
            || fail "pretraining the small base" "see $RUN_DIR/pretrain.log"
        mv "$RUN_DIR/pretrain/model.bin" "$BASE"
    fi
fi
[ -s "$BASE" ] || fail "no base model" "pass one with -e, or run make run first"

# name | flags (LoRA: alpha = 2r, so scale = 2 at every rank; base-weight methods take the -f 1 lr default 1e-4)
RUNS=(
    "full|-f 1"
    "l2sp|-f 1 -w 0.01"
    "full_dropout|-f 1 -R 0.1"
    "freeze_top1|-F 1"
    "adapter_m16|-H 16 -l 1e-3"
    "prefix_P8|-X 8 -l 1e-2"
    "bitfit|-B 1 -l 1e-3"
    "lora_r8_qkv|-r 8 -a 16 -q qkv -l 1e-3"
    "lora_r8_qkv_attproj|-r 8 -a 16 -q qkv,attproj -l 1e-3"
    "lora_r8_dropout|-r 8 -a 16 -l 1e-3 -D 0.1"
    "lora_r1|-r 1 -a 2 -l 1e-3"
    "lora_r2|-r 2 -a 4 -l 1e-3"
    "lora_r4|-r 4 -a 8 -l 1e-3"
    "lora_r8|-r 8 -a 16 -l 1e-3"
    "lora_r16|-r 16 -a 32 -l 1e-3"
    "lora_r64|-r 64 -a 128 -l 1e-3 -n 4242"
    # LoRA variants, all at r=8 alpha=16 like lora_r8; names avoid the lora_r<N> pattern of the rank study
    "v_rslora|-r 8 -a 16 -l 1e-3 -V rslora"
    "v_loraplus16|-r 8 -a 16 -l 1e-3 -P 16"
    "v_dora|-r 8 -a 16 -l 1e-3 -V dora"
    "v_pissa|-r 8 -a 16 -l 1e-3 -V pissa"
    # AdaLoRA: init_r 12 falling to 8 on average (the budget of lora_r8), alpha / init_r = 2; the budget falls
    # from step 20 to 160 (masking every 10 steps), then the ranks stay fixed for the last 40 steps
    "v_adalora|-r 12 -a 24 -l 1e-3 -V adalora -Z 8 -U 20,40,10"
    "v_qlora_int8|-r 8 -a 16 -l 1e-3 -Q int8"
    "v_qlora_nf4|-r 8 -a 16 -l 1e-3 -Q nf4"
    "v_qlora_int2|-r 8 -a 16 -l 1e-3 -Q int2"
)
: > "$RUN_DIR/runs.txt"
for run in "${RUNS[@]}"; do
    name="${run%%|*}"
    flags="${run#*|}"
    rm -rf "$RUN_DIR/$name"
    mkdir -p "$RUN_DIR/$name"
    echo "make compare: $name ($flags)"
    # shellcheck disable=SC2086
    "$TRAIN" -e "$BASE" -i data/tiny_shakespeare_train.bin -j data/tiny_shakespeare_val.bin \
        -b "$B" -t "$T" -x "$STEPS" -v "$VAL_EVERY" -m "$VAL_BATCHES" -s 0 -u 0 -o "$RUN_DIR/$name" $flags \
        > "$RUN_DIR/$name.log" || fail "run $name" "see $RUN_DIR/$name.log"
    echo "$name|$flags" >> "$RUN_DIR/runs.txt"
done

# How dW relates to W (the LoRA paper's section 7.3): the last block's matrices of the r = 4 and r = 64 adapters
mkdir -p build/compare_tools
g++ -O3 -std=c++17 -fopenmp dev/delta_w.cpp -lm -o build/compare_tools/delta_w || fail "building dev/delta_w.cpp" "see the compiler error above"
{ for r in 4 64; do build/compare_tools/delta_w "$BASE" "$RUN_DIR/lora_r$r/adapter.bin" && echo; done; } > "$RUN_DIR/delta_w.md" \
    || fail "dev/delta_w.cpp" "see its error above"

/usr/bin/python3 dev/compare.py "$RUN_DIR" dev/results "$BASE" "B=$B T=$T steps=$STEPS" \
    || fail "dev/compare.py" "it needs numpy and matplotlib in the system python (apt-get install python3-matplotlib)"
echo "make compare: wrote dev/results/compare.md and dev/results/compare_val_loss.png"
