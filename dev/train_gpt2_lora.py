"""
PyTorch reference twin of train_gpt2_lora.cpp: GPT-2 (llm.c layout) with LoRA adapters, gradients by
autograd. It is the second, independent derivation the hand-written C++ backward is checked against;
it is not a trainer and nothing in build/run/test needs it (test_lora.cpp reads the committed fixture).

Run with the system interpreter (Debian python3-torch + python3-numpy):
  /usr/bin/python3 dev/train_gpt2_lora.py fixture       # tiny fixture -> dev/fixtures/ (committed, < 1 MB)
  /usr/bin/python3 dev/train_gpt2_lora.py fixture124m   # GPT-2 124M-shaped random fixture -> data/ (not committed)
  /usr/bin/python3 dev/train_gpt2_lora.py bench --B 4 --T 64 --steps 5 --threads 2

The model matches llm.c's train_gpt2.c exactly: pre-LN blocks, LayerNorm eps 1e-5, GELU tanh approximation,
causal self-attention scaled by 1/sqrt(hs), wte tied as the LM head producing Vp logits of which only the
first V enter the softmax, loss = mean cross-entropy over B*T positions. Weights are stored (out, in) as in
llm.c and applied with F.linear. LoRA on the four matmuls qkv (C->3C), attproj (C->C), fc (C->4C),
fcproj (4C->C):  out = W0 x + b + scale * lora_B (lora_A x),  scale = alpha / r,  lora_A (r, in),
lora_B (out, r); the base is frozen. AdamW is llm.c's, written out by hand (torch.optim.AdamW applies the
decay before the Adam step, llm.c adds it inside the update).

Precision choice: the fixture's reference numbers (logits, loss, gradients, K step losses) are computed
in float64 from the fp32 values that are written to the files, then stored as fp32. The C++ side runs in
fp32, so the test's tolerances measure the C++ fp32 error alone. The bench runs in float32.
"""

# -----------------------------------------------------------------------------------------------------
# Debug-state file (our own format; the C++ reader is in test_lora.cpp, "parity with the PyTorch twin").
# All little-endian. Header: 256 int32 (1024 bytes), unused slots 0:
#   [0] 20261123 (magic)   [1] 1 (version)
#   [2] B   [3] T   [4] V   [5] Vp   [6] L   [7] C   [8] NH   [9] maxT      (model dims, must match the model)
#   [10] r  [11] targets bitmask (qkv=1, attproj=2, fc=4, fcproj=8)  [12] K (number of AdamW steps)
#   [13] n_lora = number of floats in the flat adapter buffer
#   [14] lora_B init: 0 = true init (lora_B = 0), 1 = lora_B ~ Normal(0, lora_B_std) (lora_B_std below)
#   [15] seed the LoRA parameters were drawn with
# Then, in this order:
#   int32 inputs[B*T], int32 targets[B*T]                 (the batch; inputs row-major (B,T))
#   fp32 hparams[8] = alpha, lr, beta1, beta2, eps, weight_decay, lora_B_std, 0 (reserved)
#   fp32 lora_params[n_lora]     initial adapters, flat target-major layout: for each enabled target in the
#                                order qkv, attproj, fc, fcproj: lora_A (L, r, in) then lora_B (L, out, r)
#   fp32 logits[B*T*V]           UNPADDED: only the first V of the Vp logits per position
#   fp32 loss                    mean cross-entropy over B*T
#   fp32 grads[n_lora]           d loss / d (lora_params), same flat layout
#   fp32 step_losses[K]          loss before each of K AdamW steps on this same batch, t = step + 1
#                                (step_losses[0] == loss)
# File size = 1024 + 8*B*T + 4*(8 + 2*n_lora + B*T*V + 1 + K) bytes; the reader checks it exactly.
# -----------------------------------------------------------------------------------------------------

import argparse
import math
import os
import resource
import sys
import time

import numpy as np

