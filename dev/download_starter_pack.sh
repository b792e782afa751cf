#!/usr/bin/env bash
# dev/download_starter_pack.sh: fetches llm.c's starter pack into data/ when the machine is online:
#   data/gpt2_124M.bin             GPT-2 124M, llm.c fp32 checkpoint (version 3), 497,904,640 bytes
#   data/gpt2_tokenizer.bin        llm.c tokenizer (`make data` also writes an equivalent one offline)
#   data/tiny_shakespeare_{train,val}.bin   llm.c token files (`make data` writes these offline too)
# Files already present are kept. Each download goes to <file>.tmp and is renamed only when complete.
# With the starter pack in place, `./train_gpt2_lora` with no flags and `make run` use GPT-2 124M.
# Offline it stops with a message saying what is missing and what to do instead.
set -euo pipefail
cd "$(dirname "$0")/.."

# llm.c's starter pack on Hugging Face (the URL llm.c's own download script uses)
BASE_URL="${STARTER_PACK_URL:-https://huggingface.co/datasets/karpathy/llmc-starter-pack/resolve/main}"
FILES=(gpt2_124M.bin gpt2_tokenizer.bin tiny_shakespeare_train.bin tiny_shakespeare_val.bin)
GPT2_124M_BYTES=497904640 # 1024-byte header + 124,439,808 fp32 parameters (Vp = 50304)

fail() {
    echo "ERROR: $1" >&2
    echo "---> HINT: $2" >&2
    exit 1
}

command -v curl >/dev/null 2>&1 ||
    fail "curl not found; it is needed to download the starter pack" "apt-get install curl, or copy the files listed at the top of $0 into data/ by hand"
mkdir -p data

missing=()
for f in "${FILES[@]}"; do [ -s "data/$f" ] || missing+=("$f"); done
if [ ${#missing[@]} -eq 0 ]; then
    echo "[starter pack] all files present in data/, nothing to do"
    exit 0
fi

# one cheap request first, so that an offline machine gets one clear message instead of a stack of errors
errfile=$(mktemp)
if ! curl -sS -fL -r 0-1023 --connect-timeout 10 --max-time 30 -o /dev/null "$BASE_URL/gpt2_124M.bin" 2>"$errfile"; then
    why=$(tr -d '\n' <"$errfile"); rm -f "$errfile"
    fail "cannot reach $BASE_URL (curl: ${why:-no answer}); still missing in data/: ${missing[*]}" \
         "this machine looks offline. Either copy those files from a machine with internet into data/ (run this script there: it needs only bash and curl), or skip them: \`make run\` works offline by pretraining a small base on the Brown corpus (data/brown_base.bin)"
fi
rm -f "$errfile"

for f in "${missing[@]}"; do
    echo "[starter pack] downloading $f ..."
    if ! curl -fL --connect-timeout 10 --retry 3 --progress-bar -o "data/$f.tmp" "$BASE_URL/$f?download=true"; then
        rm -f "data/$f.tmp"
        fail "download of $BASE_URL/$f failed" "check the connection and rerun $0 (files already downloaded are kept)"
    fi
    if [ "$f" = gpt2_124M.bin ]; then
        got=$(stat -c %s "data/$f.tmp")
        if [ "$got" != "$GPT2_124M_BYTES" ]; then
            rm -f "data/$f.tmp"
            fail "data/$f is $got bytes, expected $GPT2_124M_BYTES (an llm.c fp32 GPT-2 124M checkpoint)" "rerun $0; if it persists the file on the server changed: pass your own checkpoint with -e"
        fi
    fi
    mv "data/$f.tmp" "data/$f"
    echo "[starter pack] wrote data/$f ($(stat -c %s "data/$f") bytes)"
done
echo "[starter pack] done: ./train_gpt2_lora (no flags) and make run now use data/gpt2_124M.bin"
