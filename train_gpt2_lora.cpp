/*
LoRA fine-tuning of GPT-2 on the CPU, in one file, in the spirit of llm.c's train_gpt2.c.

What it is: GPT-2 (pre-LN, GELU-tanh, tied token embedding / LM head) with its forward and backward
written by hand, LoRA adapters (lora.h) on the attention and MLP matmuls of a frozen base, AdamW on the
adapters only, and llm.c's file formats, so llm.c's starter-pack checkpoint, tokens and tokenizer work.
With -f it trains every parameter instead (full fine-tuning, the baseline LoRA is compared with).

What it is not: a framework. Every kernel is a plain loop nest with OpenMP; the float matmul has a fast
path with its naive twin beside it, and test_lora.cpp checks every backward against finite differences.
The kernels and the model are templates over the scalar type only so that the tests can run the very
same code in double precision; the program itself runs in float.

Reading order: kernels (forward/backward pairs) -> model -> build/forward/backward/update/free ->
files (checkpoint, tokens, tokenizer) -> data loader and sampling -> adapter files (own format,
PEFT safetensors, merge) -> main.
*/
#include <algorithm>
#include <cerrno>
#include <cstdarg>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#include <time.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/resource.h>
#include <signal.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef USE_MPI
#define OMPI_SKIP_MPICXX 1 // the C API only: no deprecated C++ bindings
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#endif
#include "lora.h"
#include "dev/tokenizer.h" // GPT-2 BPE for -p prompts

// ----------------------------------------------------------------------------
// errors: every failure names the file or flag, says what was wrong and ends in a HINT

[[noreturn]] static void die(const std::string& msg) {
    fprintf(stderr, "Error: %s\n", msg.c_str());
    exit(EXIT_FAILURE);
}

static std::string strprintf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
static std::string strprintf(const char* fmt, ...) {
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    return std::string(buf);
}

static void* malloc_check(size_t size, const char* what) {
    void* p = malloc(size > 0 ? size : 1);
    if (p == NULL) {
        die(strprintf("out of memory allocating %zu bytes for %s\n---> HINT: lower the batch size (-b) or sequence length (-t)", size, what));
    }
    return p;
}

template <typename real> static real* calloc_real(size_t n, const char* what) {
    real* p = (real*)malloc_check(n * sizeof(real), what);
    memset(p, 0, n * sizeof(real));
    return p;
}

// ----------------------------------------------------------------------------
// kernels. Dimension letters, used everywhere below and never improvised:
// B = batch size, T = sequence length, C = channels, OC = output channels, V = vocab size,
// Vp = V padded to a multiple of 128, L = layers, NH = heads, hs = head size C/NH, r = LoRA rank.
// Every backward accumulates (+=) into its gradients. A NULL gradient pointer means "frozen, skip".

// inp (B,T) token ids, wte (Vp,C), wpe (maxT,C) -> out (B,T,C)
template <typename real>
void encoder_forward(real* out, const int* inp, const real* wte, const real* wpe, int B, int T, int C) {
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            real* out_bt = out + ((size_t)b * T + t) * C;
            const real* wte_ix = wte + (size_t)inp[b * T + t] * C;
            const real* wpe_t = wpe + (size_t)t * C;
            for (int c = 0; c < C; c++) { out_bt[c] = wte_ix[c] + wpe_t[c]; }
        }
    }
}

// dout (B,T,C) -> dwte (Vp,C) +=, dwpe (maxT,C) +=
template <typename real>
void encoder_backward(real* dwte, real* dwpe, const real* dout, const int* inp, int B, int T, int C) {
    // forward was: out[b,t] = wte[inp[b,t]] + wpe[t]; so now each row routes dout to both.
    // parallel over channels: two positions may share a token id, so rows can't be split across threads
    #pragma omp parallel for
    for (int c = 0; c < C; c++) {
        for (int b = 0; b < B; b++) {
            for (int t = 0; t < T; t++) {
                real d = dout[((size_t)b * T + t) * C + c];
                dwte[(size_t)inp[b * T + t] * C + c] += d;
                dwpe[(size_t)t * C + c] += d;
            }
        }
    }
}

// inp (B,T,C), weight (C), bias (C) -> out (B,T,C); mean, rstd (B,T) cached
template <typename real>
void layernorm_forward(real* out, real* mean, real* rstd, const real* inp, const real* weight, const real* bias,
                       int B, int T, int C) {
    const real eps = (real)1e-5;
    #pragma omp parallel for
    for (int bt = 0; bt < B * T; bt++) {
        const real* x = inp + (size_t)bt * C;
        real m = 0;
        for (int c = 0; c < C; c++) { m += x[c]; }
        m = m / C;
        real v = 0;
        for (int c = 0; c < C; c++) { real d = x[c] - m; v += d * d; }
        v = v / C;
        real s = 1 / std::sqrt(v + eps);
        real* out_bt = out + (size_t)bt * C;
        for (int c = 0; c < C; c++) { out_bt[c] = (x[c] - m) * s * weight[c] + bias[c]; }
        mean[bt] = m;
        rstd[bt] = s;
    }
}

// dout (B,T,C) -> dinp (B,T,C) +=, dweight (C) +=, dbias (C) += (dweight, dbias may be NULL)
template <typename real>
void layernorm_backward(real* dinp, real* dweight, real* dbias, const real* dout, const real* inp,
                        const real* weight, const real* mean, const real* rstd, int B, int T, int C) {
    // forward was: norm = (x - mean) * rstd; out = norm * weight + bias. With dnorm = dout * weight,
    // dx = rstd * (dnorm - mean_c(dnorm) - norm * mean_c(dnorm * norm))   (mean and rstd depend on x too)
    #pragma omp parallel for
    for (int bt = 0; bt < B * T; bt++) {
        const real* dout_bt = dout + (size_t)bt * C;
        const real* inp_bt = inp + (size_t)bt * C;
        real* dinp_bt = dinp + (size_t)bt * C;
        real m = mean[bt], s = rstd[bt];
        real dnorm_mean = 0, dnorm_norm_mean = 0;
        for (int c = 0; c < C; c++) {
            real norm = (inp_bt[c] - m) * s;
            real dnorm = weight[c] * dout_bt[c];
            dnorm_mean += dnorm;
            dnorm_norm_mean += dnorm * norm;
        }
        dnorm_mean = dnorm_mean / C;
        dnorm_norm_mean = dnorm_norm_mean / C;
        for (int c = 0; c < C; c++) {
            real norm = (inp_bt[c] - m) * s;
            real dnorm = weight[c] * dout_bt[c];
            dinp_bt[c] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
        }
    }
    if (dweight == NULL) return;
    // parallel over channels: each thread owns dweight[c] and dbias[c]
    #pragma omp parallel for
    for (int c = 0; c < C; c++) {
        real dw = 0, db = 0;
        for (int bt = 0; bt < B * T; bt++) {
            real d = dout[(size_t)bt * C + c];
            dw += d * (inp[(size_t)bt * C + c] - mean[bt]) * rstd[bt];
            db += d;
        }
        dweight[c] += dw;
        dbias[c] += db;
    }
}

// inp (B,T,C), weight (OC,C), bias (OC) or NULL -> out (B,T,OC) = inp @ weight^T + bias
template <typename real>
void matmul_forward_naive(real* out, const real* inp, const real* weight, const real* bias,
                          int B, int T, int C, int OC) {
    #pragma omp parallel for collapse(2)
    for (int bt = 0; bt < B * T; bt++) {
        for (int o = 0; o < OC; o++) {
            const real* inp_bt = inp + (size_t)bt * C;
            const real* w_row = weight + (size_t)o * C;
            real sum = bias != NULL ? bias[o] : 0;
            for (int c = 0; c < C; c++) { sum += inp_bt[c] * w_row[c]; }
            out[(size_t)bt * OC + o] = sum;
        }
    }
}

// dout (B,T,OC) -> dinp (B,T,C) +=, dweight (OC,C) +=, dbias (OC) +=; any of the three may be NULL:
// a frozen weight passes NULL and costs no weight-gradient work at all
template <typename real>
void matmul_backward_naive(real* dinp, real* dweight, real* dbias, const real* dout, const real* inp,
                           const real* weight, int B, int T, int C, int OC) {
    // forward was: out[bt,o] = bias[o] + sum_c inp[bt,c] * weight[o,c]
    if (dinp != NULL) {
        // dinp = dout @ weight; parallel over rows, each thread owns dinp[bt,:]
        #pragma omp parallel for
        for (int bt = 0; bt < B * T; bt++) {
            real* dinp_bt = dinp + (size_t)bt * C;
            const real* dout_bt = dout + (size_t)bt * OC;
            for (int o = 0; o < OC; o++) {
                real d = dout_bt[o];
                const real* w_row = weight + (size_t)o * C;
                for (int c = 0; c < C; c++) { dinp_bt[c] += d * w_row[c]; }
            }
        }
    }
    if (dweight != NULL || dbias != NULL) {
        // dweight = dout^T @ inp, dbias = column sums of dout; parallel over OC, each thread owns row o
        #pragma omp parallel for
        for (int o = 0; o < OC; o++) {
            real* dw_row = dweight != NULL ? dweight + (size_t)o * C : NULL;
            real db = 0;
            for (int bt = 0; bt < B * T; bt++) {
                real d = dout[(size_t)bt * OC + o];
                db += d;
                if (dw_row == NULL) continue;
                const real* inp_bt = inp + (size_t)bt * C;
                for (int c = 0; c < C; c++) { dw_row[c] += d * inp_bt[c]; }
            }
            if (dbias != NULL) dbias[o] += db;
        }
    }
}

// The generic matmul is the naive one; float, the type the program trains in, gets the fast path below.
template <typename real>
void matmul_forward(real* out, const real* inp, const real* weight, const real* bias, int B, int T, int C, int OC) {
    matmul_forward_naive(out, inp, weight, bias, B, T, C, OC);
}
template <typename real>
void matmul_backward(real* dinp, real* dweight, real* dbias, const real* dout, const real* inp, const real* weight,
                     int B, int T, int C, int OC) {
    matmul_backward_naive(dinp, dweight, dbias, dout, inp, weight, B, T, C, OC);
}

// a . b over n elements in 8 interleaved partial sums (lane j sums elements j, j+8, ...), added up at
// the end. Each lane is a plain sequential sum, so the compiler may keep the 8 lanes in one vector
// register without reassociating anything (no -ffast-math); a single running sum could not vectorize.
template <typename real>
static inline real dot_lanes(const real* a, const real* b, int n) {
    real lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int j = 0; j < 8; j++) { lane[j] += a[i + j] * b[i + j]; }
    }
    real s = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    for (; i < n; i++) { s += a[i] * b[i]; }
    return s;
}

// ---- fast float path (issue 9) ----
// One blocked GEMM serves forward, dinp, dweight and the LoRA branches:
//   Cmat (M,N) += alpha * A (M,K) @ Bmat (K,N), each operand given by strides, so that
//   forward  out  (BT,OC) += inp  (BT,C)    @ weight^T (C,OC)
//   dinp     dinp (BT,C)  += dout (BT,OC)   @ weight   (OC,C)
//   dweight  dw   (OC,C)  += dout^T (OC,BT) @ inp      (BT,C)
// Design (BLIS-like): the output is cut into MC x NC tiles, one OpenMP task each; a tile walks K in
// KC slices; the slice of Bmat is packed into NR-column panels (zero-padded past N), A is read in
// place (or packed into MR-row panels when its k steps are strided); a micro-kernel keeps an MR x NR
// block of the output in registers. It vectorizes across the NR output columns, so every output is
// still one sequential sum over k: no reassociation, no -ffast-math. The compiler does the vectorizing.
static const int MATMUL_MR = 6;   // register tile rows: MR*NR/8 = 12 of the 16 AVX2 registers hold it
static const int MATMUL_NR = 16;  // register tile columns: two 8-float vectors
static const int MATMUL_KC = 256; // K slice: one packed panel is KC*NR*4 = 16 KB, stays in L1
static const int MATMUL_MC = 264; // tile rows: covers BT = 256, so each weight slice is packed once
static const int MATMUL_NC = 192; // tile columns: the packed Bmat slice is KC*NC*4 = 192 KB, in L2
static_assert(MATMUL_MC % MATMUL_MR == 0 && MATMUL_NC % MATMUL_NR == 0, "tiles hold whole register blocks");

// Timing hook for dev/bench_step: seconds in, and FLOPs done by, the float matmuls since the last
// reset. The model calls them from one thread, so plain accumulation is safe.
struct MatmulStats { double seconds, flops; };
static MatmulStats matmul_stats = {0.0, 0.0};
static double matmul_clock() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// a*b + c with one rounding where the CPU has FMA (twice the throughput); plain a*b + c elsewhere
static inline float madd(float a, float b, float c) {
#ifdef __FMA__
    return __builtin_fmaf(a, b, c);
#else
    return a * b + c;
#endif
}

// per-thread pack buffer (Bmat slice KC x NC, then A slice MC x KC), allocated on the thread's first
// matmul and reused for the life of the process: no allocation per step
static float* matmul_pack_buffer() {
    static thread_local float* buf = NULL;
    if (buf == NULL) {
        size_t n = (size_t)MATMUL_KC * MATMUL_NC + (size_t)MATMUL_MC * MATMUL_KC;
        buf = (float*)aligned_alloc(64, n * sizeof(float));
        if (buf == NULL) die("out of memory for the matmul pack buffer\n---> HINT: free some memory");
    }
    return buf;
}

// Cmat (m,n) += alpha * A (m,kc) @ Bp (kc,NR): one register block, m <= MR, n <= NR.
// A(i,k) = A[i*rsa + k*csa]; Bp is a packed panel (row k at Bp + k*NR, zero past n). Rows past m
// re-read row m-1 and their sums are dropped, so one kernel serves every edge. With MR, NR constant
// the compiler keeps acc in registers: per k, 2 vector loads and 6 broadcasts feed 12 vector FMAs.
static inline void matmul_micro_kernel(int kc, const float* A, size_t rsa, size_t csa, const float* __restrict Bp,
                                       float* Cmat, size_t ldc, int m, int n, float alpha) {
    const int MR = MATMUL_MR, NR = MATMUL_NR;
    const float* a_row[MR];
    for (int i = 0; i < MR; i++) { a_row[i] = A + (size_t)(i < m ? i : m - 1) * rsa; }
    float acc[MR][NR] = {};
    for (int k = 0; k < kc; k++) {
        const float* b = Bp + (size_t)k * NR;
        for (int i = 0; i < MR; i++) {
            float a_ik = a_row[i][(size_t)k * csa];
            // "unroll 1": if GCC unrolls j before vectorizing, it settles for 128-bit SLP with acc
            // spilled to the stack (4x slower); kept as a loop, j becomes NR/8 ymm FMAs
            #pragma GCC unroll 1
            for (int j = 0; j < NR; j++) { acc[i][j] = madd(a_ik, b[j], acc[i][j]); }
        }
    }
    if (m == MR && n == NR) {
        for (int i = 0; i < MR; i++) {
            #pragma GCC unroll 1
            for (int j = 0; j < NR; j++) { Cmat[i * ldc + j] += alpha * acc[i][j]; }
        }
    } else {
        for (int i = 0; i < m; i++) {
            for (int j = 0; j < n; j++) { Cmat[i * ldc + j] += alpha * acc[i][j]; }
        }
    }
}

// Cmat (M,N) += alpha * A (M,K) @ Bmat (K,N); A(i,k) = A[i*rsa + k*csa], Bmat(k,j) = Bmat[k*rsb + j*csb];
// Cmat row-major with row stride ldc, must not alias A or Bmat.
static void matmul_gemm(int M, int N, int K, float alpha, const float* A, size_t rsa, size_t csa,
                        const float* Bmat, size_t rsb, size_t csb, float* Cmat, size_t ldc) {
    const int MR = MATMUL_MR, NR = MATMUL_NR, KC = MATMUL_KC, NC = MATMUL_NC;
    int tiles_n = (N + NC - 1) / NC, MC = MATMUL_MC;
    // a thin output (the LoRA bottleneck h or dh: N = r) is a single tile; cut its rows into one tile
    // per thread instead, in whole register blocks, so every thread has a share
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    if (tiles_n * ((M + MC - 1) / MC) < threads) MC = std::max(MR, (M / threads + MR - 1) / MR * MR);
    int tiles_m = (M + MC - 1) / MC;
    // parallel over output tiles: each task writes only its own MC x NC block of Cmat and packs into
    // its own thread's buffer, so there are no races and no atomics
    #pragma omp parallel for schedule(dynamic, 1)
    for (int t = 0; t < tiles_m * tiles_n; t++) {
        int i0 = (t % tiles_m) * MC, j0 = (t / tiles_m) * NC;
        int mc = std::min(MC, M - i0), nc = std::min(NC, N - j0);
        int npanels = (nc + NR - 1) / NR;
        float* Bp = matmul_pack_buffer();
        float* Ap = Bp + (size_t)KC * NC;
        for (int k0 = 0; k0 < K; k0 += KC) {
            int kc = std::min(KC, K - k0);
            // pack the Bmat slice: panel p holds columns j0 + p*NR.., laid out [k][j], zero past N
            for (int p = 0; p < npanels; p++) {
                float* dst = Bp + (size_t)p * NR * kc;
                int ncols = std::min(NR, nc - p * NR);
                const float* src = Bmat + (size_t)k0 * rsb + (size_t)(j0 + p * NR) * csb;
                if (csb == 1) { // the panel's rows are contiguous (dinp, dweight)
                    for (int k = 0; k < kc; k++) {
                        for (int j = 0; j < NR; j++) { dst[(size_t)k * NR + j] = j < ncols ? src[(size_t)k * rsb + j] : 0.0f; }
                    }
                } else {        // its columns are (forward: rows of weight), so read along k
                    for (int j = 0; j < NR; j++) {
                        for (int k = 0; k < kc; k++) { dst[(size_t)k * NR + j] = j < ncols ? src[(size_t)j * csb + (size_t)k * rsb] : 0.0f; }
                    }
                }
            }
            // A is read in place when its rows run along k (forward, dinp). When its k steps are
            // strided (dweight: A = dout^T, a step of OC floats, a new page each), the slice is packed
            // into MR-row panels laid out [k][i], which the kernel reads with rsa = 1, csa = MR.
            const float* A_blk = A + (size_t)i0 * rsa + (size_t)k0 * csa;
            size_t rs = rsa, cs = csa, strip = (size_t)MR * rsa;
            if (csa != 1) {
                for (int p = 0; p * MR < mc; p++) {
                    for (int k = 0; k < kc; k++) {
                        for (int i = 0; i < MR; i++) { // rows past mc repeat row mc-1; dropped later
                            int row = std::min(p * MR + i, mc - 1);
                            Ap[(size_t)p * MR * kc + (size_t)k * MR + i] = A_blk[(size_t)row * rsa + (size_t)k * csa];
                        }
                    }
                }
                A_blk = Ap; rs = 1; cs = MR; strip = (size_t)MR * kc;
            }
            // register blocks: an MR-row strip of A (L1) against every packed panel of Bmat (L2)
            for (int i = 0; i < mc; i += MR) {
                const float* a_strip = A_blk + (size_t)(i / MR) * strip;
                for (int p = 0; p < npanels; p++) {
                    float* c_blk = Cmat + (size_t)(i0 + i) * ldc + (j0 + p * NR);
                    matmul_micro_kernel(kc, a_strip, rs, cs, Bp + (size_t)p * NR * kc, c_blk, ldc,
                                        std::min(MR, mc - i), std::min(NR, nc - p * NR), alpha);
                }
            }
        }
    }
}

// inp (B,T,C), weight (OC,C), bias (OC) or NULL -> out (B,T,OC); the fast twin of matmul_forward_naive
void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int B, int T, int C, int OC) {
    double t0 = matmul_clock();
    int BT = B * T;
    // out starts as the bias (or 0) and the GEMM accumulates into it
    // parallel over rows: each thread writes its own rows of out
    #pragma omp parallel for
    for (int bt = 0; bt < BT; bt++) {
        float* out_bt = out + (size_t)bt * OC;
        for (int o = 0; o < OC; o++) { out_bt[o] = bias != NULL ? bias[o] : 0.0f; }
    }
    if (BT < MATMUL_MR) {
        // fewer rows than a register block (generation with the key/value cache: one): the GEMM would
        // pack every weight to use it once, so each output is a dot product along its weight row instead,
        // and the weights stream from memory once (parallel over output channels)
        #pragma omp parallel for
        for (int o = 0; o < OC; o++) {
            for (int bt = 0; bt < BT; bt++) { out[(size_t)bt * OC + o] += dot_lanes(inp + (size_t)bt * C, weight + (size_t)o * C, C); }
        }
    } else {
        // out (BT,OC) += inp (BT,C) @ weight^T, i.e. Bmat(c,o) = weight[o*C + c]
        matmul_gemm(BT, OC, C, 1.0f, inp, C, 1, weight, 1, C, out, OC);
    }
    matmul_stats.flops += 2.0 * BT * C * OC;
    matmul_stats.seconds += matmul_clock() - t0;
}

// dout (B,T,OC) -> dinp (B,T,C) +=, dweight (OC,C) +=, dbias (OC) +=; any of the three may be NULL, and a
// frozen weight (dweight = dbias = NULL) costs no weight-gradient work at all. Fast twin of matmul_backward_naive.
void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int B, int T, int C, int OC) {
    double t0 = matmul_clock();
    int BT = B * T;
    // forward was: out = inp @ weight^T + bias; so now:
    if (dinp != NULL) {    // dinp (BT,C) += dout (BT,OC) @ weight (OC,C)
        matmul_gemm(BT, C, OC, 1.0f, dout, OC, 1, weight, C, 1, dinp, C);
        matmul_stats.flops += 2.0 * BT * C * OC;
    }
    if (dweight != NULL) { // dweight (OC,C) += dout^T (OC,BT) @ inp (BT,C)
        matmul_gemm(OC, C, BT, 1.0f, dout, 1, OC, inp, C, 1, dweight, C);
        matmul_stats.flops += 2.0 * BT * C * OC;
    }
    if (dbias != NULL) {   // dbias[o] += sum_bt dout[bt,o]
        // parallel over blocks of 64 output channels: each thread owns its slice of dbias
        #pragma omp parallel for
        for (int o0 = 0; o0 < OC; o0 += 64) {
            int o1 = std::min(o0 + 64, OC);
            for (int bt = 0; bt < BT; bt++) {
                const float* dout_bt = dout + (size_t)bt * OC;
                for (int o = o0; o < o1; o++) { dbias[o] += dout_bt[o]; }
            }
        }
    }
    matmul_stats.seconds += matmul_clock() - t0;
}

// The LoRA branch as two thin GEMMs, never forming lora_B @ lora_A (the float fast path; lora.h's
// templates are the naive twins, reachable for floats as lora_forward<float> / lora_backward<float>).
// inp (BT,C), lora_A (r,C), lora_B (OC,r) -> h (BT,r) cached; out (BT,OC) += scale * h @ lora_B^T
void lora_forward(float* out, float* h, const float* inp, const float* lora_A, const float* lora_B,
                  float scale, int BT, int C, int OC, int r) {
    // h = inp @ lora_A^T: Bmat(c,i) = lora_A[i*C + c]
    memset(h, 0, (size_t)BT * r * sizeof(float));
    matmul_gemm(BT, r, C, 1.0f, inp, C, 1, lora_A, 1, C, h, r);
    // out += scale * h @ lora_B^T: Bmat(i,o) = lora_B[o*r + i]
    matmul_gemm(BT, OC, r, scale, h, r, 1, lora_B, 1, r, out, OC);
}

// dout (BT,OC), h (BT,r), inp (BT,C), lora_A (r,C), lora_B (OC,r)
//   -> dlora_B (OC,r) +=, dlora_A (r,C) +=, dinp (BT,C) += (dinp may be NULL); dh (BT,r) is scratch
void lora_backward(float* dinp, float* dlora_A, float* dlora_B, float* dh, const float* dout, const float* h,
                   const float* inp, const float* lora_A, const float* lora_B, float scale, int BT, int C, int OC, int r) {
    // forward was: out += scale * h @ lora_B^T with h = inp @ lora_A^T; so now:
    // dlora_B (OC,r) += scale * dout^T @ h, with A(o,bt) = dout[bt*OC + o]
    matmul_gemm(OC, r, BT, scale, dout, 1, OC, h, r, 1, dlora_B, r);
    // dh (BT,r) = scale * dout @ lora_B
    memset(dh, 0, (size_t)BT * r * sizeof(float));
    matmul_gemm(BT, r, OC, scale, dout, OC, 1, lora_B, r, 1, dh, r);
    // dlora_A (r,C) += dh^T @ inp, with A(i,bt) = dh[bt*r + i]
    matmul_gemm(r, C, BT, 1.0f, dh, 1, r, inp, C, 1, dlora_A, C);
    // dinp (BT,C) += dh @ lora_A
    if (dinp != NULL) matmul_gemm(BT, C, r, 1.0f, dh, r, 1, lora_A, C, 1, dinp, C);
}

// exp(x) for x <= 0, which is all the softmaxes and GELU need (x - max, and -2|u| for tanh). Double
// (the finite-difference tests) keeps std::exp. Float gets a version the compiler can vectorize, since
// libm's expf is an opaque call per element (4% of a LoRA step at 124M):
//   x = n ln2 + f, |f| <= ln2/2: adding 1.5 * 2^23 rounds x / ln2 to the integer n in the low mantissa
//   bits (no float -> int conversion, which would keep GCC from vectorizing); ln2 is split in two parts
//   so n * ln2 loses nothing; e^f from a degree-7 polynomial (Cephes' expf coefficients); 2^n written
//   straight into a float's exponent bits; below n = -126 (x < -87.3) the result is 0, by a bit mask.
// Relative error within 1 ulp over [-87.3, 0] (checked against double in test_lora.cpp); exp(0) is 1.
static inline double exp_fast(double x) { return std::exp(x); }
static inline float exp_fast(float x) {
    const float round_magic = 12582912.0f;                // 1.5 * 2^23
    float t = x * 1.44269504088896341f + round_magic;     // x / ln2 + magic: the low bits hold round(x / ln2)
    float n = t - round_magic;
    float f = x - n * 0.693359375f;                       // ln2 = 0.693359375 - 2.12194440e-4: the first part
    f = f - n * -2.12194440e-4f;                          // has few bits, so n times it is exact
    float p = 1.9875691500e-4f;
    p = p * f + 1.3981999507e-3f;
    p = p * f + 8.3334519073e-3f;
    p = p * f + 4.1665795894e-2f;
    p = p * f + 1.6666665459e-1f;
    p = p * f + 5.0000001201e-1f;
    p = p * f * f + f + 1.0f;                             // e^f
    int32_t t_bits;
    memcpy(&t_bits, &t, sizeof(t_bits));
    int32_t ni = t_bits - 0x4B400000;                     // n as an integer (0x4B400000 is the magic's bits)
    uint32_t two_n_bits = (uint32_t)(ni + 127) << 23;     // 2^n
    float two_n, r;
    memcpy(&two_n, &two_n_bits, sizeof(two_n));
    r = p * two_n;
    uint32_t r_bits;
    memcpy(&r_bits, &r, sizeof(r_bits));
    r_bits &= ni >= -126 ? 0xFFFFFFFFu : 0u;              // underflow: 0
    memcpy(&r, &r_bits, sizeof(r));
    return r;
}

// sum_i exp(x[i] - shift) in 8 interleaved partial sums, so the exps vectorize (see dot_lanes)
template <typename real>
static inline real sum_exp_lanes(const real* x, int n, real shift) {
    real lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int j = 0; j < 8; j++) { lane[j] += exp_fast(x[i + j] - shift); }
    }
    real s = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    for (; i < n; i++) { s += exp_fast(x[i] - shift); }
    return s;
}


