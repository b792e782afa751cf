// dev/bench_matmul.cpp: GFLOP/s of our matmul kernels vs OpenBLAS sgemm on the GPT-2 124M shapes,
// plus a correctness check of every fast kernel against its naive twin. The bf16 rows (-Q bf16's
// frozen matmuls: forward and dinp with bf16 weights, lib/bf16.h) are set beside the same sgemm.
// Dev-only: this is the one program that links OpenBLAS (-lopenblas); the main build never does.
// Every kernel is timed with its weight in cache; forward and dinp again with it cold (a new copy per
// call, as in a step).
// Built and run by `make bench` (dev/bench.mk, dev/bench.sh).
#include <cstdio>
#include <cstdint>
#include <vector>
#include <chrono>
#include <algorithm>
#include <cstring>
#include <string>
#include <cblas.h>
// the trainer's own kernels (TESTING hides its main)
#define TESTING
#include "../train_gpt2_lora.cpp"

static double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

static void fill_random(std::vector<float>& v, uint64_t seed) {
    for (size_t i = 0; i < v.size(); i++) { // xorshift64*, uniform in [-1, 1)
        seed ^= seed >> 12; seed ^= seed << 25; seed ^= seed >> 27;
        uint64_t r = seed * 2685821657736338717ULL;
        v[i] = (float)((r >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
    }
}

// max |a-b| / max |b|: error relative to the size of the result
static double max_rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
    double m = 0.0, scale = 1e-30;
    for (size_t i = 0; i < a.size(); i++) {
        m = std::max(m, std::fabs((double)a[i] - (double)b[i]));
        scale = std::max(scale, std::fabs((double)b[i]));
    }
    return m / scale;
}

// One contender's best time per (shape, kernel) over `reps` runs, as lines "time <shape> <kernel> <seconds>".
// Each contender is timed in a process of its own (see main): two thread pools in one process (GNU
// OpenMP's and OpenBLAS's pthreads) on 2 cores would each run with the other's threads spinning or
// asleep, so whichever ran second paid for the first one's wait policy.
struct Shape { int C, OC; const char* name; };
static const Shape shapes[] = { {768, 2304, "qkv"}, {768, 3072, "fc"}, {3072, 768, "fcproj"}, {768, 50304, "lmhead"} };
static const char* kernel_names[3] = { "forward", "dinp", "dweight" };
static const int B = 4, T = 64, BT = B * T;

// who: 0 ours, 1 openblas, 2 our bf16 kernels (forward and dinp only: a bf16 weight is frozen).
// cold: each call multiplies the next of several copies of the weight, COLD_BYTES in all (more than any
// CPU's last-level cache), as a training step streams its layers' weights from memory; otherwise every
// call reuses one weight, which stays in cache (the lmhead's does not fit: it is cold either way).
static const size_t COLD_BYTES = (size_t)512 << 20;
static void time_contender(int who, int reps, bool cold) {
    bool ours = who == 0;
    for (const Shape& sh : shapes) {
        int C = sh.C, OC = sh.OC;
        size_t wn = (size_t)OC * C, w_bytes = wn * (who == 2 ? sizeof(uint16_t) : sizeof(float));
        size_t copies = cold ? std::max<size_t>(1, (COLD_BYTES + w_bytes - 1) / w_bytes) : 1, call = 0;
        std::vector<float> inp((size_t)BT * C), w(wn), bias(OC), out((size_t)BT * OC), dout((size_t)BT * OC);
        std::vector<float> dinp((size_t)BT * C, 0.0f), dw(wn, 0.0f);
        fill_random(inp, 1); fill_random(w, 2); fill_random(bias, 3); fill_random(dout, 4);
        std::vector<uint16_t> w16;
        if (who == 2) {
            w16.resize(wn * copies);
            for (size_t i = 0; i < w16.size(); i++) w16[i] = bf16_round(w[i % wn]);
        } else {
            w.resize(wn * copies);
            for (size_t i = wn; i < w.size(); i++) w[i] = w[i % wn];
        }
        // the same three problems for both: out = inp @ w^T, dinp += dout @ w, dw += dout^T @ inp
        for (int k = 0; k < (who == 2 || cold ? 2 : 3); k++) { // (dweight reads no weight: never cold)
            auto run = [&] {
                size_t at = (call++ % copies) * wn; // this call's copy of the weight
                if (who == 2) {
                    if (k == 0) matmul_bf16_forward_fast(out.data(), inp.data(), w16.data() + at, bias.data(), B, T, C, OC);
                    if (k == 1) matmul_bf16_backward_fast(dinp.data(), dout.data(), w16.data() + at, B, T, C, OC);
                } else if (ours) {
                    if (k == 0) matmul_forward(out.data(), inp.data(), w.data() + at, bias.data(), B, T, C, OC);
                    if (k == 1) matmul_backward(dinp.data(), (float*)NULL, (float*)NULL, dout.data(), inp.data(), w.data() + at, B, T, C, OC);
                    if (k == 2) matmul_backward((float*)NULL, dw.data(), (float*)NULL, dout.data(), inp.data(), w.data() + at, B, T, C, OC);
                } else {
                    if (k == 0) cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, BT, OC, C, 1.0f, inp.data(), C,
                                            w.data() + at, C, 0.0f, out.data(), OC);
                    if (k == 1) cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, BT, C, OC, 1.0f, dout.data(), OC,
                                            w.data() + at, C, 1.0f, dinp.data(), C);
                    if (k == 2) cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OC, C, BT, 1.0f, dout.data(), OC,
                                            inp.data(), C, 1.0f, dw.data(), C);
                }
            };
            // warm-up for 0.1 s, not one call: in a fresh process the first few calls run at a third of
            // the speed (threads starting, first touch of the pack buffers, the clock ramping up)
            double w0 = now_s();
            do { run(); } while (now_s() - w0 < 0.1);
            double best = 1e30;
            for (int r = 0; r < reps; r++) {
                double t0 = now_s();
                run();
                best = std::min(best, now_s() - t0);
            }
            printf("time %s %s %.9f\n", sh.name, kernel_names[k], best);
        }
    }
}

