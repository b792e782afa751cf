/*
LoRA (Low-Rank Adaptation) for GPT-2: the adapter structs and the two kernels.

A frozen weight W0 (OC, C) gets a trainable low-rank branch beside it:
    out = inp @ W0^T + bias  +  scale * (inp @ lora_A^T) @ lora_B^T,   scale = alpha / r
with lora_A (r, C) and lora_B (OC, r). Only lora_A and lora_B are trained. The product
lora_B @ lora_A is never formed while training: the branch is two thin matmuls through the
(BT, r) bottleneck h = inp @ lora_A^T, which is cached for the backward pass.

This header has no dependencies on the model; train_gpt2_lora.cpp wires it into the blocks.
Dimension letters: BT = B*T rows, C = input channels, OC = output channels, r = LoRA rank, L = layers.
*/
#ifndef LORA_H
#define LORA_H

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "lib/rng.h"  // lora_A's seeded init
#include "lib/fast.h" // lora_forward_fast / lora_backward_fast, the float twins of the naive kernels below

// ----------------------------------------------------------------------------
// which matmuls of a GPT-2 block carry an adapter

enum LoRATarget { LORA_QKV, LORA_ATTPROJ, LORA_FC, LORA_FCPROJ, LORA_NUM_TARGETS };
// our flag names, and the module names Hugging Face PEFT uses for the same matmuls in GPT-2
static const char* const lora_target_names[LORA_NUM_TARGETS] = {"qkv", "attproj", "fc", "fcproj"};
static const char* const lora_peft_names[LORA_NUM_TARGETS] = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"};
static const unsigned LORA_ALL_TARGETS = (1u << LORA_NUM_TARGETS) - 1;

// input and output channels of each target in a block of width C
static inline int lora_target_in(int target, int C) { return target == LORA_FCPROJ ? 4 * C : C; }
static inline int lora_target_out(int target, int C) {
    switch (target) {
        case LORA_QKV: return 3 * C;
        case LORA_FC: return 4 * C;
        default: return C;
    }
}

// parses "qkv,attproj,fc,fcproj" (any subset, any order) into a bitmask; false + err on a bad name
static inline bool lora_parse_targets(const char* list, unsigned* mask, std::string* err) {
    *mask = 0;
    std::string s(list);
    size_t start = 0;
    while (start <= s.size()) {
        size_t end = s.find(',', start);
        if (end == std::string::npos) end = s.size();
        std::string name = s.substr(start, end - start);
        int found = -1;
        for (int t = 0; t < LORA_NUM_TARGETS; t++) {
            if (name == lora_target_names[t]) found = t;
        }
        if (found < 0) {
            *err = "unknown LoRA target '" + name + "'; HINT: choose from qkv,attproj,fc,fcproj (comma-separated)";
            return false;
        }
        *mask |= 1u << found;
        start = end + 1;
    }
    return true;
}

static inline std::string lora_targets_string(unsigned mask) {
    std::string s;
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        if (mask & (1u << t)) { if (!s.empty()) s += ","; s += lora_target_names[t]; }
    }
    return s;
}

struct LoRAConfig {
    int r;            // rank of every adapter, r >= 1
    float alpha;      // scale = alpha / r (alpha / sqrt(r) with use_rslora)
    float scale;      // derived by lora_scale_of, never set by hand
    unsigned targets; // bitmask over LoRATarget
    // the variants (see "LoRA variants" below); lora_config sets plain LoRA
    bool use_rslora;  // rsLoRA: scale = alpha / sqrt(r)
    float lr_ratio_B; // LoRA+: lora_B trains with lr * lr_ratio_B (1 = plain)
    bool use_dora;    // DoRA: a trainable magnitude per output row, W = m * V / ||V||_row
    bool init_pissa;  // PiSSA: lora_A, lora_B from the top-r SVD of W0; the frozen base becomes the residual
    int base_quant;   // the frozen base's adapted matrices stored as LORA_QUANT_FP32 / INT8 / NF4
};

// the one place the scale is derived. rsLoRA (Kalajdzievski 2023): with alpha / r the update
// scale * lora_B lora_A shrinks as r grows and large ranks stop learning; alpha / sqrt(r) keeps it rank-stable.
static inline float lora_scale_of(const LoRAConfig& cfg) {
    return cfg.use_rslora ? cfg.alpha / sqrtf((float)cfg.r) : cfg.alpha / (float)cfg.r;
}

static inline LoRAConfig lora_config(int r, float alpha, unsigned targets) {
    LoRAConfig cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.r = r;
    cfg.alpha = alpha;
    cfg.targets = targets;
    cfg.use_rslora = false;
    cfg.lr_ratio_B = 1.0f;
    cfg.use_dora = false;
    cfg.init_pissa = false;
    cfg.base_quant = 0;
    cfg.scale = lora_scale_of(cfg);
    return cfg;
}

// rsLoRA on or off, the scale re-derived
static inline LoRAConfig lora_config_rslora(LoRAConfig cfg, bool use_rslora) {
    cfg.use_rslora = use_rslora;
    cfg.scale = lora_scale_of(cfg);
    return cfg;
}

// ----------------------------------------------------------------------------
// the LoRA kernels

// one row of the bottleneck: inp_bt (C), lora_A (r,C) -> h_bt (r) = inp_bt @ lora_A^T (LoRA and DoRA share it)
template <typename real>
static inline void lora_down_row(real* h_bt, const real* inp_bt, const real* lora_A, int C, int r) {
    for (int i = 0; i < r; i++) {
        const real* lora_A_row = lora_A + (size_t)i * C;
        real sum = 0;
        for (int c = 0; c < C; c++) { sum += inp_bt[c] * lora_A_row[c]; }
        h_bt[i] = sum;
    }
}

// inp (BT,C), lora_A (r,C), lora_B (OC,r) -> h (BT,r) cached; out (BT,OC) += scale * h @ lora_B^T
template <typename real>
void lora_forward_naive(real* out, real* h, const real* inp, const real* lora_A, const real* lora_B,
                  real scale, int BT, int C, int OC, int r) {
    // parallel over rows of the batch: each thread owns rows h[bt,:] and out[bt,:]
    #pragma omp parallel for
    for (int bt = 0; bt < BT; bt++) {
        const real* inp_bt = inp + (size_t)bt * C;
        real* h_bt = h + (size_t)bt * r;
        lora_down_row(h_bt, inp_bt, lora_A, C, r);
        // out += scale * h @ lora_B^T (while lora_B = 0 this adds exact zeros: the base output is untouched)
        real* out_bt = out + (size_t)bt * OC;
        for (int o = 0; o < OC; o++) {
            const real* lora_B_row = lora_B + (size_t)o * r;
            real sum = 0;
            for (int i = 0; i < r; i++) { sum += h_bt[i] * lora_B_row[i]; }
            out_bt[o] += scale * sum;
        }
    }
}