// qkv (B,T,3C) with q|k|v along channels -> out (B,T,C); att (B,NH,T,T) post-softmax weights cached
// Queries are positions t0..T-1 of each sequence, keys and values all T positions: t0 = 0 in training;
// generation with a key/value cache passes the cached rows as qkv and t0 = the first new position, so
// out is (B,T-t0,C) and att (B,NH,T-t0,T). Each query row is computed the same way either way.
template <typename real>
void attention_forward(real* out, real* att, const real* qkv, int B, int T, int C, int NH, int t0 = 0) {
    int hs = C / NH, Tq = T - t0;
    real scale = 1 / std::sqrt((real)hs);
    // parallel over (b, t, h): each thread owns one row att[b,h,t,:] and out[b,t,h*hs:(h+1)*hs]
    #pragma omp parallel for collapse(3)
    for (int b = 0; b < B; b++) {
        for (int t = t0; t < T; t++) {
            for (int h = 0; h < NH; h++) {
                const real* q = qkv + ((size_t)b * T + t) * 3 * C + h * hs;
                real* att_bth = att + (((size_t)b * NH + h) * Tq + (t - t0)) * T;
                // pre-softmax scores, causal: only t2 <= t
                real maxval = -1e30f;
                for (int t2 = 0; t2 <= t; t2++) {
                    const real* k = qkv + ((size_t)b * T + t2) * 3 * C + C + h * hs;
                    real s = dot_lanes(q, k, hs) * scale;
                    att_bth[t2] = s;
                    if (s > maxval) maxval = s;
                }
                real sum = 0;
                for (int t2 = 0; t2 <= t; t2++) {
                    real e = exp_fast(att_bth[t2] - maxval);
                    att_bth[t2] = e;
                    sum += e;
                }
                real inv = 1 / sum;
                for (int t2 = 0; t2 < T; t2++) { att_bth[t2] = t2 <= t ? att_bth[t2] * inv : 0; }
                // out = att @ v
                real* out_bth = out + ((size_t)b * Tq + (t - t0)) * C + h * hs;
                for (int i = 0; i < hs; i++) { out_bth[i] = 0; }
                for (int t2 = 0; t2 <= t; t2++) {
                    const real* v = qkv + ((size_t)b * T + t2) * 3 * C + 2 * C + h * hs;
                    real a = att_bth[t2];
                    for (int i = 0; i < hs; i++) { out_bth[i] += a * v[i]; }
                }
            }
        }
    }
}

// dout (B,T,C) -> dqkv (B,T,3C) +=; datt (B,NH,T,T) is scratch
template <typename real>
void attention_backward(real* dqkv, real* datt, const real* dout, const real* qkv, const real* att,
                        int B, int T, int C, int NH) {
    int hs = C / NH;
    real scale = 1 / std::sqrt((real)hs);
    // parallel over (b, h): everything a head touches (q, k, v of head h in sequence b) is its own
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            for (int t = 0; t < T; t++) {
                const real* att_bth = att + (((size_t)b * NH + h) * T + t) * T;
                real* datt_bth = datt + (((size_t)b * NH + h) * T + t) * T;
                const real* dout_bth = dout + ((size_t)b * T + t) * C + h * hs;
                // forward was: out = sum_t2 att[t2] * v[t2]; so datt[t2] = dout . v[t2], dv[t2] += att[t2] * dout
                for (int t2 = 0; t2 <= t; t2++) {
                    const real* v = qkv + ((size_t)b * T + t2) * 3 * C + 2 * C + h * hs;
                    real* dv = dqkv + ((size_t)b * T + t2) * 3 * C + 2 * C + h * hs;
                    for (int i = 0; i < hs; i++) { dv[i] += att_bth[t2] * dout_bth[i]; }
                    datt_bth[t2] = dot_lanes(dout_bth, v, hs);
                }
                // forward was: att = softmax(s); so ds[t2] = att[t2] * (datt[t2] - sum_j att[j] datt[j])
                real dot = 0;
                for (int t2 = 0; t2 <= t; t2++) { dot += att_bth[t2] * datt_bth[t2]; }
                // forward was: s[t2] = scale * q . k[t2]; so dq += scale ds[t2] k[t2], dk[t2] += scale ds[t2] q
                const real* q = qkv + ((size_t)b * T + t) * 3 * C + h * hs;
                real* dq = dqkv + ((size_t)b * T + t) * 3 * C + h * hs;
                for (int t2 = 0; t2 <= t; t2++) {
                    real ds = att_bth[t2] * (datt_bth[t2] - dot) * scale;
                    const real* k = qkv + ((size_t)b * T + t2) * 3 * C + C + h * hs;
                    real* dk = dqkv + ((size_t)b * T + t2) * 3 * C + C + h * hs;
                    for (int i = 0; i < hs; i++) {
                        dq[i] += ds * k[i];
                        dk[i] += ds * q[i];
                    }
                }
            }
        }
    }
}

#define GELU_SCALING_FACTOR 0.7978845608028654 // sqrt(2 / pi)
// tanh for GELU. In float, tanh(|u|) = (1 - e) / (1 + e) with e = exp(-2|u|), sign restored: libm's tanhf
// was ~4x slower than expf here and GELU is ~10% of a LoRA step; the absolute error stays below 2e-7
// (GELU needs absolute, not relative, accuracy: out = 0.5 x (1 + tanh)), and large |u| gives exactly +-1.
// Double (the finite-difference tests) keeps std::tanh.
static inline float gelu_tanh(float u) {
    float e = exp_fast(-2.0f * std::fabs(u));             // in (0, 1]: exp_fast's domain, no overflow
    return std::copysign((1.0f - e) / (1.0f + e), u);
}
static inline double gelu_tanh(double u) { return std::tanh(u); }

// inp (N) -> out (N) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GPT-2's tanh approximation
template <typename real>
void gelu_forward(real* out, const real* inp, size_t N) {
    #pragma omp parallel for
    for (size_t i = 0; i < N; i++) {
        real x = inp[i];
        real u = (real)GELU_SCALING_FACTOR * (x + (real)0.044715 * x * x * x);
        out[i] = (real)0.5 * x * (1 + gelu_tanh(u));
    }
}

// dout (N) -> dinp (N) +=
template <typename real>
void gelu_backward(real* dinp, const real* inp, const real* dout, size_t N) {
    #pragma omp parallel for
    for (size_t i = 0; i < N; i++) {
        real x = inp[i];
        real u = (real)GELU_SCALING_FACTOR * (x + (real)0.044715 * x * x * x);
        real th = gelu_tanh(u);
        real du = (real)GELU_SCALING_FACTOR * (1 + 3 * (real)0.044715 * x * x);
        real grad = (real)0.5 * (1 + th) + (real)0.5 * x * (1 - th * th) * du;
        dinp[i] += grad * dout[i];
    }
}

// inp1, inp2 (N) -> out (N) = inp1 + inp2. Its backward is the identity into both inputs, which the
// model gets for free by keeping one dresidual buffer for the whole residual stream (see gpt2_backward).
template <typename real>
void residual_forward(real* out, const real* inp1, const real* inp2, size_t N) {
    #pragma omp parallel for
    for (size_t i = 0; i < N; i++) { out[i] = inp1[i] + inp2[i]; }
}

// Fused softmax + cross-entropy. logits (B,T,Vp), targets (B,T) -> losses (B,T); lse (B,T) cached.
// No probabilities buffer: the backward recomputes softmax from logits and the cached log-sum-exp.
// Only the first V logits are real tokens; the padding Vp - V never enters the softmax.
template <typename real>
void crossentropy_forward(real* losses, real* lse, const real* logits, const int* targets,
                          int B, int T, int V, int Vp) {
    #pragma omp parallel for
    for (int bt = 0; bt < B * T; bt++) {
        const real* logits_bt = logits + (size_t)bt * Vp;
        real maxval = -1e30f;
        for (int v = 0; v < V; v++) { if (logits_bt[v] > maxval) maxval = logits_bt[v]; }
        lse[bt] = maxval + std::log(sum_exp_lanes(logits_bt, V, maxval));
        losses[bt] = lse[bt] - logits_bt[targets[bt]];
    }
}

// dlosses = dloss for every position -> dlogits (B,T,Vp), written IN PLACE over logits (which die here)
template <typename real>
void crossentropy_backward(real* logits_dlogits, const real* lse, const int* targets, real dloss,
                           int B, int T, int V, int Vp) {
    // forward was: loss = lse - logits[target]; so dlogits[v] = (softmax[v] - [v == target]) * dloss
    #pragma omp parallel for
    for (int bt = 0; bt < B * T; bt++) {
        real* row = logits_dlogits + (size_t)bt * Vp;
        for (int v = 0; v < V; v++) { row[v] = exp_fast(row[v] - lse[bt]) * dloss; }
        row[targets[bt]] -= dloss;
        for (int v = V; v < Vp; v++) { row[v] = 0; }
    }
}

// AdamW as llm.c does it, t = step + 1 (bias correction):
// p -= lr * (mhat / (sqrt(vhat) + eps) + weight_decay * p)
template <typename real>
void adamw_update(real* params, const real* grads, real* m, real* v, size_t n, float lr, float beta1,
                  float beta2, float eps, float weight_decay, int t) {
    real bc1 = 1 - (real)std::pow((double)beta1, t), bc2 = 1 - (real)std::pow((double)beta2, t);
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) {
        real g = grads[i];
        real mi = (real)beta1 * m[i] + (1 - (real)beta1) * g;
        real vi = (real)beta2 * v[i] + (1 - (real)beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        real mhat = mi / bc1, vhat = vi / bc2;
        params[i] -= (real)lr * (mhat / (std::sqrt(vhat) + (real)eps) + (real)weight_decay * params[i]);
    }
}

// ----------------------------------------------------------------------------
// ---- other adaptation methods ----
// The methods LoRA is compared with: Houlsby adapters, prefix tuning, freezing all but the top blocks
// (gpt2_enable_top_training) and L2-SP regularized fine-tuning (l2sp_*). Full fine-tuning is the core's.
// Two more letters: m = adapter bottleneck width, P = prefix positions per layer.

// one flat buffer of trainable parameters with its gradient and AdamW moments, all the same layout
template <typename real>
struct TrainableBuffer {
    real* params;
    real* grads;
    real* m;
    real* v;
    size_t n;
};

template <typename real>
void trainable_alloc(TrainableBuffer<real>* tb, size_t n, const char* what) {
    tb->n = n;
    tb->params = calloc_real<real>(n, what);
    tb->grads = calloc_real<real>(n, what);
    tb->m = calloc_real<real>(n, what);
    tb->v = calloc_real<real>(n, what);
}

template <typename real>
void trainable_free(TrainableBuffer<real>* tb) {
    free(tb->params);
    free(tb->grads);
    free(tb->m);
    free(tb->v);
    memset(tb, 0, sizeof(*tb));
}

// the gradient of a parameter pointer p inside tb (same offset in the gradient buffer)
template <typename real>
static inline real* grad_of(TrainableBuffer<real>* tb, const real* p) { return tb->grads + (p - tb->params); }

// inp (BT,C), down_w (m,C), down_b (m), up_w (C,m), up_b (C) -> h, hg (BT,m) cached;
// out (BT,C) = inp + gelu(inp @ down_w^T + down_b) @ up_w^T + up_b. out must not alias inp.
template <typename real>
void adapter_forward(real* out, real* h, real* hg, const real* inp, const real* down_w, const real* down_b,
                     const real* up_w, const real* up_b, int BT, int C, int m) {
    matmul_forward(h, inp, down_w, down_b, 1, BT, C, m);     // h = down(inp)
    gelu_forward(hg, h, (size_t)BT * m);                      // hg = gelu(h)
    matmul_forward(out, hg, up_w, up_b, 1, BT, m, C);        // out = up(hg)
    residual_forward(out, out, inp, (size_t)BT * C);         // out += inp, the adapter's own skip
}

// dout (BT,C) -> dinp (BT,C) +=, ddown_w (m,C) +=, ddown_b (m) +=, dup_w (C,m) +=, dup_b (C) +=;
// dh, dhg (BT,m) are scratch (overwritten). dinp must not alias dout.
template <typename real>
void adapter_backward(real* dinp, real* ddown_w, real* ddown_b, real* dup_w, real* dup_b, real* dh, real* dhg,
                      const real* dout, const real* h, const real* hg, const real* inp, const real* down_w,
                      const real* up_w, int BT, int C, int m) {
    // forward was: out = inp + up(gelu(down(inp))); so dinp = dout + down_w^T (gelu'(h) * (up_w^T dout)) per row
    memset(dh, 0, (size_t)BT * m * sizeof(real));
    memset(dhg, 0, (size_t)BT * m * sizeof(real));
    matmul_backward(dhg, dup_w, dup_b, dout, hg, up_w, 1, BT, m, C);
    gelu_backward(dh, h, dhg, (size_t)BT * m);
    matmul_backward(dinp, ddown_w, ddown_b, dh, inp, down_w, 1, BT, C, m);
    #pragma omp parallel for
    for (size_t i = 0; i < (size_t)BT * C; i++) { dinp[i] += dout[i]; } // the skip
}

// Houlsby adapters: one bottleneck after the attention projection (pos 0) and one after the MLP projection
// (pos 1) of every block, before the residual add. Adapter a = 2 * l + pos.
template <typename real>
struct Adapters {
    int m;                       // bottleneck width; 0 = no adapters
    int L, C;
    real* down_w;                // (L, 2, m, C)
    real* down_b;                // (L, 2, m)
    real* up_w;                  // (L, 2, C, m)
    real* up_b;                  // (L, 2, C)
    TrainableBuffer<real> buf;   // down_w, down_b, up_w, up_b back to back
    // activations, for batches up to act_BT rows
    real* x;                     // (L, 2, BT, C) adapter inputs (the projection outputs)
    real* h;                     // (L, 2, BT, m) bottleneck before GELU
    real* hg;                    // (L, 2, BT, m) bottleneck after GELU
    real* dx;                    // (BT, C) backward scratch: the gradient at the adapter input
    real* dh;                    // (BT, m) backward scratch
    real* dhg;                   // (BT, m) backward scratch
    size_t act_BT;
};

static inline size_t adapters_count_parameters(int L, int C, int m) { return (size_t)L * 2 * (2 * (size_t)m * C + m + C); }

// down_w ~ U(-1/sqrt(C), 1/sqrt(C)), up = 0: every adapter starts as the identity, so the model starts at the base
template <typename real>
void adapters_init(Adapters<real>* ad, int L, int C, int m, uint64_t seed) {
    memset(ad, 0, sizeof(*ad));
    ad->m = m;
    ad->L = L;
    ad->C = C;
    trainable_alloc(&ad->buf, adapters_count_parameters(L, C, m), "adapters");
    ad->down_w = ad->buf.params;
    ad->down_b = ad->down_w + (size_t)L * 2 * m * C;
    ad->up_w = ad->down_b + (size_t)L * 2 * m;
    ad->up_b = ad->up_w + (size_t)L * 2 * C * m;
    Rng rng;
    rng_seed(&rng, seed);
    float bound = 1.0f / sqrtf((float)C);
    for (size_t i = 0; i < (size_t)L * 2 * m * C; i++) { ad->down_w[i] = (real)rng_uniform(&rng, -bound, bound); }
}

template <typename real>
void adapters_allocate_activations(Adapters<real>* ad, size_t BT) {
    size_t La = (size_t)ad->L * 2;
    free(ad->x); free(ad->h); free(ad->hg); free(ad->dx); free(ad->dh); free(ad->dhg);
    ad->x = calloc_real<real>(La * BT * ad->C, "adapter inputs");
    ad->h = calloc_real<real>(La * BT * ad->m, "adapter bottleneck");
    ad->hg = calloc_real<real>(La * BT * ad->m, "adapter bottleneck");
    ad->dx = calloc_real<real>(BT * ad->C, "adapter scratch");
    ad->dh = calloc_real<real>(BT * ad->m, "adapter scratch");
    ad->dhg = calloc_real<real>(BT * ad->m, "adapter scratch");
    ad->act_BT = BT;
}

template <typename real>
size_t adapters_activation_bytes(const Adapters<real>* ad) {
    if (ad->m == 0) return 0;
    size_t BT = ad->act_BT, La = (size_t)ad->L * 2;
    return (La * BT * ((size_t)ad->C + 2 * ad->m) + BT * ((size_t)ad->C + 2 * ad->m)) * sizeof(real);
}

template <typename real>
void adapters_free(Adapters<real>* ad) {
    trainable_free(&ad->buf);
    free(ad->x); free(ad->h); free(ad->hg); free(ad->dx); free(ad->dh); free(ad->dhg);
    memset(ad, 0, sizeof(*ad));
}

// the adapter at (block l, position pos): proj (BT,C) becomes proj + up(gelu(down(proj))), in place
template <typename real>
void gpt2_adapter_forward(Adapters<real>* ad, int pos, int l, real* proj, int BT) {
    if (ad->m == 0) return;
    int C = ad->C, m = ad->m;
    size_t a = 2 * (size_t)l + pos;
    real* x = ad->x + a * BT * C;
    memcpy(x, proj, (size_t)BT * C * sizeof(real)); // cached: the backward needs the adapter input
    adapter_forward(proj, ad->h + a * BT * m, ad->hg + a * BT * m, x, ad->down_w + a * m * C, ad->down_b + a * m,
                    ad->up_w + a * C * m, ad->up_b + a * C, BT, C, m);
}

// dout (BT,C) at the adapter output -> the gradient at its input: dout itself when there are no adapters
template <typename real>
real* gpt2_adapter_backward(Adapters<real>* ad, int pos, int l, real* dout, int BT) {
    if (ad->m == 0) return dout;
    int C = ad->C, m = ad->m;
    size_t a = 2 * (size_t)l + pos;
    real* down_w = ad->down_w + a * m * C;
    real* down_b = ad->down_b + a * m;
    real* up_w = ad->up_w + a * C * m;
    real* up_b = ad->up_b + a * C;
    memset(ad->dx, 0, (size_t)BT * C * sizeof(real));
    adapter_backward(ad->dx, grad_of(&ad->buf, down_w), grad_of(&ad->buf, down_b), grad_of(&ad->buf, up_w),
                     grad_of(&ad->buf, up_b), ad->dh, ad->dhg, dout, ad->h + a * BT * m, ad->hg + a * BT * m,
                     ad->x + a * BT * C, down_w, up_w, BT, C, m);
    return ad->dx;
}

// Attention with P trainable prefix positions in front of the sequence (prefix tuning).
// qkv (B,T,3C), prefix_k, prefix_v (P,C) -> out (B,T,C); att (B,NH,T,P+T) post-softmax weights cached.
// Column j < P of a row is prefix position j (visible to every query); column P + t2 is real position
// t2, visible to query t when t2 <= t (the causal mask among real tokens is unchanged).
template <typename real>
void attention_prefix_forward(real* out, real* att, const real* qkv, const real* prefix_k, const real* prefix_v,
                              int B, int T, int C, int NH, int P, int t0 = 0) {
    int hs = C / NH, TP = P + T, Tq = T - t0; // queries t0..T-1, as in attention_forward
    real scale = 1 / std::sqrt((real)hs);
    // parallel over (b, t, h): each thread owns one row att[b,h,t,:] and out[b,t,h*hs:(h+1)*hs]
    #pragma omp parallel for collapse(3)
    for (int b = 0; b < B; b++) {
        for (int t = t0; t < T; t++) {
            for (int h = 0; h < NH; h++) {
                const real* q = qkv + ((size_t)b * T + t) * 3 * C + h * hs;
                real* att_bth = att + (((size_t)b * NH + h) * Tq + (t - t0)) * TP;
                int n = P + t + 1; // visible columns
                real maxval = -1e30f;
                for (int j = 0; j < n; j++) {
                    const real* k = j < P ? prefix_k + (size_t)j * C + h * hs : qkv + ((size_t)b * T + j - P) * 3 * C + C + h * hs;
                    real s = dot_lanes(q, k, hs) * scale;
                    att_bth[j] = s;
                    if (s > maxval) maxval = s;
                }
                real sum = 0;
                for (int j = 0; j < n; j++) {
                    real e = exp_fast(att_bth[j] - maxval);
                    att_bth[j] = e;
                    sum += e;
                }
                real inv = 1 / sum;
                for (int j = 0; j < TP; j++) { att_bth[j] = j < n ? att_bth[j] * inv : 0; }
                real* out_bth = out + ((size_t)b * Tq + (t - t0)) * C + h * hs;
                for (int i = 0; i < hs; i++) { out_bth[i] = 0; }
                for (int j = 0; j < n; j++) {
                    const real* v = j < P ? prefix_v + (size_t)j * C + h * hs : qkv + ((size_t)b * T + j - P) * 3 * C + 2 * C + h * hs;
                    real a = att_bth[j];
                    for (int i = 0; i < hs; i++) { out_bth[i] += a * v[i]; }
                }
            }
        }
    }
}

// dout (B,T,C) -> dqkv (B,T,3C) +=, dprefix_k, dprefix_v (P,C) +=; datt (B,NH,T,P+T) is scratch
template <typename real>
void attention_prefix_backward(real* dqkv, real* dprefix_k, real* dprefix_v, real* datt, const real* dout,
                               const real* qkv, const real* prefix_k, const real* prefix_v, const real* att,
                               int B, int T, int C, int NH, int P) {
    int hs = C / NH, TP = P + T;
    real scale = 1 / std::sqrt((real)hs);
    // parallel over heads only: the prefix of head h is shared by every sequence b, and each thread owns
    // head h's channels of dqkv and of dprefix_k / dprefix_v, so no atomics are needed
    #pragma omp parallel for
    for (int h = 0; h < NH; h++) {
        for (int b = 0; b < B; b++) {
            for (int t = 0; t < T; t++) {
                const real* att_bth = att + (((size_t)b * NH + h) * T + t) * TP;
                real* datt_bth = datt + (((size_t)b * NH + h) * T + t) * TP;
                const real* dout_bth = dout + ((size_t)b * T + t) * C + h * hs;
                int n = P + t + 1;
                // forward was: out = sum_j att[j] v[j]; so datt[j] = dout . v[j], dv[j] += att[j] dout
                for (int j = 0; j < n; j++) {
                    size_t voff = j < P ? (size_t)j * C + h * hs : ((size_t)b * T + j - P) * 3 * C + 2 * C + h * hs;
                    const real* v = (j < P ? prefix_v : qkv) + voff;
                    real* dv = (j < P ? dprefix_v : dqkv) + voff;
                    for (int i = 0; i < hs; i++) { dv[i] += att_bth[j] * dout_bth[i]; }
                    datt_bth[j] = dot_lanes(dout_bth, v, hs);
                }
                // forward was: att = softmax(s); so ds[j] = att[j] (datt[j] - sum_i att[i] datt[i])
                real dot = 0;
                for (int j = 0; j < n; j++) { dot += att_bth[j] * datt_bth[j]; }
                // forward was: s[j] = scale q . k[j]; so dq += scale ds[j] k[j], dk[j] += scale ds[j] q
                const real* q = qkv + ((size_t)b * T + t) * 3 * C + h * hs;
                real* dq = dqkv + ((size_t)b * T + t) * 3 * C + h * hs;
                for (int j = 0; j < n; j++) {
                    real ds = att_bth[j] * (datt_bth[j] - dot) * scale;
                    size_t koff = j < P ? (size_t)j * C + h * hs : ((size_t)b * T + j - P) * 3 * C + C + h * hs;
                    const real* k = (j < P ? prefix_k : qkv) + koff;
                    real* dk = (j < P ? dprefix_k : dqkv) + koff;
                    for (int i = 0; i < hs; i++) {
                        dq[i] += ds * k[i];
                        dk[i] += ds * q[i];
                    }
                }
            }
        }
    }
}

// prefix tuning: P trainable key and value vectors per layer (each head sees its hs channels of them)
template <typename real>
struct Prefix {
    int P;                       // prefix positions per layer; 0 = no prefix
    int L, C, NH;
    real* keys;                  // (L, P, C)
    real* values;                // (L, P, C)
    TrainableBuffer<real> buf;   // keys then values
    real* att;                   // (L, B, NH, T, P + T) replaces the model's att when P > 0
    real* datt;                  // (B, NH, T, P + T) backward scratch
    size_t act_att;              // elements of att
};

// keys, values ~ N(0, 0.02^2): near zero, so each prefix position starts with a score near 0 and a value near 0
template <typename real>
void prefix_init(Prefix<real>* pf, int L, int C, int NH, int P, uint64_t seed) {
    memset(pf, 0, sizeof(*pf));
    pf->P = P;
    pf->L = L;
    pf->C = C;
    pf->NH = NH;
    trainable_alloc(&pf->buf, 2 * (size_t)L * P * C, "prefix");
    pf->keys = pf->buf.params;
    pf->values = pf->keys + (size_t)L * P * C;
    Rng rng;
    rng_seed(&rng, seed);
    for (size_t i = 0; i < pf->buf.n; i++) { pf->buf.params[i] = (real)(0.02f * rng_normal(&rng)); }
}

template <typename real>
void prefix_allocate_activations(Prefix<real>* pf, int B, int T) {
    free(pf->att);
    free(pf->datt);
    size_t row = (size_t)B * pf->NH * T * (pf->P + T);
    pf->act_att = (size_t)pf->L * row;
    pf->att = calloc_real<real>(pf->act_att, "prefix attention");
    pf->datt = calloc_real<real>(row, "prefix attention scratch");
}

template <typename real>
size_t prefix_activation_bytes(const Prefix<real>* pf) {
    return pf->P == 0 ? 0 : (pf->act_att + pf->act_att / pf->L) * sizeof(real);
}

template <typename real>
void prefix_free(Prefix<real>* pf) {
    trainable_free(&pf->buf);
    free(pf->att);
    free(pf->datt);
    memset(pf, 0, sizeof(*pf));
}

template <typename real>
void gpt2_prefix_attention_forward(Prefix<real>* pf, int l, real* out, const real* qkv, int B, int T, int t0 = 0) {
    int C = pf->C, P = pf->P;
    // layer l's weights at (L, B, NH, T - t0, P + T): within the (L, B, NH, T, P + T) allocated for training
    attention_prefix_forward(out, pf->att + (size_t)l * B * pf->NH * (T - t0) * (P + T), qkv, pf->keys + (size_t)l * P * C,
                             pf->values + (size_t)l * P * C, B, T, C, pf->NH, P, t0);
}

template <typename real>
void gpt2_prefix_attention_backward(Prefix<real>* pf, int l, real* dqkv, const real* dout, const real* qkv, int B, int T) {
    int C = pf->C, P = pf->P;
    real* keys = pf->keys + (size_t)l * P * C;
    real* values = pf->values + (size_t)l * P * C;
    attention_prefix_backward(dqkv, grad_of(&pf->buf, keys), grad_of(&pf->buf, values), pf->datt, dout, qkv, keys, values,
                              pf->att + (size_t)l * B * pf->NH * T * (P + T), B, T, C, pf->NH, P);
}

// L2-SP: the penalty lambda/2 ||W - W0||^2 pulls the fine-tuned weights W toward the pretrained W0.
// params, params0 (n) -> returns lambda/2 * sum (params - params0)^2
template <typename real>
double l2sp_forward(const real* params, const real* params0, size_t n, float lambda) {
    double sum = 0;
    #pragma omp parallel for reduction(+ : sum)
    for (size_t i = 0; i < n; i++) { double d = (double)params[i] - (double)params0[i]; sum += d * d; }
    return 0.5 * lambda * sum;
}

// grads (n) += lambda * (params - params0), the derivative of the penalty above
template <typename real>
void l2sp_backward(real* grads, const real* params, const real* params0, size_t n, float lambda) {
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) { grads[i] += (real)lambda * (params[i] - params0[i]); }
}

// ----------------------------------------------------------------------------
// the model

struct GPT2Config {
    int max_seq_len;       // maxT, e.g. 1024
    int vocab_size;        // V, e.g. 50257
    int padded_vocab_size; // Vp, e.g. 50304 (multiple of 128)
    int num_layers;        // L, e.g. 12
    int num_heads;         // NH, e.g. 12
    int channels;          // C, e.g. 768
};

#define NUM_PARAMETER_TENSORS 16
template <typename real>
struct ParameterTensors {
    real* wte;      // (Vp, C) token embedding, also the LM head
    real* wpe;      // (maxT, C)
    real* ln1w;     // (L, C)
    real* ln1b;     // (L, C)
    real* qkvw;     // (L, 3C, C)
    real* qkvb;     // (L, 3C)
    real* attprojw; // (L, C, C)
    real* attprojb; // (L, C)
    real* ln2w;     // (L, C)
    real* ln2b;     // (L, C)
    real* fcw;      // (L, 4C, C)
    real* fcb;      // (L, 4C)
    real* fcprojw;  // (L, C, 4C)
    real* fcprojb;  // (L, C)
    real* lnfw;     // (C)
    real* lnfb;     // (C)
};
static const char* const param_tensor_names[NUM_PARAMETER_TENSORS] = {
    "wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
    "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb"};

static void fill_in_parameter_sizes(size_t* sizes, GPT2Config cfg) {
    size_t Vp = cfg.padded_vocab_size, C = cfg.channels, maxT = cfg.max_seq_len, L = cfg.num_layers;
    sizes[0] = Vp * C;          // wte
    sizes[1] = maxT * C;        // wpe
    sizes[2] = L * C;           // ln1w
    sizes[3] = L * C;           // ln1b
    sizes[4] = L * (3 * C) * C; // qkvw
    sizes[5] = L * (3 * C);     // qkvb
    sizes[6] = L * C * C;       // attprojw
    sizes[7] = L * C;           // attprojb
    sizes[8] = L * C;           // ln2w
    sizes[9] = L * C;           // ln2b
    sizes[10] = L * (4 * C) * C; // fcw
    sizes[11] = L * (4 * C);    // fcb
    sizes[12] = L * C * (4 * C); // fcprojw
    sizes[13] = L * C;          // fcprojb
    sizes[14] = C;              // lnfw
    sizes[15] = C;              // lnfb
}