// runs `self time <who> <reps> [cold]` with the given OpenMP wait policy (and environment settings `env`,
// or ""); keeps the minimum per (shape, kernel)
static void run_child(const char* self, const char* who, const char* wait_policy, int reps, std::vector<double>* best,
                      const std::string& env = "", bool cold = false) {
    int expected = strcmp(who, "bf16") == 0 || cold ? 8 : 12;
    std::string cmd = env + " OMP_WAIT_POLICY=" + wait_policy + " '" + self + "' time " + who + " " + std::to_string(reps) + (cold ? " cold" : "");
    FILE* p = popen(cmd.c_str(), "r");
    if (p == NULL) { fprintf(stderr, "bench_matmul: cannot run %s\n", cmd.c_str()); exit(1); }
    char line[256], shape[64], kernel[64];
    double sec;
    int n = 0;
    while (fgets(line, sizeof(line), p)) {
        if (sscanf(line, "time %63s %63s %lf", shape, kernel, &sec) != 3) continue;
        (*best)[n] = std::min((*best)[n], sec);
        n++;
    }
    if (pclose(p) != 0 || n != expected) { fprintf(stderr, "bench_matmul: '%s' failed (%d timings)\n", cmd.c_str(), n); exit(1); }
}

// a count in [1, 1000], or -1
static int positive_int(const char* s) {
    char* end = NULL;
    long v = strtol(s, &end, 10);
    return end != s && *end == '\0' && v >= 1 && v <= 1000 ? (int)v : -1;
}
static void usage() {
    fprintf(stderr, "Error: bench_matmul: usage: bench_matmul [rounds] | bench_matmul time ours|openblas|bf16 <reps> [cold]\n"
                    "---> HINT: rounds and reps are integers in [1, 1000]; `make bench` runs it with 5 rounds\n");
    exit(EXIT_FAILURE);
}

