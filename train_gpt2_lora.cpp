/*
LoRA fine-tuning of GPT-2 on the CPU, in the spirit of llm.c's train_gpt2.c.

What it is: GPT-2 (pre-LN, GELU-tanh, tied token embedding / LM head) with its forward and backward
written by hand, LoRA adapters (lora.h) on the attention and MLP matmuls of a frozen base, AdamW on the
adapters only, and llm.c's file formats, so llm.c's starter-pack checkpoint, tokens and tokenizer work.
With -f it trains every parameter instead (full fine-tuning, the baseline LoRA is compared with).

What it is not: a framework. Every kernel is a plain loop nest with OpenMP; the float matmul has a fast
path (lib/fast.h) with its naive twin beside it (so does float attention on long sequences: a GEMM
form, lib/attention_gemm.h), and test_lora.cpp checks every backward against finite
differences. The kernels and the model are templates over the scalar type only so that the tests can
run the very same code in double precision; the program itself runs in float.

Reading order (doc/reading.md lists every file):
  1. the kernels: forward/backward pairs, each with its shape contract; the matmul picks its fast twin
  2. the model: config, parameters, activations, build and allocate
  3. LoRA's wiring: attach an adapter (lora.h) to the frozen base, one adapted matmul forward and
     backward, merge
  4. gpt2_forward, gpt2_backward (its exact reverse) and gpt2_update; then the training step's helpers
     (learning-rate schedule, gradient clipping, the non-finite guard, validation)
  5. sampling and generation, with a key/value cache
  6. main, at the very end: flags -> check -> build -> either generate / merge / export, or train -> free
Everything else is marked "skip on first reading": the methods LoRA is compared with (lib/methods.h),
a quantized base's storage, and, after the core, the files of models and adapters, data parallelism
and the program's flags and logs. Utilities live in lib/, and each include line says what it brings.
*/
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "lib/utils.h"       // die, strprintf, calloc_real: errors that end in a HINT, checked allocation
#include "lib/fast.h"        // the float fast paths: blocked GEMM, exp_fast, dot_lanes
#include "lora.h"            // LoRA: config, targets, lora_forward / lora_backward, init, merge, the variants
#include "lib/files.h"       // checked reading, write_atomically, the llm.c magic numbers
#include "lib/dataloader.h"  // llm.c token files and the batches of B*T+1 tokens
#include "lib/tokenizer.h"   // GPT-2 BPE for -p prompts; llm.c's tokenizer file for printing samples
#include "lib/json.h"        // a strict JSON reader, for safetensors headers and PEFT configs
#include "lib/safetensors.h" // safetensors files, for PEFT

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
    if (dweight == NULL && dbias == NULL) return; // frozen (BitFit trains dbias alone)
    // parallel over channels: each thread owns dweight[c] and dbias[c]
    #pragma omp parallel for
    for (int c = 0; c < C; c++) {
        real dw = 0, db = 0;
        for (int bt = 0; bt < B * T; bt++) {
            real d = dout[(size_t)bt * C + c];
            dw += d * (inp[(size_t)bt * C + c] - mean[bt]) * rstd[bt];
            db += d;
        }
        if (dweight != NULL) dweight[c] += dw;
        if (dbias != NULL) dbias[c] += db;
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

// The matmul the model calls: float, the type the program trains in, runs the fast twin (lib/fast.h,
// a blocked GEMM with the same contract); double, the finite-difference tests' type, runs the loops above.
template <typename real>
void matmul_forward(real* out, const real* inp, const real* weight, const real* bias, int B, int T, int C, int OC) {
    if constexpr (std::is_same<real, float>::value) matmul_forward_fast(out, inp, weight, bias, B, T, C, OC);
    else matmul_forward_naive(out, inp, weight, bias, B, T, C, OC);
}
template <typename real>
void matmul_backward(real* dinp, real* dweight, real* dbias, const real* dout, const real* inp, const real* weight,
                     int B, int T, int C, int OC) {
    if constexpr (std::is_same<real, float>::value) matmul_backward_fast(dinp, dweight, dbias, dout, inp, weight, B, T, C, OC);
    else matmul_backward_naive(dinp, dweight, dbias, dout, inp, weight, B, T, C, OC);
}

// Dropout, inverted as PyTorch's: each element is kept with probability 1 - p and scaled by 1 / (1 - p),
// so the expected output is the input and evaluation uses the weights as they are. No mask is stored:
// element i of a call is kept when dropout_keep(key, i, p), a hash of (key, i) (a counter-based RNG), so
// the backward, and a run resumed at this step, draw exactly the same mask. The key names the call: the
// run's seed, the step, the layer and the site (dropout_key). p = 0 is never passed: callers skip the call.
static inline uint64_t dropout_mix(uint64_t x) { // splitmix64's finalizer: every input bit moves every output bit
    x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27; x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}
static inline uint64_t dropout_key(uint64_t seed, int step, int layer, int site) {
    uint64_t k = dropout_mix(seed + 0x9e3779b97f4a7c15ull);
    k = dropout_mix(k ^ (uint64_t)(uint32_t)step);
    return dropout_mix(k ^ ((uint64_t)(uint32_t)(layer + 1) << 8 | (uint64_t)site));
}
// element i is kept when a uniform u in [0, 1) with 24 bits (exact in float) is >= p
static inline bool dropout_keep(uint64_t key, uint64_t i, float p) {
    uint64_t h = dropout_mix(key + (i + 1) * 0x9e3779b97f4a7c15ull);
    return (float)(h >> 40) * (1.0f / 16777216.0f) >= p;
}

// inp (N) -> out (N) = inp * keep_i / (1 - p) with keep_i = dropout_keep(key, i, p); out may be inp
template <typename real>
void dropout_forward(real* out, const real* inp, size_t N, float p, uint64_t key) {
    real scale = 1 / (1 - (real)p);
    #pragma omp parallel for
    for (size_t i = 0; i < N; i++) { out[i] = dropout_keep(key, i, p) ? inp[i] * scale : 0; }
}

// dout (N) -> dinp (N) += dout * keep_i / (1 - p), the forward's mask drawn again from the same key
template <typename real>
void dropout_backward(real* dinp, const real* dout, size_t N, float p, uint64_t key) {
    real scale = 1 / (1 - (real)p);
    #pragma omp parallel for
    for (size_t i = 0; i < N; i++) { if (dropout_keep(key, i, p)) dinp[i] += dout[i] * scale; }
}

// max_i x[i] (NaNs skipped, -1e30 for none) in 16 interleaved lanes, so that it vectorizes: the maximum
// is the same in any order, so this is exactly the plain loop's result (a single running max would not
// vectorize without -ffast-math, and the LM head's 50257 logits per position made it 2% of a step)
template <typename real>
static inline real max_lanes(const real* x, int n) {
    real lane[16];
    for (int j = 0; j < 16; j++) { lane[j] = (real)-1e30f; }
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        for (int j = 0; j < 16; j++) { lane[j] = x[i + j] > lane[j] ? x[i + j] : lane[j]; }
    }
    real m = (real)-1e30f;
    for (int j = 0; j < 16; j++) { m = lane[j] > m ? lane[j] : m; }
    for (; i < n; i++) { m = x[i] > m ? x[i] : m; }
    return m;
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

// x[i] = exp(x[i] - shift) in place; returns their sum, summed as sum_exp_lanes sums it (the same bits)
template <typename real>
static inline real exp_lanes(real* x, int n, real shift) {
    real lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int j = 0; j < 8; j++) {
            x[i + j] = exp_fast(x[i + j] - shift);
            lane[j] += x[i + j];
        }
    }
    real s = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    for (; i < n; i++) {
        x[i] = exp_fast(x[i] - shift);
        s += x[i];
    }
    return s;
}


// One head's keys or values transposed, for vectors over the keys, in the calling thread's scratch:
// returns kT with kT[i * ld + P + t2] = qkv[b, t2, which * C + h * hs + i] for i < hs, t2 < T (which: 1 keys,
// 2 values), zero from column P + T up to ld (P + T rounded up to a multiple of ATT_KEYS, and ATT_KEYS more
// where that is a multiple of 256 floats: rows 1 KB or 4 KB apart, read down a block of 64 floats, use only
// 16 or 4 of the L1 cache's 64 sets; at T = 1024 the forward ran 10% slower that way); columns below P
// are the caller's (prefix tuning's prefix positions). A query's dot products with a block of ATT_KEYS
// keys are then ATT_KEYS running sums over i, acc[0..64) += q[i] * kT[i][block], which stay in vector
// registers; one short dot product per key would end in a horizontal sum each (that made attention ~9%
// of a bf16 LoRA step).
static const int ATT_KEYS = 64;
static const int ATT_COLS = 16; // columns of att gathered together in attention_backward's pass 2
template <typename real>
static real* attention_head_transposed(size_t* ld, const real* qkv, int b, int h, int which, int T, int C, int hs, int P = 0) {
    static thread_local std::vector<real> buf;
    *ld = (size_t)(P + T + ATT_KEYS - 1) / ATT_KEYS * ATT_KEYS;
    if (*ld % 256 == 0) *ld += ATT_KEYS; // (see above)
    buf.resize((size_t)hs * *ld);
    real* kT = buf.data();
    for (int t2 = 0; t2 < T; t2++) {
        const real* src = qkv + ((size_t)b * T + t2) * 3 * C + which * C + h * hs;
        for (int i = 0; i < hs; i++) { kT[(size_t)i * *ld + P + t2] = src[i]; }
    }
    for (int i = 0; i < hs; i++) {
        for (size_t j = P + T; j < *ld; j++) { kT[(size_t)i * *ld + j] = 0; }
    }
    return kT;
}

// One head's T rows of hs values, stride apart from first (its queries, keys or values in qkv, or its
// slice of dout), copied into slot of the calling thread's scratch, one row after another: the weighted
// row sums below then read them contiguously. (Read in place, 3C floats apart, where rows 9 KB apart at
// C = 768 also map to few sets of the L1 cache, attention ran 8-11% slower on a Zen 1.)
template <typename real>
static const real* attention_head_rows(const real* first, size_t stride, int T, int hs, int slot) {
    static thread_local std::vector<real> buf[4];
    buf[slot].resize((size_t)T * hs);
    for (int t = 0; t < T; t++) { memcpy(&buf[slot][(size_t)t * hs], first + (size_t)t * stride, (size_t)hs * sizeof(real)); }
    return buf[slot].data();
}

// out[j] = sum_i x[i] * yT[i * ld + j] for j < n <= ATT_KEYS: x against a block of transposed keys or values
template <typename real>
static inline void attention_dot_block(real* out, const real* x, const real* yT, size_t ld, int hs, int n) {
    real acc[ATT_KEYS] = {};
    for (int i = 0; i < hs; i++) {
        for (int j = 0; j < ATT_KEYS; j++) { acc[j] += x[i] * yT[(size_t)i * ld + j]; }
    }
    for (int j = 0; j < n; j++) { out[j] = acc[j]; }
}

// out[i] += sum_{t2 < n} w[t2] * rows[t2 * stride + i] for i < hs: a weighted sum of n rows (values or keys),
// ATT_KEYS outputs at a time in registers; added into out once per row instead, each row's add would wait
// for the previous one's store. Each out[i] is still summed in order over t2.
template <typename real>
static inline void attention_rows_sum(real* out, const real* w, const real* rows, size_t stride, int n, int hs) {
    int i0 = 0;
    for (; i0 + ATT_KEYS <= hs; i0 += ATT_KEYS) {
        real acc[ATT_KEYS];
        for (int j = 0; j < ATT_KEYS; j++) { acc[j] = out[i0 + j]; }
        for (int t2 = 0; t2 < n; t2++) {
            for (int j = 0; j < ATT_KEYS; j++) { acc[j] += w[t2] * rows[(size_t)t2 * stride + i0 + j]; }
        }
        for (int j = 0; j < ATT_KEYS; j++) { out[i0 + j] = acc[j]; }
    }
    for (; i0 < hs; i0++) { // a head size that is not a multiple of ATT_KEYS
        for (int t2 = 0; t2 < n; t2++) { out[i0] += w[t2] * rows[(size_t)t2 * stride + i0]; }
    }
}

// One query row of attention: att_row[0..n) = softmax(scale * q . k[j]) over the n visible keys (the
// head's transposed keys kT, ld apart), zero from n up to width. Returns the weights out = a @ v takes:
// att_row itself, or with dropout (drop_p > 0) att_row * mask / (1 - p) in the calling thread's scratch,
// the mask of column j drawn from drop_key at index att_index + j.
template <typename real>
static const real* attention_softmax_row(real* att_row, const real* q, const real* kT, size_t ld, int hs, int n, int width,
                                         real scale, float drop_p, uint64_t drop_key, size_t att_index) {
    for (int k0 = 0; k0 < n; k0 += ATT_KEYS) { attention_dot_block(att_row + k0, q, kT + k0, ld, hs, std::min(ATT_KEYS, n - k0)); }
    for (int j = 0; j < n; j++) { att_row[j] *= scale; }
    real maxval = max_lanes(att_row, n);
    real inv = 1 / exp_lanes(att_row, n, maxval); // att_row[j] = exp(att_row[j] - maxval), j < n
    for (int j = 0; j < width; j++) { att_row[j] = j < n ? att_row[j] * inv : 0; }
    if (drop_p <= 0) return att_row;
    static thread_local std::vector<real> a_buf;
    a_buf.resize(width);
    real drop_scale = 1 / (1 - (real)drop_p);
    for (int j = 0; j < n; j++) { a_buf[j] = dropout_keep(drop_key, att_index + j, drop_p) ? att_row[j] * drop_scale : 0; }
    return a_buf.data();
}

// The same attention for float on long sequences (T >= ATT_GEMM_T and t0 = 0: with the key/value cache
// only the prompt's forward), as small GEMMs per head that never store the (T, T) weights
// (lib/attention_gemm.h, included after the backward): there att holds each query row's softmax
// statistics, (B, NH, T, 2), and the backward recomputes the weights.
static const int ATT_GEMM_T = 128;
static bool attention_by_gemm(int T, int t0) { return T >= ATT_GEMM_T && t0 == 0; }
void attention_forward_gemm(float* out, float* stats, const float* qkv, int B, int T, int C, int NH, float drop_p, uint64_t drop_key);
void attention_backward_gemm(float* dqkv, const float* dout, const float* qkv, const float* stats, int B, int T, int C, int NH,
                             float drop_p, uint64_t drop_key);

// qkv (B,T,3C) with q|k|v along channels -> out (B,T,C); att (B,NH,T,T) post-softmax weights cached
// (in float from T = ATT_GEMM_T on, (B,NH,T,2) statistics instead: attention_cache_floats)
// Queries are positions t0..T-1 of each sequence, keys and values all T positions: t0 = 0 in training;
// generation with a key/value cache passes the cached rows as qkv and t0 = the first new position, so
// out is (B,T-t0,C) and att (B,NH,T-t0,T). Each query row is computed the same way either way.
// drop_p > 0 (training with -R): dropout on the probabilities, out = (att * mask / (1 - p)) @ v with the
// mask of element att[b,h,t,t2] drawn from drop_key; att keeps the probabilities before the mask.
template <typename real>
void attention_forward(real* out, real* att, const real* qkv, int B, int T, int C, int NH, int t0 = 0,
                       float drop_p = 0, uint64_t drop_key = 0) {
    if constexpr (std::is_same<real, float>::value) {
        if (attention_by_gemm(T, t0)) { attention_forward_gemm(out, att, qkv, B, T, C, NH, drop_p, drop_key); return; }
    }
    int hs = C / NH, Tq = T - t0;
    real scale = 1 / std::sqrt((real)hs);
    // parallel over (b, h): each thread owns head h of sequence b, its rows of att and its slice of out
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            size_t ld;
            const real* kT = attention_head_transposed(&ld, qkv, b, h, 1, T, C, hs); // the head's keys (hs, ld)
            const real* v = attention_head_rows(qkv + (size_t)b * T * 3 * C + 2 * C + h * hs, (size_t)3 * C, T, hs, 0); // values (T, hs)
            for (int t = t0; t < T; t++) {
                const real* q = qkv + ((size_t)b * T + t) * 3 * C + h * hs;
                real* att_bth = att + (((size_t)b * NH + h) * Tq + (t - t0)) * T;
                // causal: keys t2 <= t are visible; out = a @ v (a: att, with dropout's mask when -R)
                const real* a = attention_softmax_row(att_bth, q, kT, ld, hs, t + 1, T, scale, drop_p, drop_key, (size_t)(att_bth - att));
                real* out_bth = out + ((size_t)b * Tq + (t - t0)) * C + h * hs;
                for (int i = 0; i < hs; i++) { out_bth[i] = 0; }
                attention_rows_sum(out_bth, a, v, (size_t)hs, t + 1, hs);
            }
        }
    }
}