// dout (BT,OC), h (BT,r), inp (BT,C), lora_A (r,C), lora_B (OC,r)
//   -> dlora_B (OC,r) +=, dlora_A (r,C) +=, dinp (BT,C) += (dinp may be NULL); dh (BT,r) is scratch
template <typename real>
void lora_backward_naive(real* dinp, real* dlora_A, real* dlora_B, real* dh,
                   const real* dout, const real* h, const real* inp, const real* lora_A, const real* lora_B,
                   real scale, int BT, int C, int OC, int r) {
    // forward was: out[bt,o] += scale * sum_i h[bt,i] * lora_B[o,i], with h[bt,i] = sum_c inp[bt,c] * lora_A[i,c]
    // 1) dlora_B = scale * dout^T @ h
    // parallel over OC: each thread owns row dlora_B[o,:], no atomics needed
    #pragma omp parallel for
    for (int o = 0; o < OC; o++) {
        real* dlora_B_row = dlora_B + (size_t)o * r;
        for (int bt = 0; bt < BT; bt++) {
            real d = scale * dout[(size_t)bt * OC + o];
            const real* h_bt = h + (size_t)bt * r;
            for (int i = 0; i < r; i++) { dlora_B_row[i] += d * h_bt[i]; }
        }
    }
    // 2) dh = scale * dout @ lora_B: the gradient arriving at the bottleneck
    // parallel over rows: each thread owns dh[bt,:]
    #pragma omp parallel for
    for (int bt = 0; bt < BT; bt++) {
        const real* dout_bt = dout + (size_t)bt * OC;
        real* dh_bt = dh + (size_t)bt * r;
        for (int i = 0; i < r; i++) { dh_bt[i] = 0; }
        for (int o = 0; o < OC; o++) {
            real d = dout_bt[o];
            const real* lora_B_row = lora_B + (size_t)o * r;
            for (int i = 0; i < r; i++) { dh_bt[i] += d * lora_B_row[i]; }
        }
        for (int i = 0; i < r; i++) { dh_bt[i] *= scale; }
    }
    // 3) dlora_A = dh^T @ inp  (= scale * lora_B^T dout^T inp)
    // parallel over channels c: each thread owns the columns dlora_A[:,c] it is given
    #pragma omp parallel for
    for (int c = 0; c < C; c++) {
        for (int bt = 0; bt < BT; bt++) {
            real x = inp[(size_t)bt * C + c];
            const real* dh_bt = dh + (size_t)bt * r;
            for (int i = 0; i < r; i++) { dlora_A[(size_t)i * C + c] += dh_bt[i] * x; }
        }
    }
    // 4) dinp += dh @ lora_A  (= scale * dout @ lora_B @ lora_A), added to the base matmul's dinp
    if (dinp == NULL) return;
    // parallel over rows: each thread owns dinp[bt,:]
    #pragma omp parallel for
    for (int bt = 0; bt < BT; bt++) {
        real* dinp_bt = dinp + (size_t)bt * C;
        const real* dh_bt = dh + (size_t)bt * r;
        for (int i = 0; i < r; i++) {
            real d = dh_bt[i];
            const real* lora_A_row = lora_A + (size_t)i * C;
            for (int c = 0; c < C; c++) { dinp_bt[c] += d * lora_A_row[c]; }
        }
    }
}

// The LoRA branch the model runs: for float (the program) the fast twins in lib/fast.h, two thin GEMMs
// with the same contracts; for double (the finite-difference tests) the loops above.
template <typename real>
void lora_forward(real* out, real* h, const real* inp, const real* lora_A, const real* lora_B,
                  real scale, int BT, int C, int OC, int r) {
    if constexpr (std::is_same<real, float>::value) lora_forward_fast(out, h, inp, lora_A, lora_B, scale, BT, C, OC, r);
    else lora_forward_naive(out, h, inp, lora_A, lora_B, scale, BT, C, OC, r);
}
template <typename real>
void lora_backward(real* dinp, real* dlora_A, real* dlora_B, real* dh,
                   const real* dout, const real* h, const real* inp, const real* lora_A, const real* lora_B,
                   real scale, int BT, int C, int OC, int r) {
    if constexpr (std::is_same<real, float>::value) lora_backward_fast(dinp, dlora_A, dlora_B, dh, dout, h, inp, lora_A, lora_B, scale, BT, C, OC, r);
    else lora_backward_naive(dinp, dlora_A, dlora_B, dh, dout, h, inp, lora_A, lora_B, scale, BT, C, OC, r);
}

// ----------------------------------------------------------------------------
// the adapters of a whole model

template <typename real>
struct LoRA {
    LoRAConfig config;
    int L, C;                                  // layers and width of the base model
    real* lora_A[LORA_NUM_TARGETS];            // (L, r, in) per enabled target, NULL otherwise
    real* lora_B[LORA_NUM_TARGETS];            // (L, out, r)
    real* dlora_A[LORA_NUM_TARGETS];           // same shapes as lora_A
    real* dlora_B[LORA_NUM_TARGETS];           // same shapes as lora_B
    // one flat buffer each, target-major: for each enabled target in enum order, lora_A then lora_B
    real* params_memory;
    real* grads_memory;
    real* m_memory;                            // AdamW first moment
    real* v_memory;                            // AdamW second moment
    size_t num_parameters;
    // activations, allocated for a given B*T by lora_allocate_activations
    real* h[LORA_NUM_TARGETS];                 // (L, BT, r) cached bottlenecks
    real* dh;                                  // (BT, r) backward scratch, reused by every adapter
    size_t act_BT;
    // the variants (see "LoRA variants" below); all NULL unless chosen
    real* base_w[LORA_NUM_TARGETS];            // (L, out, in) the base's frozen weight of each target
    real* base_b[LORA_NUM_TARGETS];            // (L, out) its bias
    real* dora_m[LORA_NUM_TARGETS];            // (L, out) DoRA magnitudes, in params_memory after all lora_A/lora_B
    real* ddora_m[LORA_NUM_TARGETS];           // (L, out)
    real* dora_n[LORA_NUM_TARGETS];            // (L, out) cached row norms ||W0 + scale lora_B lora_A||
    real* dora_P[LORA_NUM_TARGETS];            // (L, out, r) cached W0 @ lora_A^T
    real* dora_z[LORA_NUM_TARGETS];            // (L, BT, out) cached inp @ (W0 + scale lora_B lora_A)^T
    real* dora_dz;                             // (BT, 4C) backward scratch
    uint8_t* quant_q[LORA_NUM_TARGETS];        // (L, out, in) int8 codes, two NF4 or four int2 codes per byte
    float* quant_absmax[LORA_NUM_TARGETS];     // one absmax per block of LORA_QUANT_BLOCK weights
    real* quant_w;                             // (out, in) one layer of one matrix dequantized, for the matmul at hand;
                                               // sized for the largest, (4C, C), and shared by all four targets
    int quant_t, quant_l;                      // which target and layer quant_w holds, -1 none
    const LoRA<real>* const* multi;            // multi-adapter inference: the adapters, NULL otherwise
    const int* multi_index;                    // (B) which adapter each sequence uses
    int multi_T;                               // rows per sequence
};

// the number of adapter parameters: sum over enabled targets of L * r * (in + out)
static inline size_t lora_count_parameters(LoRAConfig cfg, int L, int C) {
    size_t n = 0;
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        if (cfg.targets & (1u << t)) {
            n += (size_t)L * cfg.r * (lora_target_in(t, C) + lora_target_out(t, C));
            if (cfg.use_dora) n += (size_t)L * lora_target_out(t, C); // the magnitudes
        }
    }
    return n;
}

template <typename real>
static real* lora_calloc(size_t n) {
    real* p = (real*)calloc(n > 0 ? n : 1, sizeof(real));
    if (p == NULL) {
        fprintf(stderr, "Error: out of memory allocating %zu bytes for LoRA\n"
                        "---> HINT: lower the rank (-r) or the batch size (-b)\n", n * sizeof(real));
        exit(EXIT_FAILURE);
    }
    return p;
}

// Allocates the adapters and initialises them the way PEFT does by default:
// lora_A ~ kaiming-uniform U(-1/sqrt(in), 1/sqrt(in)), lora_B = 0, so delta W = lora_B lora_A = 0 at step 0
// and the adapted model starts exactly at the base. The RNG draws lora_A in flat-buffer order.
template <typename real>
void lora_init(LoRA<real>* lora, LoRAConfig cfg, int L, int C, uint64_t seed) {
    memset(lora, 0, sizeof(*lora));
    lora->config = cfg;
    lora->L = L;
    lora->C = C;
    lora->num_parameters = lora_count_parameters(cfg, L, C);
    lora->params_memory = lora_calloc<real>(lora->num_parameters);
    lora->grads_memory = lora_calloc<real>(lora->num_parameters);
    lora->m_memory = lora_calloc<real>(lora->num_parameters);
    lora->v_memory = lora_calloc<real>(lora->num_parameters);
    Rng rng;
    rng_seed(&rng, seed);
    size_t off = 0;
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        if (!(cfg.targets & (1u << t))) continue;
        int in = lora_target_in(t, C), out = lora_target_out(t, C);
        size_t nA = (size_t)L * cfg.r * in, nB = (size_t)L * out * cfg.r;
        lora->lora_A[t] = lora->params_memory + off;
        lora->dlora_A[t] = lora->grads_memory + off;
        off += nA;
        lora->lora_B[t] = lora->params_memory + off;  // calloc: lora_B = 0
        lora->dlora_B[t] = lora->grads_memory + off;
        off += nB;
        float bound = 1.0f / sqrtf((float)in);
        for (size_t i = 0; i < nA; i++) { lora->lora_A[t][i] = (real)rng_uniform(&rng, -bound, bound); }
    }
    // DoRA: the magnitudes come after every lora_A / lora_B, so those keep the plain layout;
    // lora_attach_base sets them to the row norms of W0
    for (int t = 0; t < LORA_NUM_TARGETS && cfg.use_dora; t++) {
        if (!(cfg.targets & (1u << t))) continue;
        lora->dora_m[t] = lora->params_memory + off;
        lora->ddora_m[t] = lora->grads_memory + off;
        off += (size_t)L * lora_target_out(t, C);
    }
}

