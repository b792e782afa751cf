#!/usr/bin/python3
"""
Independent check of a train_gpt2_lora PEFT export, with Python's json and numpy only (no safetensors,
torch or peft): parses <dir>/adapter_model.safetensors by its published format, checks every key, shape,
dtype and offset, compares every value with <dir>/adapter.bin (our own format, parsed here from its
documented header), and validates <dir>/adapter_config.json. Optionally (--base) recomputes the base
checksum stored in adapter.bin from an llm.c checkpoint.

usage: /usr/bin/python3 dev/check_safetensors.py <dir> [--base model.bin]
Exit status 0 and a last line "OK ..." when everything matches; 1 and "FAIL: ..." otherwise.
"""
import json
import os
import re
import struct
import sys

import numpy as np

ADAPTER_MAGIC = 20240801
# our target order (the bitmask bits) and PEFT's module names for them in GPT-2
PEFT_NAMES = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
KEY = re.compile(r"^base_model\.model\.transformer\.h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.lora_(A|B)\.weight$")


class Fail(Exception):
    pass


def need(cond, msg):
    if not cond:
        raise Fail(msg)


def in_out(target, C):
    """input and output channels of a target in a block of width C"""
    return [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)][target]


def no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    need(len(keys) == len(set(keys)), f"duplicate keys in a JSON object: {keys}")
    return dict(pairs)


def read_safetensors(path):
    raw = open(path, "rb").read()
    need(len(raw) >= 8, f"{path}: shorter than 8 bytes")
    (n,) = struct.unpack("<Q", raw[:8])
    need(n <= 100_000_000, f"{path}: header length {n} over 100,000,000")
    need(8 + n <= len(raw), f"{path}: header length {n} runs past the end ({len(raw)} bytes)")
    need(n % 8 == 0, f"{path}: header length {n} is not a multiple of 8 (the writer pads with spaces)")
    header = json.loads(raw[8:8 + n].decode("utf-8"), object_pairs_hook=no_duplicates)
    data = raw[8 + n:]
    meta = header.pop("__metadata__", None)
    need(meta == {"format": "pt"}, f"{path}: __metadata__ is {meta!r}, expected {{'format': 'pt'}}")
    spans = []
    tensors = {}
    for name, info in header.items():
        need(set(info) == {"dtype", "shape", "data_offsets"}, f"{name}: fields {sorted(info)}")
        need(info["dtype"] == "F32", f"{name}: dtype {info['dtype']}")
        shape = info["shape"]
        begin, end = info["data_offsets"]
        need(all(isinstance(d, int) and d >= 0 for d in shape), f"{name}: shape {shape}")
        need(0 <= begin <= end <= len(data), f"{name}: offsets [{begin}, {end}] outside {len(data)} data bytes")
        need(end - begin == 4 * int(np.prod(shape)), f"{name}: {end - begin} bytes for shape {shape}")
        spans.append((begin, end, name))
        tensors[name] = np.frombuffer(data[begin:end], dtype="<f4").reshape(shape)
    at = 0
    for begin, end, name in sorted(spans):
        need(begin == at, f"{name}: starts at {begin}, previous tensor ends at {at} (gap or overlap)")
        at = end
    need(at == len(data), f"{path}: {len(data) - at} bytes after the last tensor")
    return tensors, n


def read_adapter_bin(path):
    raw = open(path, "rb").read()
    need(len(raw) >= 1024, f"{path}: shorter than its 1024-byte header")
    h = np.frombuffer(raw[:1024], dtype="<i4")
    need(h[0] == ADAPTER_MAGIC, f"{path}: magic {h[0]}, expected {ADAPTER_MAGIC}")
    need(h[1] == 1, f"{path}: version {h[1]}")
    u64 = lambda i: int(np.frombuffer(raw[4 * i:4 * i + 8], dtype="<u8")[0])
    cfg = dict(r=int(h[2]), alpha=float(np.frombuffer(raw[12:16], dtype="<f4")[0]), targets=int(h[4]),
               L=int(h[5]), C=int(h[6]), V=int(h[7]), Vp=int(h[8]), maxT=int(h[9]), NH=int(h[10]),
               checksum=u64(11), n=u64(13), has_state=int(h[15]), rslora=bool(h[28] & 1))
    n = cfg["n"]
    params = np.frombuffer(raw[1024:1024 + 4 * n], dtype="<f4")
    need(params.size == n, f"{path}: truncated parameters")
    expected = 1024 + 4 * n
    if cfg["has_state"]:
        expected += 8 * n + 8 * u64(26)
    need(len(raw) == expected, f"{path}: {len(raw)} bytes, header implies {expected}")
    return cfg, params