// points the 16 tensors into one flat buffer, in checkpoint order
template <typename real>
void point_parameters(ParameterTensors<real>* p, const size_t* sizes, real* memory) {
    real** ptrs[NUM_PARAMETER_TENSORS] = {
        &p->wte, &p->wpe, &p->ln1w, &p->ln1b, &p->qkvw, &p->qkvb, &p->attprojw, &p->attprojb,
        &p->ln2w, &p->ln2b, &p->fcw, &p->fcb, &p->fcprojw, &p->fcprojb, &p->lnfw, &p->lnfb};
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        *(ptrs[i]) = memory;
        memory += sizes[i];
    }
}

// the pointer p + offset, or NULL when p is NULL (a frozen tensor has no gradient)
template <typename real> static inline real* at(real* p, size_t offset) { return p ? p + offset : NULL; }

// One block's slice of the 12 per-layer tensors: layer l of params (or of gradients, where a NULL
// tensor, frozen, gives NULL slices). The forward takes the four block matrices from gpt2_base_weight
// instead, which also covers a quantized base (-Q), whose fp32 qkvw ... fcprojw are not in memory.
template <typename real>
struct LayerParams {
    real *ln1w, *ln1b, *qkvw, *qkvb, *attprojw, *attprojb, *ln2w, *ln2b, *fcw, *fcb, *fcprojw, *fcprojb;
};

template <typename real>
LayerParams<real> layer_params(const ParameterTensors<real>& p, int l, size_t C) {
    LayerParams<real> lp;
    lp.ln1w = at(p.ln1w, l * C);
    lp.ln1b = at(p.ln1b, l * C);
    lp.qkvw = at(p.qkvw, l * 3 * C * C);
    lp.qkvb = at(p.qkvb, l * 3 * C);
    lp.attprojw = at(p.attprojw, l * C * C);
    lp.attprojb = at(p.attprojb, l * C);
    lp.ln2w = at(p.ln2w, l * C);
    lp.ln2b = at(p.ln2b, l * C);
    lp.fcw = at(p.fcw, l * 4 * C * C);
    lp.fcb = at(p.fcb, l * 4 * C);
    lp.fcprojw = at(p.fcprojw, l * C * 4 * C);
    lp.fcprojb = at(p.fcprojb, l * C);
    return lp;
}

#define NUM_ACTIVATION_TENSORS 19
template <typename real>
struct ActivationTensors {
    real* encoded;   // (B, T, C)
    real* ln1;       // (L, B, T, C)
    real* ln1_mean;  // (L, B, T)
    real* ln1_rstd;  // (L, B, T)
    real* qkv;       // (L, B, T, 3C)
    real* atty;      // (L, B, T, C)
    real* att;       // (L, B, NH, T, T) post-softmax
    real* residual2; // (L, B, T, C)
    real* ln2;       // (L, B, T, C)
    real* ln2_mean;  // (L, B, T)
    real* ln2_rstd;  // (L, B, T)
    real* fch;       // (L, B, T, 4C)
    real* fch_gelu;  // (L, B, T, 4C)
    real* residual3; // (L, B, T, C)
    real* lnf;       // (B, T, C)
    real* lnf_mean;  // (B, T)
    real* lnf_rstd;  // (B, T)
    real* logits;    // (B, T, Vp); the backward overwrites it with dlogits
    real* proj;      // (B, T, C) output of attproj / fcproj before the residual add; not needed backward
};

static void fill_in_activation_sizes(size_t* sizes, GPT2Config cfg, size_t B, size_t T) {
    size_t C = cfg.channels, NH = cfg.num_heads, L = cfg.num_layers, Vp = cfg.padded_vocab_size;
    size_t s[NUM_ACTIVATION_TENSORS] = {
        B * T * C, L * B * T * C, L * B * T, L * B * T, L * B * T * 3 * C, L * B * T * C, L * B * NH * T * T,
        L * B * T * C, L * B * T * C, L * B * T, L * B * T, L * B * T * 4 * C, L * B * T * 4 * C,
        L * B * T * C, B * T * C, B * T, B * T, B * T * Vp, B * T * C};
    memcpy(sizes, s, sizeof(s));
}

// One block's slice of the activations: what gpt2_forward writes at layer l and gpt2_backward reads
// back. residual is the block's input: the embeddings at l = 0, else the previous block's residual3.
template <typename real>
struct LayerActivations {
    real *residual, *ln1, *ln1_mean, *ln1_rstd, *qkv, *atty, *att, *residual2, *ln2, *ln2_mean, *ln2_rstd,
         *fch, *fch_gelu, *residual3;
};

template <typename real>
LayerActivations<real> layer_activations(const ActivationTensors<real>& acts, int l, size_t B, size_t T, size_t C, size_t NH) {
    size_t BT = B * T;
    LayerActivations<real> la;
    la.residual = l == 0 ? acts.encoded : acts.residual3 + (l - 1) * BT * C;
    la.ln1 = acts.ln1 + l * BT * C;
    la.ln1_mean = acts.ln1_mean + l * BT;
    la.ln1_rstd = acts.ln1_rstd + l * BT;
    la.qkv = acts.qkv + l * BT * 3 * C;
    la.atty = acts.atty + l * BT * C;
    la.att = acts.att + l * B * NH * T * T;
    la.residual2 = acts.residual2 + l * BT * C;
    la.ln2 = acts.ln2 + l * BT * C;
    la.ln2_mean = acts.ln2_mean + l * BT;
    la.ln2_rstd = acts.ln2_rstd + l * BT;
    la.fch = acts.fch + l * BT * 4 * C;
    la.fch_gelu = acts.fch_gelu + l * BT * 4 * C;
    la.residual3 = acts.residual3 + l * BT * C;
    return la;
}

// Gradients of the activations, one layer's worth: the backward walks the layers top to bottom and
// reuses these buffers for every layer. dresidual carries the gradient of the residual stream.
#define NUM_BACKWARD_TENSORS 7
template <typename real>
struct BackwardTensors {
    real* dresidual; // (B, T, C)
    real* dln;       // (B, T, C) gradient at a layernorm output: lnf, ln2, ln1 in turn
    real* datty;     // (B, T, C)
    real* dqkv;      // (B, T, 3C)
    real* datt;      // (B, NH, T, T) scratch of attention_backward
    real* dfch;      // (B, T, 4C)
    real* dfch_gelu; // (B, T, 4C)
};

template <typename real>
struct GPT2 {
    GPT2Config config;
    ParameterTensors<real> params;
    size_t param_sizes[NUM_PARAMETER_TENSORS];
    real* params_memory;
    size_t num_parameters;
    size_t num_params_stored; // floats held in params_memory: num_parameters, less qkvw, attprojw, fcw, fcprojw
                              // when the checkpoint was read for a quantized base (-Q): those four pointers are then NULL
    char* block_file;         // the checkpoint whose block matrices were left on disk for gpt2_lora_attach to
                              // quantize (gpt2_read_checkpoint with leave_block_matrices); NULL otherwise
    // full fine-tuning (-f) only: gradients and AdamW state of every base parameter; NULL otherwise
    bool train_base;
    ParameterTensors<real> grads;
    real* grads_memory;
    real* m_memory;
    real* v_memory;
    // LoRA adapters; lora.num_parameters == 0 when none are attached
    LoRA<real> lora;
    // the other adaptation methods (see "other adaptation methods"); all zero / NULL unless chosen
    int first_trained_layer;   // -F: blocks below it get no gradient work at all; 0 otherwise
    size_t num_top_trainable;  // -F: elements of top_grads (the trained tails of the tensors)
    size_t top_offsets[NUM_PARAMETER_TENSORS]; // -F: where each tensor's trained tail starts
    real* top_grads;           // -F: gradients, then AdamW m and v, of just those tails
    real* top_m;
    real* top_v;
    Adapters<real> adapters;   // -H: adapters.m == 0 when none
    Prefix<real> prefix;       // -X: prefix.P == 0 when none
    real* params0;             // -f 1 -w: a copy of the pretrained weights W0; NULL otherwise
    float l2sp_lambda;
    real reg_loss;             // -f 1 -w: lambda/2 ||W - W0||^2 at the last forward with targets
    // activations, allocated once for (B, T) by gpt2_allocate; smaller batches reuse the same memory
    ActivationTensors<real> acts;
    size_t act_sizes[NUM_ACTIVATION_TENSORS];
    real* acts_memory;
    size_t num_activations;
    BackwardTensors<real> dacts;
    real* dacts_memory;
    size_t num_dacts;
    real* losses;  // (B, T)
    real* lse;     // (B, T) log-sum-exp of each row of logits, for the fused cross-entropy backward
    int alloc_B, alloc_T;
    int batch_size, seq_len;
    int* inputs;   // (B, T)
    int* targets;  // (B, T)
    bool have_targets;
    real mean_loss;
    // generation with a key/value cache (gpt2_generate): every layer's qkv rows of the positions seen so
    // far, (L, kv_cap, 3C) with kv_cap = alloc_T, so a new token costs one row of each matmul instead of
    // a forward over the whole context. kv_on: gpt2_forward appends to it (B = 1, no targets).
    real* kv;
    int kv_cap, kv_len;
    bool kv_on;
};


// the tensors a quantized base (-Q) holds as codes instead of fp32: the four block matrices, and the
// LoRA target each one is
static inline bool param_tensor_is_block_matrix(int i) { return i == 4 || i == 6 || i == 10 || i == 12; }
static inline int block_matrix_target(int i) { return i == 4 ? LORA_QKV : i == 6 ? LORA_ATTPROJ : i == 10 ? LORA_FC : LORA_FCPROJ; }

// the 16 tensors' pointers, in checkpoint order
template <typename real>
static void parameter_pointers(ParameterTensors<real>* p, real** ptrs[NUM_PARAMETER_TENSORS]) {
    real** all[NUM_PARAMETER_TENSORS] = {&p->wte, &p->wpe, &p->ln1w, &p->ln1b, &p->qkvw, &p->qkvb, &p->attprojw, &p->attprojb,
                                         &p->ln2w, &p->ln2b, &p->fcw, &p->fcb, &p->fcprojw, &p->fcprojb, &p->lnfw, &p->lnfb};
    memcpy(ptrs, all, sizeof(all));
}

// points the tensors into params_memory back to back in checkpoint order; without_block_matrices (a
// quantized base) leaves qkvw, attprojw, fcw, fcprojw out and NULL. Returns the floats pointed into.
template <typename real>
size_t point_stored_parameters(GPT2<real>* model, bool without_block_matrices) {
    real** ptrs[NUM_PARAMETER_TENSORS];
    parameter_pointers(&model->params, ptrs);
    size_t off = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        bool left_out = without_block_matrices && param_tensor_is_block_matrix(i);
        *ptrs[i] = left_out ? NULL : model->params_memory + off;
        off += left_out ? 0 : model->param_sizes[i];
    }
    return off;
}

// an all-zero model; without_block_matrices: with no memory for the four block matrices (pointers NULL)
template <typename real>
void gpt2_init_empty(GPT2<real>* model, GPT2Config cfg, bool without_block_matrices = false) {
    memset(model, 0, sizeof(*model));
    model->config = cfg;
    fill_in_parameter_sizes(model->param_sizes, cfg);
    model->num_parameters = 0;
    model->num_params_stored = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        model->num_parameters += model->param_sizes[i];
        if (!(without_block_matrices && param_tensor_is_block_matrix(i))) model->num_params_stored += model->param_sizes[i];
    }
    model->params_memory = calloc_real<real>(model->num_params_stored, "parameters");
    point_stored_parameters(model, without_block_matrices);
}

// a model with GPT-2-style random init (for tests and benchmarks): N(0, 0.02) matrices, projections
// into the residual scaled by 1/sqrt(2L), layernorm weights 1, biases 0, padded wte rows 0
template <typename real>
void gpt2_build_random(GPT2<real>* model, GPT2Config cfg, uint64_t seed) {
    gpt2_init_empty(model, cfg);
    Rng rng;
    rng_seed(&rng, seed);
    ParameterTensors<real>* p = &model->params;
    real* normal[] = {p->wte, p->wpe, p->qkvw, p->attprojw, p->fcw, p->fcprojw};
    size_t sizes[] = {(size_t)cfg.vocab_size * cfg.channels, model->param_sizes[1], model->param_sizes[4],
                      model->param_sizes[6], model->param_sizes[10], model->param_sizes[12]};
    float stds[] = {0.02f, 0.02f, 0.02f, 0.02f / sqrtf(2.0f * cfg.num_layers), 0.02f, 0.02f / sqrtf(2.0f * cfg.num_layers)};
    for (int k = 0; k < 6; k++) {
        for (size_t i = 0; i < sizes[k]; i++) { normal[k][i] = (real)(stds[k] * rng_normal(&rng)); }
    }
    real* ones[] = {p->ln1w, p->ln2w, p->lnfw};
    size_t ones_n[] = {model->param_sizes[2], model->param_sizes[8], model->param_sizes[14]};
    for (int k = 0; k < 3; k++) {
        for (size_t i = 0; i < ones_n[k]; i++) { ones[k][i] = 1; }
    }
}

// -Q with the block matrices left on disk: each layer of each is read from the checkpoint into one
// (4C, C) scratch and handed to lora_attach_layer (PiSSA, then quantize), so at most one fp32 layer of
// them is ever in memory. The file was validated when the model was read from it.
template <typename real>
void gpt2_attach_layers_from_file(GPT2<real>* model) {
    const char* path = model->block_file;
    FILE* f = fopen(path, "rb");
    if (f == NULL) die(strprintf("checkpoint '%s' can no longer be opened to quantize its block matrices\n---> HINT: keep the -e file in place while the trainer starts", path));
    int L = model->config.num_layers, C = model->config.channels;
    std::vector<float> buf((size_t)4 * C * C);
    std::vector<real> W_l(buf.size());
    size_t offset = 256 * sizeof(int); // past the header
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        size_t n = model->param_sizes[i] / L; // one layer
        for (int l = 0; l < L && param_tensor_is_block_matrix(i); l++) {
            if (fseek(f, (long)(offset + (size_t)l * n * sizeof(float)), SEEK_SET) != 0 || fread(buf.data(), sizeof(float), n, f) != n) {
                die(strprintf("checkpoint '%s': read error in %s, layer %d\n---> HINT: the file changed since it was loaded; load it again", path, param_tensor_names[i], l));
            }
            for (size_t k = 0; k < n; k++) { W_l[k] = (real)buf[k]; }
            lora_attach_layer(&model->lora, block_matrix_target(i), l, W_l.data());
        }
        offset += model->param_sizes[i] * sizeof(float);
    }
    fclose(f);
}

// attaches LoRA adapters to a frozen base (see lora_init for the init convention). A quantized base
// (cfg.base_quant): the block matrices become codes. The trainer reads the checkpoint without them
// (gpt2_read_checkpoint's leave_block_matrices) and they are quantized here one layer at a time from the
// file, so their fp32 copy is never held, and every attach (another adapter, a reload) starts from the file.
// On a base built in memory (tests) the fp32 matrices stay allocated beside the codes, unread.
template <typename real>
void gpt2_lora_attach(GPT2<real>* model, LoRAConfig cfg, uint64_t seed) {
    if (model->block_file != NULL && cfg.base_quant == LORA_QUANT_FP32) {
        die("gpt2_lora_attach: the base was read for a quantized attach (block matrices left on disk), but this adapter wants an fp32 base\n"
            "---> HINT: give the same -Q the adapter was trained with, or -Q fp32 to read the base whole");
    }
    lora_init(&model->lora, cfg, model->config.num_layers, model->config.channels, seed);
    ParameterTensors<real> p = model->params; // the variants (DoRA, PiSSA, a quantized base) need the base weights
    real* const W[LORA_NUM_TARGETS] = {p.qkvw, p.attprojw, p.fcw, p.fcprojw}, * const bias[LORA_NUM_TARGETS] = {p.qkvb, p.attprojb, p.fcb, p.fcprojb};
    if (model->block_file != NULL) {
        gpt2_attach_layers_from_file(model); // the fp32 block matrices were never in memory
        lora_attach_finish(&model->lora, W, bias);
    } else {
        lora_attach_base(&model->lora, W, bias);
    }
    if (model->alloc_B > 0) lora_allocate_activations(&model->lora, (size_t)model->alloc_B * model->alloc_T);
}

// every base parameter trainable: gradient buffers and AdamW state for all of them
template <typename real>
void gpt2_enable_full_training(GPT2<real>* model) {
    model->train_base = true;
    model->grads_memory = calloc_real<real>(model->num_parameters, "parameter gradients");
    model->m_memory = calloc_real<real>(model->num_parameters, "AdamW m");
    model->v_memory = calloc_real<real>(model->num_parameters, "AdamW v");
    point_parameters(&model->grads, model->param_sizes, model->grads_memory);
}

// -F: only the top k blocks and the final layernorm train. The blocks below and the embeddings
// (wte is also the LM head) get no gradient buffers, no AdamW state and no gradient work: the backward
// stops at block first_trained_layer. Each per-layer tensor is (L, ...), so its trained part is a tail.
template <typename real>
void gpt2_enable_top_training(GPT2<real>* model, int k) {
    int L = model->config.num_layers;
    model->first_trained_layer = L - k;
    real** dptrs[NUM_PARAMETER_TENSORS] = {
        &model->grads.wte, &model->grads.wpe, &model->grads.ln1w, &model->grads.ln1b, &model->grads.qkvw,
        &model->grads.qkvb, &model->grads.attprojw, &model->grads.attprojb, &model->grads.ln2w, &model->grads.ln2b,
        &model->grads.fcw, &model->grads.fcb, &model->grads.fcprojw, &model->grads.fcprojb, &model->grads.lnfw, &model->grads.lnfb};
    size_t n = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        size_t size = model->param_sizes[i];
        bool per_layer = i >= 2 && i <= 13;
        model->top_offsets[i] = i < 2 ? size : per_layer ? size / L * (size_t)(L - k) : 0;
        n += size - model->top_offsets[i];
    }
    model->num_top_trainable = n;
    model->top_grads = calloc_real<real>(n, "top-block gradients");
    model->top_m = calloc_real<real>(n, "AdamW m");
    model->top_v = calloc_real<real>(n, "AdamW v");
    size_t off = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        size_t len = model->param_sizes[i] - model->top_offsets[i];
        *dptrs[i] = len > 0 ? model->top_grads + off : NULL; // a block's gradient is at (l - first_trained_layer)
        off += len;
    }
}

// -H: Houlsby adapters of bottleneck m on a frozen base (see adapters_init for the init)
template <typename real>
void gpt2_adapters_attach(GPT2<real>* model, int m, uint64_t seed) {
    adapters_init(&model->adapters, model->config.num_layers, model->config.channels, m, seed);
    if (model->alloc_B > 0) adapters_allocate_activations(&model->adapters, (size_t)model->alloc_B * model->alloc_T);
}

// -X: P trainable key/value positions per layer on a frozen base
template <typename real>
void gpt2_prefix_attach(GPT2<real>* model, int P, uint64_t seed) {
    prefix_init(&model->prefix, model->config.num_layers, model->config.channels, model->config.num_heads, P, seed);
    if (model->alloc_B > 0) prefix_allocate_activations(&model->prefix, model->alloc_B, model->alloc_T);
}

// -f 1 -w: full fine-tuning plus lambda/2 ||W - W0||^2, with W0 the weights as they are now
template <typename real>
void gpt2_enable_l2sp(GPT2<real>* model, float lambda) {
    gpt2_enable_full_training(model);
    model->l2sp_lambda = lambda;
    model->params0 = calloc_real<real>(model->num_parameters, "pretrained weights W0");
    memcpy(model->params0, model->params_memory, model->num_parameters * sizeof(real));
}

// allocates activations (and their gradients) once, for batches up to (B, T)
template <typename real>
void gpt2_allocate(GPT2<real>* model, int B, int T) {
    GPT2Config cfg = model->config;
    fill_in_activation_sizes(model->act_sizes, cfg, B, T);
    model->num_activations = 0;
    for (int i = 0; i < NUM_ACTIVATION_TENSORS; i++) { model->num_activations += model->act_sizes[i]; }
    model->acts_memory = calloc_real<real>(model->num_activations, "activations");
    real** ptrs[NUM_ACTIVATION_TENSORS] = {
        &model->acts.encoded, &model->acts.ln1, &model->acts.ln1_mean, &model->acts.ln1_rstd, &model->acts.qkv,
        &model->acts.atty, &model->acts.att, &model->acts.residual2, &model->acts.ln2, &model->acts.ln2_mean,
        &model->acts.ln2_rstd, &model->acts.fch, &model->acts.fch_gelu, &model->acts.residual3, &model->acts.lnf,
        &model->acts.lnf_mean, &model->acts.lnf_rstd, &model->acts.logits, &model->acts.proj};
    real* mem = model->acts_memory;
    for (int i = 0; i < NUM_ACTIVATION_TENSORS; i++) { *(ptrs[i]) = mem; mem += model->act_sizes[i]; }

    size_t BT = (size_t)B * T, C = cfg.channels, NH = cfg.num_heads;
    size_t dsizes[NUM_BACKWARD_TENSORS] = {BT * C, BT * C, BT * C, BT * 3 * C, (size_t)B * NH * T * T, BT * 4 * C, BT * 4 * C};
    model->num_dacts = 0;
    for (int i = 0; i < NUM_BACKWARD_TENSORS; i++) { model->num_dacts += dsizes[i]; }
    model->dacts_memory = calloc_real<real>(model->num_dacts, "activation gradients");
    real** dptrs[NUM_BACKWARD_TENSORS] = {&model->dacts.dresidual, &model->dacts.dln, &model->dacts.datty,
        &model->dacts.dqkv, &model->dacts.datt, &model->dacts.dfch, &model->dacts.dfch_gelu};
    mem = model->dacts_memory;
    for (int i = 0; i < NUM_BACKWARD_TENSORS; i++) { *(dptrs[i]) = mem; mem += dsizes[i]; }

    model->losses = calloc_real<real>(BT, "losses");
    model->lse = calloc_real<real>(BT, "log-sum-exp");
    model->inputs = (int*)malloc_check(BT * sizeof(int), "inputs");
    model->targets = (int*)malloc_check(BT * sizeof(int), "targets");
    model->alloc_B = B;
    model->alloc_T = T;
    if (model->lora.num_parameters > 0) lora_allocate_activations(&model->lora, BT);
    if (model->adapters.m > 0) adapters_allocate_activations(&model->adapters, BT);
    if (model->prefix.P > 0) prefix_allocate_activations(&model->prefix, B, T);
}

// the weight of adapted matmul t (a LoRA target) at layer l: the fp32 tensor's layer, or with a quantized
// base (-Q: the fp32 pointer is NULL) the dequantized layer in lora's shared scratch, valid until the next
// matrix is fetched, so callers fetch it right at its matmul
template <typename real>
real* gpt2_base_weight(GPT2<real>* model, int t, int l) {
    ParameterTensors<real>& p = model->params;
    size_t C = model->config.channels;
    real* W = t == LORA_QKV ? p.qkvw : t == LORA_ATTPROJ ? p.attprojw : t == LORA_FC ? p.fcw : p.fcprojw;
    return lora_base_weight(&model->lora, t, l, at(W, (size_t)l * lora_target_out(t, (int)C) * lora_target_in(t, (int)C)));
}

// one adapted matmul's LoRA branch at layer l; nothing when that target carries no adapter
template <typename real>
void gpt2_lora_forward(LoRA<real>* lora, int target, int l, real* out, const real* inp, int BT) {
    if (lora_variant_forward(lora, target, l, out, inp, BT)) return; // DoRA, or several adapters in one batch
    if (lora->lora_A[target] == NULL) return;
    int r = lora->config.r, C = lora_target_in(target, lora->C), OC = lora_target_out(target, lora->C);
    lora_forward(out, lora->h[target] + (size_t)l * BT * r, inp, lora->lora_A[target] + (size_t)l * r * C,
                 lora->lora_B[target] + (size_t)l * OC * r, (real)lora->config.scale, BT, C, OC, r);
}

template <typename real>
void gpt2_lora_backward(LoRA<real>* lora, int target, int l, real* dinp, const real* dout, const real* inp, int BT) {
    if (lora->lora_A[target] == NULL) return;
    if (lora_variant_backward(lora, target, l, dinp, dout, inp, BT)) return; // DoRA
    int r = lora->config.r, C = lora_target_in(target, lora->C), OC = lora_target_out(target, lora->C);
    lora_backward(dinp, lora->dlora_A[target] + (size_t)l * r * C, lora->dlora_B[target] + (size_t)l * OC * r,
                  lora->dh, dout, lora->h[target] + (size_t)l * BT * r, inp, lora->lora_A[target] + (size_t)l * r * C,
                  lora->lora_B[target] + (size_t)l * OC * r, (real)lora->config.scale, BT, C, OC, r);
}

// inputs, targets (B, T) token ids; targets may be NULL (inference: no loss)
template <typename real>
void gpt2_forward(GPT2<real>* model, const int* inputs, const int* targets, int B, int T) {
    if (model->params.qkvw == NULL && model->lora.quant_q[0] == NULL) {
        die("gpt2_forward: the base's block matrices are still on disk (read for -Q); attach the adapters first (gpt2_lora_attach)");
    }
    if (model->acts_memory == NULL) gpt2_allocate(model, B, T);
    if (B > model->alloc_B || T > model->alloc_T || (size_t)B * T * T > (size_t)model->alloc_B * model->alloc_T * model->alloc_T) {
        die(strprintf("forward with B=%d T=%d exceeds the allocated B=%d T=%d", B, T, model->alloc_B, model->alloc_T));
    }
    int V = model->config.vocab_size, Vp = model->config.padded_vocab_size;
    int L = model->config.num_layers, NH = model->config.num_heads, C = model->config.channels;
    int BT = B * T;
    model->batch_size = B;
    model->seq_len = T;
    memcpy(model->inputs, inputs, (size_t)BT * sizeof(int));
    model->have_targets = targets != NULL;
    if (targets != NULL) memcpy(model->targets, targets, (size_t)BT * sizeof(int));

    // with the key/value cache on, these T tokens are positions pos0.. of one sequence
    int pos0 = model->kv_on ? model->kv_len : 0;
    if (model->kv_on && (B != 1 || targets != NULL || pos0 + T > model->kv_cap)) {
        die(strprintf("gpt2_forward with the key/value cache: B=%d, targets %s, positions %d..%d of %d", B, targets ? "given" : "none", pos0, pos0 + T - 1, model->kv_cap));
    }

    ParameterTensors<real> params = model->params;
    ActivationTensors<real> acts = model->acts;
    LoRA<real>* lora = &model->lora;
    encoder_forward(acts.encoded, inputs, params.wte, params.wpe + (size_t)pos0 * C, B, T, C);
    for (int l = 0; l < L; l++) {
        LayerParams<real> lp = layer_params(params, l, C);                 // this block's weights
        LayerActivations<real> la = layer_activations(acts, l, B, T, C, NH); // and activations
        real* proj = acts.proj;

        layernorm_forward(la.ln1, la.ln1_mean, la.ln1_rstd, la.residual, lp.ln1w, lp.ln1b, B, T, C);
        matmul_forward(la.qkv, la.ln1, gpt2_base_weight(model, LORA_QKV, l), lp.qkvb, B, T, C, 3 * C);
        gpt2_lora_forward(lora, LORA_QKV, l, la.qkv, la.ln1, BT);
        // with the cache: append the new rows, then attend from them over all cached positions
        const real* qkv_all = la.qkv;
        real* att = la.att;
        if (model->kv_on) {
            real* kv_l = model->kv + (size_t)l * model->kv_cap * 3 * C;
            memcpy(kv_l + (size_t)pos0 * 3 * C, la.qkv, (size_t)T * 3 * C * sizeof(real));
            qkv_all = kv_l;
            att = acts.att; // scratch: (NH, T, pos0 + T) fits in one layer's (NH, alloc_T, alloc_T); no backward
        }
        if (model->prefix.P > 0) gpt2_prefix_attention_forward(&model->prefix, l, la.atty, qkv_all, B, pos0 + T, pos0);
        else attention_forward(la.atty, att, qkv_all, B, pos0 + T, C, NH, pos0);
        matmul_forward(proj, la.atty, gpt2_base_weight(model, LORA_ATTPROJ, l), lp.attprojb, B, T, C, C);
        gpt2_lora_forward(lora, LORA_ATTPROJ, l, proj, la.atty, BT);
        gpt2_adapter_forward(&model->adapters, 0, l, proj, BT);
        residual_forward(la.residual2, la.residual, proj, (size_t)BT * C);
        layernorm_forward(la.ln2, la.ln2_mean, la.ln2_rstd, la.residual2, lp.ln2w, lp.ln2b, B, T, C);
        matmul_forward(la.fch, la.ln2, gpt2_base_weight(model, LORA_FC, l), lp.fcb, B, T, C, 4 * C);
        gpt2_lora_forward(lora, LORA_FC, l, la.fch, la.ln2, BT);
        gelu_forward(la.fch_gelu, la.fch, (size_t)BT * 4 * C);
        matmul_forward(proj, la.fch_gelu, gpt2_base_weight(model, LORA_FCPROJ, l), lp.fcprojb, B, T, 4 * C, C);
        gpt2_lora_forward(lora, LORA_FCPROJ, l, proj, la.fch_gelu, BT);
        gpt2_adapter_forward(&model->adapters, 1, l, proj, BT);
        residual_forward(la.residual3, la.residual2, proj, (size_t)BT * C);
    }
    real* residual = acts.residual3 + (size_t)(L - 1) * BT * C;
    layernorm_forward(acts.lnf, acts.lnf_mean, acts.lnf_rstd, residual, params.lnfw, params.lnfb, B, T, C);
    matmul_forward(acts.logits, acts.lnf, params.wte, (real*)NULL, B, T, C, Vp);

    if (targets != NULL) {
        crossentropy_forward(model->losses, model->lse, acts.logits, targets, B, T, V, Vp);
        double sum = 0;
        for (int i = 0; i < BT; i++) { sum += model->losses[i]; }
        model->mean_loss = (real)(sum / BT);
        // -f 1 -w: the penalty is reported beside the loss (mean_loss stays the cross-entropy)
        if (model->params0) model->reg_loss = (real)l2sp_forward(model->params_memory, model->params0, model->num_parameters, model->l2sp_lambda);
    }
    if (model->kv_on) model->kv_len += T;
}