// dout (B,T,C) -> dqkv (B,T,3C) +=; datt (B,NH,T,T) is scratch (it ends up holding scale * ds); drop_p,
// drop_key as the forward had them. Two passes per head: by query row t (datt, ds, dq[t]), then by key
// row t2 (dv[t2], dk[t2]), so that every gradient row is a weighted row sum held in registers.
template <typename real>
void attention_backward(real* dqkv, real* datt, const real* dout, const real* qkv, const real* att,
                        int B, int T, int C, int NH, float drop_p = 0, uint64_t drop_key = 0) {
    if constexpr (std::is_same<real, float>::value) {
        if (attention_by_gemm(T, 0)) { attention_backward_gemm(dqkv, dout, qkv, att, B, T, C, NH, drop_p, drop_key); return; }
    }
    int hs = C / NH;
    real scale = 1 / std::sqrt((real)hs);
    real drop_scale = 1 / (1 - (real)drop_p);
    // the dropout multiplier of att element e as the forward drew it: mask / (1 - p), or 1 without dropout
    auto drop_mult = [&](size_t e) -> real { return drop_p > 0 ? (dropout_keep(drop_key, e, drop_p) ? drop_scale : 0) : 1; };
    // parallel over (b, h): everything a head touches (q, k, v of head h in sequence b) is its own
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            size_t ld;
            const real* vT = attention_head_transposed(&ld, qkv, b, h, 2, T, C, hs); // the head's values (hs, ld),
            const real* q = attention_head_rows(qkv + (size_t)b * T * 3 * C + h * hs, (size_t)3 * C, T, hs, 0);     // queries,
            const real* k = attention_head_rows(qkv + (size_t)b * T * 3 * C + C + h * hs, (size_t)3 * C, T, hs, 1); // keys
            const real* dout_h = attention_head_rows(dout + (size_t)b * T * C + h * hs, (size_t)C, T, hs, 2);      // and dout (T, hs)
            size_t bh = ((size_t)b * NH + h) * T * T; // att[b,h] and datt[b,h] start here
            // pass 1, by query row t
            for (int t = 0; t < T; t++) {
                const real* att_bth = att + bh + (size_t)t * T;
                real* datt_bth = datt + bh + (size_t)t * T;
                const real* dout_bth = dout_h + (size_t)t * hs;
                // forward was: out = sum_t2 a[t2] * v[t2], a = att * m (m: the dropout multiplier); so
                // datt[t2] = m * dout . v[t2] (summed over i, against the transposed values) and dv[t2] += a[t2] * dout (pass 2)
                for (int k0 = 0; k0 <= t; k0 += ATT_KEYS) { attention_dot_block(datt_bth + k0, dout_bth, vT + k0, ld, hs, std::min(ATT_KEYS, t + 1 - k0)); }
                if (drop_p > 0) {
                    for (int t2 = 0; t2 <= t; t2++) { datt_bth[t2] *= drop_mult(bh + (size_t)t * T + t2); }
                }
                // forward was: att = softmax(s); so ds[t2] = att[t2] * (datt[t2] - sum_j att[j] datt[j])
                real dot = dot_lanes(att_bth, datt_bth, t + 1);
                // (scaled by the forward's scale, ds takes datt's place: datt[t2] := scale * ds[t2])
                for (int t2 = 0; t2 <= t; t2++) { datt_bth[t2] = att_bth[t2] * (datt_bth[t2] - dot) * scale; }
                // forward was: s[t2] = scale * q . k[t2]; so dq += scale ds[t2] k[t2] and dk[t2] += scale ds[t2] q (pass 2)
                real* dq = dqkv + ((size_t)b * T + t) * 3 * C + h * hs;
                attention_rows_sum(dq, datt_bth, k, (size_t)hs, t + 1, hs);
            }
            // pass 2, by key row t2: its weights are column t2 of a and of scale * ds, rows t >= t2. The
            // columns are gathered ATT_COLS at a time, from a short run of each row t: one column alone reads
            // a cache line per element, T floats apart (at T = 1024 this per-query backward took 3x its forward,
            // then 2x; float now takes lib/attention_gemm.h there).
            // (The gathered columns are T + 16 apart, not T: at T = 1024, 16 stores 4 KB apart would all go
            // to one L1 set.)
            static thread_local std::vector<real> col_buf;
            const size_t ldc = (size_t)T + 16;
            col_buf.resize(2 * (size_t)ATT_COLS * ldc);
            real* a_cols = col_buf.data();           // a_cols[j * ldc + t] = a[t, c0 + j]
            real* ds_cols = a_cols + (size_t)ATT_COLS * ldc; // and scale * ds[t, c0 + j]
            for (int c0 = 0; c0 < T; c0 += ATT_COLS) {
                int nc = std::min(ATT_COLS, T - c0);
                for (int t = c0; t < T; t++) {
                    size_t e0 = bh + (size_t)t * T + c0; // att[b,h,t,c0] and datt's
                    int n = std::min(nc, t - c0 + 1);    // the columns at or below the diagonal
                    for (int j = 0; j < n; j++) {
                        a_cols[(size_t)j * ldc + t] = att[e0 + j];
                        ds_cols[(size_t)j * ldc + t] = datt[e0 + j];
                    }
                    if (drop_p > 0) {
                        for (int j = 0; j < n; j++) { a_cols[(size_t)j * ldc + t] *= drop_mult(e0 + j); }
                    }
                }
                for (int j = 0; j < nc; j++) {
                    int t2 = c0 + j;
                    real* dk = dqkv + ((size_t)b * T + t2) * 3 * C + C + h * hs;
                    real* dv = dqkv + ((size_t)b * T + t2) * 3 * C + 2 * C + h * hs;
                    attention_rows_sum(dv, a_cols + (size_t)j * ldc + t2, dout_h + (size_t)t2 * hs, (size_t)hs, T - t2, hs);
                    attention_rows_sum(dk, ds_cols + (size_t)j * ldc + t2, q + (size_t)t2 * hs, (size_t)hs, T - t2, hs);
                }
            }
        }
    }
}

// ---- attention for float on long sequences (T >= 128): the same products as small GEMMs per head.
// Skip on first reading.
#include "lib/attention_gemm.h"

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

// out (N) = 0: the gradient scratch that the backward's kernels then accumulate into. Both threads zero
// a half each (a plain memset of a layer's 11 MB at GPT-2 124M, 13 ms of a 1.8 s step on a 2-core Zen 1,
// left the other core waiting).
template <typename real>
void zero_fill(real* out, size_t N) {
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < N; i++) { out[i] = 0; }
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
        real maxval = max_lanes(logits_bt, V);
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
// the methods LoRA is compared with (Houlsby adapters, prefix tuning, L2-SP): their kernels and state
// build on the kernels above, and the model below holds them. Skip on first reading.
#include "lib/methods.h"

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
#define ACT_ATT 6 // att's place among them
template <typename real>
struct ActivationTensors {
    real* encoded;   // (B, T, C)
    real* ln1;       // (L, B, T, C)
    real* ln1_mean;  // (L, B, T)
    real* ln1_rstd;  // (L, B, T)
    real* qkv;       // (L, B, T, 3C)
    real* atty;      // (L, B, T, C)
    real* att;       // (L, B, NH, T, T) post-softmax; in float from T = ATT_GEMM_T on (L, B, NH, T, 2) statistics
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

// One layer's att at (B, T): the attention weights (B, NH, T, T), or where float takes the GEMM form
// (attention_by_gemm) only the softmax statistics of their rows, (B, NH, T, 2): at T = 1024 that is 2
// floats per row instead of 1024.
template <typename real>
static size_t attention_cache_floats(size_t B, size_t NH, size_t T) {
    return std::is_same<real, float>::value && attention_by_gemm((int)T, 0) ? B * NH * T * 2 : B * NH * T * T;
}
// att's room per layer, allocated for batches up to (B, T): it holds any smaller batch's att too, the
// weights of one with T below ATT_GEMM_T included
template <typename real>
static size_t attention_cache_room(size_t B, size_t NH, size_t T) {
    return std::max(attention_cache_floats<real>(B, NH, T), attention_cache_floats<real>(B, NH, std::min<size_t>(T, ATT_GEMM_T - 1)));
}
// and the room of attention_backward's scratch datt, which only the per-query form uses (in float, below ATT_GEMM_T)
template <typename real>
static size_t attention_scratch_room(size_t B, size_t NH, size_t T) {
    return std::is_same<real, float>::value ? B * NH * std::min<size_t>(T, ATT_GEMM_T - 1) * std::min<size_t>(T, ATT_GEMM_T - 1) : B * NH * T * T;
}

template <typename real>
static void fill_in_activation_sizes(size_t* sizes, GPT2Config cfg, size_t B, size_t T) {
    size_t C = cfg.channels, NH = cfg.num_heads, L = cfg.num_layers, Vp = cfg.padded_vocab_size;
    size_t s[NUM_ACTIVATION_TENSORS] = {
        B * T * C, L * B * T * C, L * B * T, L * B * T, L * B * T * 3 * C, L * B * T * C, L * attention_cache_room<real>(B, NH, T),
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
    la.att = acts.att + l * attention_cache_floats<real>(B, NH, T);
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
    real* datt;      // (B, NH, T, T) scratch of attention_backward (not used by the GEMM form)
    real* dfch;      // (B, T, 4C)
    real* dfch_gelu; // (B, T, 4C)
};

// Dropout while training: the forward draws masks only when train is set (gpt2_train_mode) and it
// has targets, never at evaluation or generation; the backward then draws the same masks (dropout_keep).
// Where GPT-2 (HF's embd_pdrop, attn_pdrop, resid_pdrop, all gpt2_p here): on the embeddings wte + wpe,
// on the attention probabilities, and on the attproj and fcproj outputs before each residual add.
// LoRA's (PEFT's lora_dropout): on the branch's input, h = W0 x + s lora_B lora_A dropout(x).
// Sites name the masks of one layer; the buffers exist only while some p > 0.
enum DropoutSite { DROP_EMBEDDINGS, DROP_ATTENTION, DROP_ATTPROJ, DROP_FCPROJ, DROP_LORA }; // DROP_LORA + t: target t
template <typename real>
struct Dropout {
    float gpt2_p;    // -R, 0 = off
    uint64_t seed;   // the run's seed: every mask's key starts from it
    bool train;      // the next forward draws masks, for this step
    int step;
    bool drawn;      // the last forward drew masks: its backward draws them again
    real* lora_x;    // (BT, 4C) -D: the LoRA branch's dropped input
    real* lora_dx;   // (BT, 4C) -D: the gradient at it, before the mask
    real* dproj;     // (BT, C) -R: the gradient at proj before its mask
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
    bool block_file_bf16;     // that file is llm.c's bf16 checkpoint (version 5): 2 bytes a parameter
    // -Q: the four block matrices as codes (lib/quant.h), indexed by LoRATarget; NULL for an fp32 base
    int quant;                                // their LoRAQuant
    uint8_t* quant_q[LORA_NUM_TARGETS];       // (L, out, in) int8 codes, two NF4 or four int2 codes per byte
    float* quant_absmax[LORA_NUM_TARGETS];    // one absmax per block of LORA_QUANT_BLOCK weights
    real* quant_w;                            // (out, in) one layer of one matrix dequantized, for the matmul at
                                              // hand; sized for the largest, (4C, C), and shared by all four
    int quant_t, quant_l;                     // which matrix and layer quant_w holds, -1 none
    uint16_t* wte_bf16;                       // -Q bf16: wte (Vp, C), the LM head, in bf16 too (lib/bf16.h); NULL otherwise.
                                              // Read from a file, params.wte is then NULL; built in memory, it holds the same rounded values
    // full fine-tuning (-f) only: gradients and AdamW state of every base parameter; NULL otherwise
    bool train_base;
    ParameterTensors<real> grads;
    real* grads_memory;
    real* m_memory;
    real* v_memory;
    // LoRA adapters; lora.num_parameters == 0 when none are attached
    LoRA<real> lora;
    // -C: trained rows of the tied wte beside the adapters (lora.h, trainable token rows); tokens.n == 0 when none
    TokenRows<real> tokens;
    // the other adaptation methods (lib/methods.h); all zero / NULL unless chosen
    int first_trained_layer;   // -F: blocks below it get no gradient work at all; 0 otherwise
    size_t num_top_trainable;  // -F: elements of top_grads (the trained tails of the tensors)
    size_t top_offsets[NUM_PARAMETER_TENSORS]; // -F: where each tensor's trained tail starts
    real* top_grads;           // -F: gradients, then AdamW m and v, of just those tails
    bool bitfit;               // -B: the tails are the bias tensors, whole (gpt2_enable_bitfit)
    real* top_m;
    real* top_v;
    Adapters<real> adapters;   // -H: adapters.m == 0 when none
    Prefix<real> prefix;       // -X: prefix.P == 0 when none
    real* params0;             // -f 1 -w: a copy of the pretrained weights W0; NULL otherwise
    float l2sp_lambda;
    real reg_loss;             // -f 1 -w: lambda/2 ||W - W0||^2 at the last forward with targets
    // dropout while training (-D on LoRA's branch, its p in lora.config.dropout; -R GPT-2's own); see Dropout
    Dropout<real> drop;
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

// every base parameter trainable: gradient buffers and AdamW state for all of them
template <typename real>
void gpt2_enable_full_training(GPT2<real>* model) {
    model->train_base = true;
    model->grads_memory = calloc_real<real>(model->num_parameters, "parameter gradients");
    model->m_memory = calloc_real<real>(model->num_parameters, "AdamW m");
    model->v_memory = calloc_real<real>(model->num_parameters, "AdamW v");
    point_parameters(&model->grads, model->param_sizes, model->grads_memory);
}

// allocates activations (and their gradients) once, for batches up to (B, T)
template <typename real>
void gpt2_allocate(GPT2<real>* model, int B, int T) {
    GPT2Config cfg = model->config;
    fill_in_activation_sizes<real>(model->act_sizes, cfg, B, T);
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
    size_t dsizes[NUM_BACKWARD_TENSORS] = {BT * C, BT * C, BT * C, BT * 3 * C, attention_scratch_room<real>(B, NH, T), BT * 4 * C, BT * 4 * C};
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
    free(model->drop.lora_x); // dropout's scratch: sized anew at the next forward that draws masks
    free(model->drop.lora_dx);
    free(model->drop.dproj);
    model->drop.lora_x = model->drop.lora_dx = model->drop.dproj = NULL;
    if (model->lora.num_parameters > 0) lora_allocate_activations(&model->lora, BT);
    if (model->adapters.m > 0) adapters_allocate_activations(&model->adapters, BT);
    if (model->prefix.P > 0) prefix_allocate_activations(&model->prefix, B, T);
}

// ---- the frozen block matrices and their matmuls: fp32, -Q codes dequantized layer by layer, or -Q bf16 (skip on first reading)

// the weight of block matrix t (a LoRATarget) at layer l, as the matmul uses it: the fp32 tensor's layer,
// or with a quantized base (-Q: the fp32 pointer is NULL) the dequantized layer in the shared scratch,
// valid until another matrix is fetched, so callers fetch it right at its matmul
template <typename real>
real* gpt2_base_weight(GPT2<real>* model, int t, int l) {
    ParameterTensors<real>& p = model->params;
    int C = model->config.channels;
    size_t n = (size_t)lora_target_out(t, C) * lora_target_in(t, C);
    if (model->quant_q[t] != NULL) {
        if (model->quant_w == NULL) model->quant_w = calloc_real<real>((size_t)4 * C * C, "the dequantization scratch");
        if (model->quant_t != t || model->quant_l != l) {
            // each layer's matrix is quantized on its own: its codes and blocks start at layer offsets
            size_t nabsmax = lora_quant_absmax_count(model->quant, n); // (none for bf16)
            dequantize_forward(model->quant_w, model->quant_q[t] + (size_t)l * lora_quant_code_bytes(model->quant, n),
                               nabsmax > 0 ? model->quant_absmax[t] + (size_t)l * nabsmax : NULL, n, model->quant);
            model->quant_t = t;
            model->quant_l = l;
        }
        return model->quant_w;
    }
    real* W = t == LORA_QKV ? p.qkvw : t == LORA_ATTPROJ ? p.attprojw : t == LORA_FC ? p.fcw : p.fcprojw;
    return at(W, (size_t)l * n);
}

// the bias of block matrix t at layer l
template <typename real>
real* gpt2_base_bias(GPT2<real>* model, int t, int l) {
    ParameterTensors<real>& p = model->params;
    real* b = t == LORA_QKV ? p.qkvb : t == LORA_ATTPROJ ? p.attprojb : t == LORA_FC ? p.fcb : p.fcprojb;
    return at(b, (size_t)l * lora_target_out(t, model->config.channels));
}

// -Q: block matrix t at layer l, W_l (out, in), stored as codes of model->quant; W_l is not read again
template <typename real>
void gpt2_quantize_layer(GPT2<real>* model, int t, int l, const real* W_l) {
    int L = model->config.num_layers, C = model->config.channels, quant = model->quant;
    size_t n = (size_t)lora_target_out(t, C) * lora_target_in(t, C);
    size_t nabsmax = lora_quant_absmax_count(quant, n); // (none for bf16)
    if (model->quant_q[t] == NULL) {
        model->quant_q[t] = calloc_real<uint8_t>((size_t)L * lora_quant_code_bytes(quant, n), "the quantized base");
        if (nabsmax > 0) model->quant_absmax[t] = calloc_real<float>((size_t)L * nabsmax, "the quantized base");
    }
    // (bf16: the matmuls read it directly, so the scratch waits for a caller that needs fp32: DoRA, merging)
    if (model->quant_w == NULL && quant != LORA_QUANT_BF16) model->quant_w = calloc_real<real>((size_t)4 * C * C, "the dequantization scratch");
    model->quant_t = model->quant_l = -1;
    quantize_forward(model->quant_q[t] + (size_t)l * lora_quant_code_bytes(quant, n),
                     nabsmax > 0 ? model->quant_absmax[t] + (size_t)l * nabsmax : NULL, W_l, n, quant);
}

template <typename real>
void gpt2_free_quantized(GPT2<real>* model) {
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        free(model->quant_q[t]);
        free(model->quant_absmax[t]);
        model->quant_q[t] = NULL;
        model->quant_absmax[t] = NULL;
    }
    free(model->quant_w);
    model->quant_w = NULL;
    model->quant = LORA_QUANT_FP32;
    // -Q bf16's wte: kept when it is the only copy (params.wte dropped), so a new attach finds it
    if (model->params.wte != NULL) {
        free(model->wte_bf16);
        model->wte_bf16 = NULL;
    }
}

// the bytes of the four block matrices as stored: fp32, or codes + an absmax per block
template <typename real>
size_t gpt2_block_matrix_bytes(const GPT2<real>* model, int quant) {
    size_t bytes = 0, L = model->config.num_layers;
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        size_t n = (size_t)lora_target_out(t, model->config.channels) * lora_target_in(t, model->config.channels);
        if (quant == LORA_QUANT_FP32) bytes += L * n * sizeof(float);
        else bytes += L * (lora_quant_code_bytes(quant, n) + lora_quant_absmax_count(quant, n) * sizeof(float));
    }
    return bytes;
}

// -Q bf16: block matrix t at layer l as stored, (out, in) bf16
template <typename real>
const uint16_t* gpt2_base_weight_bf16(const GPT2<real>* model, int t, int l) {
    size_t n = (size_t)lora_target_out(t, model->config.channels) * lora_target_in(t, model->config.channels);
    return (const uint16_t*)(model->quant_q[t] + (size_t)l * lora_quant_code_bytes(LORA_QUANT_BF16, n));
}

// -Q bf16: wte, the tied embedding and LM head, is stored in bf16 too (LoRA never trains it). Read from a
// file (the trainer: block_file set), its fp32 copy leaves params_memory (wte comes first there), so only
// the bf16 one is held; built in memory (tests) or in double, params.wte is rounded in place to the same
// values and kept, for the encoder and the naive kernels.
template <typename real>
void gpt2_wte_to_bf16(GPT2<real>* model) {
    if (model->params.wte == NULL) return; // only the bf16 copy is left: a new attach on the same base
    size_t n = model->param_sizes[0];
    real* wte = model->params.wte;
    free(model->wte_bf16);
    model->wte_bf16 = calloc_real<uint16_t>(n, "the bf16 wte");
    uint16_t* h = model->wte_bf16;
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) { h[i] = bf16_round((float)wte[i]); }
    if (!std::is_same<real, float>::value || model->block_file == NULL) {
        #pragma omp parallel for
        for (size_t i = 0; i < n; i++) { wte[i] = (real)bf16_widen(h[i]); }
        return;
    }
    // move the other tensors into a smaller allocation, then free the old one with the fp32 wte
    real** ptrs[NUM_PARAMETER_TENSORS];
    parameter_pointers(&model->params, ptrs);
    size_t rest = model->num_params_stored - n;
    real* mem = calloc_real<real>(rest, "parameters");
    memcpy(mem, model->params_memory + n, rest * sizeof(real));
    for (int i = 1; i < NUM_PARAMETER_TENSORS; i++) {
        if (*ptrs[i] != NULL) *ptrs[i] = mem + (*ptrs[i] - (model->params_memory + n));
    }
    free(model->params_memory);
    model->params_memory = mem;
    model->params.wte = NULL;
    model->num_params_stored = rest;
}

