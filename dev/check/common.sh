# dev/check/common.sh: sourced by check_llamacpp.sh and check_peft.sh (which set CHECK to their name):
# fail(), and BASE, a base with GPT-2's vocabulary from data/, with the token files the short runs train on.
fail() { printf '%s: FAILED: %s\n---> HINT: %s\n' "$CHECK" "$1" "$2" >&2; exit 1; }

BASE=""
for b in data/gpt2_124M.bin data/brown_base.bin; do [ -s "$b" ] && { BASE=$b; break; }; done
[ -n "$BASE" ] || fail "no base with GPT-2's vocabulary (data/gpt2_124M.bin or data/brown_base.bin)" \
                       "run \`make run\` once (it pretrains data/brown_base.bin offline), or \`make starter-pack\`"
for f in data/tiny_shakespeare_train.bin data/tiny_shakespeare_val.bin; do
    [ -s "$f" ] || fail "no $f" "run \`make data\`"
done