template <typename real>
void lora_allocate_activations(LoRA<real>* lora, size_t BT) {
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        free(lora->h[t]);
        lora->h[t] = (lora->config.targets & (1u << t)) ? lora_calloc<real>((size_t)lora->L * BT * lora->config.r) : NULL;
    }
    free(lora->dh);
    lora->dh = lora_calloc<real>(BT * lora->config.r);
    lora->act_BT = BT;
    for (int t = 0; t < LORA_NUM_TARGETS && lora->config.use_dora; t++) {
        free(lora->dora_z[t]);
        lora->dora_z[t] = lora->dora_m[t] ? lora_calloc<real>((size_t)lora->L * BT * lora_target_out(t, lora->C)) : NULL;
    }
    free(lora->dora_dz);
    lora->dora_dz = lora->config.use_dora ? lora_calloc<real>(BT * 4 * lora->C) : NULL;
}

template <typename real>
size_t lora_activation_bytes(const LoRA<real>* lora) {
    size_t n = 0;
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        if (lora->h[t]) n += (size_t)lora->L * lora->act_BT * lora->config.r;
        if (lora->dora_z[t]) n += (size_t)lora->L * lora->act_BT * lora_target_out(t, lora->C); // DoRA's cached z
    }
    if (lora->dora_dz) n += lora->act_BT * 4 * lora->C;
    return (n + lora->act_BT * lora->config.r) * sizeof(real);
}

// gradients accumulate; this is the only place that writes zeros into them
template <typename real>
void lora_zero_grad(LoRA<real>* lora) {
    memset(lora->grads_memory, 0, lora->num_parameters * sizeof(real));
}

template <typename real>
void lora_free(LoRA<real>* lora) {
    free(lora->params_memory);
    free(lora->grads_memory);
    free(lora->m_memory);
    free(lora->v_memory);
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        free(lora->h[t]);
        free(lora->dora_n[t]);
        free(lora->dora_P[t]);
        free(lora->dora_z[t]);
        free(lora->quant_q[t]);
        free(lora->quant_absmax[t]);
    }
    free(lora->dh);
    free(lora->dora_dz);
    free(lora->quant_w);
    memset(lora, 0, sizeof(*lora));
}

// ----------------------------------------------------------------------------
// merge and unmerge: folding the adapters into the frozen weights, and taking them out again

// W (OC,C), lora_A (r,C), lora_B (OC,r) -> W (OC,C) += sign * scale * lora_B @ lora_A   (sign = +1 or -1)
// Merged, the adapted matmul is one plain matmul again: inp @ (W0 + scale * lora_B lora_A)^T equals
// inp @ W0^T + scale * (inp @ lora_A^T) @ lora_B^T up to fp32 rounding, at zero extra inference cost.
// Unmerge (sign = -1) computes the very same delta in the very same order, so (W0 + d) - d returns W0
// up to one rounding of the sum: |error| <= ulp(|W0| + |d|).
template <typename real>
void lora_merge(real* W, const real* lora_A, const real* lora_B, real scale, int C, int OC, int r, int sign) {
    // parallel over output rows: each thread owns row W[o,:]
    #pragma omp parallel for
    for (int o = 0; o < OC; o++) {
        const real* lora_B_row = lora_B + (size_t)o * r;
        real* W_row = W + (size_t)o * C;
        for (int c = 0; c < C; c++) {
            real delta = 0;
            for (int i = 0; i < r; i++) { delta += lora_B_row[i] * lora_A[(size_t)i * C + c]; }
            W_row[c] += sign * scale * delta;
        }
    }
}

// every adapted matrix of every layer: base[t] is target t's frozen weight (L, out, in), NULL when the
// target carries no adapter. sign +1 merges, -1 unmerges.
template <typename real> void dora_merge(const LoRA<real>* lora, int t, real* W, int sign); // DoRA's merge, see below
template <typename real>
void lora_merge_all(const LoRA<real>* lora, real* const base[LORA_NUM_TARGETS], int sign) {
    int r = lora->config.r;
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        if (lora->lora_A[t] == NULL) continue;
        if (lora->dora_m[t] != NULL) { dora_merge(lora, t, base[t], sign); continue; }
        int in = lora_target_in(t, lora->C), out = lora_target_out(t, lora->C);
        for (int l = 0; l < lora->L; l++) {
            lora_merge(base[t] + (size_t)l * out * in, lora->lora_A[t] + (size_t)l * r * in,
                       lora->lora_B[t] + (size_t)l * out * r, (real)lora->config.scale, in, out, r, sign);
        }
    }
}

// ----------------------------------------------------------------------------
// the adapter's tensors, one per (layer, target, A or B), as adapter files and PEFT name them

struct LoRATensor {
    int layer, target;
    bool is_B;      // false: lora_A (r, in); true: lora_B (out, r)
    int rows, cols; // shape, row-major
    size_t offset;  // element offset into the flat params buffer
};

// The tensors in flat-buffer order: for each enabled target, lora_A of layers 0..L-1, then lora_B of
// layers 0..L-1. Walking this list visits params_memory front to back without gaps.
static inline std::vector<LoRATensor> lora_tensor_list(LoRAConfig cfg, int L, int C) {
    std::vector<LoRATensor> list;
    size_t off = 0;
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        if (!(cfg.targets & (1u << t))) continue;
        int in = lora_target_in(t, C), out = lora_target_out(t, C);
        for (int is_B = 0; is_B < 2; is_B++) {
            for (int l = 0; l < L; l++) {
                LoRATensor x;
                x.layer = l;
                x.target = t;
                x.is_B = is_B != 0;
                x.rows = is_B ? out : cfg.r;
                x.cols = is_B ? cfg.r : in;
                x.offset = off;
                off += (size_t)x.rows * x.cols;
                list.push_back(x);
            }
        }
    }
    return list;
}

// Hugging Face PEFT's key for one tensor of a GPT-2 adapter, e.g.
// "base_model.model.transformer.h.3.mlp.c_fc.lora_B.weight". PEFT's lora_A / lora_B are nn.Linear
// modules, so their weights are (r, in) and (out, r) whatever the base layer is: exactly our layout.
static inline std::string lora_peft_key(int layer, int target, bool is_B) {
    return "base_model.model.transformer.h." + std::to_string(layer) + "." + lora_peft_names[target] +
           (is_B ? ".lora_B.weight" : ".lora_A.weight");
}

// DoRA's magnitude (out) of one module, as PEFT saves it: "<module>.lora_magnitude_vector" (no ".weight")
static inline std::string lora_peft_magnitude_key(int layer, int target) {
    return "base_model.model.transformer.h." + std::to_string(layer) + "." + lora_peft_names[target] + ".lora_magnitude_vector";
}

// ----------------------------------------------------------------------------
// ---- LoRA variants ----
// rsLoRA (the scale, see lora_scale_of above), LoRA+, DoRA, a quantized frozen base (int8 / NF4 / int2), PiSSA
// initialisation and multi-adapter batches. Each is off by default; plain LoRA is untouched by them.

// LoRA+ (Hayou et al. 2024): lora_B learns with lr_B = lr_ratio_B * lr while lora_A keeps lr, because
// for wide layers the two factors want learning rates of different orders. The flat buffer is
// target-major (lora_A then lora_B of each target), so the ranges below cover it front to back:
// AdamW runs once per range with lr * lr_mult. (PEFT's create_loraplus_optimizer also gives 1-D
// parameters such as DoRA's magnitude the ratio; here exactly the lora_B ranges get it.)
struct LoRALrRange {
    size_t offset, n; // elements [offset, offset + n) of params_memory (and grads, m, v)
    float lr_mult;    // 1 for lora_A (and DoRA magnitudes), lr_ratio_B for lora_B
};