template <typename real>
void gpt2_zero_grad(GPT2<real>* model) {
    if (model->grads_memory) memset(model->grads_memory, 0, model->num_parameters * sizeof(real));
    if (model->lora.num_parameters > 0) lora_zero_grad(&model->lora);
    if (model->top_grads) memset(model->top_grads, 0, model->num_top_trainable * sizeof(real));
    if (model->adapters.m > 0) memset(model->adapters.buf.grads, 0, model->adapters.buf.n * sizeof(real));
    if (model->prefix.P > 0) memset(model->prefix.buf.grads, 0, model->prefix.buf.n * sizeof(real));
}

// The exact reverse of gpt2_forward. Frozen weights get NULL gradients, so their matmuls only pass
// the activation gradient through. Requires a forward with targets just before; destroys the logits.
template <typename real>
void gpt2_backward(GPT2<real>* model) {
    if (!model->have_targets) die("gpt2_backward needs a forward pass with targets first");
    int B = model->batch_size, T = model->seq_len, BT = B * T;
    int V = model->config.vocab_size, Vp = model->config.padded_vocab_size;
    int L = model->config.num_layers, NH = model->config.num_heads, C = model->config.channels;
    ParameterTensors<real> params = model->params;
    ParameterTensors<real> grads = model->grads; // all NULL unless full fine-tuning (or -F: the top tails)
    int l0 = model->first_trained_layer;         // the lowest block with a gradient (0 unless -F)
    ActivationTensors<real> acts = model->acts;
    BackwardTensors<real> d = model->dacts;
    LoRA<real>* lora = &model->lora;

    // the loss is the mean over B*T positions
    real dloss = (real)1 / BT;
    memset(d.dresidual, 0, (size_t)BT * C * sizeof(real));
    memset(d.dln, 0, (size_t)BT * C * sizeof(real));
    crossentropy_backward(acts.logits, model->lse, model->targets, dloss, B, T, V, Vp);
    real* dlogits = acts.logits;
    matmul_backward(d.dln, grads.wte, (real*)NULL, dlogits, acts.lnf, params.wte, B, T, C, Vp);
    real* residual = acts.residual3 + (size_t)(L - 1) * BT * C;
    layernorm_backward(d.dresidual, grads.lnfw, grads.lnfb, d.dln, residual, params.lnfw, acts.lnf_mean, acts.lnf_rstd, B, T, C);

    for (int l = L - 1; l >= l0; l--) {
        LayerParams<real> lp = layer_params(params, l, C);                 // this block's weights,
        LayerParams<real> lg = layer_params(grads, l - l0, C);             // their gradients (NULL: frozen)
        LayerActivations<real> la = layer_activations(acts, l, B, T, C, NH); // and the forward's activations
        // the layer's gradient scratch starts at zero: the kernels below accumulate into it
        memset(d.dln, 0, (size_t)BT * C * sizeof(real));
        memset(d.datty, 0, (size_t)BT * C * sizeof(real));
        memset(d.dqkv, 0, (size_t)BT * 3 * C * sizeof(real));
        memset(d.dfch, 0, (size_t)BT * 4 * C * sizeof(real));
        memset(d.dfch_gelu, 0, (size_t)BT * 4 * C * sizeof(real));
        // Below layer 0 only the embeddings remain; when they are frozen, the gradient of the block's
        // input is never used, so layer 0 skips it (the adapters still get all their gradients).
        // With -F the same holds below block l0, and nothing below it is visited at all.
        bool need_dinp = l > l0 || model->train_base;

        // residual3 = residual2 + proj: both receive dresidual unchanged (it's the same buffer)
        real* dproj = gpt2_adapter_backward(&model->adapters, 1, l, d.dresidual, BT);
        matmul_backward(d.dfch_gelu, lg.fcprojw, lg.fcprojb, dproj, la.fch_gelu, gpt2_base_weight(model, LORA_FCPROJ, l), B, T, 4 * C, C);
        gpt2_lora_backward(lora, LORA_FCPROJ, l, d.dfch_gelu, dproj, la.fch_gelu, BT);
        gelu_backward(d.dfch, la.fch, d.dfch_gelu, (size_t)BT * 4 * C);
        matmul_backward(d.dln, lg.fcw, lg.fcb, d.dfch, la.ln2, gpt2_base_weight(model, LORA_FC, l), B, T, C, 4 * C);
        gpt2_lora_backward(lora, LORA_FC, l, d.dln, d.dfch, la.ln2, BT);
        layernorm_backward(d.dresidual, lg.ln2w, lg.ln2b, d.dln, la.residual2, lp.ln2w, la.ln2_mean, la.ln2_rstd, B, T, C);
        // residual2 = residual + proj: again dresidual flows to both unchanged
        dproj = gpt2_adapter_backward(&model->adapters, 0, l, d.dresidual, BT);
        matmul_backward(d.datty, lg.attprojw, lg.attprojb, dproj, la.atty, gpt2_base_weight(model, LORA_ATTPROJ, l), B, T, C, C);
        gpt2_lora_backward(lora, LORA_ATTPROJ, l, d.datty, dproj, la.atty, BT);
        if (model->prefix.P > 0) gpt2_prefix_attention_backward(&model->prefix, l, d.dqkv, d.datty, la.qkv, B, T);
        else attention_backward(d.dqkv, d.datt, d.datty, la.qkv, la.att, B, T, C, NH);
        memset(d.dln, 0, (size_t)BT * C * sizeof(real));
        // (-F: the lowest trained block's ln1 weights still need the gradient at ln1's output)
        real* dln1 = need_dinp || lg.ln1w != NULL ? d.dln : NULL;
        matmul_backward(dln1, lg.qkvw, lg.qkvb, d.dqkv, la.ln1, gpt2_base_weight(model, LORA_QKV, l), B, T, C, 3 * C);
        gpt2_lora_backward(lora, LORA_QKV, l, dln1, d.dqkv, la.ln1, BT);
        if (dln1 != NULL) {
            layernorm_backward(d.dresidual, lg.ln1w, lg.ln1b, d.dln, la.residual, lp.ln1w, la.ln1_mean, la.ln1_rstd, B, T, C);
        }
    }
    if (model->train_base) {
        encoder_backward(grads.wte, grads.wpe, d.dresidual, model->inputs, B, T, C);
    }
    if (model->params0) l2sp_backward(model->grads_memory, model->params_memory, model->params0, model->num_parameters, model->l2sp_lambda);
    model->have_targets = false; // the logits are gone: another backward needs another forward
}

// AdamW on what is trainable: the adapters, or with -f every base parameter
template <typename real>
void gpt2_update(GPT2<real>* model, float lr, float beta1, float beta2, float eps, float weight_decay, int t) {
    if (model->train_base) {
        adamw_update(model->params_memory, model->grads_memory, model->m_memory, model->v_memory,
                     model->num_parameters, lr, beta1, beta2, eps, weight_decay, t);
    }
    LoRA<real>* lora = &model->lora;
    // LoRA+: the lora_B ranges step with lr * lr_ratio_B (one range covering everything when the ratio is 1)
    for (const LoRALrRange& g : lora_lr_ranges(lora->config, lora->L, lora->C)) {
        adamw_update(lora->params_memory + g.offset, lora->grads_memory + g.offset, lora->m_memory + g.offset,
                     lora->v_memory + g.offset, g.n, lr * g.lr_mult, beta1, beta2, eps, weight_decay, t);
    }
    if (model->top_grads) {
        // -F: each tensor's trained tail, its gradients and moments back to back in top_*
        size_t p = 0, g = 0;
        for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
            size_t n = model->param_sizes[i] - model->top_offsets[i];
            if (n > 0) adamw_update(model->params_memory + p + model->top_offsets[i], model->top_grads + g, model->top_m + g,
                                    model->top_v + g, n, lr, beta1, beta2, eps, weight_decay, t);
            p += model->param_sizes[i];
            g += n;
        }
    }
    TrainableBuffer<real>* bufs[2] = {&model->adapters.buf, &model->prefix.buf};
    for (TrainableBuffer<real>* b : bufs) {
        if (b->n > 0) adamw_update(b->params, b->grads, b->m, b->v, b->n, lr, beta1, beta2, eps, weight_decay, t);
    }
}

// every gradient buffer the update applies, as (pointer, count); unused ones have count 0
template <typename real>
std::vector<std::pair<real*, size_t>> gpt2_trainable_grads(const GPT2<real>* model) {
    return {{model->grads_memory, model->grads_memory ? model->num_parameters : 0},
            {model->lora.grads_memory, model->lora.num_parameters},
            {model->top_grads, model->top_grads ? model->num_top_trainable : 0},
            {model->adapters.buf.grads, model->adapters.buf.n},
            {model->prefix.buf.grads, model->prefix.buf.n}};
}

// The learning rate at step (0-based) of steps, as llm.c schedules it: a linear warmup over the first
// warmup steps (lr * (step + 1) / warmup), then a cosine from lr down to lr * final_frac at the last step.
// final_frac = 1 and warmup = 0 keep lr constant.
static float lr_schedule(float lr, int step, int steps, int warmup, float final_frac) {
    if (step < warmup) return lr * (float)(step + 1) / (float)warmup;
    if (final_frac == 1.0f || steps <= warmup + 1) return lr;
    double progress = (double)(step - warmup) / (double)(steps - 1 - warmup); // 0 at the first decayed step, 1 at the last
    double coeff = 0.5 * (1.0 + cos(M_PI * progress));                       // 1 -> 0
    return (float)(lr * (final_frac + coeff * (1.0 - final_frac)));
}

// Gradient clipping by global norm: the L2 norm of every gradient the update will apply (all trainable
// buffers together); when it exceeds max_norm, all of them are scaled by max_norm / norm. max_norm <= 0
// measures only. Returns the norm before clipping. Clipping at 1 is llm.c's (and Hugging Face Trainer's)
// default: pretraining the small base at a constant lr, the batches right after a loss spike had norms
// of 13-350 against a typical 0.5-1.5; clipped, such a batch weighs in Adam's moments no more than a typical one. (The
// spikes themselves came from Adam moving every element by about lr at once; the warmup and decay of
// lr_schedule are what removed them.)
template <typename real>
double gpt2_clip_grad_norm(GPT2<real>* model, float max_norm) {
    std::vector<std::pair<real*, size_t>> grads = gpt2_trainable_grads(model);
    double sumsq = 0.0;
    for (const auto& g : grads) {
        const real* p = g.first;
        size_t n = g.second;
        double part = 0.0;
        #pragma omp parallel for reduction(+:part)
        for (size_t i = 0; i < n; i++) { part += (double)p[i] * (double)p[i]; }
        sumsq += part;
    }
    double norm = sqrt(sumsq);
    if (max_norm > 0 && norm > max_norm) {
        real scale = (real)(max_norm / norm);
        for (const auto& g : grads) {
            real* p = g.first;
            size_t n = g.second;
            #pragma omp parallel for
            for (size_t i = 0; i < n; i++) { p[i] *= scale; }
        }
    }
    return norm;
}

// The non-finite guard: "" when the loss and every gradient the update would apply are finite, else a
// message naming the step. The caller checks it between backward and update, so a NaN/inf step never
// reaches the weights, and so never reaches an adapter or checkpoint saved afterwards.
template <typename real>
std::string gpt2_check_step_finite(const GPT2<real>* model, int step) {
    std::vector<std::pair<real*, size_t>> grads = gpt2_trainable_grads(model);
    const char* hint = "lower the learning rate (-l); check the base checkpoint (-e) for inf/NaN weights; the last adapter saved with -o is intact";
    if (!std::isfinite((double)model->mean_loss)) {
        return strprintf("train loss is %f at step %d; stopping before the update\n---> HINT: %s", (double)model->mean_loss, step, hint);
    }
    for (const auto& g : grads) {
        for (size_t i = 0; i < g.second; i++) {
            if (!std::isfinite((double)g.first[i])) {
                return strprintf("a gradient is %f at step %d (train loss %f); stopping before the update\n---> HINT: %s",
                                 (double)g.first[i], step, (double)model->mean_loss, hint);
            }
        }
    }
    return "";
}

template <typename real>
size_t gpt2_trainable_parameters(const GPT2<real>* model) {
    return (model->train_base ? model->num_parameters : 0) + model->lora.num_parameters + model->num_top_trainable +
           model->adapters.buf.n + model->prefix.buf.n;
}

template <typename real>
void gpt2_free(GPT2<real>* model) {
    free(model->params_memory);
    free(model->grads_memory);
    free(model->m_memory);
    free(model->v_memory);
    free(model->acts_memory);
    free(model->dacts_memory);
    free(model->losses);
    free(model->lse);
    free(model->inputs);
    free(model->targets);
    if (model->lora.params_memory) lora_free(&model->lora);
    free(model->top_grads);
    free(model->top_m);
    free(model->top_v);
    adapters_free(&model->adapters);
    prefix_free(&model->prefix);
    free(model->params0);
    free(model->block_file);
    free(model->kv);
    memset(model, 0, sizeof(*model));
}

// ----------------------------------------------------------------------------
// files. Readers return "" on success or a message naming the file, what was wrong and a HINT;
// nothing is allocated from a header value before that value has been checked against the file size.

#define CHECKPOINT_MAGIC 20240326
#define TOKENS_MAGIC 20240520
#define TOKENIZER_MAGIC 20240328
#define DEBUG_STATE_MAGIC 20240327
#define ADAPTER_MAGIC 20240801 // our LoRA adapter files (see "adapter files" below)

static std::string file_size_of(FILE* f, const char* path, long* size) {
    if (fseek(f, 0, SEEK_END) != 0 || (*size = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        return strprintf("cannot determine the size of '%s'\n---> HINT: pass a regular file, not a pipe or directory", path);
    }
    return "";
}

static std::string open_for_reading(const char* path, const char* what, const char* hint, FILE** f) {
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
        return strprintf("%s '%s' is a directory\n---> HINT: %s", what, path, hint);
    }
    *f = fopen(path, "rb");
    if (*f == NULL) return strprintf("cannot open %s '%s': %s\n---> HINT: %s", what, path, strerror(errno), hint);
    return "";
}

// names a file by its magic number, to explain "wrong magic" errors
static const char* describe_magic(int magic) {
    switch (magic) {
        case CHECKPOINT_MAGIC: return "an llm.c model checkpoint";
        case TOKENS_MAGIC: return "an llm.c token file";
        case TOKENIZER_MAGIC: return "an llm.c tokenizer file";
        case DEBUG_STATE_MAGIC: return "an llm.c debug state";
        case ADAPTER_MAGIC: return "a train_gpt2_lora adapter file (pass it with -A)";
        default: return "not an llm.c file";
    }
}

// reads an llm.c fp32 checkpoint (version 3) into a fresh model.
// leave_block_matrices (a quantized base, -Q): qkvw, attprojw, fcw, fcprojw are skipped, the model holds
// the other 12 tensors only (those four pointers NULL) and remembers the file, from which
// gpt2_lora_attach reads them one layer at a time to quantize. So the fp32 block matrices are never all
// in memory, and the peak RSS of a quantized run is its quantized size, not the fp32 model's.
template <typename real>
std::string gpt2_read_checkpoint(GPT2<real>* model, const char* path, bool leave_block_matrices = false) {
    const char* hint = "pass an llm.c fp32 checkpoint with -e: data/gpt2_124M.bin is llm.c's starter pack (dev/download_starter_pack.sh, online); offline, `make run` pretrains data/brown_base.bin";
    FILE* f = NULL;
    std::string err = open_for_reading(path, "checkpoint", hint, &f);
    if (!err.empty()) return err;
    long size = 0;
    err = file_size_of(f, path, &size);
    int header[256];
    if (err.empty() && (size < (long)sizeof(header) || fread(header, sizeof(header), 1, f) != 1)) {
        err = strprintf("checkpoint '%s' is truncated: %ld bytes, shorter than the 1024-byte header\n---> HINT: %s", path, size, hint);
    }
    if (err.empty() && header[0] != CHECKPOINT_MAGIC) {
        err = strprintf("checkpoint '%s' has magic %d, expected %d; it is %s\n---> HINT: %s", path, header[0], CHECKPOINT_MAGIC, describe_magic(header[0]), hint);
    }
    if (err.empty() && header[1] != 3) {
        err = strprintf("checkpoint '%s' has version %d, expected 3 (fp32)%s\n---> HINT: export an fp32 checkpoint (llm.c's train_gpt2.py writes gpt2_124M.bin as version 3)",
                        path, header[1], header[1] == 5 ? "; version 5 is bf16, which this fp32 trainer does not read" : "");
    }
    GPT2Config cfg;
    if (err.empty()) {
        cfg.max_seq_len = header[2];
        cfg.vocab_size = header[3];
        cfg.num_layers = header[4];
        cfg.num_heads = header[5];
        cfg.channels = header[6];
        cfg.padded_vocab_size = header[7];
        bool ok = cfg.max_seq_len > 0 && cfg.max_seq_len <= 1 << 20 && cfg.vocab_size > 0 && cfg.vocab_size <= 1 << 24 &&
                  cfg.padded_vocab_size >= cfg.vocab_size && cfg.padded_vocab_size <= 1 << 24 && cfg.num_layers > 0 &&
                  cfg.num_layers <= 1024 && cfg.num_heads > 0 && cfg.channels > 0 && cfg.channels <= 1 << 16 &&
                  cfg.channels % cfg.num_heads == 0 && cfg.vocab_size <= 65536;
        if (!ok) {
            err = strprintf("checkpoint '%s' has impossible shapes: maxT=%d V=%d Vp=%d L=%d NH=%d C=%d (need positive sizes, Vp >= V, V <= 65536 for uint16 tokens, C divisible by NH)\n---> HINT: the file is corrupt or not an llm.c checkpoint; %s",
                            path, cfg.max_seq_len, cfg.vocab_size, cfg.padded_vocab_size, cfg.num_layers, cfg.num_heads, cfg.channels, hint);
        }
    }
    if (err.empty()) {
        size_t sizes[NUM_PARAMETER_TENSORS], n = 0;
        fill_in_parameter_sizes(sizes, cfg);
        for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) { n += sizes[i]; }
        size_t expected = sizeof(header) + n * sizeof(float);
        if ((size_t)size != expected) {
            err = strprintf("checkpoint '%s' is %ld bytes but its header (L=%d C=%d Vp=%d maxT=%d) needs %zu: %s\n---> HINT: %s",
                            path, size, cfg.num_layers, cfg.channels, cfg.padded_vocab_size, cfg.max_seq_len, expected,
                            (size_t)size < expected ? "the file is truncated (re-download or re-export it)" : "there are trailing bytes", hint);
        }
    }
    if (err.empty()) {
        gpt2_init_empty(model, cfg, leave_block_matrices);
        // stream the fp32 blob tensor by tensor, converting to real when the model is not float
        real** ptrs[NUM_PARAMETER_TENSORS];
        parameter_pointers(&model->params, ptrs);
        std::vector<float> buf(1 << 16);
        size_t done = 0; // parameters read (or skipped)
        for (int i = 0; i < NUM_PARAMETER_TENSORS && err.empty(); i++) {
            real* dst = *ptrs[i];
            size_t size = model->param_sizes[i];
            if (dst == NULL) { // a block matrix left on disk
                if (fseek(f, (long)(size * sizeof(float)), SEEK_CUR) != 0) {
                    err = strprintf("checkpoint '%s': seek error after %zu parameters\n---> HINT: %s", path, done, hint);
                }
                done += size;
                continue;
            }
            for (size_t at_i = 0; at_i < size;) {
                size_t n = std::min(buf.size(), size - at_i);
                if (fread(buf.data(), sizeof(float), n, f) != n) {
                    err = strprintf("checkpoint '%s': read error after %zu parameters\n---> HINT: %s", path, done + at_i, hint);
                    break;
                }
                for (size_t k = 0; k < n; k++) { dst[at_i + k] = (real)buf[k]; }
                at_i += n;
            }
            done += size;
        }
        if (!err.empty()) {
            gpt2_free(model); // the caller gets no half-read model, and nothing leaks
        } else if (leave_block_matrices) {
            model->block_file = strdup(path);
        }
    }
    fclose(f);
    return err;
}

template <typename real>
void gpt2_build_from_checkpoint(GPT2<real>* model, const char* path) {
    std::string err = gpt2_read_checkpoint(model, path);
    if (!err.empty()) die(err);
}

// writes to path.tmp, then renames: a crash never leaves a half-written file under the real name
static std::string write_atomically(const char* path, const std::vector<std::pair<const void*, size_t>>& parts) {
    std::string tmp = std::string(path) + ".tmp";
    FILE* f = fopen(tmp.c_str(), "wb");
    if (f == NULL) {
        return strprintf("cannot write '%s': %s\n---> HINT: check that the output directory (-o) exists and is writable", tmp.c_str(), strerror(errno));
    }
    bool ok = true;
    for (const auto& part : parts) {
        if (part.second > 0 && fwrite(part.first, 1, part.second, f) != part.second) { ok = false; break; }
    }
    if (fflush(f) != 0 || fsync(fileno(f)) != 0) ok = false;
    if (fclose(f) != 0) ok = false;
    if (!ok) {
        int e = errno;
        remove(tmp.c_str());
        return strprintf("failed writing '%s': %s\n---> HINT: check free disk space; nothing was left behind", path, strerror(e));
    }
    if (rename(tmp.c_str(), path) != 0) {
        int e = errno;
        remove(tmp.c_str());
        return strprintf("cannot rename '%s' to '%s': %s\n---> HINT: check permissions of the output directory", tmp.c_str(), path, strerror(e));
    }
    return "";
}

// writes an llm.c fp32 checkpoint (version 3) of the base weights, atomically
// an llm.c v3 checkpoint of the n = all parameters in checkpoint order
static std::string checkpoint_write(const char* path, const GPT2Config& cfg, const float* params, size_t n) {
    int header[256] = {0};
    header[0] = CHECKPOINT_MAGIC;
    header[1] = 3;
    header[2] = cfg.max_seq_len;
    header[3] = cfg.vocab_size;
    header[4] = cfg.num_layers;
    header[5] = cfg.num_heads;
    header[6] = cfg.channels;
    header[7] = cfg.padded_vocab_size;
    return write_atomically(path, {{header, sizeof(header)}, {params, n * sizeof(float)}});
}
static std::string gpt2_write_checkpoint(const GPT2<float>* model, const char* path) {
    if (model->num_params_stored != model->num_parameters) {
        return strprintf("cannot write '%s': the base is quantized (-Q) and holds no fp32 block matrices\n"
                         "---> HINT: write_merged_checkpoint (-M) writes the dequantized base + adapters", path);
    }
    return checkpoint_write(path, model->config, model->params_memory, model->num_parameters);
}

// An llm.c token file, validated: every id must be < V of the model it will feed.
struct TokenFile {
    std::vector<uint16_t> tokens;
};

static std::string tokens_read(TokenFile* tf, const char* path, int V, const char* flag) {
    std::string hint = strprintf("pass an llm.c token file with %s (make data writes data/tiny_shakespeare_train.bin and _val.bin)", flag);
    FILE* f = NULL;
    std::string err = open_for_reading(path, "token file", hint.c_str(), &f);
    if (!err.empty()) return err;
    long size = 0;
    err = file_size_of(f, path, &size);
    int header[256];
    if (err.empty() && (size < (long)sizeof(header) || fread(header, sizeof(header), 1, f) != 1)) {
        err = strprintf("token file '%s' is truncated: %ld bytes, shorter than the 1024-byte header\n---> HINT: %s", path, size, hint.c_str());
    }
    if (err.empty() && header[0] != TOKENS_MAGIC) {
        err = strprintf("token file '%s' has magic %d, expected %d; it is %s\n---> HINT: %s", path, header[0], TOKENS_MAGIC, describe_magic(header[0]), hint.c_str());
    }
    if (err.empty() && header[1] != 1) {
        err = strprintf("token file '%s' has version %d, expected 1\n---> HINT: %s", path, header[1], hint.c_str());
    }
    if (err.empty() && (header[2] < 0 || (size_t)size != sizeof(header) + 2 * (size_t)header[2])) {
        err = strprintf("token file '%s' claims %d tokens (%zu bytes with the header) but is %ld bytes: truncated or corrupt\n---> HINT: regenerate it (make data)",
                        path, header[2], sizeof(header) + 2 * (size_t)(header[2] < 0 ? 0 : header[2]), size);
    }
    if (err.empty()) {
        tf->tokens.resize((size_t)header[2]);
        if (!tf->tokens.empty() && fread(tf->tokens.data(), 2, tf->tokens.size(), f) != tf->tokens.size()) {
            err = strprintf("token file '%s': read error\n---> HINT: %s", path, hint.c_str());
        }
    }
    fclose(f);
    if (err.empty()) {
        for (size_t i = 0; i < tf->tokens.size(); i++) {
            if (tf->tokens[i] >= V) {
                err = strprintf("token file '%s': token %zu has id %d, but the model's vocabulary has V=%d ids\n---> HINT: the tokens were made with another tokenizer; re-tokenize the text for this model",
                                path, i, tf->tokens[i], V);
                break;
            }
        }
    }
    return err;
}

// An llm.c tokenizer file (decoding only): for each id a uint8 length and that many bytes.
struct Tokenizer {
    std::vector<std::string> pieces;
    int eot_token;
};

static std::string tokenizer_read(Tokenizer* tok, const char* path) {
    const char* hint = "pass llm.c's gpt2_tokenizer.bin (make data writes data/gpt2_tokenizer.bin), or omit it to print token ids";
    FILE* f = NULL;
    std::string err = open_for_reading(path, "tokenizer file", hint, &f);
    if (!err.empty()) return err;
    long size = 0;
    err = file_size_of(f, path, &size);
    int header[256];
    if (err.empty() && (size < (long)sizeof(header) || fread(header, sizeof(header), 1, f) != 1)) {
        err = strprintf("tokenizer file '%s' is truncated: %ld bytes, shorter than the 1024-byte header\n---> HINT: %s", path, size, hint);
    }
    if (err.empty() && header[0] != TOKENIZER_MAGIC) {
        err = strprintf("tokenizer file '%s' has magic %d, expected %d; it is %s\n---> HINT: %s", path, header[0], TOKENIZER_MAGIC, describe_magic(header[0]), hint);
    }
    if (err.empty() && header[1] != 1 && header[1] != 2) {
        err = strprintf("tokenizer file '%s' has version %d, expected 1 or 2\n---> HINT: %s", path, header[1], hint);
    }
    // every id takes at least 2 bytes (length + one byte), which bounds the count by the file size
    if (err.empty() && (header[2] <= 0 || (long)header[2] * 2 > size - (long)sizeof(header))) {
        err = strprintf("tokenizer file '%s' claims %d tokens, impossible for its %ld bytes\n---> HINT: %s", path, header[2], size, hint);
    }
    // version 2 names its end-of-text id; it must index the pieces (a bad one would index wte out of bounds)
    if (err.empty() && header[1] == 2 && (header[3] < 0 || header[3] >= header[2])) {
        err = strprintf("tokenizer file '%s' has end-of-text id %d, outside its %d tokens\n---> HINT: %s", path, header[3], header[2], hint);
    }
    if (err.empty()) {
        tok->eot_token = header[1] == 2 ? header[3] : 50256;
        tok->pieces.resize(header[2]);
        for (int i = 0; i < header[2] && err.empty(); i++) {
            unsigned char len = 0;
            char buf[256];
            if (fread(&len, 1, 1, f) != 1 || len == 0 || fread(buf, 1, len, f) != len) {
                err = strprintf("tokenizer file '%s' is truncated or corrupt at token %d (lengths must be 1..255)\n---> HINT: %s", path, i, hint);
            } else {
                tok->pieces[i].assign(buf, len);
            }
        }
        if (err.empty() && ftell(f) != size) {
            err = strprintf("tokenizer file '%s' has %ld trailing bytes after %d tokens\n---> HINT: %s", path, size - ftell(f), header[2], hint);
        }
    }
    fclose(f);
    return err;
}

