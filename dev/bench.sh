#!/usr/bin/env bash
# dev/bench.sh: the whole `make bench` run (see dev/bench.mk). Everything is measured in this one run,
# so the printed ratios compare numbers taken side by side on the same (shared, noisy) machine.
#   STEPS=N      timed steps per 124M configuration (default 5; the small config runs 4x as many; the
#                T = 1024 rows near the end 2)
#   ROUNDS=N     rounds of our LoRA step against the PyTorch twin's, alternated (default 3), at T = 64 and
#                again at T = 1024
#   OURS_WAIT    our OpenMP wait policy: default (the runtime's own, as the trainer runs), passive or active
#   BENCH_STEP, BENCH_MATMUL: the built programs (set by make)
#   PYTHON       the interpreter with torch: default build/torchvenv/bin/python when it exists (the newest
#                torch from PyPI: python3 -m venv build/torchvenv && build/torchvenv/bin/pip install torch numpy),
#                else /usr/bin/python3 (Debian's python3-torch)
set -euo pipefail
BENCH_STEP=${BENCH_STEP:-build/omp/bench_step}
BENCH_MATMUL=${BENCH_MATMUL:-build/omp/bench_matmul}
STEPS=${STEPS:-5}
ROUNDS=${ROUNDS:-3}
if [ -z "${PYTHON:-}" ]; then
    PYTHON=/usr/bin/python3
    [ -x build/torchvenv/bin/python ] && PYTHON=build/torchvenv/bin/python
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# OpenMP waiting, each side at its best as a user runs it:
#   ours: OURS_WAIT=default (the default): libgomp's own policy, which a user of the trainer gets (spin a
#     little, then sleep); passive (sleep at once) costs ~40 ms a 124M step here in futex wake-ups
#     between the step's ~1,000 parallel regions, and is measured too (one line after the rounds);
#     OURS_WAIT=passive|active runs everything of ours that way
#   torch: passive (the twin sets it; without it PyTorch runs 3x slower on this shared 2-core machine)
OURS_WAIT=${OURS_WAIT:-default}
unset OMP_WAIT_POLICY
ours() { # bench_step with our wait policy
    if [ "$OURS_WAIT" = default ]; then "$BENCH_STEP" "$@"; else OMP_WAIT_POLICY=$OURS_WAIT "$BENCH_STEP" "$@"; fi
}
# peers are measured with their own defaults: OpenBLAS picks its kernel and cache sizes itself
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE

big=data/bench_gpt2_124M.bin     # random-init GPT-2 124M shape: L=12, C=768, NH=12, maxT=1024
small=data/bench_gpt2_L4_C256.bin # the offline base's shape: L=4, C=256, NH=4, maxT=256
mkdir -p data                     # a fresh clone has no data/ (it is made by `make data`, or here)
[ -f "$big" ] || "$BENCH_STEP" gen "$big" 12 768 12 1024
[ -f "$small" ] || "$BENCH_STEP" gen "$small" 4 256 4 256