// The frozen matmuls of the core: out (B,T,OC) = inp (B,T,C) @ W^T + bias, W block matrix t at layer l.
// With -Q bf16 in float (the program) the bf16 kernels read the stored weights (lib/bf16.h); otherwise
// matmul_forward runs on gpt2_base_weight (the fp32 layer, or a dequantized one)
template <typename real>
void gpt2_base_matmul_forward(GPT2<real>* model, int t, int l, real* out, const real* inp, const real* bias, int B, int T, int C, int OC) {
    if constexpr (std::is_same<real, float>::value) {
        if (model->quant == LORA_QUANT_BF16 && model->quant_q[t] != NULL) {
            matmul_bf16_forward_fast(out, inp, gpt2_base_weight_bf16(model, t, l), bias, B, T, C, OC);
            return;
        }
    }
    matmul_forward(out, inp, gpt2_base_weight(model, t, l), bias, B, T, C, OC);
}

// its backward: dout (B,T,OC) -> dinp +=, dweight +=, dbias += (each may be NULL); a bf16 weight is frozen
template <typename real>
void gpt2_base_matmul_backward(GPT2<real>* model, int t, int l, real* dinp, real* dweight, real* dbias, const real* dout,
                               const real* inp, int B, int T, int C, int OC) {
    if constexpr (std::is_same<real, float>::value) {
        if (model->quant == LORA_QUANT_BF16 && model->quant_q[t] != NULL) {
            if (dweight != NULL) die("gpt2_base_matmul_backward: a bf16 base (-Q bf16) is frozen and has no weight gradient");
            if (dinp != NULL) matmul_bf16_backward_fast(dinp, dout, gpt2_base_weight_bf16(model, t, l), B, T, C, OC);
            if (dbias != NULL) matmul_backward((real*)NULL, (real*)NULL, dbias, dout, inp, (const real*)NULL, B, T, C, OC);
            return;
        }
    }
    matmul_backward(dinp, dweight, dbias, dout, inp, gpt2_base_weight(model, t, l), B, T, C, OC);
}

// the LM head, wte tied: logits (B,T,Vp) = lnf (B,T,C) @ wte^T, from the bf16 wte with -Q bf16 in float
template <typename real>
void gpt2_lm_head_forward(GPT2<real>* model, real* logits, const real* lnf, int B, int T, int C, int Vp) {
    if constexpr (std::is_same<real, float>::value) {
        if (model->wte_bf16 != NULL) {
            matmul_bf16_forward_fast(logits, lnf, model->wte_bf16, (const float*)NULL, B, T, C, Vp);
            return;
        }
    }
    matmul_forward(logits, lnf, model->params.wte, (real*)NULL, B, T, C, Vp);
}

// its backward: dlogits (B,T,Vp) -> dlnf (B,T,C) +=, dwte (Vp,C) += (NULL: frozen)
template <typename real>
void gpt2_lm_head_backward(GPT2<real>* model, real* dlnf, real* dwte, const real* dlogits, const real* lnf, int B, int T, int C, int Vp) {
    if constexpr (std::is_same<real, float>::value) {
        if (model->wte_bf16 != NULL && dwte == NULL) {
            matmul_bf16_backward_fast(dlnf, dlogits, model->wte_bf16, B, T, C, Vp);
            return;
        }
    }
    matmul_backward(dlnf, dwte, (real*)NULL, dlogits, lnf, model->params.wte, B, T, C, Vp);
}

// the token and position embeddings: encoder_forward, or with only the bf16 wte held, its rows widened
template <typename real>
void gpt2_encoder_forward(GPT2<real>* model, real* out, const int* inp, const real* wpe, int B, int T, int C) {
    if (model->params.wte != NULL) {
        encoder_forward(out, inp, model->params.wte, wpe, B, T, C);
        return;
    }
    #pragma omp parallel for
    for (int bt = 0; bt < B * T; bt++) {
        const uint16_t* wte_ix = model->wte_bf16 + (size_t)inp[bt] * C;
        const real* wpe_t = wpe + (size_t)(bt % T) * C;
        for (int c = 0; c < C; c++) { out[(size_t)bt * C + c] = (real)bf16_widen(wte_ix[c]) + wpe_t[c]; }
    }
}

// ---- dropout's wiring (-D, -R; see Dropout): the key of each mask, train mode, the scratch buffers

// the key of the mask at layer l (-1: below the blocks) and site, in this training step
template <typename real>
uint64_t gpt2_dropout_key(const GPT2<real>* model, int l, int site) { return dropout_key(model->drop.seed, model->drop.step, l, site); }

// train = true: the forwards and backwards of training step `step` draw the masks of -D and -R;
// false (evaluation, generation): no mask is drawn
template <typename real>
void gpt2_train_mode(GPT2<real>* model, bool train, int step = 0) {
    model->drop.train = train;
    model->drop.step = step;
}

// the scratch a forward with masks needs, for the allocated (B, T); allocated at its first such forward
template <typename real>
void gpt2_dropout_allocate(GPT2<real>* model) {
    size_t BT = (size_t)model->alloc_B * model->alloc_T, C = model->config.channels;
    if (model->lora.config.dropout > 0 && model->drop.lora_x == NULL) {
        model->drop.lora_x = calloc_real<real>(BT * 4 * C, "LoRA dropout input (-D)");
        model->drop.lora_dx = calloc_real<real>(BT * 4 * C, "LoRA dropout gradient (-D)");
    }
    if (model->drop.gpt2_p > 0 && model->drop.dproj == NULL) model->drop.dproj = calloc_real<real>(BT * C, "dropout gradient (-R)");
}

// -R's backward at a dropped tensor of N elements (proj, the embeddings): the gradient before the mask,
// from dout after it, into the scratch drop.dproj, which it returns
template <typename real>
real* gpt2_dropout_backward(GPT2<real>* model, int l, int site, const real* dout, size_t N) {
    memset(model->drop.dproj, 0, N * sizeof(real));
    dropout_backward(model->drop.dproj, dout, N, model->drop.gpt2_p, gpt2_dropout_key(model, l, site));
    return model->drop.dproj;
}

// the bytes of that scratch (allocated or not yet): -D two (BT, 4C), -R one (BT, C)
template <typename real>
size_t gpt2_dropout_bytes(const GPT2<real>* model) {
    size_t BT = (size_t)model->alloc_B * model->alloc_T, C = model->config.channels;
    return ((model->lora.config.dropout > 0 ? 2 * BT * 4 * C : 0) + (model->drop.gpt2_p > 0 ? BT * C : 0)) * sizeof(real);
}

// ---- LoRA's wiring: attach, one adapted matmul forward and backward, merge

// one block matrix at one layer as an adapter is attached: PiSSA's init (W_l becomes the residual), then
// with -Q its codes
template <typename real>
void gpt2_attach_layer(GPT2<real>* model, int t, int l, real* W_l) {
    lora_attach_layer(&model->lora, t, l, W_l);
    if (model->quant != LORA_QUANT_FP32) gpt2_quantize_layer(model, t, l, W_l);
}

// (the layer-by-layer read of a quantized base's matrices from the checkpoint is lib/checkpoint.h's)
template <typename real> void gpt2_attach_layers_from_file(GPT2<real>* model);

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
    if (model->params.wte == NULL && cfg.base_quant != LORA_QUANT_BF16) {
        die("gpt2_lora_attach: the base's wte is held in bf16 only (it was attached with -Q bf16), but this adapter wants another base\n"
            "---> HINT: give the same -Q the adapter was trained with, or read the base again");
    }
    int L = model->config.num_layers, C = model->config.channels;
    lora_init(&model->lora, cfg, L, C, seed);
    gpt2_free_quantized(model); // every attach quantizes anew
    model->quant = cfg.base_quant;
    if (model->block_file != NULL) {
        gpt2_attach_layers_from_file(model); // the fp32 block matrices were never in memory
    } else {
        ParameterTensors<real> p = model->params;
        real* const W[LORA_NUM_TARGETS] = {p.qkvw, p.attprojw, p.fcw, p.fcprojw};
        for (int t = 0; t < LORA_NUM_TARGETS; t++) {
            size_t n = (size_t)lora_target_out(t, C) * lora_target_in(t, C);
            for (int l = 0; l < L; l++) { gpt2_attach_layer(model, t, l, W[t] + (size_t)l * n); }
        }
    }
    if (model->quant == LORA_QUANT_BF16) gpt2_wte_to_bf16(model); // the LM head in bf16 too
    // DoRA: the magnitudes at the row norms of the base as it now is (dequantized with -Q)
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        for (int l = 0; l < L && model->lora.dora_m[t] != NULL; l++) { dora_init_layer(&model->lora, t, l, gpt2_base_weight(model, t, l)); }
    }
    if (model->alloc_B > 0) lora_allocate_activations(&model->lora, (size_t)model->alloc_B * model->alloc_T);
}

// One adapted matmul's LoRA branch: block matrix t at layer l, after the base matmul wrote out (BT, OC)
// from inp (BT, C); nothing when that target carries no adapter. DoRA also reads the frozen weight and
// bias, as the matmul used them.
template <typename real>
void gpt2_lora_forward(GPT2<real>* model, int t, int l, real* out, const real* inp, int BT) {
    LoRA<real>* lora = &model->lora;
    bool dropped = model->drop.drawn && lora->config.dropout > 0;
    if (lora->multi != NULL || lora->dora_m[t] != NULL || lora->lora_E[t] != NULL) { // several adapters in one batch, DoRA or AdaLoRA
        if (dropped && lora->lora_A[t] != NULL) die("gpt2_lora_forward: LoRA dropout with DoRA or AdaLoRA is not implemented\n---> HINT: an internal check failed: this is a bug in train_gpt2_lora, not in your input; please report it with the command line");
        lora_variant_forward(lora, t, l, out, inp, gpt2_base_weight(model, t, l), gpt2_base_bias(model, t, l), BT);
        return;
    }
    if (lora->lora_A[t] == NULL) return;
    LoRALayer<real> a = lora_layer(lora, t, l, BT);
    if (dropped) { // -D: the branch reads dropout(inp); the base matmul above read inp itself
        dropout_forward(model->drop.lora_x, inp, (size_t)BT * a.C, lora->config.dropout, gpt2_dropout_key(model, l, DROP_LORA + t));
        inp = model->drop.lora_x;
    }
    lora_forward(out, a.h, inp, a.lora_A, a.lora_B, (real)lora->config.scale, BT, a.C, a.OC, a.r);
}

// its backward: dout (BT, OC) -> the adapter's gradients +=, dinp (BT, C) += (NULL: not needed)
template <typename real>
void gpt2_lora_backward(GPT2<real>* model, int t, int l, real* dinp, const real* dout, const real* inp, int BT) {
    LoRA<real>* lora = &model->lora;
    if (lora->lora_A[t] == NULL) return;
    if (lora->dora_m[t] != NULL || lora->lora_E[t] != NULL) { // DoRA or AdaLoRA
        lora_variant_backward(lora, t, l, dinp, dout, inp, gpt2_base_weight(model, t, l), BT);
        return;
    }
    LoRALayer<real> a = lora_layer(lora, t, l, BT);
    bool dropped = model->drop.drawn && lora->config.dropout > 0;
    real* dbranch = dinp;
    if (dropped) { // -D: the forward's dropped input again (same key, same mask); the branch's dinp before the mask
        uint64_t key = gpt2_dropout_key(model, l, DROP_LORA + t);
        dropout_forward(model->drop.lora_x, inp, (size_t)BT * a.C, lora->config.dropout, key);
        inp = model->drop.lora_x;
        if (dinp != NULL) { dbranch = model->drop.lora_dx; memset(dbranch, 0, (size_t)BT * a.C * sizeof(real)); }
    }
    lora_backward(dbranch, a.dlora_A, a.dlora_B, lora->dh, dout, a.h, inp, a.lora_A, a.lora_B, (real)lora->config.scale, BT, a.C, a.OC, a.r);
    if (dropped && dinp != NULL) dropout_backward(dinp, dbranch, (size_t)BT * a.C, lora->config.dropout, gpt2_dropout_key(model, l, DROP_LORA + t));
}

// folds the adapters into qkvw, attprojw, fcw, fcprojw (sign +1) or takes them out again (sign -1)
// (a quantized base has no fp32 matrices to fold into: write_merged_checkpoint merges into a dequantized copy)
template <typename real>
void gpt2_lora_merge(GPT2<real>* model, int sign) {
    if (model->quant_q[0] != NULL) die("gpt2_lora_merge: the base is quantized (-Q): there are no fp32 block matrices to merge into\n---> HINT: an internal check failed: this is a bug in train_gpt2_lora, not in your input; please report it with the command line");
    real* base[LORA_NUM_TARGETS] = {model->params.qkvw, model->params.attprojw, model->params.fcw, model->params.fcprojw};
    lora_merge_all(&model->lora, base, sign);
}

// ---- trainable token rows' wiring (-C): attach, detach; their backward is called in gpt2_backward
// (see "trainable token rows" in lora.h). The rows live in the fp32 wte itself, so a -Q bf16 LM head,
// which is read from a bf16 copy, is refused.
template <typename real>
std::string gpt2_token_rows_attach(GPT2<real>* model, const std::vector<int>& ids) {
    if (model->params.wte == NULL || model->wte_bf16 != NULL) {
        return "-C trains rows of the fp32 token embedding, but with -Q bf16 the LM head is read from a bf16 copy\n"
               "---> HINT: use -Q fp32 (or int8, nf4, int2, which keep wte in fp32) with -C";
    }
    std::string err = token_rows_check_ids(ids, model->config.vocab_size);
    if (!err.empty()) return "-C: " + err + "\n---> HINT: give distinct token ids below V, or top:N";
    if (model->tokens.n > 0) token_rows_detach(&model->tokens, model->params.wte);
    token_rows_attach(&model->tokens, ids, model->params.wte, model->config.vocab_size, model->config.channels);
    return "";
}

template <typename real>
void gpt2_token_rows_detach(GPT2<real>* model) {
    if (model->tokens.n > 0) token_rows_detach(&model->tokens, model->params.wte);
}

// ----------------------------------------------------------------------------
// the forward pass, the backward pass (its exact reverse) and the update