# Debian's torch runs its own ops on OpenMP threads but its GEMMs on OpenBLAS's pthreads. With the default
# (active) OpenMP wait policy the idle OpenMP threads spin and starve OpenBLAS on a 2-core machine: a
# LoRA step measured ~4x slower. Passive waiting must be set before libgomp loads, i.e. before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

CHECKPOINT_MAGIC, CHECKPOINT_VERSION = 20240326, 3  # llm.c fp32 checkpoint, padded vocab
TOKENS_MAGIC, TOKENS_VERSION = 20240520, 1  # llm.c token file
DEBUG_MAGIC, DEBUG_VERSION = 20261123, 1  # our debug state (format above)

TARGETS = ["qkv", "attproj", "fc", "fcproj"]  # bit i of the targets mask enables TARGETS[i]
LN_EPS = 1e-5


def target_dims(name, C):
    """(in, out) of the matmul a LoRA target adapts."""
    return {"qkv": (C, 3 * C), "attproj": (C, C), "fc": (C, 4 * C), "fcproj": (4 * C, C)}[name]


def targets_from_mask(mask):
    return [t for i, t in enumerate(TARGETS) if mask & (1 << i)]


def llmc_param_shapes(maxT, V, Vp, L, NH, C):
    """The 16 checkpoint tensors in llm.c order, per-layer tensors stacked over L; weights (out, in)."""
    return [
        ("wte", (Vp, C)), ("wpe", (maxT, C)),
        ("ln1w", (L, C)), ("ln1b", (L, C)),
        ("qkvw", (L, 3 * C, C)), ("qkvb", (L, 3 * C)),
        ("attprojw", (L, C, C)), ("attprojb", (L, C)),
        ("ln2w", (L, C)), ("ln2b", (L, C)),
        ("fcw", (L, 4 * C, C)), ("fcb", (L, 4 * C)),
        ("fcprojw", (L, C, 4 * C)), ("fcprojb", (L, C)),
        ("lnfw", (C,)), ("lnfb", (C,)),
    ]


class GPTConfig:
    def __init__(self, maxT, V, Vp, L, NH, C):
        assert C % NH == 0 and Vp >= V
        self.maxT, self.V, self.Vp, self.L, self.NH, self.C = maxT, V, Vp, L, NH, C


# -----------------------------------------------------------------------------------------------------
# model

class LoRA(nn.Module):
    """One adapter on a matmul with in -> out: delta = scale * lora_B (lora_A x)."""

    def __init__(self, d_in, d_out, r, scale):
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(r, d_in))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(d_out, r))  # (out, r)
        self.scale = scale

    def forward(self, x):
        # x (B,T,in) -> h = x lora_A^T (B,T,r) -> scale * h lora_B^T (B,T,out)
        return self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