// ----------------------------------------------------------------------------
// data loader: batches of B*T+1 consecutive tokens (inputs, and targets shifted by one),
// advancing by B*T; optionally visiting the batches of each epoch in a seeded random order.
// Data parallel (world > 1 ranks): a global batch is B*world*T+1 tokens, visited in the same seeded
// order on every rank, and rank k reads its k-th slice of B*T+1, so the ranks together see exactly
// what one process with batch B*world sees.

struct DataLoader {
    TokenFile file;
    int B, T;
    size_t num_batches;
    size_t position;            // index into order
    std::vector<size_t> order;  // batch visiting order for this epoch
    bool shuffle;
    Rng rng;
    std::vector<int> inputs, targets; // (B, T)
    int rank, world;            // this rank's slice of each global batch, and the number of ranks
};

static std::string dataloader_init(DataLoader* loader, const char* path, int B, int T, int V, bool shuffle,
                                   uint64_t seed, const char* flag, int rank = 0, int world = 1) {
    std::string err = tokens_read(&loader->file, path, V, flag);
    if (!err.empty()) return err;
    size_t need = (size_t)B * world * T + 1;
    if (loader->file.tokens.size() < need) {
        return strprintf("token file '%s' has %zu tokens, fewer than one batch needs (B*T%s+1 = %zu)\n---> HINT: lower -b or -t, or use a larger token file",
                         path, loader->file.tokens.size(), world > 1 ? "*ranks" : "", need);
    }
    loader->B = B;
    loader->T = T;
    loader->rank = rank;
    loader->world = world;
    loader->num_batches = (loader->file.tokens.size() - 1) / ((size_t)B * world * T);
    loader->shuffle = shuffle;
    rng_seed(&loader->rng, seed);
    loader->order.resize(loader->num_batches);
    loader->inputs.resize((size_t)B * T);
    loader->targets.resize((size_t)B * T);
    for (size_t i = 0; i < loader->num_batches; i++) { loader->order[i] = i; }
    loader->position = 0;
    return "";
}

static void dataloader_reset(DataLoader* loader) {
    loader->position = 0;
    for (size_t i = 0; i < loader->num_batches; i++) { loader->order[i] = i; }
}

static void dataloader_next_batch(DataLoader* loader) {
    if (loader->position == loader->num_batches) loader->position = 0; // next epoch
    if (loader->position == 0 && loader->shuffle) {
        // Fisher-Yates over batch indices
        for (size_t i = loader->num_batches - 1; i > 0; i--) {
            size_t j = rng_u32(&loader->rng) % (i + 1);
            std::swap(loader->order[i], loader->order[j]);
        }
    }
    size_t BT = (size_t)loader->B * loader->T;
    // global batch number order[position] starts at order[position] * world * BT; this rank's slice at rank * BT
    const uint16_t* chunk = loader->file.tokens.data() + (loader->order[loader->position] * loader->world + loader->rank) * BT;
    for (size_t i = 0; i < BT; i++) {
        loader->inputs[i] = chunk[i];
        loader->targets[i] = chunk[i + 1];
    }
    loader->position++;
}

// ----------------------------------------------------------------------------
// sampling

// samples from softmax(logits[0..V) / temperature); coin in [0, 1)
static int sample_softmax(const float* logits, int V, float temperature, float coin) {
    float maxval = -1e30f;
    for (int v = 0; v < V; v++) { if (logits[v] > maxval) maxval = logits[v]; }
    double sum = 0;
    for (int v = 0; v < V; v++) { sum += exp((logits[v] - maxval) / temperature); }
    double cdf = 0, target = coin * sum;
    for (int v = 0; v < V; v++) {
        cdf += exp((logits[v] - maxval) / temperature);
        if (target < cdf) return v;
    }
    return V - 1;
}

// samples from softmax(logits / temperature) restricted to the top_k largest logits (all V when top_k <= 0
// or top_k >= V); ties in the ranking go to the lower id; coin in [0, 1)
static int sample_top_k(const float* logits, int V, float temperature, int top_k, float coin) {
    if (top_k <= 0 || top_k >= V) return sample_softmax(logits, V, temperature, coin);
    std::vector<int> ids(V);
    for (int v = 0; v < V; v++) ids[v] = v;
    std::partial_sort(ids.begin(), ids.begin() + top_k, ids.end(),
                      [&](int a, int b) { return logits[a] != logits[b] ? logits[a] > logits[b] : a < b; });
    std::vector<float> top(top_k);
    for (int k = 0; k < top_k; k++) top[k] = logits[ids[k]];
    return ids[sample_softmax(top.data(), top_k, temperature, coin)];
}

// generates n tokens after the prompt, one sequence (B = 1), recomputing the prefix each step;
// the context slides when it would exceed the allocated T. temperature > 0; top_k <= 0 samples from all V
// turns the key/value cache on, empty, for one sequence of up to alloc_T positions: from here on each
// gpt2_forward appends its tokens (until kv_on is set false). Allocated once per allocation of the model.
template <typename real>
void gpt2_kv_start(GPT2<real>* model) {
    if (model->kv == NULL || model->kv_cap != model->alloc_T) {
        free(model->kv);
        model->kv_cap = model->alloc_T;
        model->kv = calloc_real<real>((size_t)model->config.num_layers * model->kv_cap * 3 * model->config.channels, "the key/value cache");
    }
    model->kv_on = true;
    model->kv_len = 0;
}

// n tokens after the prompt. With the key/value cache (use_cache), the prompt is one forward and every
// further token a forward of one position; once the context outgrows the allocated T, each token is a
// forward over the last T tokens.
// The two agree to fp32 rounding: a one-row matmul sums in another order (see matmul_forward);
// test_lora.cpp checks the logits and the sampled tokens.
static std::vector<int> gpt2_generate(GPT2<float>* model, const std::vector<int>& prompt, int n, Rng* rng,
                                      float temperature = 1.0f, int top_k = 0, bool use_cache = true) {
    std::vector<int> tokens = prompt;
    int maxT = model->alloc_T, Vp = model->config.padded_vocab_size;
    if (use_cache && (int)prompt.size() < maxT) gpt2_kv_start(model);
    for (int i = 0; i < n; i++) {
        int len = (int)std::min<size_t>(tokens.size(), (size_t)maxT), rows = len;
        if (model->kv_on && (int)tokens.size() > model->kv_cap) model->kv_on = false; // full: slide the window
        if (model->kv_on) {
            rows = (int)tokens.size() - model->kv_len; // the tokens not yet in the cache
            gpt2_forward(model, tokens.data() + model->kv_len, (const int*)NULL, 1, rows);
        } else {
            gpt2_forward(model, tokens.data() + tokens.size() - len, (const int*)NULL, 1, len);
        }
        const float* logits = model->acts.logits + (size_t)(rows - 1) * Vp;
        tokens.push_back(sample_top_k(logits, model->config.vocab_size, temperature, top_k, rng_f32(rng)));
    }
    model->kv_on = false;
    return std::vector<int>(tokens.begin() + prompt.size(), tokens.end());
}

static void print_tokens(const Tokenizer* tok, const std::vector<int>& ids) {
    for (int id : ids) {
        if (tok != NULL && id >= 0 && id < (int)tok->pieces.size()) {
            // like llm.c, print only printable pieces (single bytes must be printable or whitespace)
            const std::string& s = tok->pieces[id];
            if (s.size() == 1 && !(isprint((unsigned char)s[0]) || isspace((unsigned char)s[0]))) continue;
            fwrite(s.data(), 1, s.size(), stdout);
        } else {
            printf("%d ", id);
        }
    }
    printf("\n");
    fflush(stdout);
}

// ----------------------------------------------------------------------------
// adapter files: our own format (exact resume), PEFT's safetensors + adapter_config.json (export and
// import), and merging an adapter into the base for inference or for a merged llm.c checkpoint.
//
// adapter.bin, little-endian like every llm.c file: a header of 256 int32 (unused slots 0)
//   [0] magic 20240801  [1] version 1  [2] r  [3] alpha (fp32 bits)  [4] targets bitmask (1 qkv, 2 attproj,
//   4 fc, 8 fcproj)  [5] L  [6] C  [7] V  [8] Vp  [9] maxT  [10] NH  [11..12] base checksum (u64, low word first)
//   [13..14] n = adapter parameter count (u64)  [15] has_state (0/1)  and, when has_state = 1:
//   [16] steps completed  [17..18] sampler RNG state  [19..20] train loader RNG state  [21] loader B
//   [22] loader T  [23] loader shuffle  [24..25] loader position  [26..27] loader batch count nb
//   [28] variant bits, whatever has_state: 1 = rsLoRA (scale = alpha / sqrt(r) instead of alpha / r)
//   [29] the base storage the adapter trained on: 0 fp32, 1 int8, 2 nf4, 3 int2 (-Q; -A uses it unless -Q is given)
// then n fp32 adapter parameters in lora.h's flat layout (lora_tensor_list order), and when has_state = 1
// the AdamW m (n fp32), v (n fp32) and the loader's batch order (nb u64).
// The base checksum is FNV-1a 64 over the fp32 base parameters taken as 32-bit words (one xor and one
// multiply per float: h = (h ^ word) * 0x100000001b3, from h = 0xcbf29ce484222325), in checkpoint order.
// It is always the checksum of the fp32 base file, never of a quantized copy: with -Q main streams it from
// the file (checkpoint_checksum), so an adapter trained on a quantized base checks against the same
// checkpoint as an fp32 one (and -A can load it quantized or, with -Q fp32, on the fp32 base).

#define ADAPTER_VERSION 1

// FNV-1a 64 over n fp32 values as 32-bit words: one serial xor + multiply per float, about a second for
// GPT-2 124M on a busy 2-core machine; computed once per run, and only when -A or -o is given
static uint64_t base_checksum(const float* params, size_t n, uint64_t h = 0xcbf29ce484222325ull) {
    for (size_t i = 0; i < n; i++) {
        uint32_t word;
        memcpy(&word, params + i, sizeof(word));
        h = (h ^ word) * 0x100000001b3ull;
    }
    return h;
}

// the same checksum streamed from a checkpoint file (read with -Q, the model never holds all of it)
static std::string checkpoint_checksum(const char* path, uint64_t* sum) {
    FILE* f = fopen(path, "rb");
    if (f == NULL) return strprintf("checkpoint '%s' can no longer be opened for its checksum\n---> HINT: keep the -e file in place while the trainer starts", path);
    std::vector<float> buf(1 << 16);
    uint64_t h = 0xcbf29ce484222325ull;
    bool ok = fseek(f, 256 * sizeof(int), SEEK_SET) == 0;
    size_t n;
    while (ok && (n = fread(buf.data(), sizeof(float), buf.size(), f)) > 0) { h = base_checksum(buf.data(), n, h); }
    ok = ok && !ferror(f);
    fclose(f);
    if (!ok) return strprintf("checkpoint '%s': read error while taking its checksum\n---> HINT: the file changed since it was loaded; load it again", path);
    *sum = h;
    return "";
}

static void header_put_u64(int* header, int i, uint64_t v) {
    uint32_t lo = (uint32_t)v, hi = (uint32_t)(v >> 32);
    memcpy(&header[i], &lo, 4);
    memcpy(&header[i + 1], &hi, 4);
}
static uint64_t header_get_u64(const int* header, int i) {
    uint32_t lo, hi;
    memcpy(&lo, &header[i], 4);
    memcpy(&hi, &header[i + 1], 4);
    return (uint64_t)hi << 32 | lo;
}

// What an exact resume needs besides the weights and the AdamW moments (those live in model->lora)
struct TrainState {
    int step = 0;                     // optimizer steps completed; AdamW's t of the next step is step + 1
    Rng sample_rng = {0};             // the sampler's stream
    int loader_B = 0, loader_T = 0;
    bool loader_shuffle = false;
    Rng loader_rng = {0};
    size_t loader_position = 0;
    std::vector<size_t> loader_order; // (nb) batch visiting order of the current epoch
};

static TrainState train_state_capture(int step, const DataLoader* loader, const Rng* sample_rng) {
    TrainState s;
    s.step = step;
    s.sample_rng = *sample_rng;
    s.loader_B = loader->B;
    s.loader_T = loader->T;
    s.loader_shuffle = loader->shuffle;
    s.loader_rng = loader->rng;
    s.loader_position = loader->position;
    s.loader_order = loader->order;
    return s;
}

// puts a freshly initialised loader where the saved run's loader was; it must read the same batches
static std::string train_state_restore(const TrainState& s, DataLoader* loader, const char* path) {
    if (s.loader_B != loader->B || s.loader_T != loader->T || s.loader_shuffle != loader->shuffle ||
        s.loader_order.size() != loader->num_batches) {
        return strprintf("adapter file '%s' was saved by a run with B=%d T=%d shuffle=%d and %zu training batches, "
                         "but this run has B=%d T=%d shuffle=%d and %zu batches\n"
                         "---> HINT: resume with the same -b, -t, -u and -i as the run that saved it",
                         path, s.loader_B, s.loader_T, (int)s.loader_shuffle, s.loader_order.size(), loader->B,
                         loader->T, (int)loader->shuffle, loader->num_batches);
    }
    loader->rng = s.loader_rng;
    loader->position = s.loader_position;
    loader->order = s.loader_order;
    return "";
}

// writes the adapters of model (and, when state != NULL, the AdamW moments and the training state)
static std::string lora_file_write(const char* path, const GPT2<float>* model, uint64_t base_sum, const TrainState* state) {
    const LoRA<float>* lora = &model->lora;
    const GPT2Config& cfg = model->config;
    int header[256] = {0};
    header[0] = ADAPTER_MAGIC;
    header[1] = ADAPTER_VERSION;
    header[2] = lora->config.r;
    memcpy(&header[3], &lora->config.alpha, 4);
    header[4] = (int)lora->config.targets;
    header[5] = cfg.num_layers;
    header[6] = cfg.channels;
    header[7] = cfg.vocab_size;
    header[8] = cfg.padded_vocab_size;
    header[9] = cfg.max_seq_len;
    header[10] = cfg.num_heads;
    header_put_u64(header, 11, base_sum);
    header_put_u64(header, 13, lora->num_parameters);
    header[28] = (lora->config.use_rslora ? 1 : 0) | (lora->config.use_dora ? 2 : 0) | (lora->config.init_pissa ? 4 : 0); // variant bits
    header[29] = lora->config.base_quant;
    size_t n = lora->num_parameters;
    std::vector<std::pair<const void*, size_t>> parts = {{header, sizeof(header)}, {lora->params_memory, n * sizeof(float)}};
    std::vector<uint64_t> order;
    if (state != NULL) {
        header[15] = 1;
        header[16] = state->step;
        header_put_u64(header, 17, state->sample_rng.state);
        header_put_u64(header, 19, state->loader_rng.state);
        header[21] = state->loader_B;
        header[22] = state->loader_T;
        header[23] = state->loader_shuffle ? 1 : 0;
        header_put_u64(header, 24, state->loader_position);
        header_put_u64(header, 26, state->loader_order.size());
        order.assign(state->loader_order.begin(), state->loader_order.end());
        parts.push_back({lora->m_memory, n * sizeof(float)});
        parts.push_back({lora->v_memory, n * sizeof(float)});
        parts.push_back({order.data(), order.size() * sizeof(uint64_t)});
    }
    return write_atomically(path, parts);
}

// Reads an adapter for the base already in model (its checksum is base_sum) and attaches it, replacing
// any adapter attached before. The AdamW moments go to model->lora; *has_state says whether the file had
// them, and then *state holds the step and the loader/sampler state.
// base_quant: how to store the base's block matrices (LoRAQuant), or -1 (default): as the file says.
static std::string lora_file_read(const char* path, GPT2<float>* model, uint64_t base_sum, TrainState* state, bool* has_state,
                                  int base_quant = -1) {
    const char* hint = "pass an adapter.bin written by train_gpt2_lora -o (or a PEFT adapter directory) with -A";
    *has_state = false;
    FILE* f = NULL;
    std::string err = open_for_reading(path, "adapter file", hint, &f);
    if (!err.empty()) return err;
    long size = 0;
    err = file_size_of(f, path, &size);
    int header[256];
    if (err.empty() && (size < (long)sizeof(header) || fread(header, sizeof(header), 1, f) != 1)) {
        err = strprintf("adapter file '%s' is truncated: %ld bytes, shorter than the 1024-byte header\n---> HINT: %s", path, size, hint);
    }
    if (err.empty() && header[0] != ADAPTER_MAGIC) {
        bool json_at_8 = ((const char*)header)[8] == '{';
        err = strprintf("adapter file '%s' has magic %d, expected %d; it is %s\n---> HINT: %s", path, header[0], ADAPTER_MAGIC,
                        json_at_8 ? "probably a safetensors file (pass the PEFT adapter's directory to -A instead)" : describe_magic(header[0]), hint);
    }
    if (err.empty() && header[1] != ADAPTER_VERSION) {
        err = strprintf("adapter file '%s' has version %d, expected %d\n---> HINT: re-save it with this train_gpt2_lora", path, header[1], ADAPTER_VERSION);
    }
    LoRAConfig lcfg = {}; // all zero
    if (err.empty()) {
        float alpha;
        memcpy(&alpha, &header[3], 4);
        if (header[2] < 1 || header[2] > 65536 || !std::isfinite(alpha) || !(alpha > 0) || header[4] <= 0 || header[4] > (int)LORA_ALL_TARGETS ||
            (header[28] & ~7) != 0 || header[29] < 0 || header[29] >= LORA_NUM_QUANTS) {
            err = strprintf("adapter file '%s' has an impossible config: r=%d alpha=%g targets=%d variant bits=%d base storage=%d (need r >= 1, alpha > 0, targets 1..15, variant bits 0..7, base storage 0..2)\n---> HINT: the file is corrupt; %s",
                            path, header[2], alpha, header[4], header[28], header[29], hint);
        } else {
            lcfg = lora_config_rslora(lora_config(header[2], alpha, (unsigned)header[4]), (header[28] & 1) != 0);
            // DoRA: the magnitudes follow in the flat buffer; PiSSA: attaching recomputes the same residual base
            // (the SVD is seeded), and the file's lora_A / lora_B then replace the initial ones
            lcfg.use_dora = (header[28] & 2) != 0;
            lcfg.init_pissa = (header[28] & 4) != 0;
            lcfg.base_quant = base_quant >= 0 ? base_quant : header[29];
        }
    }
    const GPT2Config& cfg = model->config;
    if (err.empty() && (header[5] != cfg.num_layers || header[6] != cfg.channels || header[7] != cfg.vocab_size ||
                        header[8] != cfg.padded_vocab_size || header[9] != cfg.max_seq_len || header[10] != cfg.num_heads)) {
        err = strprintf("adapter file '%s' has shapes for a base with L=%d C=%d V=%d Vp=%d maxT=%d NH=%d, but the base (-e) has L=%d C=%d V=%d Vp=%d maxT=%d NH=%d\n"
                        "---> HINT: load the base checkpoint the adapter was trained on with -e",
                        path, header[5], header[6], header[7], header[8], header[9], header[10], cfg.num_layers, cfg.channels,
                        cfg.vocab_size, cfg.padded_vocab_size, cfg.max_seq_len, cfg.num_heads);
    }
    size_t n = 0, nb = 0;
    if (err.empty()) {
        n = lora_count_parameters(lcfg, cfg.num_layers, cfg.channels);
        if (header_get_u64(header, 13) != n) {
            err = strprintf("adapter file '%s' says it holds %llu parameters, but r=%d and targets %s on this base need %zu\n---> HINT: the file is corrupt; %s",
                            path, (unsigned long long)header_get_u64(header, 13), lcfg.r, lora_targets_string(lcfg.targets).c_str(), n, hint);
        } else if (header[15] != 0 && header[15] != 1) {
            err = strprintf("adapter file '%s' has has_state=%d, expected 0 or 1\n---> HINT: the file is corrupt; %s", path, header[15], hint);
        }
    }
    if (err.empty() && header_get_u64(header, 11) != base_sum) {
        err = strprintf("adapter file '%s' belongs to another base: it was trained on base weights with checksum %016llx, "
                        "but the base loaded with -e has checksum %016llx\n"
                        "---> HINT: load the exact base checkpoint the adapter was trained on with -e (a merged checkpoint is a different base)",
                        path, (unsigned long long)header_get_u64(header, 11), (unsigned long long)base_sum);
    }
    if (err.empty()) {
        // expected size, computed only from values already bounded by the file size
        size_t expected = sizeof(header) + n * sizeof(float);
        if (header[15] == 1) {
            uint64_t nb64 = header_get_u64(header, 26);
            nb = nb64 <= (uint64_t)size / sizeof(uint64_t) ? (size_t)nb64 : (size_t)size; // larger than possible: size check fails
            expected += 2 * n * sizeof(float) + nb * sizeof(uint64_t);
        }
        if ((size_t)size != expected) {
            err = strprintf("adapter file '%s' is %ld bytes but its header (r=%d, targets %s, %s) needs %zu: %s\n---> HINT: %s",
                            path, size, lcfg.r, lora_targets_string(lcfg.targets).c_str(),
                            header[15] == 1 ? "with optimizer state" : "weights only", expected,
                            (size_t)size < expected ? "the file is truncated" : "there are trailing bytes", hint);
        }
    }
    if (err.empty() && model->block_file != NULL && lcfg.base_quant == LORA_QUANT_FP32) {
        err = strprintf("adapter file '%s' is for an fp32 base, but the base was read for a quantized one (block matrices left on disk)\n"
                        "---> HINT: pass the -Q the adapter was trained with, or -Q fp32", path);
    }
    std::vector<uint64_t> order;
    if (err.empty()) {
        if (model->lora.params_memory != NULL) lora_free(&model->lora);
        gpt2_lora_attach(model, lcfg, 0); // the init is overwritten below
        LoRA<float>* lora = &model->lora;
        bool ok = fread(lora->params_memory, sizeof(float), n, f) == n;
        if (ok && header[15] == 1) {
            order.resize(nb);
            ok = fread(lora->m_memory, sizeof(float), n, f) == n && fread(lora->v_memory, sizeof(float), n, f) == n &&
                 fread(order.data(), sizeof(uint64_t), nb, f) == nb;
        }
        if (!ok) err = strprintf("adapter file '%s': read error\n---> HINT: %s", path, hint);
    }
    fclose(f);
    if (err.empty() && header[15] == 1) {
        uint64_t position = header_get_u64(header, 24);
        std::vector<bool> seen(nb, false);
        bool ok = header[16] >= 0 && position <= nb && header[21] > 0 && header[22] > 0;
        for (size_t i = 0; i < nb && ok; i++) {
            ok = order[i] < nb && !seen[order[i]];
            if (ok) seen[order[i]] = true;
        }
        if (!ok) {
            err = strprintf("adapter file '%s' has an impossible training state (step %d, loader position %llu of %zu batches, or a batch order that is not a permutation)\n---> HINT: the file is corrupt; %s",
                            path, header[16], (unsigned long long)position, nb, hint);
        } else {
            *has_state = true;
            state->step = header[16];
            state->sample_rng.state = header_get_u64(header, 17);
            state->loader_rng.state = header_get_u64(header, 19);
            state->loader_B = header[21];
            state->loader_T = header[22];
            state->loader_shuffle = header[23] != 0;
            state->loader_position = (size_t)position;
            state->loader_order.assign(order.begin(), order.end());
        }
    }
    if (!err.empty() && model->lora.params_memory != NULL) lora_free(&model->lora);
    return err;
}

// folds the adapters into qkvw, attprojw, fcw, fcprojw (sign +1) or takes them out again (sign -1)
// (a quantized base has no fp32 matrices to fold into: write_merged_checkpoint merges into a dequantized copy)
template <typename real>
void gpt2_lora_merge(GPT2<real>* model, int sign) {
    if (model->lora.quant_q[0] != NULL) die("gpt2_lora_merge: the base is quantized (-Q): there are no fp32 block matrices to merge into");
    real* base[LORA_NUM_TARGETS] = {model->params.qkvw, model->params.attprojw, model->params.fcw, model->params.fcprojw};
    lora_merge_all(&model->lora, base, sign);
}

// the whole base in checkpoint order, num_parameters floats, into full, exactly as the matmuls see it:
// with a quantized base the four block matrices dequantized
template <typename real>
void gpt2_expand_params(GPT2<real>* model, real* full) {
    const GPT2Config& cfg = model->config;
    ParameterTensors<real> p = model->params;
    const real* stored[NUM_PARAMETER_TENSORS] = {p.wte, p.wpe, p.ln1w, p.ln1b, p.qkvw, p.qkvb, p.attprojw, p.attprojb,
                                                 p.ln2w, p.ln2b, p.fcw, p.fcb, p.fcprojw, p.fcprojb, p.lnfw, p.lnfb};
    size_t off = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        size_t n = model->param_sizes[i];
        if (!param_tensor_is_block_matrix(i)) {
            memcpy(full + off, stored[i], n * sizeof(real));
        } else {
            int t = block_matrix_target(i);
            size_t per_layer = n / cfg.num_layers;
            for (int l = 0; l < cfg.num_layers; l++) {
                memcpy(full + off + (size_t)l * per_layer, lora_base_weight(&model->lora, t, l, at((real*)stored[i], (size_t)l * per_layer)), per_layer * sizeof(real));
            }
        }
        off += n;
    }
}

// -M: writes base + scale * lora_B lora_A as an llm.c checkpoint (atomically), which any llm.c reader
// loads as a plain GPT-2. The model is unmerged again afterwards: its base equals the original within
// fp32 rounding (see the unmerge test), and its adapters stay attached.
// With a quantized base (-Q) the merge goes into a dequantized fp32 copy of the whole base, built for the
// write and freed after it: the file is the model that was trained (dequantized base + adapters), not the
// original fp32 base + adapters, which this process no longer holds.
static std::string write_merged_checkpoint(GPT2<float>* model, const char* path) {
    if (model->lora.quant_q[0] != NULL) {
        std::vector<float> full(model->num_parameters);
        gpt2_expand_params(model, full.data());
        ParameterTensors<float> p;
        point_parameters(&p, model->param_sizes, full.data());
        float* base[LORA_NUM_TARGETS] = {p.qkvw, p.attprojw, p.fcw, p.fcprojw};
        lora_merge_all(&model->lora, base, +1);
        return checkpoint_write(path, model->config, full.data(), model->num_parameters);
    }
    gpt2_lora_merge(model, +1);
    std::string err = gpt2_write_checkpoint(model, path);
    gpt2_lora_merge(model, -1);
    return err;
}

// ---- a minimal JSON reader (RFC 8259): objects, arrays, strings with escapes, numbers, literals.
// Enough for safetensors headers and adapter_config.json; it rejects anything malformed.

struct Json {
    enum Kind { NUL, BOOL, NUMBER, STRING, ARRAY, OBJECT } kind = NUL;
    bool boolean = false;
    double number = 0;
    std::string str;                                   // STRING: decoded text; NUMBER: the literal as written
    std::vector<Json> items;                           // ARRAY
    std::vector<std::pair<std::string, Json>> members; // OBJECT, in document order, keys unique
    const Json* get(const char* key) const {
        for (const auto& m : members) { if (m.first == key) return &m.second; }
        return NULL;
    }
};

struct JsonParser {
    const unsigned char* s;
    size_t n, i;
    int depth;
    std::string err;
};

