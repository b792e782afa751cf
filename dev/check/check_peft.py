"""dev/check/check_peft.py: our PEFT export loaded by Hugging Face PEFT itself, and PEFT's adapters loaded by us.

Run by dev/check/check_peft.sh (make check-peft) in a virtual environment with torch, transformers and peft.
  1. Our llm.c checkpoint becomes a transformers GPT2LMHeadModel (Conv1D weights are (in, out): llm.c's
     (out, in) matrices transposed), checked against our own logits of the base.
  2. Each adapter directory we exported (plain LoRA, rsLoRA, DoRA, AdaLoRA) is loaded with
     PeftModel.from_pretrained. PEFT loads with strict=False, so a misspelled key would be dropped in silence:
     every lora_A, lora_B (DoRA magnitude, AdaLoRA lora_E) PEFT holds must equal the tensor in our file. Then
     PEFT's logits must equal ours.
  3. PEFT creates a LoRA (plain, rsLoRA) and an AdaLoRA on that model, trains each a few steps (AdaLoRA with
     update_and_allocate, so that its rank_pattern masks triplets) and saves it; we load the directory (-A)
     and our logits must equal PEFT's.
Usage: check_peft.py <checkpoint.bin> <logits tool> <ids,ids,...> <work dir> <our adapter dir>...
"""
import json
import os
import struct
import subprocess
import sys

import numpy as np
import peft
import torch
import transformers
from safetensors.numpy import load_file

# fp32 on both sides, summed in different orders: logits agree to ~1e-5 of their scale; a wrong orientation,
# a dropped tensor or a wrong scale moves them by O(0.1) or more
TOL_LOGITS = 1e-4


def read_llmc_checkpoint(path):
    with open(path, "rb") as f:
        header = struct.unpack("<256i", f.read(1024))
        assert header[0] == 20240326 and header[1] == 3, f"{path}: not an llm.c fp32 checkpoint (version 3)"
        maxT, V, L, NH, C, Vp = header[2], header[3], header[4], header[5], header[6], header[7]
        params = np.frombuffer(f.read(), dtype="<f4")
    sizes = [Vp * C, maxT * C, L * C, L * C, L * 3 * C * C, L * 3 * C, L * C * C, L * C, L * C, L * C,
             L * 4 * C * C, L * 4 * C, L * C * 4 * C, L * C, C, C]
    names = ["wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb", "ln2w", "ln2b", "fcw", "fcb",
             "fcprojw", "fcprojb", "lnfw", "lnfb"]
    assert sum(sizes) == params.size, f"{path}: {params.size} floats, expected {sum(sizes)}"
    t, off = {}, 0
    for n, s in zip(names, sizes):
        t[n] = params[off:off + s]
        off += s
    return dict(maxT=maxT, V=V, L=L, NH=NH, C=C, Vp=Vp), t