echo "[bench] OMP_NUM_THREADS=$OMP_NUM_THREADS OMP_WAIT_POLICY ours $OURS_WAIT torch passive, load $(cut -d" " -f1-3 /proc/loadavg) B=4 T=64 r=8 (all four targets), $(nproc) cores, $(date -u +%FT%TZ)"
# the result depends on the CPU, and the bf16 rows on whether it multiplies bf16 itself (AVX512_BF16)
bf16_cpu=no; grep -qw avx512_bf16 /proc/cpuinfo && bf16_cpu=yes
echo "[bench] CPU: $(lscpu | sed -n 's/^Model name: *//p' | head -1); AVX512_BF16: $bf16_cpu; our bf16 matmuls: $("$BENCH_STEP" path)"
declare -A ms rss
for cfg in small big; do
    ckpt=${!cfg}
    n=$STEPS; [ "$cfg" = small ] && n=$((4 * STEPS))
    for mode in lora bf16 full; do
        line=$(ours "$mode" "$ckpt" 4 64 "$n")
        echo "$line"
        ms[$cfg.$mode]=$(awk '{for (i = 1; i < NF; i++) if ($i == "ms/step") print $(i + 1)}' <<<"$line")
        rss[$cfg.$mode]=$(awk '{for (i = 1; i < NF; i++) if ($i == "peak_rss_MiB") print $(i + 1)}' <<<"$line")
    done
    awk -v cfg="$cfg" -v a="${ms[$cfg.lora]}" -v b="${ms[$cfg.full]}" -v c="${rss[$cfg.lora]}" -v d="${rss[$cfg.full]}" \
        'BEGIN { printf "ratio %s lora/full ms/step %.3f peak_rss %.3f\n", cfg, a / b, c / d }'
    awk -v cfg="$cfg" -v a="${ms[$cfg.bf16]}" -v b="${ms[$cfg.lora]}" -v c="${rss[$cfg.bf16]}" -v d="${rss[$cfg.lora]}" \
        'BEGIN { printf "ratio %s lora bf16/fp32 ms/step %.3f peak_rss %.3f (%s vs %s MiB)\n", cfg, a / b, c / d, c, d }'
done

torch_bench() { # mode [autocast]
    OMP_WAIT_POLICY=passive MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 \
        "$PYTHON" dev/train_gpt2_lora.py bench --B 4 --T 64 --steps "$STEPS" --threads "$OMP_NUM_THREADS" --mode "$1" --autocast "${2:-none}"
}
have_torch=no
"$PYTHON" -c "import torch" 2>/dev/null && have_torch=yes
if [ "$have_torch" = yes ]; then
    out=$(torch_bench full)
    echo "$out"
    t_full=$(awk '/torch full ms\/step/ {print $4}' <<<"$out")
    # LoRA against LoRA, the closest race: ROUNDS rounds alternating our process and torch's, so both
    # see the same background load; each side keeps its best round
    best_ours= best_torch=
    for round in $(seq "$ROUNDS"); do
        line=$(ours lora "$big" 4 64 "$STEPS")
        ours=$(awk '{for (i = 1; i < NF; i++) if ($i == "ms/step") print $(i + 1)}' <<<"$line")
        out=$(torch_bench lora)
        theirs=$(awk '/torch lora ms\/step/ {print $4}' <<<"$out")
        awk -v r="$round" -v a="$ours" -v b="$theirs" 'BEGIN { printf "round %d lora ms/step ours %s torch %s ratio %.3f\n", r, a, b, a / b }'
        best_ours=$(awk -v a="$best_ours" -v b="$ours" 'BEGIN { print (a == "" || b < a) ? b : a }')
        best_torch=$(awk -v a="$best_torch" -v b="$theirs" 'BEGIN { print (a == "" || b < a) ? b : a }')
    done
    awk -v a="$best_ours" -v b="$best_torch" -v c="${ms[big.full]}" -v d="$t_full" -v n="$ROUNDS" \
        'BEGIN { printf "ratio 124M ours/torch lora %.3f (best of %d rounds: %.1f vs %.1f ms) full %.3f\n", a / b, n, a, b, c / d }'
else
    echo "torch: not found in $PYTHON, skipped (our bf16/fp32 rounds below run without it)"
fi
# bf16 against PyTorch's best CPU configuration, bf16 autocast, the same way: our bf16 LoRA step
# (-Q bf16), our fp32 LoRA step and torch's autocast step, alternated in each round. Only where the CPU
# multiplies bf16 itself: elsewhere PyTorch's autocast emulates bf16 and runs many times slower than its
# own fp32 (minutes a step on a 2-core Zen 1), so its best there is fp32, raced above; the rounds then
# time our two steps alone, as they do without torch.
best_bf16= best_fp32= best_autocast=
race=no
if [ "$have_torch" != yes ]; then
    echo "torch bf16 autocast: not raced, no torch in $PYTHON"