static inline std::vector<LoRALrRange> lora_lr_ranges(LoRAConfig cfg, int L, int C) {
    std::vector<LoRALrRange> ranges;
    auto push = [&](size_t n, float mult) {
        if (!ranges.empty() && ranges.back().lr_mult == mult) { ranges.back().n += n; return; }
        size_t off = ranges.empty() ? 0 : ranges.back().offset + ranges.back().n;
        ranges.push_back({off, n, mult});
    };
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        if (!(cfg.targets & (1u << t))) continue;
        push((size_t)L * cfg.r * lora_target_in(t, C), 1.0f);
        push((size_t)L * lora_target_out(t, C) * cfg.r, cfg.lr_ratio_B);
    }
    for (int t = 0; t < LORA_NUM_TARGETS && cfg.use_dora; t++) {
        if (cfg.targets & (1u << t)) push((size_t)L * lora_target_out(t, C), 1.0f); // DoRA magnitudes, at the end
    }
    return ranges;
}

// ---- DoRA (Liu et al. 2024): weight-decomposed low-rank adaptation
// W = m * V / ||V||_row with V = W0 + scale * lora_B lora_A and a trainable magnitude m (OC), one per
// output row: n_o = ||V_o|| is taken over the input channels, as PEFT does for an nn.Linear (out, in)
// weight (torch.linalg.norm(weight, dim=1)). m starts at ||W0_o||, so the model starts at the base.
// The forward never forms V (OC,C): with P = W0 @ lora_A^T (OC,r) and G = lora_A lora_A^T (r,r),
//   n_o^2 = ||W0_o||^2 + 2 scale lora_B_o . P_o + scale^2 lora_B_o G lora_B_o^T
// which costs one thin OC*C*r pass instead of an OC*C*r product plus an (OC,C) matrix.
// The gradient is exact: n depends on lora_A and lora_B and is differentiated. PEFT instead detaches n
// (the DoRA paper's section 4.3, to save autograd memory), so its lora_A / lora_B gradients lack the
// norm term below; the forward and the gradient of m are the same.

// W0 (OC,C), lora_A (r,C), lora_B (OC,r) -> n (OC) row norms of W0 + scale lora_B lora_A, P (OC,r) = W0 @ lora_A^T
template <typename real>
void dora_norm_forward(real* n, real* P, const real* W0, const real* lora_A, const real* lora_B, real scale,
                       int C, int OC, int r) {
    std::vector<real> G((size_t)r * r); // lora_A lora_A^T, (r,r)
    for (int i = 0; i < r; i++) {
        for (int j = 0; j < r; j++) {
            real sum = 0;
            for (int c = 0; c < C; c++) { sum += lora_A[(size_t)i * C + c] * lora_A[(size_t)j * C + c]; }
            G[(size_t)i * r + j] = sum;
        }
    }
    // parallel over output rows: each thread owns n[o] and P[o,:]
    #pragma omp parallel for
    for (int o = 0; o < OC; o++) {
        const real* W0_row = W0 + (size_t)o * C;
        const real* lora_B_row = lora_B + (size_t)o * r;
        real* P_row = P + (size_t)o * r;
        real w2 = 0;
        for (int c = 0; c < C; c++) { w2 += W0_row[c] * W0_row[c]; }
        real cross = 0, quad = 0;
        for (int i = 0; i < r; i++) {
            real sum = 0;
            for (int c = 0; c < C; c++) { sum += W0_row[c] * lora_A[(size_t)i * C + c]; }
            P_row[i] = sum;
            cross += lora_B_row[i] * sum;
            real Gb = 0;
            for (int j = 0; j < r; j++) { Gb += G[(size_t)i * r + j] * lora_B_row[j]; }
            quad += lora_B_row[i] * Gb;
        }
        // the three terms are ||W0_o + scale (lora_B lora_A)_o||^2 expanded; rounding can only make a
        // zero row slightly negative, hence the clamp
        n[o] = std::sqrt(std::max(w2 + 2 * scale * cross + scale * scale * quad, (real)0));
    }
}

// inp (BT,C), W0 (OC,C), bias (OC) or NULL, lora_A (r,C), lora_B (OC,r), m (OC); out (BT,OC) holds the base
// matmul inp @ W0^T + bias on entry -> h (BT,r), z (BT,OC), n (OC), P (OC,r) cached; out = m/n * z + bias
// with z = inp @ W0^T + scale * h @ lora_B^T = inp @ V^T
template <typename real>
void dora_forward(real* out, real* h, real* z, real* n, real* P, const real* inp, const real* bias, const real* W0,
                  const real* lora_A, const real* lora_B, const real* m, real scale, int BT, int C, int OC, int r) {
    dora_norm_forward(n, P, W0, lora_A, lora_B, scale, C, OC, r);
    // parallel over rows of the batch: each thread owns h[bt,:], z[bt,:] and out[bt,:]
    #pragma omp parallel for
    for (int bt = 0; bt < BT; bt++) {
        const real* inp_bt = inp + (size_t)bt * C;
        real* h_bt = h + (size_t)bt * r;
        lora_down_row(h_bt, inp_bt, lora_A, C, r);
        real* out_bt = out + (size_t)bt * OC;
        real* z_bt = z + (size_t)bt * OC;
        for (int o = 0; o < OC; o++) {
            const real* lora_B_row = lora_B + (size_t)o * r;
            real sum = 0;
            for (int i = 0; i < r; i++) { sum += h_bt[i] * lora_B_row[i]; }
            real b = bias != NULL ? bias[o] : 0;
            z_bt[o] = out_bt[o] - b + scale * sum;
            out_bt[o] = m[o] / n[o] * z_bt[o] + b;
        }
    }
}

// dout (BT,OC), h (BT,r), z (BT,OC), n (OC), P (OC,r), inp (BT,C), W0 (OC,C), lora_A (r,C), lora_B (OC,r), m (OC)
//   -> dm (OC) +=, dlora_A (r,C) +=, dlora_B (OC,r) +=, dinp (BT,C) += (may be NULL); dh (BT,r), dz (BT,OC) scratch.
// dinp gets what the base matmul_backward (which adds dout @ W0) has not: ((m/n - 1) * dout) @ W0 plus the
// low-rank path. That base correction is a full BT*OC*C pass, the price of keeping the model's base
// matmul lines unchanged.
template <typename real>
void dora_backward(real* dinp, real* dlora_A, real* dlora_B, real* dm, real* dh, real* dz,
                   const real* dout, const real* h, const real* z, const real* n, const real* P, const real* inp,
                   const real* W0, const real* lora_A, const real* lora_B, const real* m,
                   real scale, int BT, int C, int OC, int r) {
    // forward was: out[bt,o] = g[o] z[bt,o] + bias[o], g = m / n, z = inp @ W0^T + scale * (inp @ lora_A^T) @ lora_B^T,
    // n[o] = ||W0_o + scale (lora_B lora_A)_o||. So now, with S[o] = sum_bt dout[bt,o] z[bt,o]:
    //   dm[o] = S[o] / n[o];  dn[o] = -m[o] S[o] / n[o]^2;  dz = g * dout
    std::vector<real> k(OC); // dn[o] / n[o] = -m[o] S[o] / n[o]^3, the weight of row o in the norm's gradient
    // parallel over OC: each thread owns dm[o] and k[o]
    #pragma omp parallel for
    for (int o = 0; o < OC; o++) {
        real S = 0;
        for (int bt = 0; bt < BT; bt++) { S += dout[(size_t)bt * OC + o] * z[(size_t)bt * OC + o]; }
        dm[o] += S / n[o];
        k[o] = -m[o] * S / (n[o] * n[o] * n[o]);
    }
    // 1) the z path is plain LoRA with dout scaled by g: dlora_A, dlora_B and the low-rank part of dinp
    #pragma omp parallel for
    for (int bt = 0; bt < BT; bt++) {
        for (int o = 0; o < OC; o++) { dz[(size_t)bt * OC + o] = m[o] / n[o] * dout[(size_t)bt * OC + o]; }
    }
    lora_backward_naive(dinp, dlora_A, dlora_B, dh, dz, h, inp, lora_A, lora_B, scale, BT, C, OC, r);
    // 2) the base part of the z path: dinp += ((g - 1) * dout) @ W0; parallel over rows, each thread owns dinp[bt,:]
    if (dinp != NULL) {
        #pragma omp parallel for
        for (int bt = 0; bt < BT; bt++) {
            real* dinp_bt = dinp + (size_t)bt * C;
            for (int o = 0; o < OC; o++) {
                real d = (m[o] / n[o] - 1) * dout[(size_t)bt * OC + o];
                const real* W0_row = W0 + (size_t)o * C;
                for (int c = 0; c < C; c++) { dinp_bt[c] += d * W0_row[c]; }
            }
        }
    }
    // 3) the norm path: n_o^2 = ||V_o||^2 gives dV_o = k_o V_o, V = W0 + scale lora_B lora_A, so
    //   dlora_B[o,i] += scale k_o (V_o . lora_A_i) = scale k_o (P[o,i] + scale sum_j lora_B[o,j] G[j,i])
    //   dlora_A      += scale lora_B^T diag(k) V   = scale (lora_B^T diag(k) W0 + scale (lora_B^T diag(k) lora_B) lora_A)
    std::vector<real> G((size_t)r * r), R((size_t)r * r, (real)0); // G = lora_A lora_A^T, R = lora_B^T diag(k) lora_B
    for (int i = 0; i < r; i++) {
        for (int j = 0; j < r; j++) {
            real sum = 0;
            for (int c = 0; c < C; c++) { sum += lora_A[(size_t)i * C + c] * lora_A[(size_t)j * C + c]; }
            G[(size_t)i * r + j] = sum;
        }
    }
    for (int o = 0; o < OC; o++) {
        for (int i = 0; i < r; i++) {
            for (int j = 0; j < r; j++) { R[(size_t)i * r + j] += k[o] * lora_B[(size_t)o * r + i] * lora_B[(size_t)o * r + j]; }
        }
    }
    // parallel over OC: each thread owns dlora_B[o,:]
    #pragma omp parallel for
    for (int o = 0; o < OC; o++) {
        const real* lora_B_row = lora_B + (size_t)o * r;
        for (int i = 0; i < r; i++) {
            real VA = P[(size_t)o * r + i];
            for (int j = 0; j < r; j++) { VA += scale * lora_B_row[j] * G[(size_t)j * r + i]; }
            dlora_B[(size_t)o * r + i] += scale * k[o] * VA;
        }
    }
    // parallel over the r rows of dlora_A: each thread owns dlora_A[i,:] (and reads all of W0 once)
    #pragma omp parallel for
    for (int i = 0; i < r; i++) {
        real* dlora_A_row = dlora_A + (size_t)i * C;
        for (int o = 0; o < OC; o++) {
            real coef = scale * k[o] * lora_B[(size_t)o * r + i];
            const real* W0_row = W0 + (size_t)o * C;
            for (int c = 0; c < C; c++) { dlora_A_row[c] += coef * W0_row[c]; }
        }
        for (int j = 0; j < r; j++) {
            real coef = scale * scale * R[(size_t)i * r + j];
            const real* lora_A_row = lora_A + (size_t)j * C;
            for (int c = 0; c < C; c++) { dlora_A_row[c] += coef * lora_A_row[c]; }
        }
    }
}