// inputs, targets (B, T) token ids; targets may be NULL (inference: no loss)
template <typename real>
void gpt2_forward(GPT2<real>* model, const int* inputs, const int* targets, int B, int T) {
    if (model->params.qkvw == NULL && model->quant_q[0] == NULL) {
        die("gpt2_forward: the base's block matrices are still on disk (read for -Q); attach the adapters first (gpt2_lora_attach)\n---> HINT: an internal check failed: this is a bug in train_gpt2_lora, not in your input; please report it with the command line");
    }
    if (model->acts_memory == NULL) gpt2_allocate(model, B, T);
    if (B > model->alloc_B || T > model->alloc_T) {
        die(strprintf("forward with B=%d T=%d exceeds the allocated B=%d T=%d\n---> HINT: an internal check failed: this is a bug in train_gpt2_lora, not in your input; please report it with the command line", B, T, model->alloc_B, model->alloc_T));
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
        die(strprintf("gpt2_forward with the key/value cache: B=%d, targets %s, positions %d..%d of %d", B, targets ? "given" : "none", pos0, pos0 + T - 1, model->kv_cap) + "\n---> HINT: an internal check failed: this is a bug in train_gpt2_lora, not in your input; please report it with the command line");
    }
    // (the cache's attention uses att as scratch, (NH, T, pos0 + T) or the GEMM form's statistics)
    size_t kv_att = attention_by_gemm(pos0 + T, pos0) ? (size_t)NH * T * 2 : (size_t)NH * T * (pos0 + T);
    if (model->kv_on && kv_att > model->act_sizes[ACT_ATT]) {
        die(strprintf("gpt2_forward with the key/value cache: %d new positions after %d need %zu floats of attention scratch, %zu allocated", T, pos0, kv_att, model->act_sizes[ACT_ATT]) + "\n---> HINT: an internal check failed: this is a bug in train_gpt2_lora, not in your input; please report it with the command line");
    }

    // dropout (-D, -R) in a training step's forward only: never at evaluation or generation
    Dropout<real>& drop = model->drop;
    drop.drawn = drop.train && targets != NULL && !model->kv_on && (drop.gpt2_p > 0 || model->lora.config.dropout > 0);
    if (drop.drawn) gpt2_dropout_allocate(model);
    float pr = drop.drawn ? drop.gpt2_p : 0; // -R in this forward

    ParameterTensors<real> params = model->params;
    ActivationTensors<real> acts = model->acts;
    gpt2_encoder_forward(model, acts.encoded, inputs, params.wpe + (size_t)pos0 * C, B, T, C);
    if (pr > 0) dropout_forward(acts.encoded, acts.encoded, (size_t)BT * C, pr, gpt2_dropout_key(model, -1, DROP_EMBEDDINGS));
    for (int l = 0; l < L; l++) {
        LayerParams<real> lp = layer_params(params, l, C);                 // this block's weights
        LayerActivations<real> la = layer_activations(acts, l, B, T, C, NH); // and activations
        real* proj = acts.proj;

        layernorm_forward(la.ln1, la.ln1_mean, la.ln1_rstd, la.residual, lp.ln1w, lp.ln1b, B, T, C);
        gpt2_base_matmul_forward(model, LORA_QKV, l, la.qkv, la.ln1, lp.qkvb, B, T, C, 3 * C);
        gpt2_lora_forward(model, LORA_QKV, l, la.qkv, la.ln1, BT);
        // with the cache: append the new rows, then attend from them over all cached positions
        const real* qkv_all = la.qkv;
        real* att = la.att;
        if (model->kv_on) {
            real* kv_l = model->kv + (size_t)l * model->kv_cap * 3 * C;
            memcpy(kv_l + (size_t)pos0 * 3 * C, la.qkv, (size_t)T * 3 * C * sizeof(real));
            qkv_all = kv_l;
            att = acts.att; // scratch (checked above); no backward
        }
        uint64_t att_key = gpt2_dropout_key(model, l, DROP_ATTENTION);
        if (model->prefix.P > 0) gpt2_prefix_attention_forward(&model->prefix, l, la.atty, qkv_all, B, pos0 + T, pos0, pr, att_key);
        else attention_forward(la.atty, att, qkv_all, B, pos0 + T, C, NH, pos0, pr, att_key);
        gpt2_base_matmul_forward(model, LORA_ATTPROJ, l, proj, la.atty, lp.attprojb, B, T, C, C);
        gpt2_lora_forward(model, LORA_ATTPROJ, l, proj, la.atty, BT);
        if (pr > 0) dropout_forward(proj, proj, (size_t)BT * C, pr, gpt2_dropout_key(model, l, DROP_ATTPROJ));
        gpt2_adapter_forward(&model->adapters, 0, l, proj, BT);
        residual_forward(la.residual2, la.residual, proj, (size_t)BT * C);
        layernorm_forward(la.ln2, la.ln2_mean, la.ln2_rstd, la.residual2, lp.ln2w, lp.ln2b, B, T, C);
        gpt2_base_matmul_forward(model, LORA_FC, l, la.fch, la.ln2, lp.fcb, B, T, C, 4 * C);
        gpt2_lora_forward(model, LORA_FC, l, la.fch, la.ln2, BT);
        gelu_forward(la.fch_gelu, la.fch, (size_t)BT * 4 * C);
        gpt2_base_matmul_forward(model, LORA_FCPROJ, l, proj, la.fch_gelu, lp.fcprojb, B, T, 4 * C, C);
        gpt2_lora_forward(model, LORA_FCPROJ, l, proj, la.fch_gelu, BT);
        if (pr > 0) dropout_forward(proj, proj, (size_t)BT * C, pr, gpt2_dropout_key(model, l, DROP_FCPROJ));
        gpt2_adapter_forward(&model->adapters, 1, l, proj, BT);
        residual_forward(la.residual3, la.residual2, proj, (size_t)BT * C);
    }
    real* residual = acts.residual3 + (size_t)(L - 1) * BT * C;
    layernorm_forward(acts.lnf, acts.lnf_mean, acts.lnf_rstd, residual, params.lnfw, params.lnfb, B, T, C);
    gpt2_lm_head_forward(model, acts.logits, acts.lnf, B, T, C, Vp);

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
    if (model->tokens.n > 0) memset(model->tokens.grads, 0, token_rows_count(&model->tokens) * sizeof(real));
    if (model->top_grads) memset(model->top_grads, 0, model->num_top_trainable * sizeof(real));
    if (model->adapters.m > 0) memset(model->adapters.buf.grads, 0, model->adapters.buf.n * sizeof(real));
    if (model->prefix.P > 0) memset(model->prefix.buf.grads, 0, model->prefix.buf.n * sizeof(real));
}

// The exact reverse of gpt2_forward. Frozen weights get NULL gradients, so their matmuls only pass
// the activation gradient through. Requires a forward with targets just before; destroys the logits.
template <typename real>
void gpt2_backward(GPT2<real>* model) {
    if (!model->have_targets) die("gpt2_backward needs a forward pass with targets first\n---> HINT: an internal check failed: this is a bug in train_gpt2_lora, not in your input; please report it with the command line");
    int B = model->batch_size, T = model->seq_len, BT = B * T;
    int V = model->config.vocab_size, Vp = model->config.padded_vocab_size;
    int L = model->config.num_layers, NH = model->config.num_heads, C = model->config.channels;
    ParameterTensors<real> params = model->params;
    ParameterTensors<real> grads = model->grads; // all NULL unless full fine-tuning (or -F: the top tails)
    int l0 = model->first_trained_layer;         // the lowest block with a gradient (0 unless -F)
    ActivationTensors<real> acts = model->acts;
    BackwardTensors<real> d = model->dacts;
    float pr = model->drop.drawn ? model->drop.gpt2_p : 0; // -R as the forward drew it

    // the loss is the mean over B*T positions
    real dloss = (real)1 / BT;
    zero_fill(d.dresidual, (size_t)BT * C);
    zero_fill(d.dln, (size_t)BT * C);
    crossentropy_backward(acts.logits, model->lse, model->targets, dloss, B, T, V, Vp);
    real* dlogits = acts.logits;
    gpt2_lm_head_backward(model, d.dln, grads.wte, dlogits, acts.lnf, B, T, C, Vp);
    if (model->tokens.n > 0) token_rows_lm_head_backward(&model->tokens, dlogits, acts.lnf, BT, Vp); // -C: the head's part
    real* residual = acts.residual3 + (size_t)(L - 1) * BT * C;
    layernorm_backward(d.dresidual, grads.lnfw, grads.lnfb, d.dln, residual, params.lnfw, acts.lnf_mean, acts.lnf_rstd, B, T, C);

    for (int l = L - 1; l >= l0; l--) {
        LayerParams<real> lp = layer_params(params, l, C);                 // this block's weights,
        LayerParams<real> lg = layer_params(grads, l - l0, C);             // their gradients (NULL: frozen)
        LayerActivations<real> la = layer_activations(acts, l, B, T, C, NH); // and the forward's activations
        // the layer's gradient scratch starts at zero: the kernels below accumulate into it
        zero_fill(d.dln, (size_t)BT * C);
        zero_fill(d.datty, (size_t)BT * C);
        zero_fill(d.dqkv, (size_t)BT * 3 * C);
        zero_fill(d.dfch, (size_t)BT * 4 * C);
        zero_fill(d.dfch_gelu, (size_t)BT * 4 * C);
        // Below layer 0 only the embeddings remain; when they are frozen, the gradient of the block's
        // input is never used, so layer 0 skips it (the adapters still get all their gradients).
        // With -F the same holds below block l0, and nothing below it is visited at all.
        bool need_dinp = l > l0 || model->train_base || model->tokens.n > 0;

        // residual3 = residual2 + proj: both receive dresidual unchanged (it's the same buffer)
        real* dproj = gpt2_adapter_backward(&model->adapters, 1, l, d.dresidual, BT);
        if (pr > 0) dproj = gpt2_dropout_backward(model, l, DROP_FCPROJ, dproj, (size_t)BT * C);
        gpt2_base_matmul_backward(model, LORA_FCPROJ, l, d.dfch_gelu, lg.fcprojw, lg.fcprojb, dproj, la.fch_gelu, B, T, 4 * C, C);
        gpt2_lora_backward(model, LORA_FCPROJ, l, d.dfch_gelu, dproj, la.fch_gelu, BT);
        gelu_backward(d.dfch, la.fch, d.dfch_gelu, (size_t)BT * 4 * C);
        gpt2_base_matmul_backward(model, LORA_FC, l, d.dln, lg.fcw, lg.fcb, d.dfch, la.ln2, B, T, C, 4 * C);
        gpt2_lora_backward(model, LORA_FC, l, d.dln, d.dfch, la.ln2, BT);
        layernorm_backward(d.dresidual, lg.ln2w, lg.ln2b, d.dln, la.residual2, lp.ln2w, la.ln2_mean, la.ln2_rstd, B, T, C);
        // residual2 = residual + proj: again dresidual flows to both unchanged
        dproj = gpt2_adapter_backward(&model->adapters, 0, l, d.dresidual, BT);
        if (pr > 0) dproj = gpt2_dropout_backward(model, l, DROP_ATTPROJ, dproj, (size_t)BT * C);
        gpt2_base_matmul_backward(model, LORA_ATTPROJ, l, d.datty, lg.attprojw, lg.attprojb, dproj, la.atty, B, T, C, C);
        gpt2_lora_backward(model, LORA_ATTPROJ, l, d.datty, dproj, la.atty, BT);
        uint64_t att_key = gpt2_dropout_key(model, l, DROP_ATTENTION);
        if (model->prefix.P > 0) gpt2_prefix_attention_backward(&model->prefix, l, d.dqkv, d.datty, la.qkv, B, T, pr, att_key);
        else attention_backward(d.dqkv, d.datt, d.datty, la.qkv, la.att, B, T, C, NH, pr, att_key);
        zero_fill(d.dln, (size_t)BT * C);
        // (-F: the lowest trained block's ln1 weights, BitFit: block 0's ln1 bias, still need the gradient
        // at ln1's output)
        real* dln1 = need_dinp || lg.ln1w != NULL || lg.ln1b != NULL ? d.dln : NULL;
        gpt2_base_matmul_backward(model, LORA_QKV, l, dln1, lg.qkvw, lg.qkvb, d.dqkv, la.ln1, B, T, C, 3 * C);
        gpt2_lora_backward(model, LORA_QKV, l, dln1, d.dqkv, la.ln1, BT);
        if (dln1 != NULL) {
            layernorm_backward(d.dresidual, lg.ln1w, lg.ln1b, d.dln, la.residual, lp.ln1w, la.ln1_mean, la.ln1_rstd, B, T, C);
        }
    }
    if (model->train_base) {
        const real* dencoded = d.dresidual;
        if (pr > 0) dencoded = gpt2_dropout_backward(model, -1, DROP_EMBEDDINGS, dencoded, (size_t)BT * C);
        encoder_backward(grads.wte, grads.wpe, dencoded, model->inputs, B, T, C);
    }
    if (model->tokens.n > 0) { // -C: the input embedding's part of the trained rows' gradient
        const real* dencoded = d.dresidual;
        if (pr > 0) dencoded = gpt2_dropout_backward(model, -1, DROP_EMBEDDINGS, dencoded, (size_t)BT * C);
        token_rows_encoder_backward(&model->tokens, dencoded, model->inputs, BT);
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
    TokenRows<real>* tr = &model->tokens;
    if (tr->n > 0) { // -C: the trained rows, then into wte
        adamw_update(tr->rows, tr->grads, tr->m, tr->v, token_rows_count(tr), lr, beta1, beta2, eps, weight_decay, t);
        token_rows_write(tr, model->params.wte);
    }
}

// frees everything the model holds: its base, adapters, methods, activations and caches
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
    token_rows_free(&model->tokens);
    free(model->top_grads);
    free(model->top_m);
    free(model->top_v);
    adapters_free(&model->adapters);
    prefix_free(&model->prefix);
    free(model->params0);
    free(model->block_file);
    gpt2_free_quantized(model);
    free(model->wte_bf16); // (-Q bf16 with the fp32 wte dropped: gpt2_free_quantized keeps it)
    free(model->kv);
    free(model->drop.lora_x);
    free(model->drop.lora_dx);
    free(model->drop.dproj);
    memset(model, 0, sizeof(*model));
}

// ----------------------------------------------------------------------------
// the training step's helpers: the learning-rate schedule, clipping, the non-finite guard, validation

// every gradient buffer the update applies, as (pointer, count); unused ones have count 0
template <typename real>
std::vector<std::pair<real*, size_t>> gpt2_trainable_grads(const GPT2<real>* model) {
    return {{model->grads_memory, model->grads_memory ? model->num_parameters : 0},
            {model->lora.grads_memory, model->lora.num_parameters},
            {model->top_grads, model->top_grads ? model->num_top_trainable : 0},
            {model->adapters.buf.grads, model->adapters.buf.n},
            {model->prefix.buf.grads, model->prefix.buf.n},
            {model->tokens.grads, token_rows_count(&model->tokens)}};
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
           model->adapters.buf.n + model->prefix.buf.n + token_rows_count(&model->tokens);
}

// the mean loss over the first `batches` batches of val
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

// ----------------------------------------------------------------------------
// sampling and generation

// samples from softmax(logits[0..V) / temperature); coin in [0, 1)
static int sample_softmax(const float* logits, int V, float temperature, float coin) {
    float maxval = max_lanes(logits, V);
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
// on_token (optional) is called with each token as soon as it is sampled, e.g. to print it.
static std::vector<int> gpt2_generate(GPT2<float>* model, const std::vector<int>& prompt, int n, Rng* rng,
                                      float temperature = 1.0f, int top_k = 0, bool use_cache = true,
                                      void (*on_token)(int id, void* ctx) = NULL, void* ctx = NULL) {
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
        if (on_token != NULL) on_token(tokens.back(), ctx);
    }
    model->kv_on = false;
    return std::vector<int>(tokens.begin() + prompt.size(), tokens.end());
}


// ---- inference from a text prompt (skip on first reading)

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

// stream (optional): each token's text is written to it as soon as it is sampled
struct TokenStream { const BPE* bpe; FILE* out; };
static void stream_token(int id, void* ctx) {
    TokenStream* ts = (TokenStream*)ctx;
    std::string piece = bpe_decode(ts->bpe, &id, 1);
    fwrite(piece.data(), 1, piece.size(), ts->out);
    fflush(ts->out);
}
static std::string generate_from_prompt(GPT2<float>* model, const BPE* bpe, const std::string& prompt, int n,
                                        float temperature, int top_k, Rng* rng, std::string* text, FILE* stream = NULL) {
    std::vector<int> ids;
    std::string err = encode_prompt(bpe, prompt, model->config.vocab_size, &ids);
    if (!err.empty()) return err;
    TokenStream ts = {bpe, stream};
    std::vector<int> out = gpt2_generate(model, ids, n, rng, temperature, top_k, true, stream ? stream_token : NULL, &ts);
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
// beyond the core (skip on first reading): the files of a model and its adapters, data parallelism,
// the other methods' setup, and the program (flags, logs, the training loop)

#include "lib/checkpoint.h"    // llm.c checkpoints: read (fp32 v3, bf16 v5), write (v3); a quantized base read layer by layer
#include "lib/adapter_files.h" // adapter.bin (exact resume), the base checksum, -M's merged checkpoint
#include "lib/peft.h"          // PEFT's adapter directory: export, import; loading any -A; -o's save sets
#include "lib/save_set.h"      // a save set's manifest (written last, checked on load), what -o already holds
#include "lib/gguf.h"          // GGUF for llama.cpp / Ollama: the model (base, merged) and the LoRA adapter
#include "lib/dataparallel.h"  // MPI data parallelism: one allreduce of the gradients per step

// ----------------------------------------------------------------------------
// the other adaptation methods on the model: setup, the log's method block, and the method's file

// The trained parts of the base for -F and BitFit: tensor i trains its elements [offsets[i], size), a tail
// (-F: the last blocks of each (L, ...) tensor; BitFit: the bias tensors, whole). Gradients and AdamW state
// exist for those parts only, back to back in top_grads, top_m, top_v; every other tensor's gradient is NULL.
template <typename real>
void gpt2_enable_tensor_tails(GPT2<real>* model, const size_t offsets[NUM_PARAMETER_TENSORS], const char* what) {
    real** dptrs[NUM_PARAMETER_TENSORS] = {
        &model->grads.wte, &model->grads.wpe, &model->grads.ln1w, &model->grads.ln1b, &model->grads.qkvw,
        &model->grads.qkvb, &model->grads.attprojw, &model->grads.attprojb, &model->grads.ln2w, &model->grads.ln2b,
        &model->grads.fcw, &model->grads.fcb, &model->grads.fcprojw, &model->grads.fcprojb, &model->grads.lnfw, &model->grads.lnfb};
    size_t n = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        model->top_offsets[i] = offsets[i];
        n += model->param_sizes[i] - offsets[i];
    }
    model->num_top_trainable = n;
    model->top_grads = calloc_real<real>(n, what);
    model->top_m = calloc_real<real>(n, "AdamW m");
    model->top_v = calloc_real<real>(n, "AdamW v");
    size_t off = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        size_t len = model->param_sizes[i] - model->top_offsets[i];
        *dptrs[i] = len > 0 ? model->top_grads + off : NULL; // a block's gradient is at (l - first_trained_layer)
        off += len;
    }
}

// -F: only the top k blocks and the final layernorm train. The blocks below and the embeddings
// (wte is also the LM head) get no gradient buffers, no AdamW state and no gradient work: the backward
// stops at block first_trained_layer. Each per-layer tensor is (L, ...), so its trained part is a tail.
template <typename real>
void gpt2_enable_top_training(GPT2<real>* model, int k) {
    int L = model->config.num_layers;
    model->first_trained_layer = L - k;
    size_t offsets[NUM_PARAMETER_TENSORS];
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        size_t size = model->param_sizes[i];
        bool per_layer = i >= 2 && i <= 13;
        offsets[i] = i < 2 ? size : per_layer ? size / L * (size_t)(L - k) : 0;
    }
    gpt2_enable_tensor_tails(model, offsets, "top-block gradients");
}

// the bias tensors, in checkpoint order: ln1b, qkvb, attprojb, ln2b, fcb, fcprojb, lnfb
static inline bool param_tensor_is_bias(int i) { return i == 3 || i == 5 || i == 7 || i == 9 || i == 11 || i == 13 || i == 15; }

// -B: BitFit (Ben Zaken et al. 2022): only the bias terms train, those of every matmul and layernorm;
// the weights (and the embeddings) are frozen. The backward still runs through every block (block 0's
// biases need their gradient), but no weight gradient is ever computed.
template <typename real>
void gpt2_enable_bitfit(GPT2<real>* model) {
    size_t offsets[NUM_PARAMETER_TENSORS];
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) offsets[i] = param_tensor_is_bias(i) ? 0 : model->param_sizes[i];
    gpt2_enable_tensor_tails(model, offsets, "bias gradients");
    model->bitfit = true;
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

// -F k, -H m, -X P, -B 1 (at most one, checked by main): sets the method up on a freshly loaded base
static std::string gpt2_enable_other_method(GPT2<float>* model, int freeze_k, int adapter_m, int prefix_P, int bitfit, uint64_t seed) {
    int L = model->config.num_layers;
    if (freeze_k > L) return strprintf("flag -F: cannot train the top %d blocks of a %d-block model\n---> HINT: use -F 1..%d (-f 1 trains everything)", freeze_k, L, L);
    if (freeze_k > 0) gpt2_enable_top_training(model, freeze_k);
    if (bitfit) gpt2_enable_bitfit(model);
    if (adapter_m > 0) gpt2_adapters_attach(model, adapter_m, seed);
    if (prefix_P > 0) gpt2_prefix_attach(model, prefix_P, seed);
    return "";
}