class Block(nn.Module):
    """One pre-LN transformer block; parameters per layer, shapes as one row of llm.c's stacked tensors."""

    def __init__(self, cfg, r, alpha, targets):
        super().__init__()
        C = cfg.C
        self.NH = cfg.NH
        self.sdpa = False  # the bench's --attention sdpa sets it
        self.ln1w, self.ln1b = nn.Parameter(torch.ones(C)), nn.Parameter(torch.zeros(C))  # (C,)
        self.qkvw, self.qkvb = nn.Parameter(torch.zeros(3 * C, C)), nn.Parameter(torch.zeros(3 * C))  # (3C,C) (3C,)
        self.attprojw, self.attprojb = nn.Parameter(torch.zeros(C, C)), nn.Parameter(torch.zeros(C))  # (C,C) (C,)
        self.ln2w, self.ln2b = nn.Parameter(torch.ones(C)), nn.Parameter(torch.zeros(C))  # (C,)
        self.fcw, self.fcb = nn.Parameter(torch.zeros(4 * C, C)), nn.Parameter(torch.zeros(4 * C))  # (4C,C) (4C,)
        self.fcprojw, self.fcprojb = nn.Parameter(torch.zeros(C, 4 * C)), nn.Parameter(torch.zeros(C))  # (C,4C) (C,)
        self.lora = nn.ModuleDict({t: LoRA(*target_dims(t, C), r, alpha / r) for t in targets})

    def adapted(self, name, x, w, b):
        # out = x W0^T + b (+ scale * lora_B (lora_A x) if this matmul carries an adapter)
        out = F.linear(x, w, b)
        if name in self.lora:
            out = out + self.lora[name](x)
        return out

    def forward(self, x):
        B, T, C = x.shape  # x (B,T,C) residual stream
        NH, hs = self.NH, C // self.NH
        h = F.layer_norm(x, (C,), self.ln1w, self.ln1b, LN_EPS)  # (B,T,C)
        qkv = self.adapted("qkv", h, self.qkvw, self.qkvb)  # (B,T,3C), rows q|k|v
        q, k, v = qkv.split(C, dim=2)  # each (B,T,C)
        q = q.view(B, T, NH, hs).transpose(1, 2)  # (B,NH,T,hs)
        k = k.view(B, T, NH, hs).transpose(1, 2)  # (B,NH,T,hs)
        v = v.view(B, T, NH, hs).transpose(1, 2)  # (B,NH,T,hs)
        if self.sdpa:  # (bench only) PyTorch's fused attention, which stores no (T,T) weights
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B,NH,T,T)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)  # (B,NH,T,T), row t sees 0..t
            y = (att @ v).transpose(1, 2).reshape(B, T, C)  # (B,T,C), heads concatenated
        x = x + self.adapted("attproj", y, self.attprojw, self.attprojb)  # (B,T,C)
        h = F.layer_norm(x, (C,), self.ln2w, self.ln2b, LN_EPS)  # (B,T,C)
        h = self.adapted("fc", h, self.fcw, self.fcb)  # (B,T,4C)
        h = F.gelu(h, approximate="tanh")  # (B,T,4C), GELU tanh approximation as in llm.c
        x = x + self.adapted("fcproj", h, self.fcprojw, self.fcprojb)  # (B,T,C)
        return x


class GPT(nn.Module):
    def __init__(self, cfg, r=0, alpha=1.0, targets=()):
        super().__init__()
        self.cfg = cfg
        self.targets = [t for t in TARGETS if t in targets]  # canonical order
        self.wte = nn.Parameter(torch.zeros(cfg.Vp, cfg.C))  # (Vp,C), also the LM head; rows V..Vp-1 zero
        self.wpe = nn.Parameter(torch.zeros(cfg.maxT, cfg.C))  # (maxT,C)
        self.blocks = nn.ModuleList([Block(cfg, r, alpha, self.targets) for _ in range(cfg.L)])
        self.lnfw, self.lnfb = nn.Parameter(torch.ones(cfg.C)), nn.Parameter(torch.zeros(cfg.C))  # (C,)

    def forward(self, idx, targets=None):
        B, T = idx.shape  # idx (B,T) token ids
        pos = torch.arange(T, device=idx.device)
        x = self.wte[idx] + self.wpe[pos]  # (B,T,C)
        for block in self.blocks:
            x = block(x)  # (B,T,C)
        x = F.layer_norm(x, (self.cfg.C,), self.lnfw, self.lnfb, LN_EPS)  # (B,T,C)
        logits = F.linear(x, self.wte)  # (B,T,Vp)
        loss = None
        if targets is not None:
            # softmax over the first V logits only (the padded rows of wte are not tokens); mean over B*T
            V = self.cfg.V
            loss = F.cross_entropy(logits[:, :, :V].reshape(-1, V), targets.reshape(-1))
        return logits, loss

    # --- conversion to/from llm.c's stacked checkpoint tensors and our flat adapter layout ---

    def base_tensors(self):
        """Parameters in llm.c checkpoint order, per-layer ones as lists over L."""
        per = lambda n: [getattr(b, n) for b in self.blocks]
        names = [n for n, _ in llmc_param_shapes(1, 1, 1, 1, 1, 1)]
        out = []
        for n in names:
            out.append(getattr(self, n) if n in ("wte", "wpe", "lnfw", "lnfb") else per(n))
        return out

    @torch.no_grad()
    def load_llmc(self, arrays):
        """arrays: the 16 numpy arrays in llm.c order (stacked shapes)."""
        for dst, a in zip(self.base_tensors(), arrays):
            t = torch.from_numpy(np.ascontiguousarray(a))
            if isinstance(dst, list):
                for l, p in enumerate(dst):
                    p.copy_(t[l])
            else:
                dst.copy_(t)

    def lora_params(self):
        """Adapter tensors in the flat layout's order: per target (qkv, attproj, fc, fcproj if enabled):
        lora_A of layers 0..L-1 (together (L, r, in)), then lora_B of layers 0..L-1 (together (L, out, r))."""
        out = []
        for t in self.targets:
            out += [b.lora[t].lora_A for b in self.blocks]
            out += [b.lora[t].lora_B for b in self.blocks]
        return out

    def lora_flat(self, grad=False):
        return torch.cat([(p.grad if grad else p).detach().reshape(-1) for p in self.lora_params()])

    @torch.no_grad()
    def set_lora_flat(self, flat):
        off = 0
        for p in self.lora_params():
            n = p.numel()
            p.copy_(torch.as_tensor(flat[off:off + n]).view_as(p))
            off += n
        assert off == len(flat)

    def set_trainable(self, mode):
        """mode 'lora': only adapters need grads (base frozen, wte included); 'full': all base params."""
        lora = set(id(p) for p in self.lora_params())
        for p in self.parameters():
            p.requires_grad_((id(p) in lora) if mode == "lora" else (id(p) not in lora))