// ---- a quantized frozen base, QLoRA-style (Dettmers et al. 2023)
// The base's adapted matrices are stored in blocks of LORA_QUANT_BLOCK consecutive weights (row-major
// (out, in), flattened), each block with its own fp32 absmax:
//   int8: q = round(127 x / absmax) in [-127, 127], x ~ q absmax / 127; error <= absmax / 254 per weight
//   nf4:  q = the index of the NF4 level nearest to x / absmax, two per byte, x ~ level[q] absmax;
//         error <= absmax * (largest gap between neighbouring levels) / 2 = 0.1385 absmax per weight
//   int2: q = the index of the nearest of the 4 uniform levels -1, -1/3, 1/3, 1 (no zero), four per
//         byte, x ~ level[q] absmax; error <= absmax / 3 per weight. The 2-bit row of the memory tables
//         in the LoRA literature (QLoRA itself stops at 4 bits)
// (QLoRA also quantizes the absmax values themselves, "double quantization"; here they stay fp32.)
// LoRA trains on top in fp32. A matrix is dequantized whole into one (out, in) scratch per target just
// before its matmul (forward and the dinp backward; the frozen base has no weight gradient), so the
// fp32 matmul and its fast path run unchanged on the dequantized weights.
enum LoRAQuant { LORA_QUANT_FP32, LORA_QUANT_INT8, LORA_QUANT_NF4, LORA_QUANT_INT2, LORA_NUM_QUANTS };
static const char* const lora_quant_names[LORA_NUM_QUANTS] = {"fp32", "int8", "nf4", "int2"};
#define LORA_QUANT_BLOCK 64

// the 16 NormalFloat4 levels: quantiles of N(0,1) normalised to [-1, 1], with an exact 0
// (the published table of the QLoRA paper, as bitsandbytes ships it)
static const float nf4_levels[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// the 4 int2 levels, in units of the block's absmax
static const float int2_levels[4] = {-1.0f, -1.0f / 3.0f, 1.0f / 3.0f, 1.0f};

// codes per byte: 1 (int8), 2 (nf4), 4 (int2)
static inline int lora_quant_per_byte(int quant) { return quant == LORA_QUANT_NF4 ? 2 : quant == LORA_QUANT_INT2 ? 4 : 1; }
// bytes of codes for n weights (absmax adds 4 bytes per block)
static inline size_t lora_quant_code_bytes(int quant, size_t n) {
    size_t k = (size_t)lora_quant_per_byte(quant);
    return (n + k - 1) / k;
}
static inline size_t lora_quant_blocks(size_t n) { return (n + LORA_QUANT_BLOCK - 1) / LORA_QUANT_BLOCK; }

// the index of the level nearest to x (the first of two equally near)
static inline int nearest_level(float x, const float* levels, int nlevels) {
    int best = 0;
    for (int k = 1; k < nlevels; k++) {
        if (std::fabs(x - levels[k]) < std::fabs(x - levels[best])) best = k;
    }
    return best;
}

// W (n) -> q (lora_quant_code_bytes), absmax (lora_quant_blocks(n))
template <typename real>
void quantize_forward(uint8_t* q, float* absmax, const real* W, size_t n, int quant) {
    size_t nblocks = lora_quant_blocks(n);
    if (quant != LORA_QUANT_INT8) memset(q, 0, lora_quant_code_bytes(quant, n));
    // parallel over blocks: each thread owns a block's codes (64 weights = 32 whole NF4 bytes, 16 int2
    // bytes) and absmax
    #pragma omp parallel for
    for (size_t b = 0; b < nblocks; b++) {
        size_t start = b * LORA_QUANT_BLOCK, end = std::min(n, start + LORA_QUANT_BLOCK);
        float amax = 0;
        for (size_t i = start; i < end; i++) { amax = std::max(amax, std::fabs((float)W[i])); }
        absmax[b] = amax;
        float inv = amax > 0 ? 1.0f / amax : 0.0f; // an all-zero block stores zeros
        for (size_t i = start; i < end; i++) {
            float x = (float)W[i] * inv; // in [-1, 1]
            if (quant == LORA_QUANT_INT8) {
                q[i] = (uint8_t)(int8_t)lrintf(127.0f * x);
            } else if (quant == LORA_QUANT_NF4) {
                int k = nearest_level(x, nf4_levels, 16);
                q[i / 2] |= (uint8_t)(k << (4 * (i % 2))); // even index: low nibble, odd: high nibble
            } else {
                int k = nearest_level(x, int2_levels, 4);
                q[i / 4] |= (uint8_t)(k << (2 * (i % 4))); // weight i in bits 2(i%4), 2(i%4)+1
            }
        }
    }
}

// q, absmax -> W (n) dequantized
template <typename real>
void dequantize_forward(real* W, const uint8_t* q, const float* absmax, size_t n, int quant) {
    // parallel over weights: each thread writes its own W[i]
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) {
        float amax = absmax[i / LORA_QUANT_BLOCK];
        if (quant == LORA_QUANT_INT8) W[i] = (real)((float)(int8_t)q[i] * (amax / 127.0f));
        else if (quant == LORA_QUANT_NF4) W[i] = (real)(nf4_levels[(q[i / 2] >> (4 * (i % 2))) & 15] * amax);
        else W[i] = (real)(int2_levels[(q[i / 4] >> (2 * (i % 4))) & 3] * amax);
    }
}