elif [ "$bf16_cpu" != yes ]; then
    echo "torch bf16 autocast: not raced, this CPU has no AVX512_BF16 (PyTorch would emulate bf16; its best here is fp32, above)"
else
    race=yes
fi
for round in $(seq "$ROUNDS"); do
    line=$(ours bf16 "$big" 4 64 "$STEPS")
    ours=$(awk '{for (i = 1; i < NF; i++) if ($i == "ms/step") print $(i + 1)}' <<<"$line")
    line=$(ours lora "$big" 4 64 "$STEPS")
    fp32=$(awk '{for (i = 1; i < NF; i++) if ($i == "ms/step") print $(i + 1)}' <<<"$line")
    best_bf16=$(awk -v a="$best_bf16" -v b="$ours" 'BEGIN { print (a == "" || b < a) ? b : a }')
    best_fp32=$(awk -v a="$best_fp32" -v b="$fp32" 'BEGIN { print (a == "" || b < a) ? b : a }')
    if [ "$race" != yes ]; then
        awk -v r="$round" -v a="$ours" -v f="$fp32" 'BEGIN { printf "round %d lora bf16 ms/step ours %s ours_fp32 %s ours bf16/fp32 %.3f\n", r, a, f, a / f }'
        continue
    fi
    out=$(torch_bench lora bf16)
    theirs=$(awk '/torch lora-bf16 ms\/step/ {print $4}' <<<"$out")
    [ "$round" = 1 ] && grep "^torch config" <<<"$out"
    awk -v r="$round" -v a="$ours" -v f="$fp32" -v b="$theirs" \
        'BEGIN { printf "round %d lora bf16 ms/step ours %s ours_fp32 %s torch_autocast %s ratio ours/torch %.3f ours bf16/fp32 %.3f\n", r, a, f, b, a / b, a / f }'
    best_autocast=$(awk -v a="$best_autocast" -v b="$theirs" 'BEGIN { print (a == "" || b < a) ? b : a }')
done
if [ "$race" = yes ]; then
    awk -v a="$best_bf16" -v f="$best_fp32" -v b="$best_autocast" -v n="$ROUNDS" \
        'BEGIN { printf "ratio 124M lora bf16 ours/torch_autocast %.3f, ours bf16/fp32 %.3f (best of %d rounds: %.1f, %.1f, torch %.1f ms)\n", a / b, a / f, n, a, f, b }'
else
    awk -v a="$best_bf16" -v f="$best_fp32" -v n="$ROUNDS" \
        'BEGIN { printf "ratio 124M lora bf16 ours bf16/fp32 %.3f (best of %d rounds: %.1f, %.1f ms)\n", a / f, n, a, f }'
fi
# ours again with passive waiting, as torch runs (the policy a shared machine may call for), once each
if [ "$OURS_WAIT" != passive ]; then
    p16=$(OMP_WAIT_POLICY=passive "$BENCH_STEP" bf16 "$big" 4 64 "$STEPS" | awk '{for (i = 1; i < NF; i++) if ($i == "ms/step") print $(i + 1)}')
    p32=$(OMP_WAIT_POLICY=passive "$BENCH_STEP" lora "$big" 4 64 "$STEPS" | awk '{for (i = 1; i < NF; i++) if ($i == "ms/step") print $(i + 1)}')
    awk -v a="$p16" -v f="$p32" 'BEGIN { printf "ours with OMP_WAIT_POLICY=passive: 124M lora bf16 %.1f ms, fp32 %.1f ms, bf16/fp32 %.3f\n", a, f, a / f }'
fi