def lora_numel(cfg, r, targets):
    return sum(cfg.L * r * sum(target_dims(t, cfg.C)) for t in targets)


class AdamW:
    """llm.c's AdamW: m, v kept per parameter; t = step + 1;
    m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  mhat = m / (1-b1^t);  vhat = v / (1-b2^t);
    p -= lr * (mhat / (sqrt(vhat) + eps) + wd * p)   (decay uses p before the update)."""

    def __init__(self, params, lr, beta1, beta2, eps, weight_decay):
        self.params = [p for p in params if p.requires_grad]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.lr, self.beta1, self.beta2, self.eps, self.wd = lr, beta1, beta2, eps, weight_decay

    @torch.no_grad()
    def step(self, t):
        c1, c2 = 1.0 - self.beta1 ** t, 1.0 - self.beta2 ** t
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad
            m.mul_(self.beta1).add_(g, alpha=1.0 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g, value=1.0 - self.beta2)
            update = (m / c1) / ((v / c2).sqrt_().add_(self.eps))
            update.add_(p, alpha=self.wd)
            p.sub_(update, alpha=self.lr)

    def zero_grad(self):
        for p in self.params:
            p.grad = None


# -----------------------------------------------------------------------------------------------------
# random weights and file writers (every file: temp name, then rename)

def random_llmc_params(cfg, rng):
    """The 16 llm.c tensors as float32 arrays: matmul weights and embeddings ~ N(0, 0.02), layernorm
    weights 1 + N(0, 0.1), all biases ~ N(0, 0.02) (nonzero so their paths are exercised); wte rows
    V..Vp-1 are zero as in llm.c's padded checkpoints."""
    out = []
    for name, shape in llmc_param_shapes(cfg.maxT, cfg.V, cfg.Vp, cfg.L, cfg.NH, cfg.C):
        if name in ("ln1w", "ln2w", "lnfw"):
            a = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        else:
            a = 0.02 * rng.standard_normal(shape, dtype=np.float32)
        if name == "wte":
            a[cfg.V:] = 0.0
        out.append(a.astype(np.float32))
    return out