// ---- PiSSA (Meng et al. 2024): principal singular values and vectors adaptation
// The adapter starts on the top-r singular directions of W0 = U S V^T instead of at zero:
//   lora_B = U_r sqrt(S_r / scale), lora_A = sqrt(S_r / scale) V_r^T, so scale * lora_B lora_A = U_r S_r V_r^T,
// and the frozen base becomes the residual W0 - scale * lora_B lora_A: the model is unchanged at init
// (up to fp32 rounding), but training moves the principal part. The SVD is a randomized subspace
// iteration (Halko, Martinsson, Tropp 2011) in double: Y = W Omega, a few rounds of Q = qr(W qr(W^T Q)),
// then the small (k, C) matrix Q^T W is decomposed through the eigenvectors of its (k, k) Gram matrix.

// Y (m, k) row-major -> its k columns orthonormalised in place (modified Gram-Schmidt, run twice:
// one pass leaves O(eps * cond) of non-orthogonality, the second removes it)
static inline void qr_orthonormalize(double* Y, int m, int k) {
    for (int pass = 0; pass < 2; pass++) {
        for (int j = 0; j < k; j++) {
            for (int i = 0; i < j; i++) {
                double d = 0;
                for (int a = 0; a < m; a++) { d += Y[(size_t)a * k + i] * Y[(size_t)a * k + j]; }
                for (int a = 0; a < m; a++) { Y[(size_t)a * k + j] -= d * Y[(size_t)a * k + i]; }
            }
            double norm = 0;
            for (int a = 0; a < m; a++) { norm += Y[(size_t)a * k + j] * Y[(size_t)a * k + j]; }
            norm = std::sqrt(norm);
            for (int a = 0; a < m; a++) { Y[(size_t)a * k + j] = norm > 0 ? Y[(size_t)a * k + j] / norm : 0.0; }
        }
    }
}

// S (k, k) symmetric -> its eigenvalues on the diagonal of S, eigenvectors in the columns of E (k, k):
// cyclic Jacobi rotations, each zeroing one off-diagonal pair, until the off-diagonal mass is negligible
static inline void jacobi_eigen(double* S, double* E, int k) {
    for (int i = 0; i < k; i++) {
        for (int j = 0; j < k; j++) { E[(size_t)i * k + j] = i == j ? 1.0 : 0.0; }
    }
    for (int sweep = 0; sweep < 100; sweep++) {
        double off = 0, diag = 0;
        for (int i = 0; i < k; i++) {
            diag += S[(size_t)i * k + i] * S[(size_t)i * k + i];
            for (int j = i + 1; j < k; j++) { off += S[(size_t)i * k + j] * S[(size_t)i * k + j]; }
        }
        if (off <= 1e-30 * diag || off == 0) break;
        for (int p = 0; p < k; p++) {
            for (int q = p + 1; q < k; q++) {
                double spq = S[(size_t)p * k + q];
                if (spq == 0) continue;
                // the rotation angle that makes S'[p,q] = 0: tan(2 theta) = 2 S[p,q] / (S[q,q] - S[p,p])
                double theta = (S[(size_t)q * k + q] - S[(size_t)p * k + p]) / (2 * spq);
                double t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1));
                double c = 1 / std::sqrt(t * t + 1), sn = t * c;
                for (int a = 0; a < k; a++) { // S <- S J (columns p, q)
                    double sap = S[(size_t)a * k + p], saq = S[(size_t)a * k + q];
                    S[(size_t)a * k + p] = c * sap - sn * saq;
                    S[(size_t)a * k + q] = sn * sap + c * saq;
                }
                for (int a = 0; a < k; a++) { // S <- J^T S (rows p, q)
                    double spa = S[(size_t)p * k + a], sqa = S[(size_t)q * k + a];
                    S[(size_t)p * k + a] = c * spa - sn * sqa;
                    S[(size_t)q * k + a] = sn * spa + c * sqa;
                }
                for (int a = 0; a < k; a++) { // E <- E J
                    double eap = E[(size_t)a * k + p], eaq = E[(size_t)a * k + q];
                    E[(size_t)a * k + p] = c * eap - sn * eaq;
                    E[(size_t)a * k + q] = sn * eap + c * eaq;
                }
            }
        }
    }
}

// W (OC, C) -> the top r singular triplets, descending: U (OC, r) columns, S (r), Vt (r, C) rows.
// k = r + 8 columns are iterated (oversampling) so that the r-th direction converges too; when k
// reaches min(OC, C) the subspace is the whole range and the result is exact.
template <typename real>
void svd_top_forward(double* U, double* S, double* Vt, const real* W, int OC, int C, int r, int iters, uint64_t seed) {
    int k = std::min(r + 8, std::min(OC, C));
    std::vector<double> Y((size_t)OC * k), Z((size_t)C * k);
    Rng rng;
    rng_seed(&rng, seed);
    for (size_t i = 0; i < Z.size(); i++) { Z[i] = rng_normal(&rng); } // Omega (C, k)
    auto W_times = [&](const std::vector<double>& X, std::vector<double>& out) { // out (OC, k) = W @ X, X (C, k)
        #pragma omp parallel for
        for (int o = 0; o < OC; o++) {
            for (int j = 0; j < k; j++) {
                double sum = 0;
                for (int c = 0; c < C; c++) { sum += (double)W[(size_t)o * C + c] * X[(size_t)c * k + j]; }
                out[(size_t)o * k + j] = sum;
            }
        }
    };
    auto Wt_times = [&](const std::vector<double>& X, std::vector<double>& out) { // out (C, k) = W^T @ X, X (OC, k)
        #pragma omp parallel for
        for (int c = 0; c < C; c++) {
            for (int j = 0; j < k; j++) {
                double sum = 0;
                for (int o = 0; o < OC; o++) { sum += (double)W[(size_t)o * C + c] * X[(size_t)o * k + j]; }
                out[(size_t)c * k + j] = sum;
            }
        }
    };
    W_times(Z, Y);
    qr_orthonormalize(Y.data(), OC, k);
    for (int it = 0; it < iters; it++) {
        Wt_times(Y, Z);
        qr_orthonormalize(Z.data(), C, k);
        W_times(Z, Y);
        qr_orthonormalize(Y.data(), OC, k);
    }
    // Bt = W^T Q (C, k), i.e. (Q^T W)^T; its Gram matrix G = Bt^T Bt = Q^T W W^T Q (k, k) = E diag(S^2) E^T
    Wt_times(Y, Z);
    std::vector<double> G((size_t)k * k), E((size_t)k * k);
    for (int i = 0; i < k; i++) {
        for (int j = 0; j < k; j++) {
            double sum = 0;
            for (int c = 0; c < C; c++) { sum += Z[(size_t)c * k + i] * Z[(size_t)c * k + j]; }
            G[(size_t)i * k + j] = sum;
        }
    }
    jacobi_eigen(G.data(), E.data(), k);
    std::vector<int> order(k);
    for (int i = 0; i < k; i++) order[i] = i;
    std::sort(order.begin(), order.end(), [&](int a, int b) { return G[(size_t)a * k + a] > G[(size_t)b * k + b]; });
    for (int i = 0; i < r; i++) {
        int e = order[i];
        double sigma = std::sqrt(std::max(G[(size_t)e * k + e], 0.0));
        S[i] = sigma;
        // u_i = Q E_i; v_i = W^T u_i / sigma_i = Bt E_i / sigma_i
        for (int o = 0; o < OC; o++) {
            double sum = 0;
            for (int j = 0; j < k; j++) { sum += Y[(size_t)o * k + j] * E[(size_t)j * k + e]; }
            U[(size_t)o * r + i] = sum;
        }
        for (int c = 0; c < C; c++) {
            double sum = 0;
            for (int j = 0; j < k; j++) { sum += Z[(size_t)c * k + j] * E[(size_t)j * k + e]; }
            Vt[(size_t)i * C + c] = sigma > 0 ? sum / sigma : 0.0;
        }
    }
}

// subspace iterations for PiSSA: each costs 2 OC*C*(r+8) passes; PEFT's fast option ("pissa_niter_4")
// uses 4. Any rank-r split keeps the forward exact; more iterations only sharpen "top r".
#define LORA_PISSA_ITERS 8

