#!/usr/bin/env bash
# dev/check/check_peft.sh: what `make check-peft` does (see dev/check/check_peft.py). A Python virtual
# environment with torch, transformers, peft and safetensors from PyPI is created in build/check/peft-venv on
# first use; nothing else uses it. Short LoRA runs on make run's base export plain LoRA, rsLoRA, DoRA and AdaLoRA as
# PEFT directories (-o); PEFT loads each and must give our logits, and an adapter PEFT trains must give
# PEFT's logits in ours. Not part of make test or .ci/run.
set -euo pipefail
cd "$(dirname "$0")/../.."

DIR=build/check/peft
VENV=build/check/peft-venv
TRAIN=./train_gpt2_lora
LOGITS=${LOGITS:-build/check/logits}
IDS="50256,49,2662,44,46,25,198,40,716,407,257,582,286,1310,11,475,314,716,257,1178"
CHECK=check-peft
# shellcheck source=dev/check/common.sh
source dev/check/common.sh
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, transformers, peft, safetensors" 2>/dev/null; then
    echo "check-peft: creating $VENV with torch, transformers, peft, safetensors from PyPI (first use; several GB)"
    mkdir -p build/check
    { python3 -m venv "$VENV" && "$VENV/bin/pip" install torch transformers peft safetensors numpy; } > build/check/peft-install.log 2>&1 ||
        fail "installing torch, transformers and peft failed (see build/check/peft-install.log)" "PyPI must be reachable on first use"
fi

rm -rf "$DIR" && mkdir -p "$DIR"
adapters=()
for v in "lora -r 8 -a 16" "rslora -r 4 -a 8 -V rslora" "dora -r 8 -a 16 -V dora" "adalora -r 6 -a 12 -V adalora -Z 3 -U 4,6,2 -l 3e-2"; do
    read -r name flags <<< "$v"
    mkdir -p "$DIR/$name"
    # shellcheck disable=SC2086
    "$TRAIN" -e "$BASE" -i data/tiny_shakespeare_train.bin -j data/tiny_shakespeare_val.bin -b 2 -t 32 -x 20 -l 5e-3 \
             -v 0 -s 0 -o "$DIR/$name" $flags > "$DIR/$name/train.log" 2>&1 || fail "training $name (see $DIR/$name/train.log)" "check the log"
    adapters+=("$DIR/$name")
done
"$VENV/bin/python" dev/check/check_peft.py "$BASE" "$LOGITS" "$IDS" "$DIR" "${adapters[@]}"