// bytes held by each kind of state, as the [Memory] block prints them (docs: doc/memory.md)
struct MemoryBytes {
    size_t base;        // the base weights as held: fp32, or with -Q the fp32 rest + block-matrix codes, absmax and one dequantized layer per matrix
    size_t params;      // base + trainable extras (+ W0 with L2-SP)
    size_t grads;       // one float per trainable parameter
    size_t optimizer;   // AdamW m and v: two floats per trainable parameter (AdaLoRA: two more, its importance state)
    size_t activations; // forward activations, their per-layer gradients and the method's caches
};

static MemoryBytes gpt2_memory_bytes(const GPT2<float>* model) {
    MemoryBytes mb;
    size_t trainable = gpt2_trainable_parameters(model);
    // -C's token rows count twice: the trained rows and the frozen base's copy of them (detach restores it)
    size_t extras = model->lora.num_parameters + model->adapters.buf.n + model->prefix.buf.n + 2 * token_rows_count(&model->tokens);
    mb.base = model->num_params_stored * sizeof(float);
    if (model->quant_q[0] != NULL) { // -Q: the block matrices are codes (see gpt2_lora_attach), and one dequantized layer
        mb.base += gpt2_block_matrix_bytes(model, model->quant);
        // (bf16 dequantizes only for DoRA and merging, which allocate the scratch when they need it)
        if (model->quant_w != NULL || model->quant != LORA_QUANT_BF16) mb.base += (size_t)4 * model->config.channels * model->config.channels * sizeof(float);
    }
    if (model->wte_bf16 != NULL) mb.base += model->param_sizes[0] * sizeof(uint16_t); // -Q bf16: wte in bf16
    mb.params = mb.base + (extras + (model->params0 ? model->num_parameters : 0)) * sizeof(float);
    mb.grads = trainable * sizeof(float);
    mb.optimizer = 2 * trainable * sizeof(float);
    if (model->lora.config.use_adalora) mb.optimizer += 2 * model->lora.num_parameters * sizeof(float); // AdaLoRA's importance averages
    size_t BT = (size_t)model->alloc_B * model->alloc_T;
    mb.activations = (model->num_activations + model->num_dacts + 2 * BT) * sizeof(float) +
                     (model->lora.num_parameters > 0 ? lora_activation_bytes(&model->lora) : 0) +
                     adapters_activation_bytes(&model->adapters) + prefix_activation_bytes(&model->prefix) +
                     gpt2_dropout_bytes(model);
    return mb;
}

// the method block of the log, for everything but plain LoRA (which prints [LoRA])
static void gpt2_print_method(const GPT2<float>* model) {
    size_t trainable = gpt2_trainable_parameters(model);
    if (model->params0) printf("[L2-SP]\nlambda: %g\n", model->l2sp_lambda);
    else if (model->train_base) printf("[Full fine-tuning]\n");
    if (model->bitfit) printf("[BitFit]\ntrained: the biases of every matmul and layernorm\n");
    else if (model->top_grads) printf("[Freeze]\ntrained blocks: %d..%d and lnf\n", model->first_trained_layer, model->config.num_layers - 1);
    if (model->adapters.m > 0) printf("[Adapters]\nbottleneck m: %d\n", model->adapters.m);
    if (model->prefix.P > 0) printf("[Prefix]\nprefix positions P: %d\n", model->prefix.P);
    printf("trainable_params: %zu\ntrainable %%: %.4f\n", trainable,
           100.0 * trainable / (double)(model->num_parameters + model->adapters.buf.n + model->prefix.buf.n));
}


// -H / -X / -B with -o: the trained adapter, prefix or bias parameters as <dir>/method.bin, a 1024-byte
// header (magic, version, method 1 = adapter / 2 = prefix / 3 = BitFit, L, C, m or P (0 for BitFit),
// parameter count) then the floats; BitFit's are the bias tensors in checkpoint order
#define METHOD_FILE_MAGIC 20261110
static std::string gpt2_write_method_file(const GPT2<float>* model, const char* path) {
    if (model->bitfit) {
        std::vector<float> biases;
        size_t off = 0;
        for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
            if (param_tensor_is_bias(i)) biases.insert(biases.end(), model->params_memory + off, model->params_memory + off + model->param_sizes[i]);
            off += model->param_sizes[i];
        }
        int header[256] = {0};
        header[0] = METHOD_FILE_MAGIC;
        header[1] = 1;
        header[2] = 3;
        header[3] = model->config.num_layers;
        header[4] = model->config.channels;
        header[6] = (int)biases.size();
        return write_atomically(path, {{header, sizeof(header)}, {biases.data(), biases.size() * sizeof(float)}});
    }
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

// ----------------------------------------------------------------------------
// Ctrl-C (SIGINT) or SIGTERM during training: the handler only records the signal; the loop finishes the
// step it is in, saves as at the end of a run (atomically) and exits with 128 + signal. A second Ctrl-C
// kills at once, except during a save: then the save set is finished first (a set is never left half
// written) and the program stops right after it (stop_after_save).
static volatile sig_atomic_t stop_signal = 0;
static volatile sig_atomic_t saving = 0;            // a save set is being written
static volatile sig_atomic_t signal_during_save = 0; // a second signal arrived during it
static void on_stop_signal(int sig) {
    if (stop_signal != 0 && saving) { signal_during_save = sig; return; }
    if (stop_signal != 0) { signal(sig, SIG_DFL); raise(sig); return; } // the second: the default action, at once
    stop_signal = sig;
}
static void install_stop_handlers() {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}
// writes one save set (lib/peft.h's save_set_write) with the signals held off until it is complete
static std::string save_adapter_set(const char* dir, const GPT2<float>* model, uint64_t base_sum, const TrainState* state, int step,
                                    const char* base_name) {
    saving = 1;
    std::string err = save_set_write(dir, model, base_sum, state, step, base_name);
    saving = 0;
    return err;
}
// after a save: a second signal that arrived during it ends the program now, the set complete
static void stop_after_save() {
    if (signal_during_save == 0) return;
    printf("%s again during the save: the save set is complete; stopping now\n", signal_during_save == SIGINT ? "SIGINT (Ctrl-C)" : "SIGTERM");
    fflush(stdout);
    exit(128 + signal_during_save);
}

// ----------------------------------------------------------------------------
// the program (skip on first reading): its flags and their checks, then the steps main takes in turn

#ifndef TESTING
// the usage: on stderr after a bad flag (exit 1), on stdout for -h / --help (exit 0)
static const char* const usage_text =
        "Usage:   ./train_gpt2_lora [options]\n"
        "Example: ./train_gpt2_lora -e data/gpt2_124M.bin -i data/tiny_shakespeare_train.bin -r 8 -x 100\n"
        "Options:\n"
        "  -e <file>   base model, llm.c fp32 checkpoint (default data/gpt2_124M.bin)\n"
        "  -i <file>   training tokens (default data/tiny_shakespeare_train.bin)\n"
        "  -j <file>   validation tokens (default data/tiny_shakespeare_val.bin)\n"
        "  -c <file>   llm.c tokenizer for printing samples (default data/gpt2_tokenizer.bin; ids if absent)\n"
        "  -o <dir>    output directory, created if missing (default: none, nothing is written)\n"
        "  -b <int>    batch size B, >= 1 (default 4)\n"
        "  -t <int>    sequence length T, 1..maxT (default 64)\n"
        "  -r <int>    LoRA rank r, >= 1 (default 8)\n"
        "  -a <float>  LoRA alpha; scale = alpha / r (default 16)\n"
        "  -q <list>   LoRA targets from qkv,attproj,fc,fcproj (default all four)\n"
        "  -f <0|1>    full fine-tuning: train every base parameter, no LoRA (default 0)\n"
        "  -l <float>  learning rate, >= 0 (default 1e-3 with LoRA, 1e-4 with -f 1)\n"
        "  -d <float>  AdamW weight decay, >= 0 (default 0)\n"
        "  -x <int>    training steps, >= 0 (default 40; -x 0 with -A: evaluate the adapter, no training)\n"
        "  -v <int>    validation loss every v steps, 0 = never (and -j is not needed) (default 20)\n"
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
        "  -L <dir>    write GGUF for llama.cpp at the end (-x 0: only that): base.gguf + adapter.gguf, merged.gguf\n"
        "  -p <text>   generate -g tokens from this prompt and exit (inference only, no training data)\n"
        "  -T <float>  sampling temperature, > 0 (default 1)\n"
        "  -K <int>    sample from the K most likely tokens only, 0 = all (default 0)\n"
        "  -W <0|1>    -p with the adapter merged into the weights, or as a separate branch (default 1)\n"
        "  -Y <0|1>    -p with several -A: 1 = one batch, each sequence with its own adapter, unmerged (default 0)\n"
        "  -E <dir>    GPT-2 BPE dir (encoder.json, vocab.bpe) for -p (default ../shared/data/gpt2_tokenizer)\n"
        "  -N <name>   base_model_name_or_path for the PEFT adapter_config.json (default gpt2)\n"
        "  -V <list>   LoRA variant: lora, adalora, or a comma list of rslora,dora,pissa (default lora)\n"
        "  -Z <int>    -V adalora: the average rank at the end (target_r), 1..-r (default 8; -r is init_r)\n"
        "  -U <list>   -V adalora: the budget schedule tinit,tfinal,deltaT in steps (default 0,0,1; total_step = -x)\n"
        "  -J <float>  -V adalora: the orthogonality regulariser's weight, >= 0 (default 0.5)\n"
        "  -Q <kind>   frozen base matrices as fp32, bf16, int8, nf4 or int2 (default fp32; -A: the adapter's)\n"
        "              (bf16: the block matrices and wte in bf16, with bf16 matmuls; int8, nf4, int2: QLoRA-style codes)\n"
        "  -P <float>  LoRA+: lora_B learning rate = P * lr, > 0 (default 1)\n"
        "  -F <int>    instead of LoRA, freezing: train only the top F blocks and lnf, 0 = off (default 0)\n"
        "  -H <int>    instead of LoRA, Houlsby adapters of bottleneck m = H, 0 = off (default 0)\n"
        "  -X <int>    instead of LoRA, prefix tuning with X key/value positions per layer, 0 = off (default 0)\n"
        "  -B <0|1>    instead of LoRA, BitFit: train only the biases of every matmul and layernorm (default 0)\n"
        "  -w <float>  with -f 1, L2-SP: add w/2 ||W - W0||^2 pulling toward the base, >= 0 (default 0)\n"
        "  -D <float>  LoRA dropout (PEFT's lora_dropout) on the LoRA branch's input while training, in [0, 1)\n"
        "              (default 0; -A: the adapter's)\n"
        "  -R <float>  GPT-2's own dropouts while training, any method: embeddings, attention probabilities and\n"
        "              the residual branches (HF's embd/attn/resid_pdrop), in [0, 1) (default 0)\n"
        "  -C <list>   with LoRA, also train these rows of the tied token embedding / LM head (PEFT's\n"
        "              trainable_token_indices): token ids as a comma list, or top:N = the N most frequent ids of -i\n"
        "  -O <0|1>    let a save into -o replace an adapter that holds more: a later step, or optimizer state (default 0)\n"
        "  -h, --help  print this and exit\n";
static void print_usage(FILE* out) { fputs(usage_text, out); }
static void error_usage() {
    print_usage(stderr);
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

// a flag's bad value: the message, and when it brings no HINT of its own, the flag's line of the usage
// (what it takes, its range and its default)
static void bad_flag(const char* flag, const std::string& what) {
    std::string hint;
    const char* line = strstr(usage_text, (std::string("\n  ") + flag + " ").c_str());
    if (what.find("HINT:") == std::string::npos && line != NULL) {
        const char* end = strchr(line + 1, '\n');
        hint = "\n---> HINT: " + std::string(line + 3, end) ;
        hint.erase(hint.find_last_not_of(' ') + 1);
    }
    fprintf(stderr, "Error: flag %s: %s%s\n", flag, what.c_str(), hint.c_str());
    exit(EXIT_FAILURE);
}

// Every flag, with its default (llm.c-like: B=4, T=64 on tinyshakespeare with GPT-2 124M). parse_flags
// fills it from argv; check_flags checks every value and derives the settings below the defaults.
struct Flags {
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
    const char* gguf_dir = NULL;    // -L, GGUF files for llama.cpp
    const char* prompt = NULL;      // -p
    float temperature = 1.0f;       // -T
    int top_k = 0;                  // -K
    int merged_inference = 1;       // -W
    int multi_batch = 0;            // -Y, several -A with -p: one batch, each sequence its own adapter
    const char* bpe_dir = NULL;     // -E, NULL: search ../shared/data/gpt2_tokenizer, data/gpt2_tokenizer
    const char* base_name = "gpt2"; // -N
    const char* variants = "lora";  // -V, lora, adalora or a comma list of rslora,dora,pissa
    int adalora_target_r = 8;       // -Z, AdaLoRA's target_r
    const char* adalora_schedule = "0,0,1"; // -U, AdaLoRA's tinit,tfinal,deltaT
    float adalora_orth_reg = 0.5f;  // -J, AdaLoRA's orth_reg_weight
    const char* adalora_given = NULL; // the last of -Z, -U, -J given
    const char* quant = "fp32";     // -Q, the frozen base's adapted matrices: fp32, int8, nf4, int2 or bf16 (with -A: the adapter's)
    bool quant_given = false;
    float lr_ratio_B = 1.0f;        // -P, LoRA+: lora_B learns with lr * P
    int freeze_k = 0;               // -F, train only the top k blocks (and lnf)
    int adapter_m = 0;              // -H, Houlsby adapter bottleneck width
    int prefix_P = 0;               // -X, prefix positions per layer
    int bitfit = 0;                 // -B, BitFit: only the biases train
    float l2sp_lambda = 0.0f;       // -w, L2-SP strength (with -f 1)
    float lora_dropout = 0.0f;      // -D, PEFT's lora_dropout (with -A: the adapter's unless given)
    bool lora_dropout_given = false;
    float gpt2_dropout = 0.0f;      // -R, GPT-2's embd/attn/resid dropout
    const char* token_rows = NULL;  // -C, trainable token rows: "id,id,..." or "top:N" (most frequent in -i)
    int overwrite = 0;              // -O, a save into -o may replace an adapter that holds more
    bool tokenizer_given = false;
    bool val_given = false;               // -j given (with -v 0 the default -j is not needed)
    const char* shape_given = NULL;       // the last of -r, -a, -q given (an -A adapter brings its own)
    // derived by check_flags
    const char* adapter_path = NULL;      // the first -A
    bool combine = false;                 // several -A, or -S: the adapters are added into one
    std::vector<float> combine_weights;   // -S, one per -A (1 each without -S)
    bool lora_on = false;                 // LoRA: none of -f 1, -F, -H, -X
    unsigned target_mask = 0;             // -q as LoRATarget bits
    int base_quant = LORA_QUANT_FP32;     // -Q as LoRAQuant
    bool no_training = false;             // -p, or -M with -x 0: no training data needed
    bool evaluate_only = false;           // -x 0 with -A: the adapter's validation loss and samples, no training
};

// -o and -M, before any work: -o is created (mkdir -p), locked against a second run and tested for
// writability; -M's directory must exist and be writable. So an output that cannot be written is found
// now, not after training.
static void check_output_paths(Flags* f) {
    if (f->output_dir != NULL) {
        const char* d = f->output_dir;
        std::string err = make_directories(d);
        if (!err.empty()) bad_flag("-o", err + "\n---> HINT: -o names a directory (it is created if missing); pick a path that is not under a regular file");
        long holder = 0;
        err = lock_directory(d, &holder);
        if (!err.empty() && err.find("locked by another run") != std::string::npos) {
            bad_flag("-o", strprintf("output directory '%s' is in use by another run (pid %ld): two runs would mix their saves\n"
                                     "---> HINT: wait for that run to finish, or give this one its own -o directory", d, holder));
        }
        if (err.empty()) err = probe_writable_directory(d);
        if (!err.empty()) {
            bad_flag("-o", strprintf("cannot write into output directory '%s' (where %s/%s go): %s\n"
                                     "---> HINT: choose a writable directory (this is checked before training, so nothing was lost)",
                                     d, d, f->full || f->freeze_k > 0 ? "model.bin" : f->lora_on ? "adapter.bin and the PEFT files" : "method.bin", err.c_str()));
        }
    }
    if (f->gguf_dir != NULL) { // -L: created if missing and probed, like -o (no lock: nothing is resumed from it)
        std::string err = make_directories(f->gguf_dir);
        if (err.empty()) err = probe_writable_directory(f->gguf_dir);
        if (!err.empty()) {
            bad_flag("-L", strprintf("cannot write the GGUF files into '%s': %s\n---> HINT: choose a writable directory (checked before any work, so nothing was lost)", f->gguf_dir, err.c_str()));
        }
    }
    if (f->merged_path != NULL) {
        std::string dir = path_dirname(f->merged_path);
        struct stat st;
        if (stat(f->merged_path, &st) == 0 && S_ISDIR(st.st_mode)) {
            bad_flag("-M", strprintf("'%s' is a directory\n---> HINT: -M names the merged checkpoint file, e.g. -M %s/merged.bin", f->merged_path, f->merged_path));
        }
        if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
            bad_flag("-M", strprintf("the directory of '%s' does not exist\n---> HINT: create it first (mkdir -p %s), or write the merge elsewhere", f->merged_path, dir.c_str()));
        }
        std::string err = probe_writable_directory(dir.c_str());
        if (!err.empty()) {
            bad_flag("-M", strprintf("cannot write the merged checkpoint '%s': %s\n---> HINT: choose a writable directory (checked before any work, so nothing was lost)", f->merged_path, err.c_str()));
        }
    }
}