def random_lora_flat(cfg, r, targets, lora_B_std, rng):
    """Flat adapter buffer: lora_A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform, a=sqrt(5));
    lora_B = 0 (true init) or ~ N(0, lora_B_std) so that lora_A gets a nonzero gradient."""
    parts = []
    for t in targets:
        d_in, d_out = target_dims(t, cfg.C)
        bound = 1.0 / math.sqrt(d_in)
        parts.append(rng.uniform(-bound, bound, size=cfg.L * r * d_in))
        parts.append(lora_B_std * rng.standard_normal(cfg.L * d_out * r) if lora_B_std > 0
                     else np.zeros(cfg.L * d_out * r))
    return np.concatenate(parts).astype(np.float32)


def write_atomic(path, chunks):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        for c in chunks:
            f.write(np.ascontiguousarray(c).tobytes())
    os.replace(tmp, path)


def write_checkpoint(path, cfg, arrays):
    header = np.zeros(256, dtype=np.int32)
    header[:8] = [CHECKPOINT_MAGIC, CHECKPOINT_VERSION, cfg.maxT, cfg.V, cfg.L, cfg.NH, cfg.C, cfg.Vp]
    write_atomic(path, [header] + [a.astype(np.float32) for a in arrays])


def write_tokens(path, tokens):
    header = np.zeros(256, dtype=np.int32)
    header[:3] = [TOKENS_MAGIC, TOKENS_VERSION, len(tokens)]
    write_atomic(path, [header, np.asarray(tokens, dtype=np.uint16)])


# -----------------------------------------------------------------------------------------------------
# reference debug state

def f32(x):
    """A hyperparameter as the C++ side sees it (a C float), widened back to Python float."""
    return float(np.float32(x))


def reference_state(cfg, base, lora_flat, inputs, targets, r, alpha, tnames, hp, K, dtype):
    """Forward/backward (autograd) and K AdamW steps on one batch, computed in `dtype` from fp32 inputs.
    Returns logits (B,T,V) at the initial point, loss, flat adapter grads, and the K pre-update losses."""
    model = GPT(cfg, r, f32(alpha), tnames).to(dtype)
    model.load_llmc(base)
    model.set_lora_flat(lora_flat.astype(np.float64) if dtype == torch.float64 else lora_flat)
    model.set_trainable("lora")
    opt = AdamW(model.lora_params(), f32(hp["lr"]), f32(hp["beta1"]), f32(hp["beta2"]), f32(hp["eps"]),
                f32(hp["weight_decay"]))
    x, y = torch.from_numpy(inputs).long(), torch.from_numpy(targets).long()
    losses = []
    for step in range(K):
        opt.zero_grad()
        logits, loss = model(x, y)
        loss.backward()
        losses.append(loss.item())
        if step == 0:
            first = (logits[:, :, :cfg.V].detach().float().numpy().copy(), loss.item(),
                     model.lora_flat(grad=True).float().numpy().copy())
        opt.step(step + 1)
    return first[0], first[1], first[2], np.array(losses, dtype=np.float32)


def write_debug_state(path, cfg, B, T, inputs, targets, r, alpha, mask, K, lora_init, seed, hp,
                      lora_B_std, lora_flat, logits, loss, grads, step_losses):
    header = np.zeros(256, dtype=np.int32)
    header[:16] = [DEBUG_MAGIC, DEBUG_VERSION, B, T, cfg.V, cfg.Vp, cfg.L, cfg.C, cfg.NH, cfg.maxT,
                   r, mask, K, len(lora_flat), lora_init, seed]
    hparams = np.array([alpha, hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"],
                        lora_B_std, 0.0], dtype=np.float32)
    assert logits.shape == (B, T, cfg.V) and grads.shape == lora_flat.shape and len(step_losses) == K
    write_atomic(path, [header, inputs.astype(np.int32), targets.astype(np.int32), hparams,
                        lora_flat.astype(np.float32), logits.astype(np.float32),
                        np.array([loss], dtype=np.float32), grads.astype(np.float32),
                        step_losses.astype(np.float32)])