// W (OC, C) -> lora_A (r, C), lora_B (OC, r) from its top-r SVD, and W <- W - scale * lora_B lora_A (the residual)
template <typename real>
void pissa_init(real* W, real* lora_A, real* lora_B, real scale, int C, int OC, int r, uint64_t seed) {
    std::vector<double> U((size_t)OC * r), S(r), Vt((size_t)r * C);
    svd_top_forward(U.data(), S.data(), Vt.data(), W, OC, C, r, LORA_PISSA_ITERS, seed);
    for (int i = 0; i < r; i++) {
        double f = std::sqrt(S[i] / (double)scale); // sqrt(S) on each side, with the scale divided out
        for (int c = 0; c < C; c++) { lora_A[(size_t)i * C + c] = (real)(f * Vt[(size_t)i * C + c]); }
        for (int o = 0; o < OC; o++) { lora_B[(size_t)o * r + i] = (real)(f * U[(size_t)o * r + i]); }
    }
    // the very lora_merge that merging uses, with sign -1: W + scale lora_B lora_A == W0 up to rounding
    lora_merge(W, lora_A, lora_B, scale, C, OC, r, -1);
}

// W (L, out, in) of target t -> merged: W_l <- m/n * (W_l + scale lora_B lora_A) row by row, n the row norms
// of the bracket (kept in dora_n for the unmerge); unmerged (sign -1): W_l <- W_l * n/m - scale lora_B lora_A.
// Merged, the model is one plain matmul per layer again, equal to the DoRA forward up to rounding.
template <typename real>
void dora_merge(const LoRA<real>* lora, int t, real* W, int sign) {
    int r = lora->config.r, in = lora_target_in(t, lora->C), out = lora_target_out(t, lora->C);
    real scale = (real)lora->config.scale;
    for (int l = 0; l < lora->L; l++) {
        real* W_l = W + (size_t)l * out * in;
        const real* lora_A_l = lora->lora_A[t] + (size_t)l * r * in;
        const real* lora_B_l = lora->lora_B[t] + (size_t)l * out * r;
        const real* m = lora->dora_m[t] + (size_t)l * out;
        real* n = lora->dora_n[t] + (size_t)l * out;
        if (sign > 0) {
            dora_norm_forward(n, lora->dora_P[t] + (size_t)l * out * r, W_l, lora_A_l, lora_B_l, scale, in, out, r);
            lora_merge(W_l, lora_A_l, lora_B_l, scale, in, out, r, +1);
        }
        for (int o = 0; o < out; o++) {
            real f = sign > 0 ? m[o] / n[o] : n[o] / m[o];
            for (int c = 0; c < in; c++) { W_l[(size_t)o * in + c] *= f; }
        }
        if (sign < 0) lora_merge(W_l, lora_A_l, lora_B_l, scale, in, out, r, -1);
    }
}

// ---- the model's hooks: the variants' work for one adapted matmul, called by gpt2_lora_forward/backward

// the frozen base weight of target t at layer l: the fp32 matrix itself, or (quantized base) its
// dequantized copy. With a quantized base fp32_weight is never read (and is NULL when the model never
// held the fp32 matrices: the trainer reads them from the checkpoint one layer at a time to quantize).
// The dequantized copy lives in the one scratch all four targets share, so it stays valid only until
// another matrix is asked for: fetch it right before its matmul. The matmul and the adapter branch
// after it (DoRA reads W too) then dequantize once.
template <typename real>
real* lora_base_weight(LoRA<real>* lora, int t, int l, real* fp32_weight) {
    if (lora->quant_q[t] == NULL) return fp32_weight;
    if (lora->quant_t != t || lora->quant_l != l) {
        size_t n = (size_t)lora_target_out(t, lora->C) * lora_target_in(t, lora->C);
        // each layer's matrix is quantized on its own: its codes and blocks start at layer offsets
        dequantize_forward(lora->quant_w, lora->quant_q[t] + (size_t)l * lora_quant_code_bytes(lora->config.base_quant, n),
                           lora->quant_absmax[t] + (size_t)l * lora_quant_blocks(n),
                           n, lora->config.base_quant);
        lora->quant_t = t;
        lora->quant_l = l;
    }
    return lora->quant_w;
}

// the bytes of the base's adapted matrices as stored: fp32, or codes + absmax per block
template <typename real>
size_t lora_base_weight_bytes(const LoRA<real>* lora, int quant) {
    size_t bytes = 0;
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        size_t n = (size_t)lora_target_out(t, lora->C) * lora_target_in(t, lora->C);
        if (quant == LORA_QUANT_FP32) bytes += (size_t)lora->L * n * sizeof(float);
        else bytes += (size_t)lora->L * (lora_quant_code_bytes(quant, n) + lora_quant_blocks(n) * sizeof(float));
    }
    return bytes;
}

// the dequantization scratch a quantized base holds besides its codes: one (4C, C) layer
template <typename real>
size_t lora_quant_scratch_bytes(const LoRA<real>* lora) {
    return lora->quant_w ? (size_t)4 * lora->C * lora->C * sizeof(real) : 0;
}

// p + offset, or NULL when p is NULL (a quantized base's fp32 matrix that is not in memory)
template <typename real> static inline real* lora_offset(real* p, size_t offset) { return p ? p + offset : NULL; }

// Wires the base model's adapted matrices into the adapters, one (target, layer) at a time, then once
// for all. lora_attach_layer: PiSSA replaces W_l by its residual (so the fp32 base changes), and a
// quantized base stores W_l as codes (all four block matrices, adapted or not). lora_attach_finish: the
// base pointers (W[t] is NULL when a quantized base's fp32 matrix is not in memory), and DoRA magnitudes at
// the row norms of the (dequantized) base, so m / n = 1 and the model starts exactly at the base.
// lora.h never frees the model's memory: the trainer never holds a quantized base's fp32 matrices at all
// (it reads the checkpoint without them and hands lora_attach_layer one layer at a time from the file).
template <typename real>
void lora_attach_layer(LoRA<real>* lora, int t, int l, real* W_l) {
    int L = lora->L, r = lora->config.r, quant = lora->config.base_quant;
    int in = lora_target_in(t, lora->C), out = lora_target_out(t, lora->C);
    size_t n = (size_t)out * in;
    if (lora->config.init_pissa && lora->lora_A[t] != NULL) {
        pissa_init(W_l, lora->lora_A[t] + (size_t)l * r * in, lora->lora_B[t] + (size_t)l * out * r,
                   (real)lora->config.scale, in, out, r, 1000u * t + l);
    }
    if (quant == LORA_QUANT_FP32) return;
    if (lora->quant_q[t] == NULL) {
        lora->quant_q[t] = lora_calloc<uint8_t>((size_t)L * lora_quant_code_bytes(quant, n));
        lora->quant_absmax[t] = lora_calloc<float>((size_t)L * lora_quant_blocks(n));
    }
    if (lora->quant_w == NULL) lora->quant_w = lora_calloc<real>((size_t)4 * lora->C * lora->C);
    lora->quant_t = lora->quant_l = -1;
    quantize_forward(lora->quant_q[t] + (size_t)l * lora_quant_code_bytes(quant, n),
                     lora->quant_absmax[t] + (size_t)l * lora_quant_blocks(n), W_l, n, quant);
}

template <typename real>
void lora_attach_finish(LoRA<real>* lora, real* const W[LORA_NUM_TARGETS], real* const bias[LORA_NUM_TARGETS]) {
    int L = lora->L, r = lora->config.r;
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        lora->base_w[t] = W[t];
        lora->base_b[t] = bias[t];
    }
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        if (lora->dora_m[t] == NULL) continue;
        int in = lora_target_in(t, lora->C), out = lora_target_out(t, lora->C);
        lora->dora_n[t] = lora_calloc<real>((size_t)L * out);
        lora->dora_P[t] = lora_calloc<real>((size_t)L * out * r);
        for (int l = 0; l < L; l++) {
            dora_norm_forward(lora->dora_m[t] + (size_t)l * out, lora->dora_P[t] + (size_t)l * out * r,
                              lora_base_weight(lora, t, l, lora_offset(W[t], (size_t)l * out * in)), lora->lora_A[t] + (size_t)l * r * in,
                              lora->lora_B[t] + (size_t)l * out * r, (real)lora->config.scale, in, out, r);
        }
    }
}

// both steps for a base held in memory: W[t] (L, out, in) and bias[t] (L, out) per target
template <typename real>
void lora_attach_base(LoRA<real>* lora, real* const W[LORA_NUM_TARGETS], real* const bias[LORA_NUM_TARGETS]) {
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        size_t n = (size_t)lora_target_out(t, lora->C) * lora_target_in(t, lora->C);
        for (int l = 0; l < lora->L; l++) { lora_attach_layer(lora, t, l, W[t] + (size_t)l * n); }
    }
    lora_attach_finish(lora, W, bias);
}

