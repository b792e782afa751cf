"""dev/compare.py RUN_DIR OUT_DIR BASE SETUP: turns the trainer logs of dev/compare.sh into
OUT_DIR/compare.md (the method table, the memory check and the rank study) and
OUT_DIR/compare_val_loss.png (validation loss against step for every method).
Everything is parsed from the trainer's fixed-format log lines; the rank study reads lora_A from
the PEFT safetensors each LoRA run wrote with -o. Dev only: numpy + matplotlib, system python."""
import json, os, re, struct, sys
import numpy as np

run_dir, out_dir, base, setup = sys.argv[1:5]
runs = [line.rstrip("\n").split("|", 1) for line in open(os.path.join(run_dir, "runs.txt")) if line.strip()]

def parse(name):
    log = open(os.path.join(run_dir, name + ".log")).read()
    def one(pattern, cast=float):
        m = re.search(pattern, log, re.M)
        if m is None:
            sys.exit(f"compare.py: '{pattern}' not found in {run_dir}/{name}.log")
        return cast(m.group(1))
    r = {"name": name}
    r["base_params"] = one(r"^num_parameters: (\d+)", int)
    r["trainable"] = one(r"^trainable_params: (\d+)", int)
    r["trainable_pct"] = one(r"^trainable %: ([\d.]+)")  # of base + trainable extras, as the trainer counts them
    m = re.search(r"^bytes: params (\d+) grads (\d+) optimizer (\d+) activations (\d+)", log, re.M)
    r["params_b"], r["grads_b"], r["opt_b"], r["act_b"] = (int(x) for x in m.groups())
    r["peak_rss"] = one(r"^peak RSS: ([\d.]+) MiB")
    r["rss0"] = one(r"^RSS before the model: ([\d.]+) MiB")
    r["ms"] = one(r"^average step: ([\d.]+) ms")
    r["final_val"] = one(r"^final val loss: ([\d.]+)")
    # val loss lines come before the step they precede: the step count so far is their step
    curve, step = [], 0
    for line in log.splitlines():
        if line.startswith("step "):
            step = int(line.split()[1].split("/")[0])
        elif line.startswith("val loss "):
            curve.append((step, float(line.split()[2])))
    r["curve"] = curve
    pen = re.findall(r"^l2sp penalty ([\d.eE+-]+)", log, re.M)
    r["penalty"] = float(pen[-1]) if pen else None
    # AdaLoRA: the final ranks per matrix, one line per layer ("adalora ranks layer 3: qkv 7 attproj 5 fc 9 fcproj 8")
    r["adalora_ranks"] = [(int(m.group(1)), dict(zip(m.group(2).split()[0::2], map(int, m.group(2).split()[1::2]))))
                          for m in re.finditer(r"^adalora ranks layer (\d+):((?: \w+ \d+)+)$", log, re.M)]
    orth = re.findall(r"^adalora orth penalty ([\d.eE+-]+)", log, re.M)
    r["orth"] = float(orth[-1]) if orth else None
    d = os.path.join(run_dir, name)
    for f in ("adapter_model.safetensors", "method.bin", "model.bin"):
        if os.path.exists(os.path.join(d, f)):
            r["saved"], r["saved_b"] = f, os.path.getsize(os.path.join(d, f))
            break
    else:
        sys.exit(f"compare.py: {d} holds no saved adapter or model")
    return r

rows = [parse(name) for name, _ in runs]
flags = dict((name, f) for name, f in runs)
MiB = 1024.0 * 1024.0
def mib(b): return f"{b / MiB:.2f}"
def size(b): return f"{b / MiB:.2f} MiB" if b >= MiB / 10 else f"{b / 1024:.1f} KiB"

md = []
md.append("# Adaptation methods compared on one base\n")
md.append(f"Produced by `make compare` (dev/compare.sh + dev/compare.py) from a fresh run. Base: `{base}` "
          f"({rows[0]['base_params']:,} parameters); fine-tuning on tinyshakespeare, {setup}, no shuffling "
          f"(every method sees the same batches); val loss = mean over the same first validation batches. "
          f"Timings on a shared 2-core machine: noisy, compare within one run only.\n")
md.append("| method | flags | trainable params (% of total) | params MiB | grads MiB | optimizer MiB | activations MiB | peak RSS MiB | ms/step | val loss at step 0 | val loss at the end | saved checkpoint |")
md.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    pct = r["trainable_pct"]  # (params_b no longer says how many floats the base has: -Q stores it as codes)
    md.append(f"| {r['name']} | `{flags[r['name']]}` | {r['trainable']:,} ({pct:.3g}%) | {mib(r['params_b'])} | {mib(r['grads_b'])} | "
              f"{mib(r['opt_b'])} | {mib(r['act_b'])} | {r['peak_rss']:.1f} | {r['ms']:.0f} | {r['curve'][0][1]:.4f} | "
              f"{r['final_val']:.4f} | {size(r['saved_b'])} ({r['saved']}) |")