static bool json_fail(JsonParser* p, const char* what) {
    if (p->err.empty()) p->err = strprintf("%s at byte %zu", what, p->i);
    return false;
}
static void json_skip_space(JsonParser* p) {
    while (p->i < p->n && (p->s[p->i] == ' ' || p->s[p->i] == '\t' || p->s[p->i] == '\n' || p->s[p->i] == '\r')) p->i++;
}
static int json_hex4(JsonParser* p) {
    if (p->i + 4 > p->n) return -1;
    int v = 0;
    for (int k = 0; k < 4; k++) {
        int c = p->s[p->i + k], d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    p->i += 4;
    return v;
}
static void json_put_utf8(std::string* out, uint32_t cp) {
    if (cp < 0x80) { *out += (char)cp; }
    else if (cp < 0x800) { *out += (char)(0xC0 | cp >> 6); *out += (char)(0x80 | (cp & 63)); }
    else if (cp < 0x10000) { *out += (char)(0xE0 | cp >> 12); *out += (char)(0x80 | ((cp >> 6) & 63)); *out += (char)(0x80 | (cp & 63)); }
    else { *out += (char)(0xF0 | cp >> 18); *out += (char)(0x80 | ((cp >> 12) & 63)); *out += (char)(0x80 | ((cp >> 6) & 63)); *out += (char)(0x80 | (cp & 63)); }
}
// the length of the valid UTF-8 sequence at s[i], or 0 (overlong forms, surrogates and > U+10FFFF are invalid)
static size_t utf8_sequence_length(const unsigned char* s, size_t n, size_t i) {
    unsigned char c = s[i];
    if (c < 0x80) return 1;
    size_t len = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 ? 2 : 0;
    if (len == 0 || c > 0xF4 || i + len > n) return 0;
    uint32_t cp = c & (0x7F >> len);
    for (size_t k = 1; k < len; k++) {
        if ((s[i + k] & 0xC0) != 0x80) return 0;
        cp = cp << 6 | (s[i + k] & 63);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return len;
}

static bool json_parse_string(JsonParser* p, std::string* out) {
    p->i++; // the opening quote
    out->clear();
    while (p->i < p->n) {
        unsigned char c = p->s[p->i];
        if (c == '"') { p->i++; return true; }
        if (c < 0x20) return json_fail(p, "control character inside a string");
        if (c != '\\') {
            size_t len = utf8_sequence_length(p->s, p->n, p->i);
            if (len == 0) return json_fail(p, "invalid UTF-8 inside a string");
            out->append((const char*)p->s + p->i, len);
            p->i += len;
            continue;
        }
        if (++p->i >= p->n) break;
        char e = (char)p->s[p->i++];
        switch (e) {
            case '"': *out += '"'; break;
            case '\\': *out += '\\'; break;
            case '/': *out += '/'; break;
            case 'b': *out += '\b'; break;
            case 'f': *out += '\f'; break;
            case 'n': *out += '\n'; break;
            case 'r': *out += '\r'; break;
            case 't': *out += '\t'; break;
            case 'u': {
                int cp = json_hex4(p);
                if (cp < 0) return json_fail(p, "bad \\u escape (need 4 hex digits)");
                if (cp >= 0xDC00 && cp <= 0xDFFF) return json_fail(p, "lone low surrogate in \\u escape");
                if (cp >= 0xD800 && cp <= 0xDBFF) { // a high surrogate must be followed by \uDC00..\uDFFF
                    if (p->i + 2 > p->n || p->s[p->i] != '\\' || p->s[p->i + 1] != 'u') return json_fail(p, "lone high surrogate in \\u escape");
                    p->i += 2;
                    int lo = json_hex4(p);
                    if (lo < 0xDC00 || lo > 0xDFFF) return json_fail(p, "bad low surrogate in \\u escape");
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                }
                json_put_utf8(out, (uint32_t)cp);
                break;
            }
            default: p->i--; return json_fail(p, "unknown escape in a string");
        }
    }
    return json_fail(p, "unterminated string");
}

static bool json_parse_value(JsonParser* p, Json* out);

static bool json_parse_number(JsonParser* p, Json* out) {
    size_t start = p->i;
    auto digits = [&]() { size_t k = p->i; while (p->i < p->n && p->s[p->i] >= '0' && p->s[p->i] <= '9') p->i++; return p->i - k; };
    if (p->s[p->i] == '-') p->i++;
    if (p->i < p->n && p->s[p->i] == '0') { p->i++; }
    else if (digits() == 0) return json_fail(p, "bad number");
    if (p->i < p->n && p->s[p->i] == '.') { p->i++; if (digits() == 0) return json_fail(p, "bad number: no digits after '.'"); }
    if (p->i < p->n && (p->s[p->i] == 'e' || p->s[p->i] == 'E')) {
        p->i++;
        if (p->i < p->n && (p->s[p->i] == '+' || p->s[p->i] == '-')) p->i++;
        if (digits() == 0) return json_fail(p, "bad number: no digits in the exponent");
    }
    out->kind = Json::NUMBER;
    out->str.assign((const char*)p->s + start, p->i - start);
    out->number = strtod(out->str.c_str(), NULL);
    return true;
}

static bool json_parse_value(JsonParser* p, Json* out) {
    json_skip_space(p);
    if (p->i >= p->n) return json_fail(p, "unexpected end of JSON");
    if (++p->depth > 64) return json_fail(p, "nesting deeper than 64");
    unsigned char c = p->s[p->i];
    bool ok = true;
    if (c == '{') {
        out->kind = Json::OBJECT;
        p->i++;
        json_skip_space(p);
        if (p->i < p->n && p->s[p->i] == '}') { p->i++; }
        else {
            while (ok) {
                json_skip_space(p);
                if (p->i >= p->n || p->s[p->i] != '"') { ok = json_fail(p, "expected a string key"); break; }
                std::string key;
                if (!(ok = json_parse_string(p, &key))) break;
                if (out->get(key.c_str()) != NULL) { ok = json_fail(p, ("duplicate key \"" + key + "\"").c_str()); break; }
                json_skip_space(p);
                if (p->i >= p->n || p->s[p->i] != ':') { ok = json_fail(p, "expected ':' after a key"); break; }
                p->i++;
                out->members.push_back({key, Json()});
                if (!(ok = json_parse_value(p, &out->members.back().second))) break;
                json_skip_space(p);
                if (p->i < p->n && p->s[p->i] == ',') { p->i++; continue; }
                if (p->i < p->n && p->s[p->i] == '}') { p->i++; break; }
                ok = json_fail(p, "expected ',' or '}' in an object");
            }
        }
    } else if (c == '[') {
        out->kind = Json::ARRAY;
        p->i++;
        json_skip_space(p);
        if (p->i < p->n && p->s[p->i] == ']') { p->i++; }
        else {
            while (ok) {
                out->items.push_back(Json());
                if (!(ok = json_parse_value(p, &out->items.back()))) break;
                json_skip_space(p);
                if (p->i < p->n && p->s[p->i] == ',') { p->i++; continue; }
                if (p->i < p->n && p->s[p->i] == ']') { p->i++; break; }
                ok = json_fail(p, "expected ',' or ']' in an array");
            }
        }
    } else if (c == '"') {
        out->kind = Json::STRING;
        ok = json_parse_string(p, &out->str);
    } else if (c == '-' || (c >= '0' && c <= '9')) {
        ok = json_parse_number(p, out);
    } else {
        static const char* const words[3] = {"true", "false", "null"};
        int w = -1;
        for (int k = 0; k < 3; k++) {
            size_t len = strlen(words[k]);
            if (p->i + len <= p->n && memcmp(p->s + p->i, words[k], len) == 0) { w = k; p->i += len; }
        }
        if (w < 0) ok = json_fail(p, "unexpected character");
        else if (w == 2) out->kind = Json::NUL;
        else { out->kind = Json::BOOL; out->boolean = w == 0; }
    }
    p->depth--;
    return ok;
}

// parses one JSON document (surrounding whitespace allowed); "" or "what, at byte k"
static std::string json_parse(const char* text, size_t n, Json* out) {
    JsonParser p = {(const unsigned char*)text, n, 0, 0, ""};
    *out = Json();
    if (!json_parse_value(&p, out)) return p.err;
    json_skip_space(&p);
    if (p.i != n) return strprintf("trailing characters after the JSON value at byte %zu", p.i);
    return "";
}

// a JSON number that is a non-negative integer without fraction or exponent, as a u64
static bool json_to_u64(const Json* v, uint64_t* out) {
    if (v == NULL || v->kind != Json::NUMBER || v->str.empty() || v->str.size() > 19) return false;
    uint64_t x = 0;
    for (char c : v->str) {
        if (c < '0' || c > '9') return false;
        x = x * 10 + (uint64_t)(c - '0');
    }
    *out = x;
    return true;
}

static std::string json_quote(const std::string& s) {
    std::string out = "\"";
    for (unsigned char c : s) {
        if (c == '"' || c == '\\') { out += '\\'; out += (char)c; }
        else if (c < 0x20) { out += strprintf("\\u%04x", c); }
        else { out += (char)c; }
    }
    return out + "\"";
}

// ---- safetensors: u64 LE header length N, N bytes of JSON header (padded with spaces to a multiple of
// 8), then the data buffer. Header: {"__metadata__": {"format": "pt"}, name: {"dtype": "F32", "shape":
// [...], "data_offsets": [begin, end]}, ...} with offsets relative to the data buffer. We write and
// read F32 only; the tensors tile the buffer exactly (no gaps, no overlaps, nothing after the last).

#define SAFETENSORS_MAX_HEADER 100000000ull

struct SafeTensorOut {
    std::string name;
    std::vector<size_t> shape;
    const float* data;
};

static std::string safetensors_write(const char* path, const std::vector<SafeTensorOut>& tensors) {
    std::string header = "{\"__metadata__\":{\"format\":\"pt\"}";
    size_t offset = 0;
    for (const SafeTensorOut& t : tensors) {
        size_t count = 1;
        std::string shape;
        for (size_t d : t.shape) { count *= d; shape += (shape.empty() ? "" : ",") + std::to_string(d); }
        header += "," + json_quote(t.name) + ":{\"dtype\":\"F32\",\"shape\":[" + shape + "],\"data_offsets\":[" +
                  std::to_string(offset) + "," + std::to_string(offset + count * sizeof(float)) + "]}";
        offset += count * sizeof(float);
    }
    header += "}";
    while (header.size() % 8 != 0) header += ' '; // so that the data buffer starts 8-aligned
    uint64_t N = header.size();
    std::vector<std::pair<const void*, size_t>> parts = {{&N, sizeof(N)}, {header.data(), header.size()}};
    for (const SafeTensorOut& t : tensors) {
        size_t count = 1;
        for (size_t d : t.shape) count *= d;
        parts.push_back({t.data, count * sizeof(float)});
    }
    return write_atomically(path, parts);
}

struct SafeTensor {
    std::string name;
    std::vector<size_t> shape;
    size_t begin, end; // byte offsets into the data buffer
};

struct SafeTensors {
    std::vector<SafeTensor> tensors;                              // in header order
    std::vector<std::pair<std::string, std::string>> metadata;    // __metadata__, if any
    std::vector<float> data;                                      // the whole data buffer
    const SafeTensor* find(const std::string& name) const {
        for (const SafeTensor& t : tensors) { if (t.name == name) return &t; }
        return NULL;
    }
    const float* values(const SafeTensor* t) const { return data.data() + t->begin / sizeof(float); }
};

static std::string safetensors_read(const char* path, SafeTensors* st) {
    const char* hint = "pass a safetensors file of F32 tensors, e.g. the adapter_model.safetensors PEFT's save_pretrained writes";
    *st = SafeTensors();
    FILE* f = NULL;
    std::string err = open_for_reading(path, "safetensors file", hint, &f);
    if (!err.empty()) return err;
    long size = 0;
    err = file_size_of(f, path, &size);
    uint64_t N = 0;
    if (err.empty() && (size < 8 || fread(&N, 8, 1, f) != 1)) {
        err = strprintf("safetensors file '%s' is %ld bytes, too short for the 8-byte header length\n---> HINT: %s", path, size, hint);
    }
    if (err.empty() && N > SAFETENSORS_MAX_HEADER) {
        err = strprintf("safetensors file '%s' has a header length of %llu bytes, over the limit of %llu\n---> HINT: the file is corrupt or not safetensors; %s",
                        path, (unsigned long long)N, SAFETENSORS_MAX_HEADER, hint);
    }
    if (err.empty() && N > (uint64_t)size - 8) {
        err = strprintf("safetensors file '%s' has a header length of %llu bytes, but only %ld bytes follow the length: the file is truncated\n---> HINT: %s",
                        path, (unsigned long long)N, size - 8, hint);
    }
    std::string header;
    if (err.empty()) {
        header.resize((size_t)N);
        if (N > 0 && fread(&header[0], 1, (size_t)N, f) != (size_t)N) err = strprintf("safetensors file '%s': read error\n---> HINT: %s", path, hint);
    }
    Json doc;
    if (err.empty()) {
        std::string jerr = json_parse(header.data(), header.size(), &doc);
        if (!jerr.empty()) {
            err = strprintf("safetensors file '%s': the header is not valid JSON: %s\n---> HINT: the file is corrupt; %s", path, jerr.c_str(), hint);
        } else if (doc.kind != Json::OBJECT) {
            err = strprintf("safetensors file '%s': the header is JSON but not an object\n---> HINT: %s", path, hint);
        }
    }
    size_t data_bytes = err.empty() ? (size_t)size - 8 - (size_t)N : 0;
    for (size_t k = 0; err.empty() && k < doc.members.size(); k++) {
        const std::string& name = doc.members[k].first;
        const Json& v = doc.members[k].second;
        if (name == "__metadata__") {
            bool ok = v.kind == Json::OBJECT;
            for (size_t j = 0; ok && j < v.members.size(); j++) {
                ok = v.members[j].second.kind == Json::STRING;
                if (ok) st->metadata.push_back({v.members[j].first, v.members[j].second.str});
            }
            if (!ok) err = strprintf("safetensors file '%s': __metadata__ must map strings to strings\n---> HINT: %s", path, hint);
            continue;
        }
        const Json* dtype = v.get("dtype");
        const Json* shape = v.get("shape");
        const Json* offsets = v.get("data_offsets");
        if (v.kind != Json::OBJECT || dtype == NULL || dtype->kind != Json::STRING || shape == NULL || shape->kind != Json::ARRAY ||
            offsets == NULL || offsets->kind != Json::ARRAY) {
            err = strprintf("safetensors file '%s': tensor '%s' needs \"dtype\" (string), \"shape\" (array) and \"data_offsets\" (array)\n---> HINT: %s", path, name.c_str(), hint);
            break;
        }
        if (dtype->str != "F32") {
            err = strprintf("safetensors file '%s': tensor '%s' has dtype %s; only F32 is read\n---> HINT: save the adapter from a float32 model (model.float() before save_pretrained)",
                            path, name.c_str(), dtype->str.c_str());
            break;
        }
        SafeTensor t;
        t.name = name;
        size_t count = 1;
        bool ok = true;
        for (const Json& d : shape->items) {
            uint64_t x = 0;
            ok = ok && json_to_u64(&d, &x) && x <= (1ull << 40) && !__builtin_mul_overflow(count, (size_t)x, &count);
            t.shape.push_back((size_t)x);
        }
        uint64_t begin = 0, end = 0;
        ok = ok && offsets->items.size() == 2 && json_to_u64(&offsets->items[0], &begin) && json_to_u64(&offsets->items[1], &end);
        if (!ok) {
            err = strprintf("safetensors file '%s': tensor '%s' has a shape or data_offsets that are not non-negative integers ([begin, end] for the offsets)\n---> HINT: %s", path, name.c_str(), hint);
            break;
        }
        if (begin > end || end > data_bytes) {
            err = strprintf("safetensors file '%s': tensor '%s' has data_offsets [%llu, %llu] out of range of the %zu-byte data buffer\n---> HINT: the file is truncated or corrupt; %s",
                            path, name.c_str(), (unsigned long long)begin, (unsigned long long)end, data_bytes, hint);
            break;
        }
        if (count > SIZE_MAX / sizeof(float) || end - begin != count * sizeof(float)) {
            err = strprintf("safetensors file '%s': tensor '%s' spans %llu bytes, but its shape of %zu F32 values needs %zu\n---> HINT: the file is corrupt; %s",
                            path, name.c_str(), (unsigned long long)(end - begin), count, count * sizeof(float), hint);
            break;
        }
        t.begin = (size_t)begin;
        t.end = (size_t)end;
        st->tensors.push_back(t);
    }
    if (err.empty()) {
        // the tensors, sorted by offset, must tile [0, data_bytes) exactly
        std::vector<const SafeTensor*> sorted;
        for (const SafeTensor& t : st->tensors) sorted.push_back(&t);
        std::sort(sorted.begin(), sorted.end(), [](const SafeTensor* a, const SafeTensor* b) { return a->begin != b->begin ? a->begin < b->begin : a->end < b->end; });
        size_t at = 0;
        for (const SafeTensor* t : sorted) {
            if (t->begin != at) {
                err = strprintf("safetensors file '%s': tensor '%s' starts at byte %zu of the data buffer, but the previous tensor ends at %zu: %s\n---> HINT: the file is corrupt; %s",
                                path, t->name.c_str(), t->begin, at, t->begin > at ? "a gap" : "overlapping tensors", hint);
                break;
            }
            at = t->end;
        }
        if (err.empty() && at != data_bytes) {
            err = strprintf("safetensors file '%s' has %zu trailing bytes after the last tensor\n---> HINT: the file is corrupt; %s", path, data_bytes - at, hint);
        }
    }
    if (err.empty()) {
        st->data.resize(data_bytes / sizeof(float));
        if (!st->data.empty() && fread(st->data.data(), sizeof(float), st->data.size(), f) != st->data.size()) {
            err = strprintf("safetensors file '%s': read error\n---> HINT: %s", path, hint);
        }
    }
    fclose(f);
    if (!err.empty()) *st = SafeTensors();
    return err;
}

// ---- PEFT: adapter_model.safetensors + adapter_config.json, as Hugging Face PEFT saves a LoRA for GPT-2.
// Orientation, checked in PEFT's source (peft/tuners/lora/layer.py): for a transformers Conv1D base layer
// (GPT-2's c_attn, c_proj, c_fc, whose weight is stored (in, out)) PEFT takes in_features, out_features =
// weight.shape and still builds lora_A = nn.Linear(in, r) and lora_B = nn.Linear(r, out), so the saved
// lora_A.weight is (r, in) and lora_B.weight (out, r). fan_in_fan_out = True only makes get_delta_weight
// transpose lora_B @ lora_A into Conv1D's (in, out) layout when merging. llm.c stores weights (out, in),
// so our lora_A (r, in) and lora_B (out, r) are PEFT's tensors as they are: no transpose either way.
// Target matching (peft/tuners/tuners_utils.py): a module matches when its full name equals a listed
// name or ends with "." + name; "c_proj" would match both projections, so we write qualified names.

#define PEFT_WEIGHTS_FILE "adapter_model.safetensors"
#define PEFT_CONFIG_FILE "adapter_config.json"

static std::string peft_config_json(LoRAConfig cfg, const char* base_name) {
    std::string targets;
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        if (cfg.targets & (1u << t)) targets += (targets.empty() ? "" : ", ") + json_quote(lora_peft_names[t]);
    }
    // lora_alpha is an int in PEFT's LoraConfig; write a fraction only when alpha has one
    std::string alpha = cfg.alpha == std::floor(cfg.alpha) && std::fabs(cfg.alpha) < 1e9f ? strprintf("%d", (int)cfg.alpha) : strprintf("%.9g", cfg.alpha);
    return "{\n"
           "  \"peft_type\": \"LORA\",\n"
           "  \"task_type\": \"CAUSAL_LM\",\n"
           "  \"base_model_name_or_path\": " + json_quote(base_name) + ",\n"
           "  \"r\": " + std::to_string(cfg.r) + ",\n"
           "  \"lora_alpha\": " + alpha + ",\n"
           "  \"target_modules\": [" + targets + "],\n"
           "  \"fan_in_fan_out\": true,\n"
           "  \"bias\": \"none\",\n"
           "  \"lora_dropout\": 0.0,\n"
           "  \"use_rslora\": " + std::string(cfg.use_rslora ? "true" : "false") + ",\n"
           "  \"use_dora\": " + std::string(cfg.use_dora ? "true" : "false") + ",\n"
           "  \"init_lora_weights\": " + std::string(cfg.init_pissa ? "\"pissa\"" : "true") + ",\n"
           "  \"inference_mode\": true\n"
           "}\n";
}

// writes <dir>/adapter_model.safetensors and <dir>/adapter_config.json; base_name is a hub id like "gpt2"
static std::string peft_export(const char* dir, const GPT2<float>* model, const char* base_name) {
    const LoRA<float>* lora = &model->lora;
    std::vector<SafeTensorOut> tensors;
    for (const LoRATensor& t : lora_tensor_list(lora->config, lora->L, lora->C)) {
        tensors.push_back({lora_peft_key(t.layer, t.target, t.is_B), {(size_t)t.rows, (size_t)t.cols}, lora->params_memory + t.offset});
    }
    // DoRA: one magnitude vector (out) per module
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        if (lora->dora_m[t] == NULL) continue;
        int out = lora_target_out(t, lora->C);
        for (int l = 0; l < lora->L; l++) {
            tensors.push_back({lora_peft_magnitude_key(l, t),
                               {(size_t)out}, lora->dora_m[t] + (size_t)l * out});
        }
    }
    std::string err = safetensors_write((std::string(dir) + "/" PEFT_WEIGHTS_FILE).c_str(), tensors);
    if (!err.empty()) return err;
    std::string config = peft_config_json(lora->config, base_name);
    return write_atomically((std::string(dir) + "/" PEFT_CONFIG_FILE).c_str(), {{config.data(), config.size()}});
}

static std::string read_text_file(const char* path, const char* what, const char* hint, std::string* out) {
    FILE* f = NULL;
    std::string err = open_for_reading(path, what, hint, &f);
    if (!err.empty()) return err;
    long size = 0;
    err = file_size_of(f, path, &size);
    if (err.empty()) {
        out->resize((size_t)size);
        if (size > 0 && fread(&(*out)[0], 1, (size_t)size, f) != (size_t)size) err = strprintf("%s '%s': read error\n---> HINT: %s", what, path, hint);
    }
    fclose(f);
    return err;
}

// Reads a PEFT LoRA adapter directory (made by PEFT or by peft_export) and attaches it to the base in
// model. The config decides r, alpha and the targets; every adapted target needs both tensors for every
// layer, with the exact shapes; any other key is an error (PEFT itself would ignore a misspelled key).
// base_quant: how to store the base's block matrices (LoRAQuant; PEFT files do not say: fp32 by default)
static std::string peft_import(const char* dir, GPT2<float>* model, int base_quant = LORA_QUANT_FP32) {
    const char* hint = "pass a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors, as save_pretrained writes them) with -A";
    std::string config_path = std::string(dir) + "/" PEFT_CONFIG_FILE, weights_path = std::string(dir) + "/" PEFT_WEIGHTS_FILE;
    const char* cpath = config_path.c_str();
    std::string text;
    std::string err = read_text_file(cpath, "PEFT config", hint, &text);
    if (!err.empty()) return err;
    Json doc;
    std::string jerr = json_parse(text.data(), text.size(), &doc);
    if (!jerr.empty()) return strprintf("PEFT config '%s' is not valid JSON: %s\n---> HINT: %s", cpath, jerr.c_str(), hint);
    if (doc.kind != Json::OBJECT) return strprintf("PEFT config '%s' is not a JSON object\n---> HINT: %s", cpath, hint);
    auto bad = [&](const std::string& what, const char* fix) { return strprintf("PEFT config '%s': %s\n---> HINT: %s", cpath, what.c_str(), fix); };
    const Json* v = doc.get("peft_type");
    if (v == NULL || v->kind != Json::STRING || v->str != "LORA") return bad("peft_type must be \"LORA\"", hint);
    uint64_t r = 0;
    if (!json_to_u64(doc.get("r"), &r) || r < 1 || r > 65536) return bad("r must be an integer >= 1", hint);
    float alpha = 8.0f; // PEFT's default lora_alpha
    v = doc.get("lora_alpha");
    if (v != NULL && (v->kind != Json::NUMBER || !(v->number > 0) || !std::isfinite(v->number))) return bad("lora_alpha must be a number > 0", hint);
    if (v != NULL) alpha = (float)v->number;
    v = doc.get("use_rslora");
    if (v != NULL && v->kind != Json::BOOL) return bad("use_rslora must be true or false", hint);
    bool use_rslora = v != NULL && v->boolean; // PEFT's scale is then alpha / sqrt(r), as ours
    v = doc.get("use_dora");
    if (v != NULL && v->kind != Json::BOOL && v->kind != Json::NUL) return bad("use_dora must be true or false", hint);
    bool use_dora = v != NULL && v->kind == Json::BOOL && v->boolean; // then one lora_magnitude_vector per module
    v = doc.get("init_lora_weights");
    if (v != NULL && v->kind == Json::STRING && v->str.compare(0, 5, "pissa") == 0) {
        // PiSSA changes the base too (W0 -> W0 - scale lora_B0 lora_A0 at init), and that residual base is
        // not in the adapter files: on the original base this adapter would give a different model
        return bad("init_lora_weights is \"" + v->str + "\": a PiSSA adapter needs the residual base it was trained on, which PEFT does not save with it",
                   "in PEFT, save it converted to a plain LoRA (save_pretrained(..., path_initial_model_for_weight_conversion=...)); ours: load adapter.bin, which redoes the PiSSA split of the base");
    }
    v = doc.get("bias");
    if (v != NULL && !(v->kind == Json::STRING && v->str == "none")) return bad("bias must be \"none\" (bias training is not supported)", "train with bias=\"none\"");
    v = doc.get("layers_to_transform");
    if (v != NULL && v->kind != Json::NUL && !(v->kind == Json::ARRAY && v->items.empty())) return bad("layers_to_transform is set; only adapters on every layer are supported", hint);
    for (const char* key : {"rank_pattern", "alpha_pattern"}) {
        v = doc.get(key);
        if (v != NULL && v->kind != Json::NUL && !(v->kind == Json::OBJECT && v->members.empty())) return bad(std::string(key) + " is set; one r and alpha for every layer are supported", hint);
    }
    // target_modules: a list of names matched like PEFT does; missing means PEFT's default for GPT-2, c_attn
    unsigned targets = 0;
    v = doc.get("target_modules");
    if (v == NULL || v->kind == Json::NUL) {
        targets = 1u << LORA_QKV;
    } else if (v->kind != Json::ARRAY) {
        return bad("target_modules must be a list of module names (a regex string is not supported)", "list the modules, e.g. [\"c_attn\", \"c_proj\", \"c_fc\"]");
    } else {
        for (const Json& name : v->items) {
            if (name.kind != Json::STRING) return bad("target_modules must hold strings", hint);
            unsigned matched = 0;
            for (int t = 0; t < LORA_NUM_TARGETS; t++) {
                std::string module = std::string("transformer.h.0.") + lora_peft_names[t];
                bool hit = module == name.str || (module.size() > name.str.size() &&
                           module.compare(module.size() - name.str.size() - 1, std::string::npos, "." + name.str) == 0);
                if (hit) matched |= 1u << t;
            }
            if (matched == 0) return bad("target module \"" + name.str + "\" is none of GPT-2's adaptable matmuls", "use c_attn, c_proj (or attn.c_proj / mlp.c_proj), c_fc");
            targets |= matched;
        }
    }
    if (targets == 0) return bad("target_modules is empty", hint);
    LoRAConfig cfg = lora_config_rslora(lora_config((int)r, alpha, targets), use_rslora);
    cfg.use_dora = use_dora;
    cfg.base_quant = base_quant;

    SafeTensors st;
    err = safetensors_read(weights_path.c_str(), &st);
    if (!err.empty()) return err;
    int L = model->config.num_layers, C = model->config.channels;
    std::vector<LoRATensor> list = lora_tensor_list(cfg, L, C);
    for (const LoRATensor& t : list) {
        std::string key = lora_peft_key(t.layer, t.target, t.is_B);
        const SafeTensor* s = st.find(key);
        if (s == NULL) {
            return strprintf("PEFT adapter '%s' has no tensor '%s', which its config (r=%d, targets %s) needs\n---> HINT: the adapter was made for another model or config; %s",
                             weights_path.c_str(), key.c_str(), cfg.r, lora_targets_string(cfg.targets).c_str(), hint);
        }
        if (s->shape.size() != 2 || s->shape[0] != (size_t)t.rows || s->shape[1] != (size_t)t.cols) {
            std::string shape;
            for (size_t d : s->shape) shape += (shape.empty() ? "" : ",") + std::to_string(d);
            return strprintf("PEFT adapter '%s': tensor '%s' has shape [%s], expected [%d,%d] (r=%d on a base with C=%d)\n---> HINT: the adapter was made for another base (-e) or its config's r is wrong",
                             weights_path.c_str(), key.c_str(), shape.c_str(), t.rows, t.cols, cfg.r, C);
        }
    }
    // DoRA: one magnitude vector (out) per adapted module
    struct Magnitude { std::string key; int target, layer; };
    std::vector<Magnitude> magnitudes;
    for (int t = 0; use_dora && t < LORA_NUM_TARGETS; t++) {
        if (!(cfg.targets & (1u << t))) continue;
        int out = lora_target_out(t, C);
        for (int l = 0; l < L; l++) {
            std::string key = lora_peft_magnitude_key(l, t);
            const SafeTensor* s = st.find(key);
            if (s == NULL) {
                return strprintf("PEFT adapter '%s' has no tensor '%s', which its config (use_dora) needs\n---> HINT: %s", weights_path.c_str(), key.c_str(), hint);
            }
            if (s->shape.size() != 1 || s->shape[0] != (size_t)out) {
                return strprintf("PEFT adapter '%s': DoRA magnitude '%s' must have shape [%d] (the module's outputs)\n---> HINT: the adapter was made for another base (-e)",
                                 weights_path.c_str(), key.c_str(), out);
            }
            magnitudes.push_back({key, t, l});
        }
    }
    if (st.tensors.size() != list.size() + magnitudes.size()) {
        for (const SafeTensor& s : st.tensors) {
            bool expected = false;
            for (const LoRATensor& t : list) expected = expected || s.name == lora_peft_key(t.layer, t.target, t.is_B);
            for (const Magnitude& m : magnitudes) expected = expected || s.name == m.key;
            if (!expected) {
                return strprintf("PEFT adapter '%s' has tensor '%s', which is not a lora_A/lora_B of a target in its config (%s) on an L=%d base\n---> HINT: check target_modules in '%s'; %s",
                                 weights_path.c_str(), s.name.c_str(), lora_targets_string(cfg.targets).c_str(), L, cpath, hint);
            }
        }
    }
    if (model->block_file != NULL && cfg.base_quant == LORA_QUANT_FP32) {
        return strprintf("PEFT adapter '%s': the base was read for a quantized attach (block matrices left on disk) but -Q is fp32\n---> HINT: pass -Q int8, -Q nf4 or -Q int2 with -A", dir);
    }
    if (model->lora.params_memory != NULL) lora_free(&model->lora);
    gpt2_lora_attach(model, cfg, 0); // the init is overwritten here
    for (const LoRATensor& t : list) {
        const SafeTensor* s = st.find(lora_peft_key(t.layer, t.target, t.is_B));
        memcpy(model->lora.params_memory + t.offset, st.values(s), (size_t)t.rows * t.cols * sizeof(float));
    }
    for (const Magnitude& m : magnitudes) { // the trained magnitudes replace the ||W0||_row that attach started from
        int out = lora_target_out(m.target, C);
        memcpy(model->lora.dora_m[m.target] + (size_t)m.layer * out, st.values(st.find(m.key)), (size_t)out * sizeof(float));
    }
    return "";
}