# GPT-2's own context: attention grows with T squared, which every T = 64 row above hides. One sequence of
# 1024 tokens (as many as 4 of the batches above), 2 timed steps each: our fp32 LoRA step against the
# twin's, alternated in ROUNDS rounds, the twin with PyTorch's fused attention (scaled_dot_product_attention,
# its best here: the explicit softmax it uses at T = 64 stores the (T, T) weights, as ours does not from
# T = 128 on) and, where the CPU has AVX512_BF16, also with bf16 autocast; then our bf16 step once
best_long= best_long_torch= best_long_autocast=
for round in $(seq "$ROUNDS"); do
    line=$(ours lora "$big" 1 1024 2)
    [ "$round" = 1 ] && echo "$line"
    ours=$(awk '{for (i = 1; i < NF; i++) if ($i == "ms/step") print $(i + 1)}' <<<"$line")
    rss_ours=$(awk '{for (i = 1; i < NF; i++) if ($i == "peak_rss_MiB") print $(i + 1)}' <<<"$line")
    best_long=$(awk -v a="$best_long" -v b="$ours" 'BEGIN { print (a == "" || b < a) ? b : a }')
    [ "$have_torch" = yes ] || continue
    out=$(OMP_WAIT_POLICY=passive MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 \
        "$PYTHON" dev/train_gpt2_lora.py bench --B 1 --T 1024 --steps 2 --threads "$OMP_NUM_THREADS" --mode lora --attention sdpa)
    theirs=$(awk '/torch lora ms\/step/ {print $4}' <<<"$out")
    rss_theirs=$(awk '/torch lora ms\/step/ {print $6}' <<<"$out")
    best_long_torch=$(awk -v a="$best_long_torch" -v b="$theirs" 'BEGIN { print (a == "" || b < a) ? b : a }')
    awk -v r="$round" -v a="$ours" -v b="$theirs" -v c="$rss_ours" -v d="$rss_theirs" \
        'BEGIN { printf "round %d T=1024 lora ms/step ours %s torch_sdpa %s ratio %.3f peak_rss_MiB %s vs %s\n", r, a, b, a / b, c, d }'
    if [ "$race" = yes ]; then
        out=$(OMP_WAIT_POLICY=passive MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 \
            "$PYTHON" dev/train_gpt2_lora.py bench --B 1 --T 1024 --steps 2 --threads "$OMP_NUM_THREADS" --mode lora --attention sdpa --autocast bf16)
        theirs=$(awk '/torch lora-bf16 ms\/step/ {print $4}' <<<"$out")
        echo "round $round T=1024 torch_sdpa_autocast lora-bf16 ms/step $theirs"
        best_long_autocast=$(awk -v a="$best_long_autocast" -v b="$theirs" 'BEGIN { print (a == "" || b < a) ? b : a }')
    fi
done
if [ -n "$best_long_torch" ]; then
    awk -v a="$best_long" -v b="$best_long_torch" -v n="$ROUNDS" -v c="$rss_ours" -v d="$rss_theirs" \
        'BEGIN { printf "ratio 124M T=1024 ours/torch_sdpa lora %.3f (best of %d rounds: %.1f vs %.1f ms) peak_rss %.3f (%s vs %s MiB)\n", a / b, n, a, b, c / d, c, d }'
fi
line=$(ours bf16 "$big" 1 1024 2)
echo "$line"
ms[long.bf16]=$(awk '{for (i = 1; i < NF; i++) if ($i == "ms/step") print $(i + 1)}' <<<"$line")
awk -v a="${ms[long.bf16]}" -v b="$best_long" 'BEGIN { printf "ratio 124M T=1024 lora bf16/fp32 ms/step %.3f\n", a / b }'
if [ -n "$best_long_autocast" ]; then
    awk -v a="${ms[long.bf16]}" -v b="$best_long_autocast" 'BEGIN { printf "ratio 124M T=1024 lora bf16 ours/torch_sdpa_autocast %.3f (%.1f vs best %.1f ms)\n", a / b, a, b }'
fi

"$BENCH_MATMUL" 5