pen = [r for r in rows if r["penalty"] is not None]
for r in pen:
    md.append(f"\nL2-SP penalty lambda/2 ||W - W0||^2 after the last step ({r['name']}): {r['penalty']:.6g}")

# Regularised fine-tuning: each dropout row beside the same run without it (dropout 0.1 as in the LoRA
# paper's GPT-2 runs: -D on LoRA's branch, -R GPT-2's own embedding / attention / residual dropouts)
byname = dict((r["name"], r) for r in rows)
pairs = [(a, b) for a, b in (("lora_r8", "lora_r8_dropout"), ("full", "full_dropout")) if a in byname and b in byname]
if pairs:
    md.append("\n## Dropout: the same run with and without it\n")
    md.append("Dropout acts in the training steps only; every val loss is measured without it. "
              "The train loss of a dropout run is that of the dropped model, so only val losses are compared.\n")
    md.append("| without | with dropout | flags added | val loss at the end without | with | difference | ms/step without | with |")
    md.append("|---|---|---|---|---|---|---|---|")
    for a, b in pairs:
        added = flags[b].replace(flags[a], "").strip() if flags[b].startswith(flags[a]) else flags[b]
        ra, rb = byname[a], byname[b]
        md.append(f"| {a} | {b} | `{added}` | {ra['final_val']:.4f} | {rb['final_val']:.4f} | "
                  f"{rb['final_val'] - ra['final_val']:+.4f} | {ra['ms']:.0f} | {rb['ms']:.0f} |")

for r in [r for r in rows if r["adalora_ranks"]]:
    mats = list(r["adalora_ranks"][0][1].keys())
    m_init = re.search(r"-r (\d+)", flags[r["name"]])
    m_target = re.search(r"-Z (\d+)", flags[r["name"]])
    total = sum(sum(d.values()) for _, d in r["adalora_ranks"])
    md.append(f"\n## AdaLoRA: the final rank of each matrix ({r['name']})\n")
    md.append(f"Every matrix starts at init_r = {m_init.group(1) if m_init else 12}; the budget falls on PEFT's cubic schedule to "
              f"target_r = {m_target.group(1) if m_target else 8} on average, masking the triplets (lora_B column, lora_E value, "
              f"lora_A row) of lowest importance. {total} triplets kept over {len(r['adalora_ranks']) * len(mats)} matrices "
              f"(mean {total / (len(r['adalora_ranks']) * len(mats)):.2f}); the orthogonality penalty after the last step: "
              f"{r['orth']:.4g}.\n")
    md.append("| layer | " + " | ".join(mats) + " | layer total |")
    md.append("|---" * (len(mats) + 2) + "|")
    for layer, d in r["adalora_ranks"]:
        md.append(f"| {layer} | " + " | ".join(str(d[k]) for k in mats) + f" | {sum(d.values())} |")
    md.append("| all layers | " + " | ".join(str(sum(d[k] for _, d in r["adalora_ranks"])) for k in mats) + f" | {total} |")

md.append("\n## Memory: the arithmetic of doc/memory.md against the measurement\n")
md.append("predicted = params + grads + optimizer + activations (the [Memory] bytes line); measured = peak RSS minus "
          "the RSS just before the base was loaded (the binary, libraries and OpenMP runtime are in the latter).\n")
md.append("| method | predicted MiB | measured MiB | measured / predicted |")
md.append("|---|---|---|---|")
for r in rows:
    pred = (r["params_b"] + r["grads_b"] + r["opt_b"] + r["act_b"]) / MiB
    meas = r["peak_rss"] - r["rss0"]
    md.append(f"| {r['name']} | {pred:.1f} | {meas:.1f} | {meas / pred:.3f} |")

# ---- rank study
def safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        out[k] = np.frombuffer(data[a:b], dtype=np.float32).reshape(v["shape"])
    return out

lora = {int(re.search(r"lora_r(\d+)$", r["name"]).group(1)): r for r in rows if re.search(r"lora_r(\d+)$", r["name"])}
md.append("\n## Rank study (LoRA on all four matrices, alpha = 2r)\n")
md.append("| r | trainable params | val loss at the end |")
md.append("|---|---|---|")
for k in sorted(lora):
    md.append(f"| {k} | {lora[k]['trainable']:,} | {lora[k]['final_val']:.4f} |")