static Flags parse_flags(int argc, char** argv) {
    Flags flags;
    Flags* f = &flags;
    for (int i = 1; i < argc; i++) { // -h / --help anywhere: the usage, and nothing else
        if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) { print_usage(stdout); exit(EXIT_SUCCESS); }
    }
    for (int i = 1; i < argc; i += 2) {
        if (argv[i][0] != '-' || strlen(argv[i]) != 2) {
            fprintf(stderr, "Error: unknown argument '%s'\n---> HINT: flags are a dash and one letter, each followed by a value\n", argv[i]);
            error_usage();
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "Error: flag %s needs a value\n---> HINT: every flag is followed by its value, e.g. -x 100; see the usage below\n", argv[i]);
            error_usage();
        }
        const char* v = argv[i + 1];
        switch (argv[i][1]) {
            case 'e': f->base_path = v; break;
            case 'i': f->train_path = v; break;
            case 'j': f->val_path = v; f->val_given = true; break;
            case 'c': f->tokenizer_path = v; f->tokenizer_given = true; break;
            case 'o': f->output_dir = v; break;
            case 'b': f->B = parse_int(argv[i], v); break;
            case 't': f->T = parse_int(argv[i], v); break;
            case 'r': f->rank = parse_int(argv[i], v); f->shape_given = "-r"; break;
            case 'a': f->alpha = parse_float(argv[i], v); f->shape_given = "-a"; break;
            case 'q': f->targets = v; f->shape_given = "-q"; break;
            case 'f': f->full = parse_int(argv[i], v); break;
            case 'l': f->lr = parse_float(argv[i], v); f->lr_given = true; break;
            case 'd': f->weight_decay = parse_float(argv[i], v); break;
            case 'x': f->steps = parse_int(argv[i], v); break;
            case 'v': f->val_every = parse_int(argv[i], v); break;
            case 'm': f->val_batches = parse_int(argv[i], v); break;
            case 's': f->sample_every = parse_int(argv[i], v); break;
            case 'g': f->gen_tokens = parse_int(argv[i], v); break;
            case 'u': f->shuffle = parse_int(argv[i], v); break;
            case 'y': f->warmup = parse_int(argv[i], v); break;
            case 'z': f->lr_final_frac = parse_float(argv[i], v); break;
            case 'G': f->grad_clip = parse_float(argv[i], v); break;
            case 'n': f->seed = parse_int(argv[i], v); break;
            case 'k': f->save_every = parse_int(argv[i], v); break;
            case 'A': f->adapter_paths.push_back(v); break;
            case 'S': f->adapter_weights = v; break;
            case 'M': f->merged_path = v; break;
            case 'L': f->gguf_dir = v; break;
            case 'p': f->prompt = v; break;
            case 'T': f->temperature = parse_float(argv[i], v); break;
            case 'K': f->top_k = parse_int(argv[i], v); break;
            case 'W': f->merged_inference = parse_int(argv[i], v); break;
            case 'Y': f->multi_batch = parse_int(argv[i], v); break;
            case 'E': f->bpe_dir = v; break;
            case 'N': f->base_name = v; break;
            case 'V': f->variants = v; break;
            case 'Z': f->adalora_target_r = parse_int(argv[i], v); f->adalora_given = "-Z"; break;
            case 'U': f->adalora_schedule = v; f->adalora_given = "-U"; break;
            case 'J': f->adalora_orth_reg = parse_float(argv[i], v); f->adalora_given = "-J"; break;
            case 'Q': f->quant = v; f->quant_given = true; break;
            case 'P': f->lr_ratio_B = parse_float(argv[i], v); break;
            case 'F': f->freeze_k = parse_int(argv[i], v); break;
            case 'H': f->adapter_m = parse_int(argv[i], v); break;
            case 'X': f->prefix_P = parse_int(argv[i], v); break;
            case 'B': f->bitfit = parse_int(argv[i], v); break;
            case 'C': f->token_rows = v; break;
            case 'w': f->l2sp_lambda = parse_float(argv[i], v); break;
            case 'D': f->lora_dropout = parse_float(argv[i], v); f->lora_dropout_given = true; break;
            case 'R': f->gpt2_dropout = parse_float(argv[i], v); break;
            case 'O': f->overwrite = parse_int(argv[i], v); break;
            default:
                fprintf(stderr, "Error: unknown flag '%s'\n---> HINT: the flags are listed below (flags are case-sensitive)\n", argv[i]);
                error_usage();
        }
    }
    return flags;
}

// every check that needs no file: a bad value exits here naming its flag, before any work starts
static void check_flags(Flags* f, const DataParallel& dp) {
    f->adapter_path = f->adapter_paths.empty() ? NULL : f->adapter_paths[0];
    // several -A, or -S: the adapters are combined into one, weighted (lora_files_combine); with -Y 1
    // they stay apart instead, one sequence each in one batch
    if (f->multi_batch != 0 && f->multi_batch != 1) bad_flag("-Y", strprintf("must be 0 or 1, got %d", f->multi_batch));
    if (f->multi_batch && (f->prompt == NULL || f->adapter_paths.empty() || f->adapter_weights != NULL || f->merged_path != NULL || f->output_dir != NULL)) {
        bad_flag("-Y", "a multi-adapter batch generates from -p with the adapters given by -A, each unmerged in its own sequence\n"
                       "---> HINT: -Y 1 -p <prompt> -A a -A b ...; without -S, -M and -o (those add the adapters into one: drop -Y)");
    }
    f->combine = !f->multi_batch && (f->adapter_paths.size() > 1 || f->adapter_weights != NULL);
    f->combine_weights.assign(f->adapter_paths.size(), 1.0f);
    if (f->adapter_weights != NULL) {
        if (f->adapter_paths.empty()) bad_flag("-S", "weights apply to the adapters given with -A\n---> HINT: add -A <adapter> once per weight");
        std::vector<float> w;
        const char* c = f->adapter_weights;
        for (;;) { // a comma list of finite numbers
            char* end = NULL;
            float x = strtof(c, &end);
            if (end == c || (*end != ',' && *end != '\0') || !std::isfinite(x)) {
                bad_flag("-S", strprintf("expects a comma list of numbers, one per -A adapter, got '%s'\n---> HINT: e.g. -A a -A b -S 0.7,0.3", f->adapter_weights));
            }
            w.push_back(x);
            if (*end == '\0') break;
            c = end + 1;
        }
        if (w.size() != f->adapter_paths.size()) {
            bad_flag("-S", strprintf("%zu weights for %zu adapters (-A)\n---> HINT: give one weight per -A, in the same order", w.size(), f->adapter_paths.size()));
        }
        f->combine_weights = w;
    }
    if (f->combine && f->prompt == NULL && !((f->merged_path != NULL || f->gguf_dir != NULL) && f->steps == 0)) {
        bad_flag("-A", "several adapters, or -S weights, combine into one adapter for -p and -M only (it has no optimizer state to train on)\n"
                       "---> HINT: add -p <prompt>, or -M merged.bin -x 0 (and -o <dir> to save the combined adapter); to train, give one -A");
    }
    if ((f->combine || f->multi_batch) && f->quant_given && strcmp(f->quant, "fp32") != 0) {
        bad_flag("-Q", "several adapters on one base (several -A, -S or -Y) need the fp32 base\n---> HINT: drop -Q");
    }
    if (f->B <= 0) bad_flag("-b", strprintf("batch size must be >= 1, got %d", f->B));
    if (f->T <= 0) bad_flag("-t", strprintf("sequence length must be >= 1, got %d", f->T));
    if (f->rank <= 0) bad_flag("-r", strprintf("LoRA rank must be >= 1, got %d\n---> HINT: try -r 8; to train every weight use -f 1", f->rank));
    if (!(f->alpha > 0)) bad_flag("-a", strprintf("LoRA alpha must be > 0, got %g", f->alpha));
    if (f->full != 0 && f->full != 1) bad_flag("-f", strprintf("must be 0 or 1, got %d", f->full));
    if (f->shuffle != 0 && f->shuffle != 1) bad_flag("-u", strprintf("must be 0 or 1, got %d", f->shuffle));
    if (f->lr < 0) bad_flag("-l", strprintf("learning rate must be >= 0, got %g", f->lr));
    if (f->warmup < 0) bad_flag("-y", strprintf("warmup steps must be >= 0, got %d", f->warmup));
    if (!(f->lr_final_frac >= 0 && f->lr_final_frac <= 1)) bad_flag("-z", strprintf("the final learning-rate fraction must be in [0, 1], got %g\n---> HINT: -z 0.1 decays to a tenth of -l; -z 1 keeps it constant", f->lr_final_frac));
    if (!(f->grad_clip >= 0)) bad_flag("-G", strprintf("the gradient-norm clip must be >= 0 (0 = off), got %g", f->grad_clip));
    if (f->full && !f->lr_given) f->lr = 1e-4f;
    // the other adaptation methods: at most one of -f 1, -F, -H, -X, -B 1; LoRA when none
    if (f->freeze_k < 0) bad_flag("-F", strprintf("must be >= 0, got %d", f->freeze_k));
    if (f->bitfit != 0 && f->bitfit != 1) bad_flag("-B", strprintf("must be 0 or 1, got %d\n---> HINT: -B 1 trains only the biases (BitFit)", f->bitfit));
    if (f->adapter_m < 0) bad_flag("-H", strprintf("must be >= 0, got %d", f->adapter_m));
    if (f->prefix_P < 0) bad_flag("-X", strprintf("must be >= 0, got %d", f->prefix_P));
    if ((f->full != 0) + (f->freeze_k > 0) + (f->adapter_m > 0) + (f->prefix_P > 0) + (f->bitfit != 0) > 1) {
        bad_flag(f->freeze_k > 0 ? "-F" : f->adapter_m > 0 ? "-H" : f->prefix_P > 0 ? "-X" : "-B", "choose one method: -f 1, -F, -H, -X or -B 1 (none of them: LoRA)");
    }
    if (f->l2sp_lambda < 0 || (f->l2sp_lambda > 0 && !f->full)) {
        bad_flag("-w", strprintf("L2-SP needs -f 1 and w >= 0, got w = %g\n---> HINT: e.g. -f 1 -w 0.01", f->l2sp_lambda));
    }
    f->lora_on = !f->full && f->freeze_k == 0 && f->adapter_m == 0 && f->prefix_P == 0 && f->bitfit == 0;
    if (!(f->lora_dropout >= 0 && f->lora_dropout < 1)) {
        bad_flag("-D", strprintf("LoRA dropout must be in [0, 1), got %g\n---> HINT: e.g. -D 0.1 (the LoRA paper's value for GPT-2); 0 = off", f->lora_dropout));
    }
    if (!(f->gpt2_dropout >= 0 && f->gpt2_dropout < 1)) {
        bad_flag("-R", strprintf("GPT-2's dropout must be in [0, 1), got %g\n---> HINT: e.g. -R 0.1 (GPT-2's own embd/attn/resid_pdrop); 0 = off", f->gpt2_dropout));
    }
    if (f->lora_dropout > 0 && !f->lora_on) {
        bad_flag("-D", "LoRA dropout acts on the LoRA branch, and this run trains no LoRA (-f 1, -F, -H, -X or -B 1)\n"
                       "---> HINT: drop -D; -R gives GPT-2's own dropouts with any method");
    }
    if (f->freeze_k > 0 && !f->lr_given) f->lr = 1e-4f; // trains base weights, like -f 1
    if (f->token_rows != NULL && !f->lora_on) {
        bad_flag("-C", "trainable token rows go beside LoRA adapters, and this run trains no LoRA (-f 1 already trains all of wte; -F, -H, -X, -B 1 are other methods)\n"
                       "---> HINT: drop -C, or drop the other method's flag");
    }
    if (f->token_rows != NULL && !f->adapter_paths.empty()) {
        bad_flag("-C", "an adapter loaded with -A brings its own trainable token rows (or none)\n"
                       "---> HINT: drop -C when loading or resuming an adapter");
    }
    if (!f->lora_on && !f->full && (f->adapter_path != NULL || f->merged_path != NULL || f->prompt != NULL)) {
        bad_flag(f->adapter_path ? "-A" : f->merged_path ? "-M" : "-p", "LoRA adapter files, merging and -p apply to LoRA only\n---> HINT: drop -F / -H / -X / -B");
    }
    if (f->weight_decay < 0) bad_flag("-d", strprintf("weight decay must be >= 0, got %g", f->weight_decay));
    if (f->steps < 0) bad_flag("-x", strprintf("steps must be >= 0, got %d", f->steps));
    if (f->val_every < 0) bad_flag("-v", strprintf("must be >= 0, got %d", f->val_every));
    if (f->val_batches <= 0) bad_flag("-m", strprintf("validation batches must be >= 1, got %d", f->val_batches));
    if (f->sample_every < 0) bad_flag("-s", strprintf("must be >= 0, got %d", f->sample_every));
    if (f->gen_tokens <= 0) bad_flag("-g", strprintf("generated tokens must be >= 1, got %d", f->gen_tokens));
    if (f->save_every < 0) bad_flag("-k", strprintf("must be >= 0, got %d", f->save_every));
    if (f->save_every > 0 && f->output_dir == NULL) bad_flag("-k", "saving every k steps needs an output directory\n---> HINT: add -o <dir>");
    if (!(f->temperature > 0)) bad_flag("-T", strprintf("temperature must be > 0, got %g", f->temperature));
    if (f->top_k < 0) bad_flag("-K", strprintf("top-k must be >= 0, got %d", f->top_k));
    if (f->merged_inference != 0 && f->merged_inference != 1) bad_flag("-W", strprintf("must be 0 or 1, got %d", f->merged_inference));
    if (f->base_name[0] == '\0' || f->base_name[0] == '/') {
        bad_flag("-N", strprintf("'%s' is not a model name\n---> HINT: use a Hugging Face hub id such as gpt2 (PEFT configs never carry absolute paths)", f->base_name));
    }
    if (f->gguf_dir != NULL && (!f->lora_on || f->multi_batch)) {
        bad_flag("-L", "GGUF export writes a LoRA adapter and the base it applies to (and the two merged)\n"
                       "---> HINT: drop -L, or train with LoRA (no -f 1 / -F / -H / -X / -B) and one adapter (no -Y 1)");
    }
    if (f->full && (f->adapter_path != NULL || f->merged_path != NULL)) {
        bad_flag(f->adapter_path ? "-A" : "-M", "LoRA adapters do not apply to full fine-tuning\n---> HINT: drop -f 1 (with -f 1, -o writes the whole model as model.bin)");
    }
    f->target_mask = 0;
    std::string err;
    if (f->lora_on && !lora_parse_targets(f->targets, &f->target_mask, &err)) bad_flag("-q", err);
    if (dp.rank != 0) { f->output_dir = NULL; f->merged_path = NULL; f->gguf_dir = NULL; f->sample_every = 0; } // only rank 0 samples and writes (and checks -o)
    if (f->overwrite != 0 && f->overwrite != 1) bad_flag("-O", strprintf("must be 0 or 1, got %d", f->overwrite));
    if (f->adapter_path != NULL && f->shape_given != NULL) {
        bad_flag(f->shape_given, "the adapter from -A brings its own rank, alpha and targets; -r, -a and -q would be ignored\n"
                                 "---> HINT: drop -r / -a / -q (the log's [LoRA] section prints the adapter's own)");
    }
    f->no_training = f->prompt != NULL || ((f->merged_path != NULL || f->gguf_dir != NULL) && f->steps == 0); // -p, or -M / -L alone: no data needed
    if (f->no_training && f->output_dir != NULL && f->adapter_path == NULL && f->lora_on) {
        bad_flag("-o", "this run trains nothing and loads no adapter (-A): there is nothing to save\n"
                       "---> HINT: drop -o; with -A <adapter>, -o saves that adapter (converted, or several combined) without training");
    }
    // -x 0 with an adapter: evaluate it (validation loss, samples) where it stands; nothing is trained or saved
    f->evaluate_only = !f->no_training && f->steps == 0 && f->adapter_path != NULL && f->lora_on;
    check_output_paths(f);

    f->base_quant = LORA_QUANT_FP32;
    if (!lora_parse_quant(f->quant, &f->base_quant, &err)) bad_flag("-Q", err);
    if (f->full && f->base_quant == LORA_QUANT_BF16) bad_flag("-Q", "bf16 holds a frozen base for LoRA, but full fine-tuning (-f 1) trains the base (in fp32)\n---> HINT: drop -f 1 to train LoRA on the bf16 base, or drop -Q bf16 to fine-tune everything");
    if (f->full && f->base_quant != LORA_QUANT_FP32) bad_flag("-Q", "a quantized base is frozen, full fine-tuning trains it\n---> HINT: drop -f 1, or use -Q fp32");
    if (!f->lora_on && f->base_quant != LORA_QUANT_FP32) bad_flag("-Q", "a quantized base applies to LoRA only\n---> HINT: drop -F / -H / -X / -B, or use -Q fp32");
}

// -V adalora's -Z, -U, -J into cfg (total_step = -x), each checked; any of them without -V adalora is an error
static void check_adalora_flags(const Flags* f, LoRAConfig* cfg) {
    if (!cfg->use_adalora) {
        if (f->adalora_given != NULL && f->adapter_path == NULL) bad_flag(f->adalora_given, "-Z, -U and -J set AdaLoRA's budget\n---> HINT: add -V adalora, or drop the flag");
        return;
    }
    if (f->adapter_path != NULL && f->adalora_given != NULL) {
        bad_flag(f->adalora_given, "the adapter from -A brings its own AdaLoRA schedule; -Z, -U and -J would be ignored\n---> HINT: drop -Z / -U / -J");
    }
    if (f->adalora_target_r < 1 || f->adalora_target_r > cfg->r) {
        bad_flag("-Z", strprintf("the AdaLoRA target rank must be in 1..%d (the initial rank -r), got %d\n---> HINT: the budget only falls: "
                                 "start higher with -r (PEFT's defaults: -r 12 -Z 8), or lower -Z", cfg->r, f->adalora_target_r));
    }
    int tinit = -1, tfinal = -1, deltaT = -1, used = 0;
    if (sscanf(f->adalora_schedule, "%d,%d,%d%n", &tinit, &tfinal, &deltaT, &used) != 3 || f->adalora_schedule[used] != '\0' ||
        tinit < 0 || tfinal < 0 || deltaT < 1) {
        bad_flag("-U", strprintf("'%s' is not tinit,tfinal,deltaT (three integers, tinit >= 0, tfinal >= 0, deltaT >= 1)\n---> HINT: e.g. -U 20,40,10", f->adalora_schedule));
    }
    if (f->steps > 0 && tinit >= f->steps - tfinal) {
        bad_flag("-U", strprintf("tinit %d must be below total_step - tfinal = %d - %d (total_step is -x): the budget would never fall\n"
                                 "---> HINT: lower tinit or tfinal, or train longer with -x", tinit, f->steps, tfinal));
    }
    if (!(f->adalora_orth_reg >= 0) || !std::isfinite(f->adalora_orth_reg)) bad_flag("-J", strprintf("the orthogonality weight must be >= 0, got %g\n---> HINT: PEFT's default is 0.5", f->adalora_orth_reg));
    cfg->adalora_target_r = f->adalora_target_r;
    cfg->adalora_tinit = tinit;
    cfg->adalora_tfinal = tfinal;
    cfg->adalora_deltaT = deltaT;
    cfg->adalora_total_step = f->steps;
    cfg->adalora_orth_reg = f->adalora_orth_reg;
}