// the base storage an adapter.bin says it trained on (header[29]), read before the base is loaded;
// fp32 for anything else (a PEFT directory, an unreadable or invalid file: lora_file_read reports those)
static int adapter_file_base_quant(const char* path) {
    int header[256];
    FILE* f = fopen(path, "rb");
    if (f == NULL) return LORA_QUANT_FP32;
    bool ok = fread(header, sizeof(header), 1, f) == 1 && header[0] == ADAPTER_MAGIC;
    fclose(f);
    return ok && header[29] > 0 && header[29] < LORA_NUM_QUANTS ? header[29] : LORA_QUANT_FP32;
}

// -A: a directory is a PEFT adapter, a file is our adapter.bin. base_quant: -Q when given, else -1 (the
// adapter.bin's own base storage; fp32 for PEFT)
static std::string lora_file_load(const char* path, GPT2<float>* model, uint64_t base_sum, TrainState* state, bool* has_state,
                                  int base_quant = -1) {
    struct stat st;
    *has_state = false;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) return peft_import(path, model, base_quant >= 0 ? base_quant : LORA_QUANT_FP32);
    return lora_file_read(path, model, base_sum, state, has_state, base_quant);
}

// Several adapters (-A given more than once) on one base: each is loaded onto the base in turn and moved
// aside into parts[k]. Only plain (and rsLoRA) adapters on the fp32 base qualify: the change of DoRA (a
// row norm) and of PiSSA (a changed base) is not scale * lora_B lora_A on the shared base. The caller
// frees the parts (lora_free), also after an error.
static std::string lora_files_load_all(const std::vector<const char*>& paths, GPT2<float>* model, uint64_t base_sum,
                                       std::vector<LoRA<float>>* parts) {
    parts->assign(paths.size(), LoRA<float>());
    for (size_t k = 0; k < paths.size(); k++) {
        TrainState unused;
        bool has_state = false;
        std::string err = lora_file_load(paths[k], model, base_sum, &unused, &has_state, LORA_QUANT_FP32);
        if (err.empty() && (model->lora.config.use_dora || model->lora.config.init_pissa)) {
            err = strprintf("adapter '%s' is %s: its change to the base is not scale * lora_B lora_A, so it cannot share the base with others\n"
                            "---> HINT: use it alone (one -A, no -S or -Y), e.g. -A %s -M merged.bin -x 0",
                            paths[k], model->lora.config.use_dora ? "DoRA" : "PiSSA", paths[k]);
        }
        if (!err.empty()) return paths.size() > 1 ? strprintf("adapter %zu of %zu: ", k + 1, paths.size()) + err : err;
        (*parts)[k] = model->lora; // moved aside
        memset(&model->lora, 0, sizeof(model->lora));
    }
    return "";
}

// -A given more than once, or with -S weights: the adapters folded into one by lora_combine, attached as
// the model's adapter, which -p, -M and -o then use like any other
static std::string lora_files_combine(const std::vector<const char*>& paths, const std::vector<float>& weights,
                                      GPT2<float>* model, uint64_t base_sum) {
    std::vector<LoRA<float>> parts;
    std::string err = lora_files_load_all(paths, model, base_sum, &parts);
    if (err.empty()) {
        std::vector<const LoRA<float>*> ptrs;
        for (const LoRA<float>& part : parts) ptrs.push_back(&part);
        LoRA<float> mix;
        lora_combine(&mix, ptrs.data(), weights.data(), (int)parts.size());
        gpt2_lora_attach(model, mix.config, 0);
        memcpy(model->lora.params_memory, mix.params_memory, mix.num_parameters * sizeof(float));
        lora_free(&mix);
    }
    for (LoRA<float>& part : parts) { if (part.params_memory != NULL) lora_free(&part); }
    return err;
}

// everything -o gets for an adapter: <dir>/adapter.bin (with the state for exact resume) and the PEFT export
static std::string lora_file_save_all(const char* dir, const GPT2<float>* model, uint64_t base_sum, const TrainState& state, const char* base_name) {
    std::string err = lora_file_write((std::string(dir) + "/adapter.bin").c_str(), model, base_sum, &state);
    if (err.empty()) err = peft_export(dir, model, base_name);
    return err;
}

// ---- inference from a text prompt

// encodes prompt with the GPT-2 BPE (an empty prompt starts from <|endoftext|>) and appends n sampled
// tokens; *text gets the decoded continuation
// the prompt as token ids (an empty prompt starts from <|endoftext|>), checked against the base's vocabulary
static std::string encode_prompt(const BPE* bpe, const std::string& prompt, int V, std::vector<int>* ids) {
    bpe_encode(bpe, prompt.data(), prompt.size(), *ids);
    if (ids->empty()) ids->push_back(bpe->eot_token);
    for (int id : *ids) {
        if (id >= V) {
            return strprintf("flag -p: the prompt encodes to token id %d, but the base model has only V=%d ids\n"
                             "---> HINT: prompts need a base with GPT-2's vocabulary (V=50257), e.g. gpt2_124M.bin", id, V);
        }
    }
    return "";
}

static std::string generate_from_prompt(GPT2<float>* model, const BPE* bpe, const std::string& prompt, int n,
                                        float temperature, int top_k, Rng* rng, std::string* text) {
    std::vector<int> ids;
    std::string err = encode_prompt(bpe, prompt, model->config.vocab_size, &ids);
    if (!err.empty()) return err;
    std::vector<int> out = gpt2_generate(model, ids, n, rng, temperature, top_k);
    *text = bpe_decode(bpe, out.data(), out.size());
    return "";
}

// A multi-adapter batch (lora_multi_set on model->lora): sequence b continues the prompt with its own
// adapter, all B sequences in one forward per token (no cache; past the allocated T the window slides).
// Returns the n new tokens of each sequence.
static std::vector<std::vector<int>> gpt2_generate_multi(GPT2<float>* model, const std::vector<int>& prompt, int B, int n,
                                                         Rng* rng, float temperature = 1.0f, int top_k = 0) {
    std::vector<std::vector<int>> seqs(B, prompt);
    int Vp = model->config.padded_vocab_size;
    std::vector<int> inputs;
    for (int i = 0; i < n; i++) {
        int len = (int)std::min<size_t>(seqs[0].size(), (size_t)model->alloc_T);
        inputs.clear();
        for (const std::vector<int>& seq : seqs) inputs.insert(inputs.end(), seq.end() - len, seq.end());
        model->lora.multi_T = len; // rows per sequence, for lora_multi_forward
        gpt2_forward(model, inputs.data(), (const int*)NULL, B, len);
        for (int b = 0; b < B; b++) {
            const float* logits = model->acts.logits + ((size_t)b * len + len - 1) * Vp;
            seqs[b].push_back(sample_top_k(logits, model->config.vocab_size, temperature, top_k, rng_f32(rng)));
        }
    }
    for (std::vector<int>& seq : seqs) seq.erase(seq.begin(), seq.begin() + prompt.size());
    return seqs;
}

// ----------------------------------------------------------------------------
// data parallelism over MPI ranks (compiled in with -DUSE_MPI, which make sets when it finds mpicxx).
// Every rank holds the whole model and reads its own slice of each global batch (see the data loader).
// Each rank's loss is the mean over its B*T positions, so the mean over ranks of their gradients is the
// gradient of the mean over all B*world*T positions: what one process with batch B*world computes, up
// to fp32 summation order. After backward one MPI_Allreduce sums the trainable gradients (one flat
// buffer, in place) and every rank divides by world; every rank then applies the same AdamW step to
// the same gradient, so the weights stay identical on all ranks and are never sent. With LoRA that is
// a few MB a step, not the base model. Only rank 0 logs, samples and writes files.
// A rank that dies takes the job down: MPI_ERRORS_ARE_FATAL aborts on a failed call, and mpirun kills
// the remaining ranks as soon as one exits abnormally, so nobody waits forever in an allreduce.

struct DataParallel {
    int rank = 0, world = 1;       // this process and the number of processes: 0 and 1 without MPI
    double allreduce_ms = 0;       // wall time of the last gradient allreduce (includes waiting for the slowest rank)
    size_t allreduce_bytes = 0;    // bytes of gradient each rank contributes per step
};

static void dp_init(DataParallel* dp, int* argc, char*** argv) {
#ifdef USE_MPI
    MPI_Init(argc, argv);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_ARE_FATAL); // MPI's default, made explicit
    MPI_Comm_rank(MPI_COMM_WORLD, &dp->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &dp->world);
    // ranks other than 0 stay silent on stdout; their errors still reach stderr
    if (dp->rank != 0 && freopen("/dev/null", "w", stdout) == NULL) die("rank: cannot redirect stdout to /dev/null");
#else
    // launched by mpirun but built without MPI: every process would train alone on the same data
    const char* n = getenv("OMPI_COMM_WORLD_SIZE") ? getenv("OMPI_COMM_WORLD_SIZE") : getenv("PMI_SIZE");
    if (n != NULL && atoi(n) > 1) {
        die(strprintf("started as one of %s MPI processes, but this train_gpt2_lora was built without MPI\n"
                      "---> HINT: install an MPI (apt-get install libopenmpi-dev openmpi-bin) and rebuild with make", n));
    }
#endif
}

