"""
doc/lora.py: the LoRA layer's backward, derived by hand and checked against autograd.
Run: /usr/bin/python3 doc/lora.py   (Debian's python3-torch; dev-only, never needed to build or test)
It prints the same numbers as doc/lora.cpp, which runs the C++ kernels of lora.h on the same inputs.
"""
import torch

torch.set_printoptions(precision=6)
BT, C, OC, r = 3, 4, 5, 2
alpha = 4.0
scale = alpha / r

# deterministic inputs that the C++ twin can rebuild without an RNG: x[i] = sin(1 + i) etc.
def filled(shape, offset):
    n = 1
    for s in shape:
        n *= s
    return torch.sin(torch.arange(n, dtype=torch.float64) + offset).reshape(shape)

x = filled((BT, C), 1.0).requires_grad_()        # (BT, C)    input of the adapted matmul
W0 = filled((OC, C), 2.0)                         # (OC, C)    frozen base weight
lora_A = filled((r, C), 3.0).requires_grad_()     # (r, C)
lora_B = filled((OC, r), 4.0).requires_grad_()    # (OC, r)    nonzero here, so dlora_A is nonzero too
w = filled((BT, OC), 5.0)                         # (BT, OC)   loss = sum(out * w), so dout = w

# forward, by hand: the branch goes through the r-dimensional bottleneck h
h = x @ lora_A.T                                  # (BT, r)
out = x @ W0.T + scale * h @ lora_B.T             # (BT, OC)
loss = (out * w).sum()
loss.backward()

# backward, by hand (see doc/lora.md for the derivation)
dout = w                                          # (BT, OC)
dlora_B = scale * dout.T @ h                      # (OC, r)
dh = scale * dout @ lora_B                        # (BT, r)
dlora_A = dh.T @ x                                # (r, C)
dx = dout @ W0 + dh @ lora_A                      # (BT, C)

for name, mine, auto in [("dlora_A", dlora_A, lora_A.grad), ("dlora_B", dlora_B, lora_B.grad), ("dx", dx, x.grad)]:
    print(f"{name}: maxdiff vs autograd {(mine - auto).abs().max().item():.3e}; first values {mine.flatten()[:4].tolist()}")