// ---- several adapters on one base, for inference
// Each sequence b of a batch uses its own adapter, adapters[index[b]], unmerged: the base matmul runs
// once for the whole batch and each sequence's T rows get their adapter's low-rank branch. Adapters may
// differ in rank, scale and targets (plain LoRA / rsLoRA; not DoRA). Forward only.
template <typename real>
void lora_multi_set(LoRA<real>* holder, const LoRA<real>* const* adapters, const int* index, int T, int L, int C) {
    holder->multi = adapters;
    holder->multi_index = index;
    holder->multi_T = T;
    holder->L = L;
    holder->C = C;
}

// out (BT,OC) += for each sequence b: adapters[index[b]]'s scale * inp_b @ lora_A^T @ lora_B^T at (t, l)
template <typename real>
void lora_multi_forward(LoRA<real>* holder, int t, int l, real* out, const real* inp, int BT) {
    int T = holder->multi_T, C = lora_target_in(t, holder->C), OC = lora_target_out(t, holder->C);
    for (int b = 0; b < BT / T; b++) {
        const LoRA<real>* a = holder->multi[holder->multi_index[b]];
        if (a->lora_A[t] == NULL) continue; // this adapter leaves target t alone
        int r = a->config.r;
        std::vector<real> h((size_t)T * r); // the bottleneck is not kept: no backward
        lora_forward_naive(out + (size_t)b * T * OC, h.data(), inp + (size_t)b * T * C, a->lora_A[t] + (size_t)l * r * C,
                     a->lora_B[t] + (size_t)l * OC * r, (real)a->config.scale, T, C, OC, r);
    }
}

// Several adapters folded into one, weighted: delta W = sum_k weights[k] * scale_k * lora_B_k lora_A_k, exactly,
// as one adapter of rank sum_k r_k ("cat" in PEFT's add_weighted_adapter): lora_A stacks the lora_A_k rows,
// lora_B the columns weights[k] * scale_k * lora_B_k, and the combined scale is 1 (alpha = r).
// Targets are the union; an adapter without a target contributes zero rows there.
template <typename real>
void lora_combine(LoRA<real>* out, const LoRA<real>* const* adapters, const float* weights, int n) {
    int L = adapters[0]->L, C = adapters[0]->C, r = 0;
    unsigned targets = 0;
    for (int k = 0; k < n; k++) { r += adapters[k]->config.r; targets |= adapters[k]->config.targets; }
    lora_init(out, lora_config(r, (float)r, targets), L, C, 0);
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        if (out->lora_A[t] == NULL) continue;
        int in = lora_target_in(t, C), OC = lora_target_out(t, C);
        memset(out->lora_A[t], 0, (size_t)L * r * in * sizeof(real)); // lora_init drew random rows
        int row = 0; // where adapter k's rank-r_k block starts
        for (int k = 0; k < n; k++) {
            const LoRA<real>* a = adapters[k];
            int rk = a->config.r;
            if (a->lora_A[t] != NULL) {
                real f = (real)weights[k] * (real)a->config.scale;
                for (int l = 0; l < L; l++) {
                    for (int i = 0; i < rk; i++) {
                        memcpy(out->lora_A[t] + ((size_t)l * r + row + i) * in, a->lora_A[t] + ((size_t)l * rk + i) * in, in * sizeof(real));
                        for (int o = 0; o < OC; o++) {
                            out->lora_B[t][((size_t)l * OC + o) * r + row + i] = f * a->lora_B[t][((size_t)l * OC + o) * rk + i];
                        }
                    }
                }
            }
            row += rk;
        }
    }
}

// DoRA or a multi-adapter batch instead of the plain branch; false when target t at layer l is plain LoRA
template <typename real>
bool lora_variant_forward(LoRA<real>* lora, int t, int l, real* out, const real* inp, int BT) {
    if (lora->multi != NULL) { lora_multi_forward(lora, t, l, out, inp, BT); return true; }
    if (lora->dora_m[t] == NULL) return false;
    int r = lora->config.r, C = lora_target_in(t, lora->C), OC = lora_target_out(t, lora->C);
    dora_forward(out, lora->h[t] + (size_t)l * BT * r, lora->dora_z[t] + (size_t)l * BT * OC, lora->dora_n[t] + (size_t)l * OC,
                 lora->dora_P[t] + (size_t)l * OC * r, inp, lora->base_b[t] + (size_t)l * OC,
                 lora_base_weight(lora, t, l, lora_offset(lora->base_w[t], (size_t)l * OC * C)), lora->lora_A[t] + (size_t)l * r * C,
                 lora->lora_B[t] + (size_t)l * OC * r, lora->dora_m[t] + (size_t)l * OC, (real)lora->config.scale, BT, C, OC, r);
    return true;
}

template <typename real>
bool lora_variant_backward(LoRA<real>* lora, int t, int l, real* dinp, const real* dout, const real* inp, int BT) {
    if (lora->dora_m[t] == NULL) return false;
    int r = lora->config.r, C = lora_target_in(t, lora->C), OC = lora_target_out(t, lora->C);
    dora_backward(dinp, lora->dlora_A[t] + (size_t)l * r * C, lora->dlora_B[t] + (size_t)l * OC * r,
                  lora->ddora_m[t] + (size_t)l * OC, lora->dh, lora->dora_dz, dout, lora->h[t] + (size_t)l * BT * r,
                  lora->dora_z[t] + (size_t)l * BT * OC, lora->dora_n[t] + (size_t)l * OC, lora->dora_P[t] + (size_t)l * OC * r,
                  inp, lora_base_weight(lora, t, l, lora_offset(lora->base_w[t], (size_t)l * OC * C)), lora->lora_A[t] + (size_t)l * r * C,
                  lora->lora_B[t] + (size_t)l * OC * r, lora->dora_m[t] + (size_t)l * OC, (real)lora->config.scale, BT, C, OC, r);
    return true;
}

// -V: parses "lora" or a comma list of variants ("rslora"), sets them in cfg and re-derives the scale;
// false + err on a bad name
static inline bool lora_parse_variants(const char* list, LoRAConfig* cfg, std::string* err) {
    static const char* const names[] = {"lora", "rslora", "dora", "pissa"};
    std::string s(list);
    size_t start = 0;
    while (start <= s.size()) {
        size_t end = s.find(',', start);
        if (end == std::string::npos) end = s.size();
        std::string name = s.substr(start, end - start);
        int found = -1;
        for (int k = 0; k < (int)(sizeof(names) / sizeof(names[0])); k++) {
            if (name == names[k]) found = k;
        }
        if (found < 0) {
            *err = "unknown LoRA variant '" + name + "'; HINT: choose lora, or a comma list of rslora,dora,pissa";
            return false;
        }
        if (found == 1) cfg->use_rslora = true;
        if (found == 2) cfg->use_dora = true;
        if (found == 3) cfg->init_pissa = true;
        start = end + 1;
    }
    cfg->scale = lora_scale_of(*cfg);
    return true;
}

// -Q: "fp32", "int8" or "nf4" -> *quant; false + err on a bad name
static inline bool lora_parse_quant(const char* name, int* quant, std::string* err) {
    for (int k = 0; k < LORA_NUM_QUANTS; k++) {
        if (strcmp(name, lora_quant_names[k]) == 0) { *quant = k; return true; }
    }
    *err = std::string("unknown base quantization '") + name + "'; HINT: choose fp32, int8, nf4 or int2";
    return false;
}

// the resolved variants, for the [LoRA] log block
static inline std::string lora_variants_string(const LoRAConfig& cfg) {
    std::string s = cfg.use_rslora ? "rslora" : "lora";
    if (cfg.use_dora) s += ", dora";
    if (cfg.init_pissa) s += ", pissa init";
    if (cfg.base_quant != LORA_QUANT_FP32) s += std::string(", base ") + lora_quant_names[cfg.base_quant];
    if (cfg.lr_ratio_B != 1.0f) s += ", lora+ (lr_B = " + std::to_string(cfg.lr_ratio_B) + " * lr)";
    return s;
}

// ---- end of LoRA variants ----
#endif // LORA_H