// what main builds from the flags: the model with its adapters (or its other method), and what an
// adapter file (-A) said about itself
struct Built {
    GPT2<float> model;
    LoRAConfig lcfg;
    uint64_t base_sum = 0;   // checksum of the frozen base, stamped into adapter files (-o) and checked (-A)
    TrainState resume;       // the saved run's step, loader and sampler state, when -A has them
    bool have_state = false;
    std::string adapter_desc;
    std::vector<LoRA<float>> batch_adapters; // -Y 1: the adapters, one per sequence of the batch
    std::vector<const LoRA<float>*> batch_ptrs;
    std::vector<int> batch_index;
    double rss_before_model; // doc/memory.md compares peak RSS minus this with [Memory]
    BPE gguf_bpe;            // -L: the GPT-2 vocabulary and merges for the GGUF models
};

// the base checkpoint (-e), and the checks that need its shape
static void read_base(Built* b, Flags* f) {
    GPT2<float>& model = b->model;
    std::string err;
    b->rss_before_model = rss_now_mib();
    // -Q int8 / nf4 / int2 (or -A with an adapter.bin trained on one, and no -Q): the block matrices stay on disk
    // until the attach quantizes them layer by layer, so they are never in memory in fp32
    int read_quant = f->quant_given || f->adapter_path == NULL || f->combine || f->multi_batch ? f->base_quant : adapter_file_base_quant(f->adapter_path);
    err = gpt2_read_checkpoint(&model, f->base_path, f->lora_on && read_quant != LORA_QUANT_FP32);
    if (!err.empty()) die("flag -e: " + err);
    GPT2Config cfg = model.config;
    if (f->no_training) f->T = std::min(f->T, cfg.max_seq_len); // -t is only the context window of -p
    if (f->T > cfg.max_seq_len) bad_flag("-t", strprintf("sequence length %d exceeds the model's maxT=%d\n---> HINT: use -t %d or less", f->T, cfg.max_seq_len, cfg.max_seq_len));

    LoRAConfig lcfg = lora_config(f->rank, f->alpha, f->target_mask);
    if (!lora_parse_variants(f->variants, &lcfg, &err)) bad_flag("-V", err);
    check_adalora_flags(f, &lcfg);
    lcfg.base_quant = f->base_quant;
    if (!(f->lr_ratio_B > 0)) bad_flag("-P", strprintf("the LoRA+ ratio must be > 0, got %g\n---> HINT: 1 is plain LoRA; the LoRA+ paper uses 16", f->lr_ratio_B));
    lcfg.lr_ratio_B = f->lr_ratio_B;
    if ((lcfg.use_dora || lcfg.use_adalora) && f->lora_dropout > 0) {
        bad_flag("-D", strprintf("LoRA dropout is not implemented for %s\n---> HINT: drop -D, or train it with -R (GPT-2's own dropouts)", lcfg.use_dora ? "DoRA (-V dora)" : "AdaLoRA (-V adalora)"));
    }
    lcfg.dropout = f->lora_dropout;
    b->lcfg = lcfg;
}

// the training method on the base: full fine-tuning, another method, or LoRA (new, from -A, several -A)
// -C's spec: "id,id,..." (each < V, no repeats) or "top:N" (the N most frequent ids of the training file,
// most frequent first, ties by the smaller id) -> ids
static std::string parse_token_rows(const char* spec, const char* train_path, int V, std::vector<int>* ids) {
    const char* hint = "---> HINT: give a comma list of distinct token ids below V, e.g. -C 198,25, or top:N, e.g. -C top:1024";
    ids->clear();
    std::string s(spec);
    if (s.rfind("top:", 0) == 0) {
        char* end = NULL;
        errno = 0;
        long n = strtol(s.c_str() + 4, &end, 10);
        if (errno != 0 || end == s.c_str() + 4 || *end != '\0' || n < 1 || n > V) {
            return strprintf("'%s': top:N needs N in 1..%d (V)\n%s", spec, V, hint);
        }
        TokenFile tf;
        std::string err = tokens_read(&tf, train_path, V, "-i");
        if (!err.empty()) return "top:N counts the tokens of -i: " + err;
        std::vector<size_t> count(V, 0);
        for (uint16_t t : tf.tokens) { count[t]++; }
        std::vector<int> order(V);
        for (int i = 0; i < V; i++) { order[i] = i; }
        std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return count[a] > count[b]; });
        ids->assign(order.begin(), order.begin() + n);
        return "";
    }
    size_t pos = 0;
    while (pos <= s.size()) {
        size_t comma = s.find(',', pos);
        std::string item = s.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
        char* end = NULL;
        errno = 0;
        long id = strtol(item.c_str(), &end, 10);
        if (item.empty() || errno != 0 || *end != '\0') return strprintf("'%s': '%s' is not a token id\n%s", spec, item.c_str(), hint);
        if (id < 0 || id >= V) return strprintf("'%s': token id %ld is out of range: the base's vocabulary has V = %d tokens (ids 0..%d)\n%s", spec, id, V, V - 1, hint);
        ids->push_back((int)id);
        if (comma == std::string::npos) break;
        pos = comma + 1;
    }
    std::string err = token_rows_check_ids(*ids, V);
    if (!err.empty()) return strprintf("'%s': %s\n%s", spec, err.c_str(), hint);
    return "";
}

static void attach_method(Built* b, Flags* f) {
    GPT2<float>& model = b->model;
    GPT2Config cfg = model.config;
    LoRAConfig& lcfg = b->lcfg;
    uint64_t& base_sum = b->base_sum;
    TrainState& resume = b->resume;
    bool& have_state = b->have_state;
    std::string& adapter_desc = b->adapter_desc;
    std::vector<LoRA<float>>& batch_adapters = b->batch_adapters;
    std::vector<const LoRA<float>*>& batch_ptrs = b->batch_ptrs;
    std::vector<int>& batch_index = b->batch_index;
    std::string err;
    adapter_desc = strprintf("new (seed %d)", f->seed);
    if (f->full && f->l2sp_lambda > 0) {
        gpt2_enable_l2sp(&model, f->l2sp_lambda);
    } else if (f->full) {
        gpt2_enable_full_training(&model);
    } else if (!f->lora_on) {
        err = gpt2_enable_other_method(&model, f->freeze_k, f->adapter_m, f->prefix_P, f->bitfit, (uint64_t)f->seed);
        if (!err.empty()) die(err);
    } else {
        // the checksum of the fp32 base file, whatever -Q: adapters trained on a quantized base check
        // against the same file (-A without -Q reads the base whole: the attach below quantizes it after this)
        if (f->adapter_path != NULL || f->output_dir != NULL) {
            if (model.block_file != NULL) err = checkpoint_checksum(f->base_path, &base_sum); // (-Q: not all in memory)
            else base_sum = base_checksum(model.params_memory, model.num_parameters);
            if (!err.empty()) die("flag -e: " + err);
        }
        if (f->multi_batch) {
            err = lora_files_load_all(f->adapter_paths, &model, base_sum, &batch_adapters);
            if (!err.empty()) die("flag -A: " + err);
            lcfg = batch_adapters[0].config;
            adapter_desc = "one batch, each sequence its own adapter, unmerged:";
            for (size_t k = 0; k < f->adapter_paths.size(); k++) {
                adapter_desc += strprintf(" [%zu] %s", k, f->adapter_paths[k]);
                batch_ptrs.push_back(&batch_adapters[k]);
                batch_index.push_back((int)k);
            }
            lora_multi_set(&model.lora, batch_ptrs.data(), batch_index.data(), f->T, cfg.num_layers, cfg.channels);
        } else if (f->combine) {
            err = lora_files_combine(f->adapter_paths, f->combine_weights, &model, base_sum);
            if (!err.empty()) die("flag -A: " + err);
            lcfg = model.lora.config;
            adapter_desc = "";
            for (size_t k = 0; k < f->adapter_paths.size(); k++) {
                adapter_desc += strprintf("%s%g x %s", k ? " + " : "combined: ", f->combine_weights[k], f->adapter_paths[k]);
            }
        } else if (f->adapter_path != NULL) {
            // -Q given: store the base that way; else as the adapter.bin says it trained (fp32 for PEFT)
            err = lora_file_load(f->adapter_path, &model, base_sum, &resume, &have_state, f->quant_given ? lcfg.base_quant : -1);
            if (!err.empty()) die("flag -A: " + err);
            if (f->lora_dropout_given) model.lora.config.dropout = f->lora_dropout; // -D over the file's lora_dropout
            const LoRAConfig& ac = model.lora.config;
            if ((ac.use_dora || ac.use_adalora) && ac.dropout > 0 && !f->no_training && !f->evaluate_only) {
                const char* v = ac.use_dora ? "DoRA" : "AdaLoRA";
                bad_flag(f->lora_dropout_given ? "-D" : "-A", strprintf("the adapter is %s with lora_dropout %g, and LoRA dropout is not implemented for %s\n"
                                                                        "---> HINT: add -D 0 to train it without LoRA dropout", v, ac.dropout, v));
            }
            lcfg = model.lora.config; // the adapter's r, alpha and targets, whatever -r -a -q say
            adapter_desc = strprintf("%s (%s)", f->adapter_path, have_state ? strprintf("step %d, with optimizer state", resume.step).c_str() : "weights only");
        } else {
            gpt2_lora_attach(&model, lcfg, (uint64_t)f->seed);
        }
        if (f->token_rows != NULL) { // -C: rows of wte trained beside the adapters
            std::vector<int> ids;
            err = parse_token_rows(f->token_rows, f->train_path, cfg.vocab_size, &ids);
            if (err.empty()) err = gpt2_token_rows_attach(&model, ids);
            if (!err.empty()) bad_flag("-C", err);
        }
    }
    if (f->gguf_dir != NULL) { // -L: the tokenizer the GGUF models carry, checked before any work
        BPE& bpe = b->gguf_bpe;
        bpe.print_errors = false;
        int rc = f->bpe_dir == NULL ? bpe_load_default(&bpe)
                                    : bpe_load(&bpe, (std::string(f->bpe_dir) + "/encoder.json").c_str(), (std::string(f->bpe_dir) + "/vocab.bpe").c_str());
        if (rc != 0) die(std::string(f->bpe_dir ? "flag -E: " : "flag -L: ") + bpe.error);
        if (bpe.vocab_size != cfg.vocab_size) {
            bad_flag("-L", strprintf("the base has V=%d tokens but the GPT-2 BPE files have %d; llama.cpp needs the model's own tokenizer\n"
                                     "---> HINT: export a base with GPT-2's vocabulary (V=50257), e.g. gpt2_124M.bin or make run's brown_base.bin", cfg.vocab_size, bpe.vocab_size));
        }
    }
}

// Never destroy a better save: what -o holds already is compared with what this run will write first
// (a save never replaces optimizer state with weights only, nor a later step with an earlier one,
// unless -O 1 says so). The log says what will be replaced.
static SaveSetInfo first_save_of_run(const Built* b, const Flags* f) {
    SaveSetInfo next;
    next.adapter = true;
    if (f->no_training) { next.step = b->have_state ? b->resume.step : 0; return next; }
    int start = b->have_state ? b->resume.step : 0;
    next.has_state = true;
    next.step = f->steps;
    if (f->save_every > 0) next.step = std::min(f->steps, (start / f->save_every + 1) * f->save_every);
    return next;
}
static void check_outputs(const Built* b, const Flags* f) {
    if (f->output_dir == NULL || !f->lora_on || f->evaluate_only) return;
    SaveSetInfo existing = save_set_existing(f->output_dir), next = first_save_of_run(b, f);
    std::string loses = save_set_loses(existing, next);
    if (loses.empty()) return;
    if (!f->overwrite) {
        bad_flag("-o", strprintf("'%s' already holds a better save: %s\n"
                                 "---> HINT: give this run another -o directory; or pass -O 1 to replace it%s",
                                 f->output_dir, loses.c_str(), f->no_training ? "; -p without -o generates without saving" : ""));
    }
    printf("-O 1: replacing the save in %s: %s\n", f->output_dir, loses.c_str());
}

// -L: the GGUF files for llama.cpp (lib/gguf.h)
static void save_gguf(Built* b, const Flags* f) {
    std::string written, err = gguf_export(f->gguf_dir, &b->model, &b->gguf_bpe, &written);
    if (!err.empty()) die("flag -L: " + err);
    printf("wrote GGUF: %s\n", written.c_str());
}

// -o and -M without training: the adapter as loaded (or combined) is saved, and the merge written

static void save_without_training(Built* b, Flags* f) {
    GPT2<float>& model = b->model;
    const LoRAConfig& lcfg = b->lcfg;
    const std::string& adapter_desc = b->adapter_desc;
    uint64_t base_sum = b->base_sum;
    std::string err;
    printf("[LoRA]\nadapter: %s\nrank: %d\nalpha: %g\ntargets: %s\n", adapter_desc.c_str(), lcfg.r, lcfg.alpha, lora_targets_string(lcfg.targets).c_str());
    install_stop_handlers(); // a Ctrl-C during the saves below lets them finish, then stops
    if (f->output_dir != NULL) {
        err = save_adapter_set(f->output_dir, &model, base_sum, NULL, b->have_state ? b->resume.step : 0, f->base_name);
        if (!err.empty()) die("flag -o: " + err);
        printf("saved adapter: %s/adapter.bin (weights only), %s/" PEFT_WEIGHTS_FILE ", %s/" PEFT_CONFIG_FILE "\n", f->output_dir, f->output_dir, f->output_dir);
        printf("save set: %s/" SAVE_SET_FILE " (no training in this run: the adapter from -A as loaded%s)\n", f->output_dir,
               f->combine ? ", combined" : "");
    }
    if (f->merged_path != NULL) {
        saving = 1;
        err = write_merged_checkpoint(&model, f->merged_path);
        saving = 0;
        if (!err.empty()) die("flag -M: " + err);
        printf("wrote merged checkpoint %s\n", f->merged_path);
    }
    if (f->gguf_dir != NULL) {
        saving = 1;
        save_gguf(b, f);
        saving = 0;
    }
    if (stop_signal != 0) { fflush(stdout); exit(128 + stop_signal); } // interrupted: the files above are whole
    signal(SIGINT, SIG_DFL); // -p next: a Ctrl-C stops it at once, as before
    signal(SIGTERM, SIG_DFL);
}

// -p: generation from a prompt, with the adapter merged (-W 1) or unmerged, or several adapters in one
// batch (-Y 1)
static void generate(Built* b, Flags* f) {
    GPT2<float>& model = b->model;
    GPT2Config cfg = model.config;
    std::string err;
    BPE bpe;
    bpe.print_errors = false;
    int rc = f->bpe_dir == NULL ? bpe_load_default(&bpe)
                             : bpe_load(&bpe, (std::string(f->bpe_dir) + "/encoder.json").c_str(), (std::string(f->bpe_dir) + "/vocab.bpe").c_str());
    if (rc != 0) die(std::string(f->bpe_dir ? "flag -E: " : "flag -p: ") + bpe.error);
    if (f->multi_batch) { // one sequence per adapter, in one batch
        int nb = (int)b->batch_adapters.size();
        gpt2_allocate(&model, nb, f->T);
        std::vector<int> ids;
        err = encode_prompt(&bpe, f->prompt, cfg.vocab_size, &ids);
        if (!err.empty()) die(err);
        Rng rng;
        rng_seed(&rng, (uint64_t)f->seed + 1);
        double t0 = now_seconds();
        std::vector<std::vector<int>> outs = gpt2_generate_multi(&model, ids, nb, f->gen_tokens, &rng, f->temperature, f->top_k);
        double secs = now_seconds() - t0;
        printf("[Generate]\nmode: multi-adapter batch of %d\ntemperature: %g\ntop_k: %d\ncontext: %d\n", nb, f->temperature, f->top_k, f->T);
        for (int k = 0; k < nb; k++) {
            std::string text = bpe_decode(&bpe, outs[k].data(), outs[k].size());
            printf("--- [%d] %s\n%s%s\n", k, f->adapter_paths[k], f->prompt, text.c_str());
        }
        printf("---\ngenerated %d x %d tokens in %.2f s (%.1f tok/s)\n", nb, f->gen_tokens, secs, nb * f->gen_tokens / secs);
        return;
    }
    // a quantized base has no fp32 matrices to merge into: it generates unmerged (quantized base + adapters)
    bool merge_now = f->merged_inference && model.quant_q[0] == NULL;
    if (merge_now) {
        gpt2_lora_merge(&model, +1); // one plain matmul per adapted layer from here on
        lora_free(&model.lora);
    }
    gpt2_allocate(&model, 1, f->T);
    Rng rng;
    rng_seed(&rng, (uint64_t)f->seed + 1);
    std::string text;
    std::vector<int> ids;
    err = encode_prompt(&bpe, f->prompt, cfg.vocab_size, &ids); // a bad prompt fails before anything is printed
    if (!err.empty()) die(err);
    // the header and the prompt first, then each token as it is sampled (streamed), then the end
    printf("[Generate]\nmode: %s\ntemperature: %g\ntop_k: %d\ncontext: %d\n---\n%s",
           merge_now ? "merged" : f->merged_inference ? "unmerged (quantized base)" : "unmerged",
           f->temperature, f->top_k, f->T, f->prompt);
    fflush(stdout);
    double t0 = now_seconds();
    err = generate_from_prompt(&model, &bpe, f->prompt, f->gen_tokens, f->temperature, f->top_k, &rng, &text, stdout);
    if (!err.empty()) die(err);
    double secs = now_seconds() - t0;
    printf("\n---\n");
    printf("generated %d tokens in %.2f s (%.1f tok/s)\n", f->gen_tokens, secs, f->gen_tokens / secs);
}

// the training data: both token files, the loader's state from -A, and the tokenizer for samples
struct TrainingData {
    DataLoader train_loader, val_loader;
    int start_step = 0; // > 0 when -A resumes a run
    bool have_val = true; // false with -v 0 and no -j given
    Tokenizer tokenizer;
    bool have_tokenizer = false;
};