// in place: x = mean over ranks of x, with one MPI_Allreduce
static void dp_average(DataParallel* dp, float* x, size_t n) {
#ifdef USE_MPI
    if (dp->world == 1) return;
    if (n > (size_t)INT32_MAX) die(strprintf("cannot allreduce %zu floats in one call (MPI counts are int)", n));
    double t0 = MPI_Wtime();
    MPI_Allreduce(MPI_IN_PLACE, x, (int)n, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    for (size_t i = 0; i < n; i++) { x[i] /= dp->world; }
    dp->allreduce_ms = (MPI_Wtime() - t0) * 1000.0;
    dp->allreduce_bytes = n * sizeof(float);
#endif
}

// the gradients of what is trainable: the adapters, or with -f every base parameter (main trains one or the other)
static void dp_average_gradients(DataParallel* dp, GPT2<float>* model) {
    if (dp->world == 1) return;
    float* grads = model->train_base ? model->grads_memory : model->lora.grads_memory;
    size_t n = model->train_base ? model->num_parameters : model->lora.num_parameters;
    // any other trainable buffer would silently differ between ranks: refuse instead
    if (n != gpt2_trainable_parameters(model)) {
        die("data parallel (mpirun) averages the gradients of LoRA or of full fine-tuning (-f 1) only, and this run trains other parameters\n"
            "---> HINT: run this method in one process, without mpirun");
    }
    dp_average(dp, grads, n);
}

// mean over ranks of one number (a loss), in double
static float dp_mean(const DataParallel* dp, float x) {
    double v = x;
#ifdef USE_MPI
    if (dp->world > 1) MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
#endif
    return (float)(v / dp->world);
}

static void dp_finalize() {
#ifdef USE_MPI
    MPI_Finalize();
#endif
}

// ----------------------------------------------------------------------------
// main

static double now_seconds() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static float gpt2_validate(GPT2<float>* model, DataLoader* val, int batches) {
    dataloader_reset(val);
    double sum = 0;
    for (int i = 0; i < batches; i++) {
        dataloader_next_batch(val);
        gpt2_forward(model, val->inputs.data(), val->targets.data(), val->B, val->T);
        sum += model->mean_loss;
    }
    return (float)(sum / batches);
}

static double mib(size_t bytes) { return bytes / (1024.0 * 1024.0); }

// Ctrl-C (SIGINT) or SIGTERM during training: the handler only records the signal; the loop finishes the
// step it is in, saves as at the end of a run (atomically) and exits with 128 + signal. SA_RESETHAND: a
// second Ctrl-C kills at once, which is still safe, since every file is written to .tmp and renamed.
static volatile sig_atomic_t stop_signal = 0;
static void on_stop_signal(int sig) { stop_signal = sig; }
static void install_stop_handlers() {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESETHAND | SA_RESTART;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

// ----------------------------------------------------------------------------
// ---- other adaptation methods: setup, report and files for main ----

// -F k, -H m, -X P (at most one, checked by main): sets the method up on a freshly loaded base
static std::string gpt2_enable_other_method(GPT2<float>* model, int freeze_k, int adapter_m, int prefix_P, uint64_t seed) {
    int L = model->config.num_layers;
    if (freeze_k > L) return strprintf("flag -F: cannot train the top %d blocks of a %d-block model\n---> HINT: use -F 1..%d (-f 1 trains everything)", freeze_k, L, L);
    if (freeze_k > 0) gpt2_enable_top_training(model, freeze_k);
    if (adapter_m > 0) gpt2_adapters_attach(model, adapter_m, seed);
    if (prefix_P > 0) gpt2_prefix_attach(model, prefix_P, seed);
    return "";
}

// bytes held by each kind of state, as the [Memory] block prints them (docs: doc/memory.md)
struct MemoryBytes {
    size_t base;        // the base weights as held: fp32, or with -Q the fp32 rest + block-matrix codes, absmax and one dequantized layer per matrix
    size_t params;      // base + trainable extras (+ W0 with L2-SP)
    size_t grads;       // one float per trainable parameter
    size_t optimizer;   // AdamW m and v: two floats per trainable parameter
    size_t activations; // forward activations, their per-layer gradients and the method's caches
};

static MemoryBytes gpt2_memory_bytes(const GPT2<float>* model) {
    MemoryBytes mb;
    size_t trainable = gpt2_trainable_parameters(model);
    size_t extras = model->lora.num_parameters + model->adapters.buf.n + model->prefix.buf.n;
    mb.base = model->num_params_stored * sizeof(float);
    if (model->lora.quant_q[0] != NULL) { // -Q: the block matrices are codes (see gpt2_lora_attach)
        mb.base += lora_base_weight_bytes(&model->lora, model->lora.config.base_quant) + lora_quant_scratch_bytes(&model->lora);
    }
    mb.params = mb.base + (extras + (model->params0 ? model->num_parameters : 0)) * sizeof(float);
    mb.grads = trainable * sizeof(float);
    mb.optimizer = 2 * trainable * sizeof(float);
    size_t BT = (size_t)model->alloc_B * model->alloc_T;
    mb.activations = (model->num_activations + model->num_dacts + 2 * BT) * sizeof(float) +
                     (model->lora.num_parameters > 0 ? lora_activation_bytes(&model->lora) : 0) +
                     adapters_activation_bytes(&model->adapters) + prefix_activation_bytes(&model->prefix);
    return mb;
}

// the method block of the log, for everything but plain LoRA (which prints [LoRA])
static void gpt2_print_method(const GPT2<float>* model) {
    size_t trainable = gpt2_trainable_parameters(model);
    if (model->params0) printf("[L2-SP]\nlambda: %g\n", model->l2sp_lambda);
    else if (model->train_base) printf("[Full fine-tuning]\n");
    if (model->top_grads) printf("[Freeze]\ntrained blocks: %d..%d and lnf\n", model->first_trained_layer, model->config.num_layers - 1);
    if (model->adapters.m > 0) printf("[Adapters]\nbottleneck m: %d\n", model->adapters.m);
    if (model->prefix.P > 0) printf("[Prefix]\nprefix positions P: %d\n", model->prefix.P);
    printf("trainable_params: %zu\ntrainable %%: %.4f\n", trainable,
           100.0 * trainable / (double)(model->num_parameters + model->adapters.buf.n + model->prefix.buf.n));
}

// RSS now (not the peak), from /proc/self/statm; 0 where that is unavailable
static double rss_now_mib() {
    long pages_total = 0, pages_resident = 0;
    FILE* f = fopen("/proc/self/statm", "r");
    if (f == NULL) return 0;
    if (fscanf(f, "%ld %ld", &pages_total, &pages_resident) != 2) pages_resident = 0;
    fclose(f);
    return pages_resident * (double)sysconf(_SC_PAGESIZE) / (1024.0 * 1024.0);
}

// -H / -X with -o: the trained adapter or prefix parameters as <dir>/method.bin, a 1024-byte header
// (magic, version, method 1 = adapter / 2 = prefix, L, C, m or P, parameter count) then the floats
#define METHOD_FILE_MAGIC 20261110
static std::string gpt2_write_method_file(const GPT2<float>* model, const char* path) {
    const TrainableBuffer<float>* buf = model->adapters.m > 0 ? &model->adapters.buf : &model->prefix.buf;
    int header[256] = {0};
    header[0] = METHOD_FILE_MAGIC;
    header[1] = 1;
    header[2] = model->adapters.m > 0 ? 1 : 2;
    header[3] = model->config.num_layers;
    header[4] = model->config.channels;
    header[5] = model->adapters.m > 0 ? model->adapters.m : model->prefix.P;
    header[6] = (int)buf->n;
    return write_atomically(path, {{header, sizeof(header)}, {buf->params, buf->n * sizeof(float)}});
}

#ifndef TESTING
static void error_usage() {
    fprintf(stderr,
        "Usage:   ./train_gpt2_lora [options]\n"
        "Example: ./train_gpt2_lora -e data/gpt2_124M.bin -i data/tiny_shakespeare_train.bin -r 8 -x 100\n"
        "Options:\n"
        "  -e <file>   base model, llm.c fp32 checkpoint (default data/gpt2_124M.bin)\n"
        "  -i <file>   training tokens (default data/tiny_shakespeare_train.bin)\n"
        "  -j <file>   validation tokens (default data/tiny_shakespeare_val.bin)\n"
        "  -c <file>   llm.c tokenizer for printing samples (default data/gpt2_tokenizer.bin; ids if absent)\n"
        "  -o <dir>    output directory (default: none, nothing is written)\n"
        "  -b <int>    batch size B, >= 1 (default 4)\n"
        "  -t <int>    sequence length T, 1..maxT (default 64)\n"
        "  -r <int>    LoRA rank r, >= 1 (default 8)\n"
        "  -a <float>  LoRA alpha; scale = alpha / r (default 16)\n"
        "  -q <list>   LoRA targets from qkv,attproj,fc,fcproj (default all four)\n"
        "  -f <0|1>    full fine-tuning: train every base parameter, no LoRA (default 0)\n"
        "  -l <float>  learning rate, >= 0 (default 1e-3 with LoRA, 1e-4 with -f 1)\n"
        "  -d <float>  AdamW weight decay, >= 0 (default 0)\n"
        "  -x <int>    training steps, >= 0 (default 40)\n"
        "  -v <int>    validation loss every v steps, 0 = never (default 20)\n"
        "  -m <int>    validation batches, >= 1 (default 5)\n"
        "  -s <int>    sample every s steps, 0 = never (default 20)\n"
        "  -g <int>    tokens generated per sample, >= 1 (default 64)\n"
        "  -u <0|1>    shuffle the order of training batches each epoch (default 0)\n"
        "  -y <int>    learning-rate warmup: linear over the first y steps, >= 0 (default 0)\n"
        "  -z <float>  then cosine decay to z * lr at the last step, 0..1; 1 = constant (default 1)\n"
        "  -G <float>  clip the global gradient norm to G before each update, 0 = off (default 1)\n"
        "  -n <int>    random seed for LoRA init, shuffling and sampling (default 1337)\n"
        "  -k <int>    also save the adapter (-f 1: model.bin) to -o every k steps, 0 = only at the end (default 0)\n"
        "  -A <path>   load an adapter: adapter.bin (resumes training with its optimizer state) or a PEFT dir\n"
        "              (-A more than once: the adapters are added into one, for -p and -M)\n"
        "  -S <list>   weights of the -A adapters, comma list, one each: sum_k w_k scale_k lora_B_k lora_A_k (default 1)\n"
        "  -M <file>   write base + adapter merged as an llm.c checkpoint at the end (-x 0: merge only)\n"
        "  -p <text>   generate -g tokens from this prompt and exit (inference only, no training data)\n"
        "  -T <float>  sampling temperature, > 0 (default 1)\n"
        "  -K <int>    sample from the K most likely tokens only, 0 = all (default 0)\n"
        "  -W <0|1>    -p with the adapter merged into the weights, or as a separate branch (default 1)\n"
        "  -Y <0|1>    -p with several -A: 1 = one batch, each sequence with its own adapter, unmerged (default 0)\n"
        "  -E <dir>    GPT-2 BPE dir (encoder.json, vocab.bpe) for -p (default ../shared/data/gpt2_tokenizer)\n"
        "  -N <name>   base_model_name_or_path for the PEFT adapter_config.json (default gpt2)\n"
        "  -V <list>   LoRA variant: lora, or a comma list of rslora,dora,pissa (default lora)\n"
        "  -Q <kind>   frozen base matrices as fp32, int8, nf4 or int2 (QLoRA-style; default fp32, -A: the adapter's)\n"
        "  -P <float>  LoRA+: lora_B learning rate = P * lr, > 0 (default 1)\n"
        "  -F <int>    instead of LoRA, freezing: train only the top F blocks and lnf, 0 = off (default 0)\n"
        "  -H <int>    instead of LoRA, Houlsby adapters of bottleneck m = H, 0 = off (default 0)\n"
        "  -X <int>    instead of LoRA, prefix tuning with X key/value positions per layer, 0 = off (default 0)\n"
        "  -w <float>  with -f 1, L2-SP: add w/2 ||W - W0||^2 pulling toward the base, >= 0 (default 0)\n");
    exit(EXIT_FAILURE);
}

static int parse_int(const char* flag, const char* s) {
    char* end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < INT32_MIN || v > INT32_MAX) {
        fprintf(stderr, "Error: flag %s expects an integer, got '%s'\n---> HINT: see the usage below\n", flag, s);
        error_usage();
    }
    return (int)v;
}

static float parse_float(const char* flag, const char* s) {
    char* end = NULL;
    errno = 0;
    float v = strtof(s, &end);
    if (errno != 0 || end == s || *end != '\0' || !std::isfinite(v)) {
        fprintf(stderr, "Error: flag %s expects a number, got '%s'\n---> HINT: see the usage below\n", flag, s);
        error_usage();
    }
    return v;
}

static void bad_flag(const char* flag, const std::string& what) {
    fprintf(stderr, "Error: flag %s: %s\n", flag, what.c_str());
    exit(EXIT_FAILURE);
}

int main(int argc, char** argv) {
    DataParallel dp; // one process unless started by mpirun with an MPI build
    dp_init(&dp, &argc, &argv);
    // defaults, llm.c-like: B=4, T=64 on tinyshakespeare with GPT-2 124M
    const char* base_path = "data/gpt2_124M.bin";       // -e
    const char* train_path = "data/tiny_shakespeare_train.bin"; // -i
    const char* val_path = "data/tiny_shakespeare_val.bin";     // -j
    const char* tokenizer_path = "data/gpt2_tokenizer.bin";     // -c
    const char* output_dir = NULL;  // -o
    int B = 4;                      // -b
    int T = 64;                     // -t
    int rank = 8;                   // -r
    float alpha = 16.0f;            // -a
    const char* targets = "qkv,attproj,fc,fcproj"; // -q
    int full = 0;                   // -f
    float lr = 1e-3f;               // -l, 1e-3 with LoRA; -f 1 lowers it to 1e-4 unless -l is given
    bool lr_given = false;
    float weight_decay = 0.0f;      // -d
    int steps = 40;                 // -x
    int val_every = 20;             // -v
    int val_batches = 5;            // -m
    int sample_every = 20;          // -s
    int gen_tokens = 64;            // -g
    int shuffle = 0;                // -u
    int warmup = 0;                 // -y, linear learning-rate warmup steps
    float lr_final_frac = 1.0f;     // -z, cosine decay to lr * z at the last step; 1 = constant
    float grad_clip = 1.0f;         // -G, clip the global gradient norm to G; 0 = off
    int seed = 1337;                // -n
    int save_every = 0;             // -k
    std::vector<const char*> adapter_paths; // -A, may be given several times
    const char* adapter_weights = NULL;     // -S, one weight per -A adapter
    const char* merged_path = NULL; // -M
    const char* prompt = NULL;      // -p
    float temperature = 1.0f;       // -T
    int top_k = 0;                  // -K
    int merged_inference = 1;       // -W
    int multi_batch = 0;            // -Y, several -A with -p: one batch, each sequence its own adapter
    const char* bpe_dir = NULL;     // -E, NULL: search ../shared/data/gpt2_tokenizer, data/gpt2_tokenizer
    const char* base_name = "gpt2"; // -N
    const char* variants = "lora";  // -V, lora or a comma list of rslora,dora,pissa
    const char* quant = "fp32";     // -Q, the frozen base's adapted matrices: fp32, int8, nf4 or int2 (with -A: the adapter's)
    bool quant_given = false;
    float lr_ratio_B = 1.0f;        // -P, LoRA+: lora_B learns with lr * P
    int freeze_k = 0;               // -F, train only the top k blocks (and lnf)
    int adapter_m = 0;              // -H, Houlsby adapter bottleneck width
    int prefix_P = 0;               // -X, prefix positions per layer
    float l2sp_lambda = 0.0f;       // -w, L2-SP strength (with -f 1)
    bool tokenizer_given = false;
    for (int i = 1; i < argc; i += 2) {
        if (argv[i][0] != '-' || strlen(argv[i]) != 2) {
            fprintf(stderr, "Error: unknown argument '%s'\n---> HINT: flags are a dash and one letter, each followed by a value\n", argv[i]);
            error_usage();
        }
        if (argv[i][1] == 'h') error_usage();
        if (i + 1 >= argc) {
            fprintf(stderr, "Error: flag %s needs a value\n", argv[i]);
            error_usage();
        }
        const char* v = argv[i + 1];
        switch (argv[i][1]) {
            case 'e': base_path = v; break;
            case 'i': train_path = v; break;
            case 'j': val_path = v; break;
            case 'c': tokenizer_path = v; tokenizer_given = true; break;
            case 'o': output_dir = v; break;
            case 'b': B = parse_int(argv[i], v); break;
            case 't': T = parse_int(argv[i], v); break;
            case 'r': rank = parse_int(argv[i], v); break;
            case 'a': alpha = parse_float(argv[i], v); break;
            case 'q': targets = v; break;
            case 'f': full = parse_int(argv[i], v); break;
            case 'l': lr = parse_float(argv[i], v); lr_given = true; break;
            case 'd': weight_decay = parse_float(argv[i], v); break;
            case 'x': steps = parse_int(argv[i], v); break;
            case 'v': val_every = parse_int(argv[i], v); break;
            case 'm': val_batches = parse_int(argv[i], v); break;
            case 's': sample_every = parse_int(argv[i], v); break;
            case 'g': gen_tokens = parse_int(argv[i], v); break;
            case 'u': shuffle = parse_int(argv[i], v); break;
            case 'y': warmup = parse_int(argv[i], v); break;
            case 'z': lr_final_frac = parse_float(argv[i], v); break;
            case 'G': grad_clip = parse_float(argv[i], v); break;
            case 'n': seed = parse_int(argv[i], v); break;
            case 'k': save_every = parse_int(argv[i], v); break;
            case 'A': adapter_paths.push_back(v); break;
            case 'S': adapter_weights = v; break;
            case 'M': merged_path = v; break;
            case 'p': prompt = v; break;
            case 'T': temperature = parse_float(argv[i], v); break;
            case 'K': top_k = parse_int(argv[i], v); break;
            case 'W': merged_inference = parse_int(argv[i], v); break;
            case 'Y': multi_batch = parse_int(argv[i], v); break;
            case 'E': bpe_dir = v; break;
            case 'N': base_name = v; break;
            case 'V': variants = v; break;
            case 'Q': quant = v; quant_given = true; break;
            case 'P': lr_ratio_B = parse_float(argv[i], v); break;
            case 'F': freeze_k = parse_int(argv[i], v); break;
            case 'H': adapter_m = parse_int(argv[i], v); break;
            case 'X': prefix_P = parse_int(argv[i], v); break;
            case 'w': l2sp_lambda = parse_float(argv[i], v); break;
            default:
                fprintf(stderr, "Error: unknown flag '%s'\n", argv[i]);
                error_usage();
        }
    }
    // validation / overrides
    const char* adapter_path = adapter_paths.empty() ? NULL : adapter_paths[0];
    // several -A, or -S: the adapters are combined into one, weighted (lora_files_combine); with -Y 1
    // they stay apart instead, one sequence each in one batch
    if (multi_batch != 0 && multi_batch != 1) bad_flag("-Y", strprintf("must be 0 or 1, got %d", multi_batch));
    if (multi_batch && (prompt == NULL || adapter_paths.empty() || adapter_weights != NULL || merged_path != NULL || output_dir != NULL)) {
        bad_flag("-Y", "a multi-adapter batch generates from -p with the adapters given by -A, each unmerged in its own sequence\n"
                       "---> HINT: -Y 1 -p <prompt> -A a -A b ...; without -S, -M and -o (those add the adapters into one: drop -Y)");
    }
    bool combine = !multi_batch && (adapter_paths.size() > 1 || adapter_weights != NULL);
    std::vector<float> combine_weights(adapter_paths.size(), 1.0f);
    if (adapter_weights != NULL) {
        if (adapter_paths.empty()) bad_flag("-S", "weights apply to the adapters given with -A\n---> HINT: add -A <adapter> once per weight");
        std::vector<float> w;
        const char* c = adapter_weights;
        for (;;) { // a comma list of finite numbers
            char* end = NULL;
            float x = strtof(c, &end);
            if (end == c || (*end != ',' && *end != '\0') || !std::isfinite(x)) {
                bad_flag("-S", strprintf("expects a comma list of numbers, one per -A adapter, got '%s'\n---> HINT: e.g. -A a -A b -S 0.7,0.3", adapter_weights));
            }
            w.push_back(x);
            if (*end == '\0') break;
            c = end + 1;
        }
        if (w.size() != adapter_paths.size()) {
            bad_flag("-S", strprintf("%zu weights for %zu adapters (-A)\n---> HINT: give one weight per -A, in the same order", w.size(), adapter_paths.size()));
        }
        combine_weights = w;
    }
    if (combine && prompt == NULL && !(merged_path != NULL && steps == 0)) {
        bad_flag("-A", "several adapters, or -S weights, combine into one adapter for -p and -M only (it has no optimizer state to train on)\n"
                       "---> HINT: add -p <prompt>, or -M merged.bin -x 0 (and -o <dir> to save the combined adapter); to train, give one -A");
    }
    if ((combine || multi_batch) && quant_given && strcmp(quant, "fp32") != 0) {
        bad_flag("-Q", "several adapters on one base (several -A, -S or -Y) need the fp32 base\n---> HINT: drop -Q");
    }
    if (B <= 0) bad_flag("-b", strprintf("batch size must be >= 1, got %d", B));
    if (T <= 0) bad_flag("-t", strprintf("sequence length must be >= 1, got %d", T));
    if (rank <= 0) bad_flag("-r", strprintf("LoRA rank must be >= 1, got %d\n---> HINT: try -r 8; to train every weight use -f 1", rank));
    if (!(alpha > 0)) bad_flag("-a", strprintf("LoRA alpha must be > 0, got %g", alpha));
    if (full != 0 && full != 1) bad_flag("-f", strprintf("must be 0 or 1, got %d", full));
    if (shuffle != 0 && shuffle != 1) bad_flag("-u", strprintf("must be 0 or 1, got %d", shuffle));
    if (lr < 0) bad_flag("-l", strprintf("learning rate must be >= 0, got %g", lr));
    if (warmup < 0) bad_flag("-y", strprintf("warmup steps must be >= 0, got %d", warmup));
    if (!(lr_final_frac >= 0 && lr_final_frac <= 1)) bad_flag("-z", strprintf("the final learning-rate fraction must be in [0, 1], got %g\n---> HINT: -z 0.1 decays to a tenth of -l; -z 1 keeps it constant", lr_final_frac));
    if (!(grad_clip >= 0)) bad_flag("-G", strprintf("the gradient-norm clip must be >= 0 (0 = off), got %g", grad_clip));
    if (full && !lr_given) lr = 1e-4f;
    // the other adaptation methods: at most one of -f 1, -F, -H, -X; LoRA when none
    if (freeze_k < 0) bad_flag("-F", strprintf("must be >= 0, got %d", freeze_k));
    if (adapter_m < 0) bad_flag("-H", strprintf("must be >= 0, got %d", adapter_m));
    if (prefix_P < 0) bad_flag("-X", strprintf("must be >= 0, got %d", prefix_P));
    if ((full != 0) + (freeze_k > 0) + (adapter_m > 0) + (prefix_P > 0) > 1) {
        bad_flag(freeze_k > 0 ? "-F" : adapter_m > 0 ? "-H" : "-X", "choose one method: -f 1, -F, -H or -X (none of them: LoRA)");
    }
    if (l2sp_lambda < 0 || (l2sp_lambda > 0 && !full)) {
        bad_flag("-w", strprintf("L2-SP needs -f 1 and w >= 0, got w = %g\n---> HINT: e.g. -f 1 -w 0.01", l2sp_lambda));
    }
    bool lora_on = !full && freeze_k == 0 && adapter_m == 0 && prefix_P == 0;
    if (freeze_k > 0 && !lr_given) lr = 1e-4f; // trains base weights, like -f 1
    if (!lora_on && !full && (adapter_path != NULL || merged_path != NULL || prompt != NULL)) {
        bad_flag(adapter_path ? "-A" : merged_path ? "-M" : "-p", "LoRA adapter files, merging and -p apply to LoRA only\n---> HINT: drop -F / -H / -X");
    }
    if (weight_decay < 0) bad_flag("-d", strprintf("weight decay must be >= 0, got %g", weight_decay));
    if (steps < 0) bad_flag("-x", strprintf("steps must be >= 0, got %d", steps));
    if (val_every < 0) bad_flag("-v", strprintf("must be >= 0, got %d", val_every));
    if (val_batches <= 0) bad_flag("-m", strprintf("validation batches must be >= 1, got %d", val_batches));
    if (sample_every < 0) bad_flag("-s", strprintf("must be >= 0, got %d", sample_every));
    if (gen_tokens <= 0) bad_flag("-g", strprintf("generated tokens must be >= 1, got %d", gen_tokens));
    if (save_every < 0) bad_flag("-k", strprintf("must be >= 0, got %d", save_every));
    if (save_every > 0 && output_dir == NULL) bad_flag("-k", "saving every k steps needs an output directory\n---> HINT: add -o <dir>");
    if (!(temperature > 0)) bad_flag("-T", strprintf("temperature must be > 0, got %g", temperature));
    if (top_k < 0) bad_flag("-K", strprintf("top-k must be >= 0, got %d", top_k));
    if (merged_inference != 0 && merged_inference != 1) bad_flag("-W", strprintf("must be 0 or 1, got %d", merged_inference));
    if (base_name[0] == '\0' || base_name[0] == '/') {
        bad_flag("-N", strprintf("'%s' is not a model name\n---> HINT: use a Hugging Face hub id such as gpt2 (PEFT configs never carry absolute paths)", base_name));
    }
    if (full && (adapter_path != NULL || merged_path != NULL)) {
        bad_flag(adapter_path ? "-A" : "-M", "LoRA adapters do not apply to full fine-tuning\n---> HINT: drop -f 1 (with -f 1, -o writes the whole model as model.bin)");
    }
    unsigned target_mask = 0;
    std::string err;
    if (lora_on && !lora_parse_targets(targets, &target_mask, &err)) bad_flag("-q", err);
    if (dp.rank != 0) { output_dir = NULL; merged_path = NULL; sample_every = 0; } // only rank 0 samples and writes (and checks -o)
    if (output_dir != NULL) {
        struct stat st;
        if (stat(output_dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
            bad_flag("-o", strprintf("output directory '%s' does not exist\n---> HINT: create it first (mkdir -p %s)", output_dir, output_dir));
        }
    }

    int base_quant = LORA_QUANT_FP32;
    if (!lora_parse_quant(quant, &base_quant, &err)) bad_flag("-Q", err);
    if (full && base_quant != LORA_QUANT_FP32) bad_flag("-Q", "a quantized base is frozen, full fine-tuning trains it\n---> HINT: drop -f 1, or use -Q fp32");
    if (!lora_on && base_quant != LORA_QUANT_FP32) bad_flag("-Q", "a quantized base applies to LoRA only\n---> HINT: drop -F / -H / -X, or use -Q fp32");

    double rss_before_model = rss_now_mib(); // doc/memory.md compares peak RSS minus this with [Memory]
    GPT2<float> model;
    // -Q int8 / nf4 (or -A with an adapter.bin trained on one, and no -Q): the block matrices stay on disk
    // until the attach quantizes them layer by layer, so they are never in memory in fp32
    int read_quant = quant_given || adapter_path == NULL || combine || multi_batch ? base_quant : adapter_file_base_quant(adapter_path);
    err = gpt2_read_checkpoint(&model, base_path, lora_on && read_quant != LORA_QUANT_FP32);
    if (!err.empty()) die("flag -e: " + err);
    GPT2Config cfg = model.config;
    bool no_training = prompt != NULL || (merged_path != NULL && steps == 0); // -p, or -M alone: no data needed
    if (no_training) T = std::min(T, cfg.max_seq_len); // -t is only the context window of -p
    if (T > cfg.max_seq_len) bad_flag("-t", strprintf("sequence length %d exceeds the model's maxT=%d\n---> HINT: use -t %d or less", T, cfg.max_seq_len, cfg.max_seq_len));

    LoRAConfig lcfg = lora_config(rank, alpha, target_mask);
    if (!lora_parse_variants(variants, &lcfg, &err)) bad_flag("-V", err);
    lcfg.base_quant = base_quant;
    if (!(lr_ratio_B > 0)) bad_flag("-P", strprintf("the LoRA+ ratio must be > 0, got %g\n---> HINT: 1 is plain LoRA; the LoRA+ paper uses 16", lr_ratio_B));
    lcfg.lr_ratio_B = lr_ratio_B;
    uint64_t base_sum = 0;  // checksum of the frozen base, stamped into adapter files (-o) and checked (-A)
    TrainState resume;      // the saved run's step, loader and sampler state, when -A has them
    bool have_state = false;
    std::string adapter_desc = strprintf("new (seed %d)", seed);
    std::vector<LoRA<float>> batch_adapters; // -Y 1: the adapters, one per sequence of the batch
    std::vector<const LoRA<float>*> batch_ptrs;
    std::vector<int> batch_index;
    if (full && l2sp_lambda > 0) {
        gpt2_enable_l2sp(&model, l2sp_lambda);
    } else if (full) {
        gpt2_enable_full_training(&model);
    } else if (!lora_on) {
        err = gpt2_enable_other_method(&model, freeze_k, adapter_m, prefix_P, (uint64_t)seed);
        if (!err.empty()) die(err);
    } else {
        // the checksum of the fp32 base file, whatever -Q: adapters trained on a quantized base check
        // against the same file (-A without -Q reads the base whole: the attach below quantizes it after this)
        if (adapter_path != NULL || output_dir != NULL) {
            if (model.block_file != NULL) err = checkpoint_checksum(base_path, &base_sum); // (-Q: not all in memory)
            else base_sum = base_checksum(model.params_memory, model.num_parameters);
            if (!err.empty()) die("flag -e: " + err);
        }
        if (multi_batch) {
            err = lora_files_load_all(adapter_paths, &model, base_sum, &batch_adapters);
            if (!err.empty()) die("flag -A: " + err);
            lcfg = batch_adapters[0].config;
            adapter_desc = "one batch, each sequence its own adapter, unmerged:";
            for (size_t k = 0; k < adapter_paths.size(); k++) {
                adapter_desc += strprintf(" [%zu] %s", k, adapter_paths[k]);
                batch_ptrs.push_back(&batch_adapters[k]);
                batch_index.push_back((int)k);
            }
            lora_multi_set(&model.lora, batch_ptrs.data(), batch_index.data(), T, cfg.num_layers, cfg.channels);
        } else if (combine) {
            err = lora_files_combine(adapter_paths, combine_weights, &model, base_sum);
            if (!err.empty()) die("flag -A: " + err);
            lcfg = model.lora.config;
            adapter_desc = "";
            for (size_t k = 0; k < adapter_paths.size(); k++) {
                adapter_desc += strprintf("%s%g x %s", k ? " + " : "combined: ", combine_weights[k], adapter_paths[k]);
            }
        } else if (adapter_path != NULL) {
            // -Q given: store the base that way; else as the adapter.bin says it trained (fp32 for PEFT)
            err = lora_file_load(adapter_path, &model, base_sum, &resume, &have_state, quant_given ? lcfg.base_quant : -1);
            if (!err.empty()) die("flag -A: " + err);
            lcfg = model.lora.config; // the adapter's r, alpha and targets, whatever -r -a -q say
            adapter_desc = strprintf("%s (%s)", adapter_path, have_state ? strprintf("step %d, with optimizer state", resume.step).c_str() : "weights only");
        } else {
            gpt2_lora_attach(&model, lcfg, (uint64_t)seed);
        }
    }

    // no training data needed: -p generates from a prompt; -M with -x 0 only merges (and -o converts)
    if (no_training) {
        printf("[LoRA]\nadapter: %s\nrank: %d\nalpha: %g\ntargets: %s\n", adapter_desc.c_str(), lcfg.r, lcfg.alpha, lora_targets_string(lcfg.targets).c_str());
        if (output_dir != NULL) {
            err = lora_file_write((std::string(output_dir) + "/adapter.bin").c_str(), &model, base_sum, NULL);
            if (err.empty()) err = peft_export(output_dir, &model, base_name);
            if (!err.empty()) die("flag -o: " + err);
            printf("saved adapter: %s/adapter.bin (weights only), %s/" PEFT_WEIGHTS_FILE ", %s/" PEFT_CONFIG_FILE "\n", output_dir, output_dir, output_dir);
        }
        if (merged_path != NULL) {
            err = write_merged_checkpoint(&model, merged_path);
            if (!err.empty()) die("flag -M: " + err);
            printf("wrote merged checkpoint %s\n", merged_path);
        }
        if (prompt != NULL) {
            BPE bpe;
            bpe.print_errors = false;
            int rc = bpe_dir == NULL ? bpe_load_default(&bpe)
                                     : bpe_load(&bpe, (std::string(bpe_dir) + "/encoder.json").c_str(), (std::string(bpe_dir) + "/vocab.bpe").c_str());
            if (rc != 0) die(std::string(bpe_dir ? "flag -E: " : "flag -p: ") + bpe.error);
            if (multi_batch) { // one sequence per adapter, in one batch
                int nb = (int)batch_adapters.size();
                gpt2_allocate(&model, nb, T);
                std::vector<int> ids;
                err = encode_prompt(&bpe, prompt, cfg.vocab_size, &ids);
                if (!err.empty()) die(err);
                Rng rng;
                rng_seed(&rng, (uint64_t)seed + 1);
                double t0 = now_seconds();
                std::vector<std::vector<int>> outs = gpt2_generate_multi(&model, ids, nb, gen_tokens, &rng, temperature, top_k);
                double secs = now_seconds() - t0;
                printf("[Generate]\nmode: multi-adapter batch of %d\ntemperature: %g\ntop_k: %d\ncontext: %d\n", nb, temperature, top_k, T);
                for (int k = 0; k < nb; k++) {
                    std::string text = bpe_decode(&bpe, outs[k].data(), outs[k].size());
                    printf("--- [%d] %s\n%s%s\n", k, adapter_paths[k], prompt, text.c_str());
                }
                printf("---\ngenerated %d x %d tokens in %.2f s (%.1f tok/s)\n", nb, gen_tokens, secs, nb * gen_tokens / secs);
                model.lora.multi = NULL; // the holder owns nothing; the adapters are freed below
                for (LoRA<float>& a : batch_adapters) lora_free(&a);
                gpt2_free(&model);
                dp_finalize();
                return 0;
            }
            // a quantized base has no fp32 matrices to merge into: it generates unmerged (quantized base + adapters)
            bool merge_now = merged_inference && model.lora.quant_q[0] == NULL;
            if (merge_now) {
                gpt2_lora_merge(&model, +1); // one plain matmul per adapted layer from here on
                lora_free(&model.lora);
            }
            gpt2_allocate(&model, 1, T);
            Rng rng;
            rng_seed(&rng, (uint64_t)seed + 1);
            std::string text;
            double t0 = now_seconds();
            err = generate_from_prompt(&model, &bpe, prompt, gen_tokens, temperature, top_k, &rng, &text);
            if (!err.empty()) die(err);
            double secs = now_seconds() - t0;
            printf("[Generate]\nmode: %s\ntemperature: %g\ntop_k: %d\ncontext: %d\n---\n%s%s\n---\n",
                   merge_now ? "merged" : merged_inference ? "unmerged (quantized base)" : "unmerged",
                   temperature, top_k, T, prompt, text.c_str());
            printf("generated %d tokens in %.2f s (%.1f tok/s)\n", gen_tokens, secs, gen_tokens / secs);
        }
        gpt2_free(&model);
        dp_finalize();
        return 0;
    }
    gpt2_allocate(&model, B, T);

    DataLoader train_loader, val_loader;
    err = dataloader_init(&train_loader, train_path, B, T, cfg.vocab_size, shuffle != 0, (uint64_t)seed, "-i", dp.rank, dp.world);
    if (!err.empty()) die("flag -i: " + err);
    err = dataloader_init(&val_loader, val_path, B, T, cfg.vocab_size, false, 0, "-j", dp.rank, dp.world);
    if (!err.empty()) die("flag -j: " + err);
    if (val_batches > (int)val_loader.num_batches) val_batches = (int)val_loader.num_batches;
    int start_step = 0; // > 0 when -A resumes a run
    if (have_state) {
        if (resume.step > steps) bad_flag("-x", strprintf("the adapter from -A has already trained %d steps, more than -x %d\n---> HINT: -x is the total step count; pass -x %d or more", resume.step, steps, resume.step));
        err = train_state_restore(resume, &train_loader, adapter_path);
        if (!err.empty()) die("flag -A: " + err);
        start_step = resume.step;
    }


    Tokenizer tokenizer;
    bool have_tokenizer = false;
    if (access(tokenizer_path, F_OK) == 0 || tokenizer_given) {
        err = tokenizer_read(&tokenizer, tokenizer_path);
        if (!err.empty()) die("flag -c: " + err);
        have_tokenizer = true;
    }

    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    printf("[GPT-2]\n");
    printf("checkpoint: %s\n", base_path);
    printf("max_seq_len: %d\nvocab_size: %d\npadded_vocab_size: %d\nnum_layers: %d\nnum_heads: %d\nchannels: %d\n",
           cfg.max_seq_len, cfg.vocab_size, cfg.padded_vocab_size, cfg.num_layers, cfg.num_heads, cfg.channels);
    printf("num_parameters: %zu\n", model.num_parameters);
    size_t trainable = gpt2_trainable_parameters(&model);
    if (lora_on) {
        printf("[LoRA]\n");
        printf("adapter: %s\n", adapter_desc.c_str());
        printf("rank: %d\nalpha: %g\nscale: %g\ntargets: %s\n", lcfg.r, lcfg.alpha, lcfg.scale, lora_targets_string(lcfg.targets).c_str());
        printf("variant: %s\n", lora_variants_string(lcfg).c_str());
        printf("base_matrices_bytes: %zu (fp32 would be %zu)\n", lora_base_weight_bytes(&model.lora, lcfg.base_quant),
               lora_base_weight_bytes(&model.lora, LORA_QUANT_FP32));
        printf("trainable_params: %zu\nfrozen_params: %zu\ntrainable %%: %.4f\n", trainable, model.num_parameters,
               100.0 * trainable / (double)(model.num_parameters + trainable));
    } else {
        gpt2_print_method(&model);
    }
    MemoryBytes mem = gpt2_memory_bytes(&model); // doc/memory.md derives each line per method
    size_t base_bytes = mem.base, fp32_base_bytes = model.num_parameters * sizeof(float), act_bytes = mem.activations;
    printf("[Memory]\n");
    printf("parameters: %.1f MiB (base %.1f%s + trainable adapters / prefix / L2-SP copy of W0 %.1f)\n", mib(mem.params),
           mib(base_bytes), base_bytes != fp32_base_bytes ? strprintf(", quantized from %.1f", mib(fp32_base_bytes)).c_str() : "",
           mib(mem.params - base_bytes));
    printf("gradients: %.1f MiB\noptimizer state: %.1f MiB\nactivations: %.1f MiB\n", mib(mem.grads), mib(mem.optimizer), mib(act_bytes));
    printf("total: %.1f MiB (full fine-tuning of this model needs %.1f MiB)\n",
           mib(mem.params + mem.grads + mem.optimizer + act_bytes),
           mib(4 * fp32_base_bytes + (model.num_activations + model.num_dacts + 2 * (size_t)B * T) * sizeof(float)));
    printf("bytes: params %zu grads %zu optimizer %zu activations %zu\n", mem.params, mem.grads, mem.optimizer, mem.activations);
    printf("[Run]\nB: %d\nT: %d\nsteps: %d\nlearning_rate: %g\nwarmup_steps: %d\nfinal_lr_fraction: %g\ngrad_clip: %g\nweight_decay: %g\nthreads: %d\n",
           B, T, steps, lr, warmup, lr_final_frac, grad_clip, weight_decay, threads);
    if (dp.world > 1) printf("ranks: %d (global batch %d = B x ranks)\n", dp.world, B * dp.world);
    printf("train: %s (%zu tokens, %zu batches)\nval: %s (%zu tokens, %d batches used)\n", train_path,
           train_loader.file.tokens.size(), train_loader.num_batches, val_path, val_loader.file.tokens.size(), val_batches);
    printf("tokenizer: %s\n", have_tokenizer ? tokenizer_path : "(none: samples print token ids)");
    fflush(stdout);

    Rng sample_rng;
    rng_seed(&sample_rng, (uint64_t)seed + 1);
    if (have_state) sample_rng = resume.sample_rng;
    int eot = have_tokenizer ? tokenizer.eot_token : 50256;
    if (eot >= cfg.vocab_size) eot = 0;
    double total_ms = 0, first_loss = 0, last_loss = 0, last_val = -1;
    install_stop_handlers();
    for (int step = start_step; step <= steps; step++) {
        bool last_step = step == steps;
        // the adapter with everything an exact resume needs, saved where the next step would begin
        if (lora_on && output_dir != NULL && (last_step || (save_every > 0 && step > start_step && step % save_every == 0))) {
            TrainState state = train_state_capture(step, &train_loader, &sample_rng);
            err = lora_file_save_all(output_dir, &model, base_sum, state, base_name);
            if (!err.empty()) die("flag -o: " + err);
            printf("saved adapter (step %d): %s/adapter.bin, %s/" PEFT_WEIGHTS_FILE ", %s/" PEFT_CONFIG_FILE "\n", step, output_dir, output_dir, output_dir);
        }
        // full training: the weights every k steps as <dir>/model.bin (atomically; the end writes it below),
        // so a long pretraining run keeps a usable checkpoint (weights only: AdamW state is not saved)
        if (full && output_dir != NULL && save_every > 0 && step > start_step && step % save_every == 0 && !last_step) {
            std::string path = std::string(output_dir) + "/model.bin";
            err = gpt2_write_checkpoint(&model, path.c_str());
            if (!err.empty()) die("flag -o: " + err);
            printf("saved checkpoint (step %d): %s\n", step, path.c_str());
        }
        if (val_every > 0 && (step % val_every == 0 || last_step) && stop_signal == 0) {
            last_val = dp_mean(&dp, gpt2_validate(&model, &val_loader, val_batches));
            printf("val loss %f\n", last_val);
            fflush(stdout);
        }
        if (sample_every > 0 && (step % sample_every == 0 || last_step) && stop_signal == 0) {
            std::vector<int> out = gpt2_generate(&model, std::vector<int>{eot}, gen_tokens, &sample_rng, temperature, top_k);
            printf("generating:\n---\n");
            print_tokens(have_tokenizer ? &tokenizer : NULL, out);
            printf("---\n");
        }
        if (last_step) break;
        double t0 = now_seconds();
        dataloader_next_batch(&train_loader);
        gpt2_forward(&model, train_loader.inputs.data(), train_loader.targets.data(), B, T);
        gpt2_zero_grad(&model);
        gpt2_backward(&model);
        dp_average_gradients(&dp, &model); // data parallel: mean gradient and loss over ranks
        model.mean_loss = dp_mean(&dp, model.mean_loss);
        err = gpt2_check_step_finite(&model, step + 1);
        if (!err.empty()) die(err);
        double grad_norm = gpt2_clip_grad_norm(&model, grad_clip);
        float step_lr = lr_schedule(lr, step, steps, warmup, lr_final_frac);
        gpt2_update(&model, step_lr, 0.9f, 0.999f, 1e-8f, weight_decay, step + 1);
        double ms = (now_seconds() - t0) * 1000.0;
        if (step > start_step) total_ms += ms; // the first step pays page faults; leave it out of the average
        if (step == start_step) first_loss = model.mean_loss;
        last_loss = model.mean_loss;
        double avg = step > start_step ? total_ms / (step - start_step) : ms;
        printf("step %d/%d: train loss %f norm %.4f lr %.2e (took %.1f ms, %.0f tok/s", step + 1, steps, model.mean_loss, grad_norm, step_lr, ms, (double)B * T * dp.world / (ms / 1000.0));
        if (dp.world > 1) printf(" over %d ranks, allreduce %.2f ms for %zu bytes", dp.world, dp.allreduce_ms, dp.allreduce_bytes);
        printf(", ETA %.1f s)\n", avg * (steps - step - 1) / 1000.0);
        if (model.params0) printf("l2sp penalty %f\n", model.reg_loss);
        fflush(stdout);
        if (stop_signal != 0 && step + 1 < steps) {
            // interrupted: this step is done; make it the last one, so the saves below happen as at a normal end
            printf("interrupted by %s after step %d: saving and stopping%s\n", stop_signal == SIGINT ? "SIGINT (Ctrl-C)" : "SIGTERM",
                   step + 1, output_dir == NULL ? " (no -o: nothing to save)" : full ? "" : " (resume with -A <dir>/adapter.bin)");
            fflush(stdout);
            steps = step + 1;
        }
    }
    if (merged_path != NULL) {
        err = write_merged_checkpoint(&model, merged_path);
        if (!err.empty()) die("flag -M: " + err);
        printf("wrote merged checkpoint %s\n", merged_path);
    }
    if (full && output_dir != NULL) {
        std::string path = std::string(output_dir) + "/model.bin";
        err = gpt2_write_checkpoint(&model, path.c_str());
        if (!err.empty()) die(err);
        printf("wrote %s\n", path.c_str());
    }
    if (!lora_on && !full && output_dir != NULL) {
        // -F: the whole model (its top blocks changed); -H / -X: only the trained adapter or prefix
        std::string path = std::string(output_dir) + (freeze_k > 0 ? "/model.bin" : "/method.bin");
        err = freeze_k > 0 ? gpt2_write_checkpoint(&model, path.c_str()) : gpt2_write_method_file(&model, path.c_str());
        if (!err.empty()) die("flag -o: " + err);
        printf("wrote %s\n", path.c_str());
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("[Summary]\nfirst train loss: %f\nlast train loss: %f\n", first_loss, last_loss);
    if (last_val >= 0) printf("final val loss: %f\n", last_val);
    if (steps - start_step > 1) printf("average step: %.1f ms (%.0f tok/s)\n", total_ms / (steps - start_step - 1), (double)B * T * dp.world * (steps - start_step - 1) / (total_ms / 1000.0));
    printf("peak RSS: %.1f MiB\n", ru.ru_maxrss / 1024.0);
    printf("RSS before the model: %.1f MiB\n", rss_before_model);
    gpt2_free(&model);
    dp_finalize();
    return stop_signal != 0 ? 128 + stop_signal : 0;
}
#endif