int main(int argc, char** argv) {
    // `bench_matmul time ours|openblas|bf16 <reps> [cold]`: one contender, in this process (what the rounds below run)
    if ((argc == 4 || argc == 5) && strcmp(argv[1], "time") == 0) {
        const char* who = argv[2];
        int who_i = strcmp(who, "ours") == 0 ? 0 : strcmp(who, "openblas") == 0 ? 1 : strcmp(who, "bf16") == 0 ? 2 : -1;
        if (who_i < 0 || positive_int(argv[3]) < 0 || (argc == 5 && strcmp(argv[4], "cold") != 0)) usage();
        time_contender(who_i, positive_int(argv[3]), argc == 5);
        return 0;
    }
    // `bench_matmul [rounds]`: the correctness check, then `rounds` rounds that alternate the two
    // contenders' processes, so both see the same background load; each one's best time is kept
    if (argc > 2 || (argc == 2 && positive_int(argv[1]) < 0)) usage();
    int rounds = argc == 2 ? positive_int(argv[1]) : 5;
    // Correctness: fast vs naive on these shapes plus odd ones (remainders of every tile size).
    // tol: fp32 sums of up to 50304 terms of size ~1, accumulated in a different order (KC slices,
    // FMA) by the two kernels; their difference grows ~sqrt(K) * 6e-8 relative to the largest
    // output, so 1e-5 leaves ~10x margin at K=50304 while a wrong index gives O(1).
    const double tol = 1e-5;
    int failures = 0;
    const int odd[][4] = { {1, 7, 13, 5}, {3, 37, 29, 131}, {2, 33, 300, 45}, {1, 5, 257, 1000} };
    for (int s = 0; s < 4 + 4; s++) {
        int b = (s < 4) ? 1 : odd[s - 4][0], t = (s < 4) ? 16 : odd[s - 4][1];
        int C = (s < 4) ? shapes[s].C : odd[s - 4][2], OC = (s < 4) ? shapes[s].OC : odd[s - 4][3];
        size_t n_in = (size_t)b * t * C, n_out = (size_t)b * t * OC, n_w = (size_t)OC * C;
        std::vector<float> inp(n_in), w(n_w), bias(OC), dout(n_out);
        fill_random(inp, 1 + s); fill_random(w, 100 + s); fill_random(bias, 200 + s); fill_random(dout, 300 + s);
        std::vector<float> o1(n_out), o2(n_out);
        matmul_forward(o1.data(), inp.data(), w.data(), bias.data(), b, t, C, OC);
        matmul_forward_naive(o2.data(), inp.data(), w.data(), bias.data(), b, t, C, OC);
        std::vector<float> di1(n_in, 0.5f), di2(n_in, 0.5f), dw1(n_w, 0.25f), dw2(n_w, 0.25f), db1(OC, 1.0f), db2(OC, 1.0f);
        matmul_backward(di1.data(), dw1.data(), db1.data(), dout.data(), inp.data(), w.data(), b, t, C, OC);
        matmul_backward_naive(di2.data(), dw2.data(), db2.data(), dout.data(), inp.data(), w.data(), b, t, C, OC);
        double e[4] = { max_rel_diff(o1, o2), max_rel_diff(di1, di2), max_rel_diff(dw1, dw2), max_rel_diff(db1, db2) };
        bool ok = e[0] < tol && e[1] < tol && e[2] < tol && e[3] < tol;
        failures += !ok;
        printf("check BT=%d C=%d OC=%d: fwd %.1e dinp %.1e dweight %.1e dbias %.1e %s\n",
               b * t, C, OC, e[0], e[1], e[2], e[3], ok ? "ok" : "FAIL");
    }

    // each at its best setting: ours with OpenMP threads spinning between the step's many calls (its
    // process has no other thread pool to starve), OpenBLAS with its own defaults (pthreads, 2 threads).
    // OpenBLAS picks its kernels by CPU model; one newer than the library (Debian 12's 0.3.21 takes Zen 5
    // for a Haswell) gets 256-bit kernels on an AVX-512 CPU, so there its AVX-512 kernels (SkylakeX) race
    // too, and each shape keeps the faster of the two: the peer at its best, as a user who knows
    // OPENBLAS_CORETYPE would run it.
    std::string core = openblas_get_corename();
    bool avx512 = __builtin_cpu_supports("avx512f");
    bool core_avx512 = core == "SkylakeX" || core == "Cooperlake" || core == "SapphireRapids";
    printf("OpenBLAS: %s; core %s (its own choice)%s\n", openblas_get_config(), core.c_str(),
           avx512 && !core_avx512 ? " and SkylakeX (forced: this CPU has AVX-512F), the faster per shape" : "");
    std::vector<double> best_ours(12, 1e30), best_blas(12, 1e30), best_bf16(8, 1e30);
    std::vector<double> cold_ours(8, 1e30), cold_blas(8, 1e30), cold_bf16(8, 1e30); // forward and dinp per shape
    for (int r = 0; r < rounds; r++) {
        for (bool cold : {false, true}) {
            run_child(argv[0], "ours", "active", 5, cold ? &cold_ours : &best_ours, "", cold);
            run_child(argv[0], "openblas", "passive", 5, cold ? &cold_blas : &best_blas, "", cold);
            if (avx512 && !core_avx512) run_child(argv[0], "openblas", "passive", 5, cold ? &cold_blas : &best_blas, "OPENBLAS_CORETYPE=SkylakeX", cold);
            run_child(argv[0], "bf16", "active", 5, cold ? &cold_bf16 : &best_bf16, "", cold);
        }
    }
    printf("%-7s %5s %5s %6s | %-8s %8s %8s %6s\n", "shape", "BT", "C", "OC", "kernel", "ours", "openblas", "ratio");
    double worst = 1e30;
    int n = 0;
    for (const Shape& sh : shapes) {
        double flops = 2.0 * BT * sh.C * sh.OC;
        for (int k = 0; k < 3; k++, n++) {
            double g_ours = flops / best_ours[n] * 1e-9, g_blas = flops / best_blas[n] * 1e-9;
            worst = std::min(worst, g_ours / g_blas);
            printf("%-7s %5d %5d %6d | %-8s %8.1f %8.1f %5.0f%%\n", sh.name, BT, sh.C, sh.OC, kernel_names[k], g_ours, g_blas, 100.0 * g_ours / g_blas);
        }
    }
    printf("matmul GFLOP/s ours/openblas worst %.0f%% (target >= 90%%)\n", 100.0 * worst);
    // the bf16 kernels against OpenBLAS's fp32 sgemm on the same problem (OpenBLAS has no bf16 x fp32 GEMM)
    printf("bf16 matmuls (%s):\n", matmul_bf16_path());
    n = 0;
    for (int sh_i = 0; sh_i < 4; sh_i++) {
        const Shape& sh = shapes[sh_i];
        double flops = 2.0 * BT * sh.C * sh.OC;
        for (int k = 0; k < 2; k++, n++) {
            double g_bf16 = flops / best_bf16[n] * 1e-9, g_blas = flops / best_blas[sh_i * 3 + k] * 1e-9;
            printf("%-7s %5d %5d %6d | bf16 %-3s %8.1f %8.1f %5.0f%% of sgemm\n", sh.name, BT, sh.C, sh.OC, k == 0 ? "fwd" : "dinp", g_bf16, g_blas, 100.0 * g_bf16 / g_blas);
        }
    }
    // the same forward and dinp with cold weights (see time_contender): the speed a step sees, and how
    // much of each kernel's in-cache speed it keeps
    printf("cold weights (a copy per call, %zu MB of them, as a step streams its layers' weights from memory):\n", COLD_BYTES >> 20);
    printf("%-7s %5s %5s %6s | %-8s %8s %8s %6s | %8s %6s | kept of in-cache: ours openblas bf16\n", "shape", "BT", "C", "OC", "kernel",
           "ours", "openblas", "ratio", "bf16", "/sgemm");
    for (int sh_i = 0; sh_i < 4; sh_i++) {
        const Shape& sh = shapes[sh_i];
        double flops = 2.0 * BT * sh.C * sh.OC;
        for (int k = 0; k < 2; k++) {
            int n3 = sh_i * 3 + k, n2 = sh_i * 2 + k;
            double g_ours = flops / cold_ours[n2] * 1e-9, g_blas = flops / cold_blas[n2] * 1e-9, g_bf16 = flops / cold_bf16[n2] * 1e-9;
            printf("%-7s %5d %5d %6d | %-8s %8.1f %8.1f %5.0f%% | %8.1f %5.0f%% | %5.0f%% %5.0f%% %5.0f%%\n", sh.name, BT, sh.C, sh.OC,
                   kernel_names[k], g_ours, g_blas, 100.0 * g_ours / g_blas, g_bf16, 100.0 * g_bf16 / g_blas,
                   100.0 * best_ours[n3] / cold_ours[n2], 100.0 * best_blas[n3] / cold_blas[n2], 100.0 * best_bf16[n2] / cold_bf16[n2]);
        }
    }
    printf("correctness: %s\n", failures == 0 ? "all fast kernels match naive" : "MISMATCH");
    return failures == 0 ? 0 : 1;
}
