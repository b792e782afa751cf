#!/usr/bin/env python3
"""dev/tune_gemm.py: tries other K slices for our GEMMs on this CPU, side by side (`make tune`).

The slice lengths of lib/fast.h (MATMUL_KC) and lib/bf16.h (BF16_KC, the AVX512_BF16 dinp) are
compile-time constants chosen by measurement on the CPUs we had. This builds dev/bench_matmul.cpp once
per candidate (-DMATMUL_KC_TRY=..., -DBF16_KC_TRY=...; the product never sets them), then times every
build's kernels in alternated rounds, each in a process of its own (`bench_matmul time ours|bf16 5`),
and prints GFLOP/s per (shape, kernel) with the best per row marked. Rounds alternate so that every
build sees the same background load; each keeps its best time.

Environment: CXX, CXXFLAGS, LDFLAGS (make passes its own), ROUNDS (3), MATMUL_KCS ("256 384 512 768"),
BF16_KCS ("256 512 768", timed only where the build has AVX512_BF16: otherwise the bf16 matmuls are the
fp32 GEMM and follow MATMUL_KC), OUT (build/tune). Python 3 only, no packages.
"""
import os
import shlex
import subprocess
import sys

SHAPES = {"qkv": (768, 2304), "fc": (768, 3072), "fcproj": (3072, 768), "lmhead": (768, 50304)}
BT = 256  # dev/bench_matmul.cpp's B * T


def die(msg, hint):
    sys.stderr.write("Error: tune_gemm: %s\n---> HINT: %s\n" % (msg, hint))
    sys.exit(1)


def sizes(name, default, even=False):
    text = os.environ.get(name, default)
    try:
        values = [int(x) for x in text.split()]
    except ValueError:
        values = []
    if not values or any(v < 2 or v > 65536 or (even and v % 2) for v in values):
        die("%s must be a list of integers in [2, 65536]%s, got '%s'" % (name, ", even" if even else "", text),
            "for example %s=\"%s\"" % (name, default))
    return values


def build(out, name, defines):
    exe = os.path.join(out, name)
    cmd = ([os.environ.get("CXX", "g++")] + shlex.split(os.environ.get("CXXFLAGS", "-O3 -std=c++17 -march=native -fopenmp"))
           + defines + ["dev/bench_matmul.cpp"] + shlex.split(os.environ.get("LDFLAGS", "-fopenmp")) + ["-lm", "-lopenblas", "-o", exe])
    print("[tune] build %s: %s" % (name, " ".join(defines) or "(the product's constants)"), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        die("building %s failed:\n%s" % (name, r.stderr[-2000:]), "does `make bench` build here? it needs libopenblas-dev")
    return exe


def time_once(exe, who):
    env = dict(os.environ, OMP_WAIT_POLICY="active")
    r = subprocess.run([exe, "time", who, "5"], capture_output=True, text=True, env=env)
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("time ")]
    if r.returncode != 0 or not rows:
        die("'%s time %s 5' failed (rc %d)" % (exe, who, r.returncode), "run it by hand to see why")
    return {(row[1], row[2]): float(row[3]) for row in rows}


def main():
    rounds = sizes("ROUNDS", "3")
    if len(rounds) != 1:
        die("ROUNDS must be one integer, got '%s'" % os.environ.get("ROUNDS"), "for example ROUNDS=3")
    rounds = rounds[0]
    out = os.environ.get("OUT", "build/tune")
    os.makedirs(out, exist_ok=True)
    builds = []  # (name, exe, who)
    for kc in sizes("MATMUL_KCS", "256 384 512 768"):
        builds.append(("kc%d" % kc, build(out, "kc%d" % kc, ["-DMATMUL_KC_TRY=%d" % kc]), "ours"))
    with open("/proc/cpuinfo") as f:
        has_dot = "avx512_bf16" in f.read()  # (the builds take -march=native: the CPU's flags are the build's)
    if has_dot:
        for kc in sizes("BF16_KCS", "256 512 768", even=True):
            builds.append(("bf16kc%d" % kc, build(out, "bf16kc%d" % kc, ["-DBF16_KC_TRY=%d" % kc]), "bf16"))
    else:
        print("[tune] this CPU has no AVX512_BF16: the bf16 matmuls are the fp32 GEMM (MATMUL_KC), no BF16_KC rows")
    best = {}
    for r in range(rounds):
        for name, exe, who in builds:
            for key, sec in time_once(exe, who).items():
                best[(name,) + key] = min(best.get((name,) + key, 1e30), sec)
        print("[tune] round %d of %d done" % (r + 1, rounds), flush=True)
    for who in ("ours", "bf16"):
        group = [b for b in builds if b[2] == who]
        if not group:
            continue
        print("%s: GFLOP/s, best of %d alternated rounds (* the best per row)" % ("fp32 GEMM (MATMUL_KC)" if who == "ours" else "bf16 dot products (BF16_KC)", rounds))
        print("%-7s %-8s" % ("shape", "kernel") + "".join("%11s" % b[0] for b in group))
        for shape, (C, OC) in SHAPES.items():
            for kernel in ("forward", "dinp", "dweight"):
                if (group[0][0], shape, kernel) not in best:
                    continue
                g = [2.0 * BT * C * OC / best[(b[0], shape, kernel)] * 1e-9 for b in group]
                top = max(g)
                print("%-7s %-8s" % (shape, kernel) + "".join("%10.1f%s" % (x, "*" if x == top else " ") for x in g))


if __name__ == "__main__":
    main()