static void open_training_data(TrainingData* d, Built* b, Flags* f, const DataParallel& dp) {
    GPT2<float>& model = b->model;
    GPT2Config cfg = model.config;
    DataLoader& train_loader = d->train_loader;
    DataLoader& val_loader = d->val_loader;
    const TrainState& resume = b->resume;
    std::string err;
    err = dataloader_init(&train_loader, f->train_path, f->B, f->T, cfg.vocab_size, f->shuffle != 0, (uint64_t)f->seed, "-i", dp.rank, dp.world);
    if (!err.empty()) die("flag -i: " + err);
    // -v 0 validates never: the default -j is not read (a -j given is still read and checked)
    d->have_val = f->val_every > 0 || f->val_given;
    if (d->have_val) {
        err = dataloader_init(&val_loader, f->val_path, f->B, f->T, cfg.vocab_size, false, 0, "-j", dp.rank, dp.world);
        if (!err.empty()) die("flag -j: " + err);
        if (f->val_batches > (int)val_loader.num_batches) f->val_batches = (int)val_loader.num_batches;
    }
    if (b->have_state && f->evaluate_only) {
        // -x 0: the adapter is evaluated at the step it was saved at; the loader's position does not matter
        f->steps = resume.step;
        d->start_step = resume.step;
    } else if (b->have_state) {
        if (resume.step > f->steps) bad_flag("-x", strprintf("the adapter from -A has already trained %d steps, more than -x %d\n---> HINT: -x is the total step count; pass -x %d or more", resume.step, f->steps, resume.step));
        err = train_state_restore(resume, &train_loader, f->adapter_path);
        if (!err.empty()) die("flag -A: " + err);
        d->start_step = resume.step;
    }
    if (access(f->tokenizer_path, F_OK) == 0 || f->tokenizer_given) {
        err = tokenizer_read(&d->tokenizer, f->tokenizer_path);
        if (!err.empty()) die("flag -c: " + err);
        d->have_tokenizer = true;
    }
}

// the log's header: [GPT-2], the method ([LoRA] or another), [Memory] and [Run]
static void print_run_header(const Built* b, const Flags* f, const TrainingData* d, const DataParallel& dp) {
    const GPT2<float>& model = b->model;
    GPT2Config cfg = model.config;
    const LoRAConfig& lcfg = b->lcfg;
    const std::string& adapter_desc = b->adapter_desc;
    const DataLoader& train_loader = d->train_loader;
    const DataLoader& val_loader = d->val_loader;
    bool have_tokenizer = d->have_tokenizer;
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    printf("[GPT-2]\n");
    printf("checkpoint: %s\n", f->base_path);
    printf("max_seq_len: %d\nvocab_size: %d\npadded_vocab_size: %d\nnum_layers: %d\nnum_heads: %d\nchannels: %d\n",
           cfg.max_seq_len, cfg.vocab_size, cfg.padded_vocab_size, cfg.num_layers, cfg.num_heads, cfg.channels);
    printf("num_parameters: %zu\n", model.num_parameters);
    size_t trainable = gpt2_trainable_parameters(&model);
    if (f->lora_on) {
        printf("[LoRA]\n");
        printf("adapter: %s\n", adapter_desc.c_str());
        printf("rank: %d\nalpha: %g\nscale: %g\ntargets: %s\n", lcfg.r, lcfg.alpha, lcfg.scale, lora_targets_string(lcfg.targets).c_str());
        printf("variant: %s\n", lora_variants_string(lcfg).c_str());
        printf("lora_dropout: %g\n", lcfg.dropout);
        const TokenRows<float>& tr = model.tokens;
        if (tr.n > 0) { // -C
            std::string first;
            for (int k = 0; k < std::min(tr.n, 8); k++) first += strprintf("%s%d", k ? "," : "", tr.ids[k]);
            printf("token_rows: %d (%zu trainable values of wte; ids %s%s)\n", tr.n, token_rows_count(&tr), first.c_str(), tr.n > 8 ? ",..." : "");
        }
        printf("base_matrices_bytes: %zu (fp32 would be %zu)\n", gpt2_block_matrix_bytes(&model, lcfg.base_quant),
               gpt2_block_matrix_bytes(&model, LORA_QUANT_FP32));
        if (lcfg.base_quant == LORA_QUANT_BF16) printf("bf16_matmul: %s\n", matmul_bf16_path());
        printf("trainable_params: %zu\nfrozen_params: %zu\ntrainable %%: %.4f\n", trainable, model.num_parameters,
               100.0 * trainable / (double)(model.num_parameters + trainable));
    } else {
        gpt2_print_method(&model);
    }
    MemoryBytes mem = gpt2_memory_bytes(&model); // doc/memory.md derives each line per method
    size_t base_bytes = mem.base, fp32_base_bytes = model.num_parameters * sizeof(float), act_bytes = mem.activations;
    printf("[Memory]\n");
    printf("parameters: %.1f MiB (base %.1f%s + trainable adapters / prefix / token rows and their base / L2-SP copy of W0 %.1f)\n", mib(mem.params),
           mib(base_bytes), base_bytes != fp32_base_bytes ? strprintf(", quantized from %.1f", mib(fp32_base_bytes)).c_str() : "",
           mib(mem.params - base_bytes));
    printf("gradients: %.1f MiB\noptimizer state: %.1f MiB\nactivations: %.1f MiB\n", mib(mem.grads), mib(mem.optimizer), mib(act_bytes));
    printf("total: %.1f MiB (full fine-tuning of this model needs %.1f MiB)\n",
           mib(mem.params + mem.grads + mem.optimizer + act_bytes),
           mib(4 * fp32_base_bytes + (model.num_activations + model.num_dacts + 2 * (size_t)f->B * f->T) * sizeof(float)));
    printf("bytes: params %zu grads %zu optimizer %zu activations %zu\n", mem.params, mem.grads, mem.optimizer, mem.activations);
    printf("[Run]\nB: %d\nT: %d\nsteps: %d\nlearning_rate: %g\nwarmup_steps: %d\nfinal_lr_fraction: %g\ngrad_clip: %g\nweight_decay: %g\nthreads: %d\n",
           f->B, f->T, f->steps, f->lr, f->warmup, f->lr_final_frac, f->grad_clip, f->weight_decay, threads);
    printf("dropout: %g (GPT-2's embeddings, attention, residual; -R)\n", model.drop.gpt2_p);
    if (dp.world > 1) printf("ranks: %d (global batch %d = B x ranks)\n", dp.world, f->B * dp.world);
    printf("train: %s (%zu tokens, %zu batches)\n", f->train_path, train_loader.file.tokens.size(), train_loader.num_batches);
    if (d->have_val) printf("val: %s (%zu tokens, %d batches used)\n", f->val_path, val_loader.file.tokens.size(), f->val_batches);
    else printf("val: (none: -v 0)\n");
    if (f->evaluate_only) printf("evaluate only: -x 0 with -A, the adapter as saved (nothing is trained or written)\n");
    printf("tokenizer: %s\n", have_tokenizer ? f->tokenizer_path : "(none: samples print token ids)");
    fflush(stdout);
}

// what is written when training ends (or is interrupted): the merge (-M), the model (-f 1, -F) or the
// method's parameters (-H, -X); the adapter itself is saved inside the loop
static void save_after_training(Built* b, const Flags* f) {
    GPT2<float>& model = b->model;
    std::string err;
    if (f->merged_path != NULL) {
        err = write_merged_checkpoint(&model, f->merged_path);
        if (!err.empty()) die("flag -M: " + err);
        printf("wrote merged checkpoint %s\n", f->merged_path);
    }
    if (f->gguf_dir != NULL) save_gguf(b, f);
    if (f->full && f->output_dir != NULL) {
        std::string path = std::string(f->output_dir) + "/model.bin";
        err = gpt2_write_checkpoint(&model, path.c_str());
        if (!err.empty()) die(err);
        printf("wrote %s\n", path.c_str());
    }
    if (!f->lora_on && !f->full && f->output_dir != NULL) {
        // -F: the whole model (its top blocks changed); -H / -X: only the trained adapter or prefix
        std::string path = std::string(f->output_dir) + (f->freeze_k > 0 ? "/model.bin" : "/method.bin");
        err = f->freeze_k > 0 ? gpt2_write_checkpoint(&model, path.c_str()) : gpt2_write_method_file(&model, path.c_str());
        if (!err.empty()) die("flag -o: " + err);
        printf("wrote %s\n", path.c_str());
    }
    if (f->bitfit && f->output_dir != NULL) { // BitFit: besides the small method.bin, the biases merged into a checkpoint
        std::string path = std::string(f->output_dir) + "/model.bin";
        err = gpt2_write_checkpoint(&model, path.c_str());
        if (!err.empty()) die("flag -o: " + err);
        printf("wrote %s\n", path.c_str());
    }
}

// the training loop: validation, samples and saves at their steps, then forward, backward, the mean
// over ranks, the non-finite guard, clipping and the AdamW update; returns the exit status
static int train(Built* b, Flags* f, DataParallel* dp_) {
    DataParallel& dp = *dp_;
    GPT2<float>& model = b->model;
    GPT2Config cfg = model.config;
    std::string err;
    gpt2_allocate(&model, f->B, f->T);
    model.drop.gpt2_p = f->gpt2_dropout; // -R; -D is the adapter's (lora.config.dropout)
    model.drop.seed = dropout_mix((uint64_t)f->seed) ^ (uint64_t)dp.rank; // each rank its own masks
    TrainingData data;
    open_training_data(&data, b, f, dp);
    print_run_header(b, f, &data, dp);
    DataLoader& train_loader = data.train_loader;
    DataLoader& val_loader = data.val_loader;
    int start_step = data.start_step;
    const Tokenizer& tokenizer = data.tokenizer;
    bool have_tokenizer = data.have_tokenizer;
    bool have_state = b->have_state;
    const TrainState& resume = b->resume;
    uint64_t base_sum = b->base_sum;


    Rng sample_rng;
    rng_seed(&sample_rng, (uint64_t)f->seed + 1);
    if (have_state) sample_rng = resume.sample_rng;
    int eot = have_tokenizer ? tokenizer.eot_token : 50256;
    if (eot >= cfg.vocab_size) eot = 0;
    double total_ms = 0, first_loss = 0, last_loss = 0, last_val = -1;
    install_stop_handlers();
    for (int step = start_step; step <= f->steps; step++) {
        bool last_step = step == f->steps;
        // the adapter with everything an exact resume needs, saved where the next step would begin
        if (f->lora_on && f->output_dir != NULL && !f->evaluate_only && (last_step || (f->save_every > 0 && step > start_step && step % f->save_every == 0))) {
            TrainState state = train_state_capture(step, &train_loader, &sample_rng);
            SaveSetInfo next;
            next.adapter = next.has_state = true;
            next.step = step;
            std::string loses = f->overwrite ? "" : save_set_loses(save_set_existing(f->output_dir), next);
            if (!loses.empty()) { // only when stopped early, before the step the directory holds
                printf("not saved (step %d): %s holds a better save: %s (-O 1 would replace it)\n", step, f->output_dir, loses.c_str());
            } else {
                err = save_adapter_set(f->output_dir, &model, base_sum, &state, step, f->base_name);
                if (!err.empty()) die("flag -o: " + err);
                printf("saved adapter (step %d): %s/adapter.bin, %s/" PEFT_WEIGHTS_FILE ", %s/" PEFT_CONFIG_FILE "\n", step, f->output_dir, f->output_dir, f->output_dir);
                printf("save set: %s/" SAVE_SET_FILE " (step %d, with optimizer state: %s)\n", f->output_dir, step,
                       stop_signal != 0 ? "interrupted" : !last_step ? strprintf("every -k %d steps", f->save_every).c_str() : "end of training");
                fflush(stdout);
                stop_after_save();
            }
        }
        // full training: the weights every k steps as <dir>/model.bin (atomically; the end writes it below),
        // so a long pretraining run keeps a usable checkpoint (weights only: AdamW state is not saved)
        if (f->full && f->output_dir != NULL && f->save_every > 0 && step > start_step && step % f->save_every == 0 && !last_step) {
            std::string path = std::string(f->output_dir) + "/model.bin";
            saving = 1;
            err = gpt2_write_checkpoint(&model, path.c_str());
            saving = 0;
            if (!err.empty()) die("flag -o: " + err);
            printf("saved checkpoint (step %d): %s\n", step, path.c_str());
            stop_after_save();
        }
        if (f->val_every > 0 && data.have_val && (step % f->val_every == 0 || last_step) && stop_signal == 0) {
            last_val = dp_mean(&dp, gpt2_validate(&model, &val_loader, f->val_batches));
            printf("val loss %f\n", last_val);
            fflush(stdout);
        }
        if (f->sample_every > 0 && (step % f->sample_every == 0 || last_step) && stop_signal == 0) {
            std::vector<int> out = gpt2_generate(&model, std::vector<int>{eot}, f->gen_tokens, &sample_rng, f->temperature, f->top_k);
            printf("generating:\n---\n");
            print_tokens(have_tokenizer ? &tokenizer : NULL, out);
            printf("---\n");
        }
        if (last_step) break;
        double t0 = now_seconds();
        dataloader_next_batch(&train_loader);
        gpt2_train_mode(&model, true, step); // -D, -R: this step's masks (a resumed run draws the same)
        gpt2_forward(&model, train_loader.inputs.data(), train_loader.targets.data(), f->B, f->T);
        gpt2_zero_grad(&model);
        gpt2_backward(&model);
        gpt2_train_mode(&model, false);
        double orth_penalty = adalora_orth_loss_backward(&model.lora); // AdaLoRA's regulariser (0 otherwise)
        dp_average_gradients(&dp, &model); // data parallel: mean gradient and loss over ranks
        model.mean_loss = dp_mean(&dp, model.mean_loss);
        err = gpt2_check_step_finite(&model, step + 1);
        if (!err.empty()) die(err);
        double grad_norm = gpt2_clip_grad_norm(&model, f->grad_clip);
        float step_lr = lr_schedule(f->lr, step, f->steps, f->warmup, f->lr_final_frac);
        gpt2_update(&model, step_lr, 0.9f, 0.999f, 1e-8f, f->weight_decay, step + 1);
        adalora_update_and_allocate(&model.lora, step); // AdaLoRA: importance and the budget (nothing otherwise)
        double ms = (now_seconds() - t0) * 1000.0;
        if (step > start_step) total_ms += ms; // the first step pays page faults; leave it out of the average
        if (step == start_step) first_loss = model.mean_loss;
        last_loss = model.mean_loss;
        double avg = step > start_step ? total_ms / (step - start_step) : ms;
        printf("step %d/%d: train loss %f norm %.4f lr %.2e (took %.1f ms, %.0f tok/s", step + 1, f->steps, model.mean_loss, grad_norm, step_lr, ms, (double)f->B * f->T * dp.world / (ms / 1000.0));
        if (dp.world > 1) printf(" over %d ranks, allreduce %.2f ms for %zu bytes", dp.world, dp.allreduce_ms, dp.allreduce_bytes);
        printf(", ETA %.1f s)\n", avg * (f->steps - step - 1) / 1000.0);
        if (model.params0) printf("l2sp penalty %f\n", model.reg_loss);
        if (model.lora.config.use_adalora) printf("adalora orth penalty %f budget %d\n", orth_penalty, adalora_total_rank(&model.lora));
        fflush(stdout);
        if (stop_signal != 0 && step + 1 < f->steps) {
            // interrupted: this step is done; make it the last one, so the saves below happen as at a normal end
            printf("interrupted by %s after step %d: saving and stopping%s\n", stop_signal == SIGINT ? "SIGINT (Ctrl-C)" : "SIGTERM",
                   step + 1, f->output_dir == NULL ? " (no -o: nothing to save)" : f->full ? "" : " (resume with -A <dir>/adapter.bin)");
            fflush(stdout);
            f->steps = step + 1;
        }
    }
    if (model.lora.config.use_adalora) printf("%s", adalora_ranks_string(&model.lora).c_str()); // the final ranks per matrix
    saving = 1; // -M, model.bin, method.bin: a second signal lets them finish
    save_after_training(b, f);
    saving = 0;
    stop_after_save();
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("[Summary]\nfirst train loss: %f\nlast train loss: %f\n", first_loss, last_loss);
    if (last_val >= 0) printf("final val loss: %f\n", last_val);
    if (f->steps - start_step > 1) printf("average step: %.1f ms (%.0f tok/s)\n", total_ms / (f->steps - start_step - 1), (double)f->B * f->T * dp.world * (f->steps - start_step - 1) / (total_ms / 1000.0));
    printf("peak RSS: %.1f MiB\n", ru.ru_maxrss / 1024.0);
    printf("RSS before the model: %.1f MiB\n", b->rss_before_model);
    return stop_signal != 0 ? 128 + stop_signal : 0;
}

// frees what build made (a multi-adapter holder owns nothing: its adapters are freed here)
static void free_built(Built* b) {
    if (!b->batch_adapters.empty()) {
        b->model.lora.multi = NULL;
        for (LoRA<float>& a : b->batch_adapters) lora_free(&a);
    }
    gpt2_free(&b->model);
}

// ----------------------------------------------------------------------------
// main: flags -> check -> build -> (generate / merge / export) or train -> free

int main(int argc, char** argv) try {
    DataParallel dp; // one process unless started by mpirun with an MPI build
    dp_init(&dp, &argc, &argv);
    Flags flags = parse_flags(argc, argv); // every flag and its default: struct Flags
    check_flags(&flags, dp);               // a bad value exits here, naming its flag; -o and -M are checked writable
    Built built;
    read_base(&built, &flags);             // the frozen base from -e (quantized with -Q)
    attach_method(&built, &flags);         // LoRA (new, or -A), full fine-tuning or another method
    check_outputs(&built, &flags);         // -o holds no better save than this run would write
    int status = 0;
    if (flags.no_training) {
        save_without_training(&built, &flags); // -o, -M with -x 0: the adapter as loaded, the merge
        if (flags.prompt != NULL) generate(&built, &flags); // -p
    } else {
        status = train(&built, &flags, &dp);
    }
    free_built(&built);
    dp_finalize();
    return status;
} catch (const std::bad_alloc&) { // an allocation no reader or malloc_check caught: still a clear error
    die("out of memory\n---> HINT: the base checkpoint (-e), the batch (-b, -t) or the method (-r, -X, -H, -f 1) needs more memory than this machine has free");
}
#endif