def hf_model_from_llmc(path):
    cfg, t = read_llmc_checkpoint(path)
    V, C, L, maxT = cfg["V"], cfg["C"], cfg["L"], cfg["maxT"]
    config = transformers.GPT2Config(vocab_size=V, n_positions=maxT, n_embd=C, n_layer=L, n_head=cfg["NH"],
                                     activation_function="gelu_new", layer_norm_epsilon=1e-5,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    model = transformers.GPT2LMHeadModel(config)
    sd = {"transformer.wte.weight": t["wte"].reshape(-1, C)[:V], "transformer.wpe.weight": t["wpe"].reshape(maxT, C),
          "transformer.ln_f.weight": t["lnfw"], "transformer.ln_f.bias": t["lnfb"]}
    for l in range(L):
        h = f"transformer.h.{l}."
        sd[h + "ln_1.weight"], sd[h + "ln_1.bias"] = t["ln1w"].reshape(L, C)[l], t["ln1b"].reshape(L, C)[l]
        sd[h + "ln_2.weight"], sd[h + "ln_2.bias"] = t["ln2w"].reshape(L, C)[l], t["ln2b"].reshape(L, C)[l]
        sd[h + "attn.c_attn.weight"] = t["qkvw"].reshape(L, 3 * C, C)[l].T  # Conv1D: (in, out)
        sd[h + "attn.c_attn.bias"] = t["qkvb"].reshape(L, 3 * C)[l]
        sd[h + "attn.c_proj.weight"] = t["attprojw"].reshape(L, C, C)[l].T
        sd[h + "attn.c_proj.bias"] = t["attprojb"].reshape(L, C)[l]
        sd[h + "mlp.c_fc.weight"] = t["fcw"].reshape(L, 4 * C, C)[l].T
        sd[h + "mlp.c_fc.bias"] = t["fcb"].reshape(L, 4 * C)[l]
        sd[h + "mlp.c_proj.weight"] = t["fcprojw"].reshape(L, C, 4 * C)[l].T
        sd[h + "mlp.c_proj.bias"] = t["fcprojb"].reshape(L, C)[l]
    missing, unexpected = model.load_state_dict({k: torch.tensor(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to wte
    assert not missing and not unexpected, f"state dict: missing {missing}, unexpected {unexpected}"
    model.tie_weights()
    return model.eval()


def ours_logits(tool, ckpt, adapter, ids, out, V):
    subprocess.run([tool, ckpt, adapter, ",".join(map(str, ids)), out], check=True)
    return np.fromfile(out, dtype="<f4").reshape(len(ids), V)


def their_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def compare(label, ours, theirs, base=None):
    """base: the base model's logits; then the adapter must move them by far more than the two sides disagree
    (a near-zero adapter, such as AdaLoRA's right after its lora_E = 0 init, would prove nothing)"""
    diff = float(np.abs(ours - theirs).max())
    scale = float(np.abs(theirs).max())
    ok = diff <= TOL_LOGITS * max(1.0, scale)
    moved = ""
    if base is not None:
        effect = float(np.abs(theirs - base).max())
        ok &= effect >= 100 * diff
        moved = f", the adapter moves them by {effect:.2e} (needs >= 100 x the difference)"
    print(f"{'PASS' if ok else 'FAIL'} {label}: max |logit difference| {diff:.2e} (logit scale {scale:.2f}, tolerance {TOL_LOGITS} x scale{moved})")
    return ok


def check_loaded_tensors(pmodel, adapter_dir):
    """every adapter tensor in our file is the one PEFT holds; returns how many were checked"""
    ours = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    held = {k: v for k, v in pmodel.state_dict().items() if "lora_" in k}
    checked = 0
    for key, value in ours.items():
        # our key: base_model.model.transformer.h.3.mlp.c_fc.lora_B.weight; PEFT's adds the adapter name
        peft_key = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        peft_key = peft_key.replace(".lora_magnitude_vector", ".lora_magnitude_vector.default.weight")
        if key.endswith((".lora_A", ".lora_B", ".lora_E")):  # AdaLoRA: bare parameters, no ".weight"
            peft_key = key + ".default"
        assert peft_key in held, f"{key}: PEFT did not load it (no {peft_key})"
        assert np.array_equal(held[peft_key].numpy(), value), f"{key}: PEFT holds other values"
        checked += 1
    nonzero_ours = sum(int(np.any(v != 0)) for v in ours.values())
    nonzero_held = sum(int(torch.any(v != 0)) for v in held.values())
    assert nonzero_held >= nonzero_ours, f"PEFT holds {nonzero_held} non-zero adapter tensors, our file {nonzero_ours}"
    return checked


def peft_train(ckpt, config, ids, steps, lr, out, after_step=None):
    """PEFT's own training: the adapter of config on the checkpoint, steps AdamW steps on ids (the batch is its
    own labels), after_step(model, step) after each optimizer step; saved to out. Returns (model in eval, out)."""
    pmodel = peft.get_peft_model(hf_model_from_llmc(ckpt), config)
    opt = torch.optim.AdamW([p for p in pmodel.parameters() if p.requires_grad], lr=lr)
    x = torch.tensor([ids])
    pmodel.train()
    for step in range(steps):
        loss = pmodel(x, labels=x).loss
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(pmodel, step)
        opt.zero_grad()
    pmodel.eval()
    pmodel.save_pretrained(out)
    return pmodel, out


def main():
    ckpt, tool, ids_arg, work = sys.argv[1:5]
    adapters = sys.argv[5:]
    ids = [int(x) for x in ids_arg.split(",")]
    print(f"check-peft: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    torch.manual_seed(0)
    base = hf_model_from_llmc(ckpt)
    V = base.config.vocab_size
    base_logits = their_logits(base, ids)
    ok = compare("base: transformers GPT2LMHeadModel vs ours", ours_logits(tool, ckpt, "-", ids, f"{work}/base.f32", V), base_logits)

    # 2. our exports, loaded by PEFT
    for d in adapters:
        cfg = json.load(open(os.path.join(d, "adapter_config.json")))
        pmodel = peft.PeftModel.from_pretrained(hf_model_from_llmc(ckpt), d).eval()
        n = check_loaded_tensors(pmodel, d)
        kind = f"peft_type={cfg['peft_type']}" + (f", ranks {sum(map(sum, cfg['rank_pattern'].values()))} of {len(cfg['rank_pattern']) * cfg['init_r']}" if cfg.get("rank_pattern") else "")
        label = f"our export {os.path.basename(d)} (r={cfg['r']}, use_rslora={cfg['use_rslora']}, use_dora={cfg['use_dora']}, {kind}) in PEFT, {n} tensors loaded"
        ok &= compare(label, ours_logits(tool, ckpt, d, ids, f"{work}/ours.f32", V), their_logits(pmodel, ids), base_logits)

    # 3. an adapter made and trained by PEFT, loaded by us
    targets = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    for use_rslora in (False, True):
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=True, lora_dropout=0.0,
                                 use_rslora=use_rslora, task_type="CAUSAL_LM")
        pmodel, out = peft_train(ckpt, config, ids, steps=5, lr=1e-2, out=f"{work}/peft_made_rslora{int(use_rslora)}")
        label = f"PEFT-made adapter (r=4, use_rslora={use_rslora}, 5 AdamW steps) loaded with -A"
        ok &= compare(label, ours_logits(tool, ckpt, out, ids, f"{work}/ours.f32", V), their_logits(pmodel, ids), base_logits)
    # an AdaLoRA made by PEFT: 8 steps, the budget falling from init_r 4 to target_r 2 from step 2 to 6
    config = peft.AdaLoraConfig(init_r=4, target_r=2, tinit=2, tfinal=2, deltaT=1, total_step=8, lora_alpha=8,
                                target_modules=targets, fan_in_fan_out=True, lora_dropout=0.0, task_type="CAUSAL_LM")
    # (lora_E starts at 0: a large lr moves it; update_and_allocate runs after each step, before zero_grad, as PEFT asks)
    pmodel, out = peft_train(ckpt, config, ids, steps=8, lr=5e-2, out=f"{work}/peft_made_adalora",
                             after_step=lambda m, step: m.base_model.update_and_allocate(step))
    kept = sum(map(sum, json.load(open(os.path.join(out, "adapter_config.json")))["rank_pattern"].values()))
    label = f"PEFT-made AdaLoRA (init_r=4, target_r=2, 8 steps with update_and_allocate, {kept} triplets kept) loaded with -A"
    ok &= compare(label, ours_logits(tool, ckpt, out, ids, f"{work}/ours.f32", V), their_logits(pmodel, ids), base_logits)
    print("check-peft: all passed" if ok else "check-peft: FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