def make_states(cfg, base, tokens, B, T, states, hp, K, out_prefix, dtype):
    """One debug-state file per entry of `states`, all on the first batch of `tokens` (llm.c's loader:
    B*T+1 tokens, targets shifted by one)."""
    buf = tokens[:B * T + 1].astype(np.int32)
    inputs, targets = buf[:-1].reshape(B, T), buf[1:].reshape(B, T)
    for st in states:
        tnames = targets_from_mask(st["mask"])
        rng = np.random.default_rng(st["seed"])
        lora_flat = random_lora_flat(cfg, st["r"], tnames, st["lora_B_std"], rng)
        assert len(lora_flat) == lora_numel(cfg, st["r"], tnames)
        t0 = time.time()
        logits, loss, grads, step_losses = reference_state(cfg, base, lora_flat, inputs, targets, st["r"],
                                                           st["alpha"], tnames, hp, K, dtype)
        path = out_prefix + st["name"] + ".bin"
        write_debug_state(path, cfg, B, T, inputs, targets, st["r"], st["alpha"], st["mask"], K,
                          1 if st["lora_B_std"] > 0 else 0, st["seed"], hp, st["lora_B_std"], lora_flat,
                          logits, loss, grads, step_losses)
        print(f"wrote {path} ({os.path.getsize(path)} bytes): r {st['r']} alpha {st['alpha']} "
              f"targets {','.join(tnames)} n_lora {len(lora_flat)} loss {loss:.6f} "
              f"|grad|max {np.abs(grads).max():.3e} step losses {' '.join(f'{l:.5f}' for l in step_losses)} "
              f"({time.time() - t0:.1f} s)")


# AdamW settings for the fixtures: lr large enough that K steps move the loss visibly, a nonzero weight
# decay so its term is exercised (llm.c's default is 0).
FIXTURE_HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def cmd_fixture(args):
    # tiny config: V=500 padded to Vp=512 exercises the padded-vocab logic; C=64, NH=4 -> hs=16.
    torch.set_num_threads(1)  # deterministic reduction order
    cfg = GPTConfig(maxT=32, V=500, Vp=512, L=2, NH=4, C=64)
    B, T, K = 2, 16, 10
    rng = np.random.default_rng(1337)
    base = random_llmc_params(cfg, rng)
    tokens = rng.integers(0, cfg.V, size=1024).astype(np.uint16)  # uniform random token ids < V
    out = args.out
    write_checkpoint(os.path.join(out, "tiny_model.bin"), cfg, base)
    write_tokens(os.path.join(out, "tiny_tokens.bin"), tokens)
    # alpha/r != 1 so a dropped or doubled scale shows up; lora_B ~ N(0, 0.02) makes the adapter's share
    # of each adapted output about a fifth of the base matmul's at this size.
    states = [
        dict(name="randB", r=4, alpha=6.0, mask=15, lora_B_std=0.02, seed=42),  # all four targets
        dict(name="init", r=4, alpha=6.0, mask=15, lora_B_std=0.0, seed=43),  # true init, lora_B = 0
        dict(name="subset", r=2, alpha=3.0, mask=2 | 4, lora_B_std=0.02, seed=44),  # attproj+fc only
    ]
    make_states(cfg, base, tokens, B, T, states, FIXTURE_HP, K, os.path.join(out, "tiny_debug_state_"),
                torch.float64)
    for f in ("tiny_model.bin", "tiny_tokens.bin"):
        print(f"wrote {os.path.join(out, f)} ({os.path.getsize(os.path.join(out, f))} bytes)")


def cmd_fixture124m(args):
    torch.set_num_threads(args.threads)
    cfg = GPTConfig(maxT=1024, V=50257, Vp=50304, L=12, NH=12, C=768)
    B, T, K = 4, 64, args.K
    rng = np.random.default_rng(124)
    t0 = time.time()
    base = random_llmc_params(cfg, rng)
    tokens = rng.integers(0, cfg.V, size=B * T + 1).astype(np.uint16)
    write_checkpoint(os.path.join(args.out, "gpt2_124M_random.bin"), cfg, base)
    print(f"wrote {os.path.join(args.out, 'gpt2_124M_random.bin')} ({time.time() - t0:.1f} s)")
    states = [dict(name="debug_state", r=8, alpha=16.0, mask=15, lora_B_std=0.02, seed=125)]
    # lr 1e-2 overshoots at this size (the loss rose again at step 3); 1e-3 descends smoothly
    hp = dict(FIXTURE_HP, lr=1e-3)
    make_states(cfg, base, tokens, B, T, states, hp, K, os.path.join(args.out, "gpt2_124M_random_"), torch.float64)