if 8 in lora and 64 in lora:
    A8 = safetensors(os.path.join(run_dir, "lora_r8", "adapter_model.safetensors"))
    A64 = safetensors(os.path.join(run_dir, "lora_r64", "adapter_model.safetensors"))
    js = [1, 2, 4, 8, 16, 32, 64]
    md.append("\nSubspace similarity between the r=8 and r=64 adapters of the same matrix (Hu et al. 2021, section 7.2): "
              "phi(i, j) = ||U_i^T V_j||_F^2 / min(i, j), U_i the top-i right singular vectors of lora_A (r=8), "
              "V_j the top-j of lora_A (r=64); 1 = one subspace contains the other, about j / in for unrelated random "
              "subspaces. The r=64 run uses another seed (-n 4242), so the two lora_A do not share their random init.\n")
    # two matrices of the last block: the attention input (qkv) and output (attproj) projections
    last = max(int(re.search(r"\.h\.(\d+)\.", k).group(1)) for k in A8)
    keys = [k for k in A8 if k.endswith("lora_A.weight") and f".h.{last}.attn." in k]
    for key in sorted(keys):
        a8, a64 = A8[key].astype(np.float64), A64[key].astype(np.float64)
        U = np.linalg.svd(a8, full_matrices=False)[2].T    # (in, 8)
        V = np.linalg.svd(a64, full_matrices=False)[2].T   # (in, 64)
        name = key.replace("base_model.model.transformer.", "").replace(".weight", "")
        md.append(f"\n`{name}` (in = {a8.shape[1]}; random expectation j/in: " + ", ".join(f"{j / a8.shape[1]:.3f}" for j in js) + ")\n")
        md.append("| i \\ j | " + " | ".join(str(j) for j in js) + " |")
        md.append("|---" * (len(js) + 1) + "|")
        for i in range(1, 9):
            phis = [np.linalg.norm(U[:, :i].T @ V[:, :j]) ** 2 / min(i, j) for j in js]
            md.append(f"| {i} | " + " | ".join(f"{p:.3f}" for p in phis) + " |")

# How the update relates to the frozen weight (section 7.3): dev/delta_w.cpp's tables for r = 4 and r = 64
dw_path = os.path.join(run_dir, "delta_w.md")
if os.path.exists(dw_path):
    text = open(dw_path).read().strip()
    md.append("\n## How ΔW relates to W (Hu et al. 2021, section 7.3)\n")
    md.append("For each adapted matrix of the last block, ΔW = scale · lora_B lora_A and U, V its top-r singular "
              "vectors: W projected on ΔW's subspace (||U^T W V^T||_F), on W's own top-r subspace and on a random one, "
              "and the amplification factor ||ΔW||_F / ||U^T W V^T||_F (dev/delta_w.cpp, the project's SVD). "
              "The paper, for GPT-3's W_q at layer 48: 0.32 / 21.67 / 0.02 at r = 4, amplification about 21.5; "
              "1.90 / 37.71 / 0.33 at r = 64, about 1.9.\n")
    md.append(text + "\n")
    dw_rows = [l.split("|")[1:-1] for l in text.splitlines() if re.search(r"\(\d+ x \d+\) \|", l)]
    vals = [(float(r[3]), float(r[4]), float(r[5]), float(r[6])) for r in dw_rows]
    if vals:
        vs_random = [a / c for a, b, c, d in vals]
        vs_own = [b / a for a, b, c, d in vals]
        amp = [d for a, b, c, d in vals]
        md.append(f"For our models W's weight in ΔW's directions is {min(vs_random):.1f}-{max(vs_random):.1f}x that in random "
                  f"directions but {min(vs_own):.1f}-{max(vs_own):.1f}x less than in W's own top directions, and ΔW is "
                  f"{min(amp):.1f}-{max(amp):.1f}x larger than W's component there: as in the paper, the update amplifies "
                  "directions that W already has but does not emphasize.\n")

md.append("\n![validation loss against step](compare_val_loss.png)\n")
open(os.path.join(out_dir, "compare.md.tmp"), "w").write("\n".join(md) + "\n")
os.replace(os.path.join(out_dir, "compare.md.tmp"), os.path.join(out_dir, "compare.md"))

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(8, 5), dpi=90)
for i, r in enumerate(rows):
    xs, ys = zip(*r["curve"])
    ax.plot(xs, ys, marker="o", markersize=3, label=r["name"], color=plt.cm.tab20(i % 20),
            linestyle="--" if r["name"].startswith("lora") else "-")
ax.set_xlabel("step")
ax.set_ylabel("validation loss")
ax.set_title(f"tinyshakespeare from {os.path.basename(base)}, {setup}")
ax.legend(fontsize=7, ncol=2)
ax.grid(alpha=0.3)
fig.tight_layout()
tmp = os.path.join(out_dir, "compare_val_loss.tmp.png")
fig.savefig(tmp)
os.replace(tmp, os.path.join(out_dir, "compare_val_loss.png"))