def expected_tensors(cfg, params):
    """our flat layout, rebuilt here: for each target in bit order, lora_A (L, r, in) then lora_B (L, out, r)"""
    r, L, C = cfg["r"], cfg["L"], cfg["C"]
    out, off = {}, 0
    for t in range(4):
        if not cfg["targets"] & (1 << t):
            continue
        fin, fout = in_out(t, C)
        for part, (rows, cols) in (("A", (r, fin)), ("B", (fout, r))):
            for l in range(L):
                out[f"base_model.model.transformer.h.{l}.{PEFT_NAMES[t]}.lora_{part}.weight"] = params[off:off + rows * cols].reshape(rows, cols)
                off += rows * cols
    need(off == params.size, f"layout covers {off} of {params.size} parameters")
    return out


def fnv1a64_words(path):
    """FNV-1a 64 over the fp32 base parameters as 32-bit words, as train_gpt2_lora's base_checksum"""
    words = np.fromfile(path, dtype="<u4", offset=1024)
    h, prime, mask = 0xCBF29CE484222325, 0x100000001B3, (1 << 64) - 1
    for w in words.tolist():
        h = ((h ^ w) * prime) & mask
    return h, words.size


def main():
    args = sys.argv[1:]
    base = None
    if "--base" in args:
        i = args.index("--base")
        base = args[i + 1]
        del args[i:i + 2]
    if len(args) != 1:
        print(__doc__)
        return 2
    d = args[0]
    tensors, hlen = read_safetensors(os.path.join(d, "adapter_model.safetensors"))
    cfg, params = read_adapter_bin(os.path.join(d, "adapter.bin"))
    expect = expected_tensors(cfg, params)
    for name in tensors:
        need(KEY.match(name), f"key {name!r} is not a PEFT GPT-2 LoRA key")
    need(set(tensors) == set(expect), f"keys differ: only in safetensors {sorted(set(tensors) - set(expect))[:3]}, "
                                      f"only in adapter.bin {sorted(set(expect) - set(tensors))[:3]}")
    for name, want in expect.items():
        got = tensors[name]
        need(got.shape == want.shape, f"{name}: shape {got.shape}, expected {want.shape}")
        need(np.array_equal(got.view("<u4"), want.view("<u4")), f"{name}: values differ (max |diff| {np.abs(got - want).max()})")

    config = json.load(open(os.path.join(d, "adapter_config.json")), object_pairs_hook=no_duplicates)
    targets = [PEFT_NAMES[t] for t in range(4) if cfg["targets"] & (1 << t)]
    want = dict(peft_type="LORA", task_type="CAUSAL_LM", r=cfg["r"], target_modules=targets, fan_in_fan_out=True,
                bias="none", lora_dropout=0.0, use_rslora=cfg["rslora"], use_dora=False, init_lora_weights=True)
    for k, v in want.items():
        need(config.get(k) == v, f"adapter_config.json: {k} = {config.get(k)!r}, expected {v!r}")
    need(float(config.get("lora_alpha")) == cfg["alpha"], f"lora_alpha {config.get('lora_alpha')} != {cfg['alpha']}")
    name = config.get("base_model_name_or_path")
    need(isinstance(name, str) and name and not name.startswith("/"), f"base_model_name_or_path {name!r}")

    print(f"safetensors: {len(tensors)} F32 tensors, header {hlen} bytes, offsets tile the data buffer exactly")
    print(f"adapter.bin: r={cfg['r']} alpha={cfg['alpha']:g} targets={','.join(targets)} L={cfg['L']} C={cfg['C']} "
          f"n={cfg['n']} state={'yes' if cfg['has_state'] else 'no'}; every tensor bit-identical to the safetensors")
    for key in sorted(tensors)[:2]:
        print(f"  {key} {list(tensors[key].shape)}")
    print(f"adapter_config.json: peft_type LORA, r {config['r']}, lora_alpha {config['lora_alpha']}, "
          f"target_modules {config['target_modules']}, base_model_name_or_path {name!r}")
    if base is not None:
        hb = np.frombuffer(open(base, "rb").read(1024), dtype="<i4")
        dims = dict(maxT=hb[2], V=hb[3], L=hb[4], NH=hb[5], C=hb[6], Vp=hb[7])
        for k, v in dims.items():
            need(cfg[k] == int(v), f"--base {base}: {k}={v}, adapter.bin says {cfg[k]}")
        s, count = fnv1a64_words(base)
        need(s == cfg["checksum"], f"--base {base}: checksum {s:016x}, adapter.bin says {cfg['checksum']:016x}")
        print(f"base: {base}: shapes match, FNV-1a 64 over {count} words = {s:016x} as stored")
    print("OK: safetensors, adapter.bin and adapter_config.json agree")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Fail as e:
        print(f"FAIL: {e}")
        sys.exit(1)