# -----------------------------------------------------------------------------------------------------
# benchmark: one training step = forward + backward + AdamW, float32, 124M-shaped random weights

def cmd_bench(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = GPTConfig(maxT=1024, V=50257, Vp=50304, L=12, NH=12, C=768)
    B, T = args.B, args.T
    x = torch.randint(0, cfg.V, (B, T))
    y = torch.randint(0, cfg.V, (B, T))
    print(f"torch config B {B} T {T} steps {args.steps} threads {torch.get_num_threads()} r {args.r} "
          f"torch {torch.__version__} OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY')} autocast {args.autocast} "
          f"attention {args.attention}")
    # bf16 autocast: the matmuls (frozen base, LoRA, LM head) run on bf16 copies of their operands, with
    # fp32 accumulation; layernorm, softmax, the loss and AdamW stay fp32 (PyTorch's CPU mixed precision)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast == "bf16")
    for mode in (["lora", "full"] if args.mode == "both" else [args.mode]):
        targets = TARGETS if mode == "lora" else ()
        model = GPT(cfg, args.r, 2.0 * args.r, targets)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.02)
            model.wte[cfg.V:] = 0.0
        model.set_trainable(mode)  # lora: base (wte included) requires_grad False; full: everything
        for m in model.modules():
            if isinstance(m, Block):
                m.sdpa = args.attention == "sdpa"
        opt = AdamW(model.parameters(), 1e-4, 0.9, 0.999, 1e-8, 0.0)
        times = []
        for step in range(args.steps + 1):  # step 0 is warm-up, not timed
            t0 = time.perf_counter()
            opt.zero_grad()
            with autocast:
                _, loss = model(x, y)
            loss.backward()
            opt.step(step + 1)
            times.append(time.perf_counter() - t0)
        tag = mode + ("-bf16" if args.autocast == "bf16" else "")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # (KiB on Linux; the process's peak so far)
        print(f"torch {tag} ms/step {1000.0 * sum(times[1:]) / len(times[1:]):.1f} peak_rss_MiB {peak:.0f}")
        del model, opt


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("fixture", help="tiny model, tokens and debug states (committed)")
    p.add_argument("--out", default="dev/fixtures")
    p = sub.add_parser("fixture124m", help="GPT-2 124M-shaped random model and debug state (not committed)")
    p.add_argument("--out", default="data")
    p.add_argument("--K", type=int, default=5, help="AdamW steps in the debug state (a few s each)")
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("bench", help="ms/step of LoRA and full fine-tuning, float32")
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--mode", choices=["lora", "full", "both"], default="both")
    p.add_argument("--autocast", choices=["none", "bf16"], default="none", help="bf16: torch.autocast('cpu', bfloat16)")
    p.add_argument("--attention", choices=["explicit", "sdpa"], default="explicit",
                   help="sdpa: F.scaled_dot_product_attention (fused; the twin's tests use the explicit softmax)")
    args = ap.parse_args()
    if args.cmd in ("bench",) and (args.B < 1 or args.T < 1 or args.T > 1024 or args.steps < 1):
        sys.exit(f"bench: bad --B/--T/--steps ({args.B}, {args.T}, {args.steps})\n"
                 f"HINT: use B >= 1, 1 <= T <= 1024, steps >= 1")
    {"fixture": cmd_fixture, "fixture124m": cmd_fixture124m, "bench": cmd_bench}[args.cmd](args)


if __name__ == "__main__":
    main()
