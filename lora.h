/*
LoRA (Low-Rank Adaptation, Hu et al. 2021) for GPT-2: the adapter, its two kernels and everything it
does to a frozen weight; the model (train_gpt2_lora.cpp) wires it into the blocks.

A frozen weight W0 (OC, C) gets a trainable low-rank branch beside it:
    out = inp @ W0^T + bias  +  scale * (inp @ lora_A^T) @ lora_B^T,   scale = alpha / r
with lora_A (r, C) and lora_B (OC, r). Only lora_A and lora_B are trained. The product
lora_B @ lora_A is never formed while training: the branch is two thin matmuls through the
(BT, r) bottleneck h = inp @ lora_A^T, which is cached for the backward pass.

Reading order: plain LoRA first, complete: targets, config, the kernels (lora_forward_naive /
lora_backward_naive, and lora_forward / lora_backward, which pick the fast twin of lib/fast.h for float),
the adapters of a whole model with a per-layer view (lora_layer), init, merge / unmerge, the tensor list
the files use. Then the variants, one banner each (skip on first reading): LoRA+, DoRA, PiSSA, AdaLoRA,
several adapters on one base, and the hooks that route one adapted matmul to them. rsLoRA is one line of the
config (lora_scale_of). The frozen base, quantized or not, is the model's: LoRA never stores it.

This header has no dependencies on the model.
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
#include "lib/rng.h"   // lora_A's seeded init
#include "lib/fast.h"  // lora_forward_fast / lora_backward_fast, the float twins of the naive kernels below
#include "lib/quant.h" // LoRAQuant: the base storage an adapter was trained on (LoRAConfig.base_quant)
#include "lib/svd.h"   // svd_top_forward, for PiSSA's init

// ----------------------------------------------------------------------------
// which matmuls of a GPT-2 block carry an adapter

enum LoRATarget { LORA_QKV, LORA_ATTPROJ, LORA_FC, LORA_FCPROJ, LORA_NUM_TARGETS };
// our flag names (PEFT's module names for the same matmuls are in lib/peft.h)
static const char* const lora_target_names[LORA_NUM_TARGETS] = {"qkv", "attproj", "fc", "fcproj"};
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
    // AdaLoRA: lora_E (r) between lora_A and lora_B, r = init_r, ranks masked down to a budget while training
    bool use_adalora;
    int adalora_target_r;      // the average rank at the end (PEFT's target_r, 8)
    int adalora_tinit;         // steps before the budget starts to fall (tinit, 0)
    int adalora_tfinal;        // steps at the end with the final ranks fixed (tfinal, 0)
    int adalora_deltaT;        // steps between two maskings (deltaT, 1)
    int adalora_total_step;    // the run's steps (total_step)
    float adalora_orth_reg;    // the orthogonality regulariser's weight (orth_reg_weight, 0.5)
    int base_quant;   // the frozen base's block matrices as the adapter trained on them: a LoRAQuant (fp32, int8, nf4, int2)
    float dropout;    // PEFT's lora_dropout (-D): on the branch's input while training (the model's Dropout), 0 = off
};

// the one place the scale is derived. rsLoRA (Kalajdzievski 2023): with alpha / r the update
// scale * lora_B lora_A shrinks as r grows and large ranks stop learning; alpha / sqrt(r) keeps it rank-stable.
static inline float lora_scale_of(const LoRAConfig& cfg) {
    // AdaLoRA (see its banner): PEFT's scaling = lora_alpha divided by ranknum + 1e-5, ranknum = init_r
    if (cfg.use_adalora) return cfg.alpha / ((float)cfg.r + 1e-5f);
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
    cfg.use_adalora = false;
    cfg.adalora_target_r = 8; // PEFT's AdaLoraConfig defaults
    cfg.adalora_tinit = 0;
    cfg.adalora_tfinal = 0;
    cfg.adalora_deltaT = 1;
    cfg.adalora_total_step = 0;
    cfg.adalora_orth_reg = 0.5f;
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
    // DoRA (see its banner below); all NULL unless chosen
    real* dora_m[LORA_NUM_TARGETS];            // (L, out) magnitudes, in params_memory after all lora_A/lora_B
    real* ddora_m[LORA_NUM_TARGETS];           // (L, out)
    real* dora_n[LORA_NUM_TARGETS];            // (L, out) cached row norms ||W0 + scale lora_B lora_A||
    real* dora_P[LORA_NUM_TARGETS];            // (L, out, r) cached W0 @ lora_A^T
    real* dora_z[LORA_NUM_TARGETS];            // (L, BT, out) cached inp @ (W0 + scale lora_B lora_A)^T
    real* dora_dz;                             // (BT, 4C) backward scratch
    // AdaLoRA (see its banner below); all NULL unless chosen
    real* lora_E[LORA_NUM_TARGETS];            // (L, r) singular values, in params_memory after all lora_A/lora_B
    real* dlora_E[LORA_NUM_TARGETS];           // (L, r)
    real* adalora_mask[LORA_NUM_TARGETS];      // (L, r) 1 = triplet kept, 0 = masked (PEFT's rank_pattern)
    real* adalora_mask_memory;                 // all masks, target-major, L * r per enabled target
    real* adalora_avg;                         // (num_parameters) exponential average of |w * grad w|
    real* adalora_unc;                         // (num_parameters) exponential average of its deviation
    real* adalora_AE;                          // (r, 4C) scratch: diag(lora_E) lora_A of one layer
    real* adalora_dAE;                         // (r, 4C) scratch: its gradient
    // several adapters in one batch (see its banner below); NULL unless set
    const LoRA<real>* const* multi;            // the adapters
    const int* multi_index;                    // (B) which adapter each sequence uses
    int multi_T;                               // rows per sequence
};

// p + offset, or NULL when p is NULL (a target without an adapter)
template <typename real> static inline real* lora_offset(real* p, size_t offset) { return p ? p + offset : NULL; }

// One adapted matrix at one layer: the slices of target t's (L, ...) buffers that layer l uses, so that
// no caller writes offset arithmetic. C and OC are that matrix's input and output channels; h and
// dora_z are the layer's slices for a batch of BT rows (0: not needed). NULL where not allocated.
template <typename real>
struct LoRALayer {
    int C, OC, r;
    real* lora_A;   // (r, C)
    real* lora_B;   // (OC, r)
    real* dlora_A;  // (r, C)
    real* dlora_B;  // (OC, r)
    real* h;        // (BT, r)
    real* dora_m;   // (OC) DoRA only
    real* ddora_m;  // (OC)
    real* dora_n;   // (OC)
    real* dora_P;   // (OC, r)
    real* dora_z;   // (BT, OC)
    real* lora_E;   // (r) AdaLoRA only
    real* dlora_E;  // (r)
    real* mask;     // (r)
};

template <typename real>
LoRALayer<real> lora_layer(const LoRA<real>* lora, int t, int l, size_t BT = 0) {
    LoRALayer<real> v;
    v.C = lora_target_in(t, lora->C);
    v.OC = lora_target_out(t, lora->C);
    v.r = lora->config.r;
    size_t C = v.C, OC = v.OC, r = v.r;
    v.lora_A = lora_offset(lora->lora_A[t], l * r * C);
    v.lora_B = lora_offset(lora->lora_B[t], l * OC * r);
    v.dlora_A = lora_offset(lora->dlora_A[t], l * r * C);
    v.dlora_B = lora_offset(lora->dlora_B[t], l * OC * r);
    v.h = lora_offset(lora->h[t], l * BT * r);
    v.dora_m = lora_offset(lora->dora_m[t], l * OC);
    v.ddora_m = lora_offset(lora->ddora_m[t], l * OC);
    v.dora_n = lora_offset(lora->dora_n[t], l * OC);
    v.dora_P = lora_offset(lora->dora_P[t], l * OC * r);
    v.dora_z = lora_offset(lora->dora_z[t], l * BT * OC);
    v.lora_E = lora_offset(lora->lora_E[t], l * r);
    v.dlora_E = lora_offset(lora->dlora_E[t], l * r);
    v.mask = lora_offset(lora->adalora_mask[t], l * r);
    return v;
}

// the number of adapter parameters: sum over enabled targets of L * r * (in + out)
static inline size_t lora_count_parameters(LoRAConfig cfg, int L, int C) {
    size_t n = 0;
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        if (cfg.targets & (1u << t)) {
            n += (size_t)L * cfg.r * (lora_target_in(t, C) + lora_target_out(t, C));
            if (cfg.use_dora) n += (size_t)L * lora_target_out(t, C); // the magnitudes
            if (cfg.use_adalora) n += (size_t)L * cfg.r;                // AdaLoRA's lora_E
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

template <typename real> void adalora_init_all(LoRA<real>* lora, Rng* rng, size_t off); // AdaLoRA's part, see its banner

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
        if (cfg.use_adalora) continue; // adalora_init_all draws lora_A and lora_B below
        for (size_t i = 0; i < nA; i++) { lora->lora_A[t][i] = (real)rng_uniform(&rng, -bound, bound); }
    }
    // DoRA: the magnitudes come after every lora_A / lora_B, so those keep the plain layout;
    // dora_init_layer sets them to the row norms of W0 when the adapter is attached to a base
    for (int t = 0; t < LORA_NUM_TARGETS && cfg.use_dora; t++) {
        if (!(cfg.targets & (1u << t))) continue;
        lora->dora_m[t] = lora->params_memory + off;
        lora->ddora_m[t] = lora->grads_memory + off;
        off += (size_t)L * lora_target_out(t, C);
        lora->dora_n[t] = lora_calloc<real>((size_t)L * lora_target_out(t, C));
        lora->dora_P[t] = lora_calloc<real>((size_t)L * lora_target_out(t, C) * cfg.r);
    }
    if (cfg.use_adalora) adalora_init_all(lora, &rng, off);
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
    }
    free(lora->dh);
    free(lora->dora_dz);
    free(lora->adalora_mask_memory);
    free(lora->adalora_avg);
    free(lora->adalora_unc);
    free(lora->adalora_AE);
    free(lora->adalora_dAE);
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
template <typename real> void adalora_merge(const LoRA<real>* lora, int t, real* W, int sign); // AdaLoRA's, see below
template <typename real>
void lora_merge_all(const LoRA<real>* lora, real* const base[LORA_NUM_TARGETS], int sign) {
    int r = lora->config.r;
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        if (lora->lora_A[t] == NULL) continue;
        if (lora->dora_m[t] != NULL) { dora_merge(lora, t, base[t], sign); continue; }
        if (lora->lora_E[t] != NULL) { adalora_merge(lora, t, base[t], sign); continue; }
        for (int l = 0; l < lora->L; l++) {
            LoRALayer<real> a = lora_layer(lora, t, l);
            lora_merge(base[t] + (size_t)l * a.OC * a.C, a.lora_A, a.lora_B, (real)lora->config.scale, a.C, a.OC, r, sign);
        }
    }
}

// ----------------------------------------------------------------------------
// the adapter's tensors, one per (layer, target, A or B), in the order adapter files and PEFT write them

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

// ----------------------------------------------------------------------------
// ---- trainable token rows (-C; PEFT's trainable_token_indices) ----
// LoRA never touches the tied token embedding wte (Vp, C), which is also the LM head. A token the base
// rarely saw (a name, an archaic word, a newline) keeps a row LoRA can only reach through the blocks.
// The standard remedy trains n selected rows of wte beside the adapters: n * C more trainable values,
// the rest of wte stays frozen, and there is no (Vp, C) gradient buffer: only the n rows' gradients are
// accumulated. As in PEFT (tuners/trainable_tokens), the trained values are the rows themselves,
// initialised from the base's rows (PEFT's "trainable_tokens_delta" holds the new rows, not differences);
// the model's wte holds them (token_rows_write), so the forward is unchanged and costs nothing extra, and
// the base's rows are kept here to put back when the rows are detached.
// The gradient of a tied row has two parts (gpt2_backward calls both):
//   the input embedding:  encoded[b,t] = wte[inp[b,t]] + wpe[t]  ->  drow[s] += dencoded[b,t] where inp[b,t] = ids[s]
//   the LM head:          logits[b,t,v] = lnf[b,t] . wte[v]      ->  drow[s] += sum_bt dlogits[b,t,ids[s]] * lnf[b,t]

// plain data (the model is zeroed with memset): all zero / NULL when no rows are trained
template <typename real>
struct TokenRows {
    int n, C, V;    // n rows of width C; ids < V
    int* ids;       // (n) the token ids, in the order given
    int* slot;      // (V) slot of each token id, -1 when it is not trained
    real* memory;   // the five (n, C) arrays below, back to back
    real* base;     // (n, C) the frozen base's rows
    real* rows;     // (n, C) the trained rows (PEFT's trainable_tokens_delta)
    real* grads;    // (n, C)
    real* m;        // (n, C) AdamW's moments
    real* v;
};
template <typename real> size_t token_rows_count(const TokenRows<real>* tr) { return (size_t)tr->n * tr->C; }

// "" or why ids cannot be trained rows of a vocabulary of V tokens
static inline std::string token_rows_check_ids(const std::vector<int>& ids, int V) {
    std::vector<char> seen(V > 0 ? V : 0, 0);
    for (int id : ids) {
        if (id < 0 || id >= V) return strprintf("token id %d is out of range: the vocabulary has V = %d tokens (ids 0..%d)", id, V, V - 1);
        if (seen[id]) return strprintf("token id %d is given twice", id);
        seen[id] = 1;
    }
    if (ids.empty()) return "no token ids";
    return "";
}

// starts training rows ids of wte (V rows of C used, padded rows never): the trained rows start at the
// base's values, so the model is unchanged until the first update
template <typename real>
void token_rows_attach(TokenRows<real>* tr, const std::vector<int>& ids, const real* wte, int V, int C) {
    std::string err = token_rows_check_ids(ids, V);
    if (!err.empty()) die("token_rows_attach: " + err + "\n---> HINT: an internal check failed: this is a bug in train_gpt2_lora, not in your input; please report it with the command line");
    tr->n = (int)ids.size();
    tr->C = C;
    tr->V = V;
    tr->ids = (int*)malloc_check(ids.size() * sizeof(int), "trainable token ids");
    tr->slot = (int*)malloc_check((size_t)V * sizeof(int), "trainable token slots");
    size_t nC = (size_t)tr->n * C;
    tr->memory = calloc_real<real>(5 * nC, "trainable token rows");
    tr->base = tr->memory;
    tr->rows = tr->memory + nC;
    tr->grads = tr->memory + 2 * nC;
    tr->m = tr->memory + 3 * nC;
    tr->v = tr->memory + 4 * nC;
    for (int id = 0; id < V; id++) { tr->slot[id] = -1; }
    for (int s = 0; s < tr->n; s++) {
        tr->ids[s] = ids[s];
        tr->slot[ids[s]] = s;
        memcpy(tr->base + (size_t)s * C, wte + (size_t)ids[s] * C, C * sizeof(real));
    }
    memcpy(tr->rows, tr->base, nC * sizeof(real));
}

template <typename real>
void token_rows_free(TokenRows<real>* tr) {
    free(tr->ids);
    free(tr->slot);
    free(tr->memory);
    memset(tr, 0, sizeof(*tr));
}

// wte's selected rows := the trained rows (after attach, an update or a load)
template <typename real>
void token_rows_write(const TokenRows<real>* tr, real* wte) {
    for (int s = 0; s < tr->n; s++) { memcpy(wte + (size_t)tr->ids[s] * tr->C, tr->rows + (size_t)s * tr->C, tr->C * sizeof(real)); }
}

// puts the base's rows back into wte and forgets the trained rows
template <typename real>
void token_rows_detach(TokenRows<real>* tr, real* wte) {
    for (int s = 0; s < tr->n; s++) { memcpy(wte + (size_t)tr->ids[s] * tr->C, tr->base + (size_t)s * tr->C, tr->C * sizeof(real)); }
    token_rows_free(tr);
}

// the input embedding's part: dencoded (BT, C), inp (BT) -> grads (n, C) +=
template <typename real>
void token_rows_encoder_backward(TokenRows<real>* tr, const real* dencoded, const int* inp, int BT) {
    int C = tr->C;
    // serial over positions: two positions may hold the same token; parallel over channels instead
    #pragma omp parallel for
    for (int c = 0; c < C; c++) {
        for (int bt = 0; bt < BT; bt++) {
            int s = tr->slot[inp[bt]];
            if (s >= 0) tr->grads[(size_t)s * C + c] += dencoded[(size_t)bt * C + c];
        }
    }
}

// the LM head's part: dlogits (BT, Vp), lnf (BT, C) -> grads (n, C) +=; one row per thread
template <typename real>
void token_rows_lm_head_backward(TokenRows<real>* tr, const real* dlogits, const real* lnf, int BT, int Vp) {
    int C = tr->C;
    #pragma omp parallel for
    for (int s = 0; s < tr->n; s++) {
        real* g = tr->grads + (size_t)s * C;
        size_t id = (size_t)tr->ids[s];
        for (int bt = 0; bt < BT; bt++) {
            real d = dlogits[(size_t)bt * Vp + id];
            const real* x = lnf + (size_t)bt * C;
            for (int c = 0; c < C; c++) { g[c] += d * x[c]; }
        }
    }
}

// ----------------------------------------------------------------------------
// ---- LoRA variants (skip on first reading) ----
// rsLoRA (the scale, see lora_scale_of above), LoRA+, DoRA, PiSSA initialisation, AdaLoRA and several
// adapters on one base; a quantized frozen base (int8 / NF4 / int2) is the model's (lib/quant.h). Each is off by
// default; plain LoRA is untouched by them.

// ---- LoRA+ (Hayou et al. 2024)
// lora_B learns with lr_B = lr_ratio_B * lr while lora_A keeps lr, because
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
    for (int t = 0; t < LORA_NUM_TARGETS && cfg.use_adalora; t++) {
        if (cfg.targets & (1u << t)) push((size_t)L * cfg.r, 1.0f); // AdaLoRA's lora_E, at the end
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

// DoRA's magnitudes of target t at layer l start at the row norms of the frozen W0_l (OC, C) (dequantized
// with -Q), so m / n = 1 and the model starts exactly at the base; called once the base is final (after PiSSA)
template <typename real>
void dora_init_layer(LoRA<real>* lora, int t, int l, const real* W0_l) {
    LoRALayer<real> a = lora_layer(lora, t, l);
    if (a.dora_m == NULL) return;
    dora_norm_forward(a.dora_m, a.dora_P, W0_l, a.lora_A, a.lora_B, (real)lora->config.scale, a.C, a.OC, a.r);
}

// W (L, out, in) of target t -> merged: W_l <- m/n * (W_l + scale lora_B lora_A) row by row, n the row norms
// of the bracket (kept in dora_n for the unmerge); unmerged (sign -1): W_l <- W_l * n/m - scale lora_B lora_A.
// Merged, the model is one plain matmul per layer again, equal to the DoRA forward up to rounding.
template <typename real>
void dora_merge(const LoRA<real>* lora, int t, real* W, int sign) {
    real scale = (real)lora->config.scale;
    for (int l = 0; l < lora->L; l++) {
        LoRALayer<real> a = lora_layer(lora, t, l);
        int in = a.C, out = a.OC, r = a.r;
        real* W_l = W + (size_t)l * out * in;
        const real* m = a.dora_m;
        real* n = a.dora_n;
        if (sign > 0) {
            dora_norm_forward(n, a.dora_P, W_l, a.lora_A, a.lora_B, scale, in, out, r);
            lora_merge(W_l, a.lora_A, a.lora_B, scale, in, out, r, +1);
        }
        for (int o = 0; o < out; o++) {
            real f = sign > 0 ? m[o] / n[o] : n[o] / m[o];
            for (int c = 0; c < in; c++) { W_l[(size_t)o * in + c] *= f; }
        }
        if (sign < 0) lora_merge(W_l, a.lora_A, a.lora_B, scale, in, out, r, -1);
    }
}

// ---- PiSSA (Meng et al. 2024): principal singular values and vectors adaptation
// The adapter starts on the top-r singular directions of W0 = U S V^T instead of at zero:
//   lora_B = U_r sqrt(S_r / scale), lora_A = sqrt(S_r / scale) V_r^T, so scale * lora_B lora_A = U_r S_r V_r^T,
// and the frozen base becomes the residual W0 - scale * lora_B lora_A: the model is unchanged at init
// (up to fp32 rounding), but training moves the principal part. The top-r SVD is lib/svd.h's.

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

// PiSSA's part of attaching to a base: target t's frozen weight at layer l, W_l (out, in), gives lora_A
// and lora_B their init and keeps the residual. Nothing for plain LoRA (its init is lora_init's).
template <typename real>
void lora_attach_layer(LoRA<real>* lora, int t, int l, real* W_l) {
    LoRALayer<real> a = lora_layer(lora, t, l);
    if (!lora->config.init_pissa || a.lora_A == NULL) return;
    pissa_init(W_l, a.lora_A, a.lora_B, (real)lora->config.scale, a.C, a.OC, a.r, 1000u * t + l);
}

// ---- AdaLoRA (Zhang et al. 2023): adaptive budget allocation, with PEFT's numerics (peft/tuners/adalora)
// The update is an SVD-like triplet product P diag(E) Q with P = lora_B (OC, r), E = lora_E (r), Q = lora_A (r, C):
//   out += scale * ((inp @ lora_A^T) * lora_E) @ lora_B^T,   scale = alpha / (r + 1e-5)   (lora_scale_of)
// r is init_r and never changes (PEFT's ranknum): masking a triplet sets its lora_E to 0 instead of shrinking
// the matrices. Init as PEFT: lora_E = 0 (so the model starts at the base), lora_A and lora_B ~ N(0, 0.02^2).
// Training adds PEFT's orthogonality regulariser to the loss,
//   orth_reg * mean over every lora_A and lora_B matrix of ||Q Q^T - I||_F  (lora_A)  or  ||P^T P - I||_F  (lora_B)
// (the Frobenius norm itself, not its square), and after each AdamW update adalora_update_and_allocate
// (PEFT's update_and_allocate) scores every triplet and masks the least important ones down to a budget
// that falls from L * targets * init_r to L * targets * target_r on a cubic schedule.

#define ADALORA_BETA1 0.85 // the importance's exponential average (PEFT's beta1)
#define ADALORA_BETA2 0.85 // the uncertainty's (beta2)
#define ADALORA_INIT_STD 0.02f // lora_A, lora_B ~ N(0, 0.02^2), as PEFT's reset_lora_parameters

// lora_E after every lora_A / lora_B in the flat buffer (off: where they end), lora_A and lora_B drawn
// from N(0, 0.02^2) in flat-buffer order, every triplet kept; the importance state and scratch allocated
template <typename real>
void adalora_init_all(LoRA<real>* lora, Rng* rng, size_t off) {
    LoRAConfig cfg = lora->config;
    int L = lora->L, C = lora->C, r = cfg.r;
    size_t n_AB = off; // lora_A and lora_B of every target come first
    for (size_t i = 0; i < n_AB; i++) { lora->params_memory[i] = (real)(ADALORA_INIT_STD * rng_normal(rng)); }
    int n_targets = 0;
    for (int t = 0; t < LORA_NUM_TARGETS; t++) n_targets += (cfg.targets >> t) & 1;
    lora->adalora_mask_memory = lora_calloc<real>((size_t)n_targets * L * r);
    size_t m = 0;
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        if (!(cfg.targets & (1u << t))) continue;
        lora->lora_E[t] = lora->params_memory + off; // calloc: lora_E = 0
        lora->dlora_E[t] = lora->grads_memory + off;
        off += (size_t)L * r;
        lora->adalora_mask[t] = lora->adalora_mask_memory + m;
        m += (size_t)L * r;
    }
    for (size_t i = 0; i < m; i++) lora->adalora_mask_memory[i] = 1;
    lora->adalora_avg = lora_calloc<real>(lora->num_parameters);
    lora->adalora_unc = lora_calloc<real>(lora->num_parameters);
    lora->adalora_AE = lora_calloc<real>((size_t)r * 4 * C);
    lora->adalora_dAE = lora_calloc<real>((size_t)r * 4 * C);
}

// the number of mask entries (triplets) of an AdaLoRA config on L layers, 0 for any other
static inline size_t adalora_mask_count(const LoRAConfig& cfg, int L) {
    if (!cfg.use_adalora) return 0;
    size_t n = 0;
    for (int t = 0; t < LORA_NUM_TARGETS; t++) n += (cfg.targets >> t) & 1 ? (size_t)L * cfg.r : 0;
    return n;
}

// lora_A (r,C), lora_E (r) -> AE (r,C) = diag(lora_E) lora_A: the triplets' down projection with E folded in
template <typename real>
void adalora_fold_E(real* AE, const real* lora_A, const real* lora_E, int C, int r) {
    for (int i = 0; i < r; i++) {
        for (int c = 0; c < C; c++) { AE[(size_t)i * C + c] = lora_E[i] * lora_A[(size_t)i * C + c]; }
    }
}

// inp (BT,C), lora_A (r,C), lora_E (r), lora_B (OC,r) -> AE (r,C) scratch, h (BT,r) = (inp @ lora_A^T) * lora_E
// cached; out (BT,OC) += scale * h @ lora_B^T. With E folded into lora_A it is plain LoRA's branch (and its
// fast twin for float).
template <typename real>
void adalora_forward(real* out, real* h, real* AE, const real* inp, const real* lora_A, const real* lora_E, const real* lora_B,
                     real scale, int BT, int C, int OC, int r) {
    adalora_fold_E(AE, lora_A, lora_E, C, r);
    lora_forward(out, h, inp, AE, lora_B, scale, BT, C, OC, r);
}

// dout (BT,OC), h (BT,r), inp (BT,C), lora_A (r,C), lora_E (r), lora_B (OC,r)
//   -> dlora_A (r,C) +=, dlora_E (r) +=, dlora_B (OC,r) +=, dinp (BT,C) += (may be NULL); dh (BT,r), AE, dAE (r,C) scratch
template <typename real>
void adalora_backward(real* dinp, real* dlora_A, real* dlora_E, real* dlora_B, real* dh, real* AE, real* dAE,
                      const real* dout, const real* h, const real* inp, const real* lora_A, const real* lora_E, const real* lora_B,
                      real scale, int BT, int C, int OC, int r) {
    // forward was plain LoRA on AE = diag(E) A: its backward gives dlora_B, dinp and dAE = scale (dout @ lora_B)^T inp
    adalora_fold_E(AE, lora_A, lora_E, C, r);
    memset(dAE, 0, (size_t)r * C * sizeof(real));
    lora_backward(dinp, dAE, dlora_B, dh, dout, h, inp, AE, lora_B, scale, BT, C, OC, r);
    // then AE[i,c] = E[i] A[i,c]: dA[i,c] += E[i] dAE[i,c], dE[i] += sum_c dAE[i,c] A[i,c]
    for (int i = 0; i < r; i++) {
        real dE = 0;
        for (int c = 0; c < C; c++) {
            dlora_A[(size_t)i * C + c] += lora_E[i] * dAE[(size_t)i * C + c];
            dE += dAE[(size_t)i * C + c] * lora_A[(size_t)i * C + c];
        }
        dlora_E[i] += dE;
    }
}

// The orthogonality regulariser of one matrix X holding r vectors of length n, vector i's element k at
// X[i * si + k * sk]: lora_A (r,C) is (si, sk) = (C, 1), lora_B (OC,r) is (1, r). M = the (r,r) Gram matrix
// of the vectors (Q Q^T for lora_A, P^T P for lora_B). Returns ||M - I||_F.
template <typename real>
real adalora_orth_forward(const real* X, int r, int n, size_t si, size_t sk, std::vector<real>* M_minus_I) {
    std::vector<real>& D = *M_minus_I;
    D.assign((size_t)r * r, 0);
    for (int i = 0; i < r; i++) {
        for (int j = 0; j <= i; j++) {
            real sum = 0;
            for (int k = 0; k < n; k++) { sum += X[i * si + k * sk] * X[j * si + k * sk]; }
            D[(size_t)i * r + j] = D[(size_t)j * r + i] = sum - (i == j ? 1 : 0);
        }
    }
    real norm2 = 0;
    for (real d : D) norm2 += d * d;
    return std::sqrt(norm2);
}

// its backward: dX += dnorm * d||M - I||_F / dX = dnorm * 2 (M - I) X / ||M - I||_F (M - I is symmetric);
// at ||M - I||_F = 0 (X orthonormal, the minimum) the norm has no gradient and the subgradient 0 is taken
template <typename real>
void adalora_orth_backward(real* dX, const real* X, const std::vector<real>& M_minus_I, real norm, real dnorm,
                           int r, int n, size_t si, size_t sk) {
    if (!(norm > 0)) return;
    real f = 2 * dnorm / norm;
    for (int i = 0; i < r; i++) {
        for (int k = 0; k < n; k++) {
            real sum = 0;
            for (int j = 0; j < r; j++) { sum += M_minus_I[(size_t)i * r + j] * X[j * si + k * sk]; }
            dX[i * si + k * sk] += f * sum;
        }
    }
}

// The whole regulariser, as PEFT adds it to the loss: orth_reg * (sum over every lora_A and lora_B matrix of
// ||M - I||_F) / their number. Adds its gradient to dlora_A, dlora_B and returns its value (for the log).
template <typename real>
double adalora_orth_loss_backward(LoRA<real>* lora) {
    if (!lora->config.use_adalora || !(lora->config.adalora_orth_reg > 0)) return 0;
    int count = 0;
    for (int t = 0; t < LORA_NUM_TARGETS; t++) count += lora->lora_A[t] != NULL ? 2 * lora->L : 0;
    real dnorm = (real)lora->config.adalora_orth_reg / (real)count;
    double total = 0;
    std::vector<real> D;
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        for (int l = 0; l < lora->L && lora->lora_A[t] != NULL; l++) {
            LoRALayer<real> a = lora_layer(lora, t, l);
            real norm = adalora_orth_forward(a.lora_A, a.r, a.C, (size_t)a.C, 1, &D);
            adalora_orth_backward(a.dlora_A, a.lora_A, D, norm, dnorm, a.r, a.C, (size_t)a.C, 1);
            total += norm;
            norm = adalora_orth_forward(a.lora_B, a.r, a.OC, 1, (size_t)a.r, &D);
            adalora_orth_backward(a.dlora_B, a.lora_B, D, norm, dnorm, a.r, a.OC, 1, (size_t)a.r);
            total += norm;
        }
    }
    return lora->config.adalora_orth_reg * total / count;
}

// the budget in triplets at one step (0-based, the step just taken), PEFT's budget_schedule: the initial
// budget init_bgt = (adapted matrices) * init_r until tinit, then the cubic fall
//   budget = floor((init_bgt - target_bgt) * (1 - (step - tinit) / (total_step - tfinal - tinit))^3 + target_bgt)
// masking every deltaT steps, and target_bgt = (adapted matrices) * target_r after total_step - tfinal.
// *mask_now: whether this step masks.
static inline int adalora_budget(const LoRAConfig& cfg, int L, int step, bool* mask_now) {
    int matrices = 0;
    for (int t = 0; t < LORA_NUM_TARGETS; t++) matrices += (cfg.targets >> t) & 1 ? L : 0;
    int init_bgt = matrices * cfg.r, target_bgt = matrices * cfg.adalora_target_r;
    int tinit = cfg.adalora_tinit, tfinal = cfg.adalora_tfinal, total = cfg.adalora_total_step;
    if (step <= tinit) { *mask_now = false; return init_bgt; }
    if (step > total - tfinal) { *mask_now = true; return target_bgt; }
    double mul = 1.0 - (double)(step - tinit) / (double)(total - tfinal - tinit);
    *mask_now = step % cfg.adalora_deltaT == 0;
    return (int)((init_bgt - target_bgt) * (mul * mul * mul) + target_bgt);
}

// PEFT's update_ipt over every adapter parameter w with gradient g (after clipping, as PEFT's trainer sees it):
//   I = |w g|,  avg <- beta1 avg + (1 - beta1) I,  unc <- beta2 unc + (1 - beta2) |I - avg|  (with the new avg)
template <typename real>
void adalora_update_importance(LoRA<real>* lora) {
    const real b1 = (real)ADALORA_BETA1, b2 = (real)ADALORA_BETA2;
    #pragma omp parallel for
    for (long long k = 0; k < (long long)lora->num_parameters; k++) {
        real I = std::fabs(lora->params_memory[k] * lora->grads_memory[k]);
        real avg = b1 * lora->adalora_avg[k] + (1 - b1) * I;
        lora->adalora_avg[k] = avg;
        lora->adalora_unc[k] = b2 * lora->adalora_unc[k] + (1 - b2) * std::fabs(I - avg);
    }
}

// the offset of p (a pointer into params_memory) in the flat buffer: the same offset in the importance state
template <typename real>
static inline size_t adalora_flat(const LoRA<real>* lora, const real* p) { return (size_t)(p - lora->params_memory); }

// the score of triplet i of target t at layer l, PEFT's mask_to_budget: with s = avg * unc per element,
//   s(lora_E[i]) + mean over c of s(lora_A[i,c]) + mean over o of s(lora_B[o,i])
template <typename real>
double adalora_triplet_score(const LoRA<real>* lora, int t, int l, int i) {
    LoRALayer<real> a = lora_layer(lora, t, l);
    const real* avg = lora->adalora_avg;
    const real* unc = lora->adalora_unc;
    size_t e = adalora_flat(lora, a.lora_E) + i;
    double score_A = 0, score_B = 0;
    size_t oA = adalora_flat(lora, a.lora_A) + (size_t)i * a.C;
    for (int c = 0; c < a.C; c++) score_A += (double)avg[oA + c] * unc[oA + c];
    size_t oB = adalora_flat(lora, a.lora_B) + i;
    for (int o = 0; o < a.OC; o++) score_B += (double)avg[oB + (size_t)o * a.r] * unc[oB + (size_t)o * a.r];
    return (double)avg[e] * unc[e] + score_A / a.C + score_B / a.OC;
}

// masks every triplet but the budget most important ones: mask 0 and lora_E 0 for the (all - budget)
// lowest scores, mask 1 for the rest (a triplet masked earlier comes back when its score rises). PEFT masks
// every score <= the k-th lowest, which is the same set unless scores tie at the threshold; here ties go by
// position, so exactly the budget stays.
template <typename real>
void adalora_mask_to_budget(LoRA<real>* lora, int budget) {
    struct Triplet { double score; int t, l, i; };
    std::vector<Triplet> all;
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        for (int l = 0; l < lora->L && lora->lora_E[t] != NULL; l++) {
            for (int i = 0; i < lora->config.r; i++) all.push_back({adalora_triplet_score(lora, t, l, i), t, l, i});
        }
    }
    size_t n_mask = budget < (int)all.size() ? all.size() - (size_t)std::max(budget, 0) : 0;
    std::stable_sort(all.begin(), all.end(), [](const Triplet& x, const Triplet& y) { return x.score < y.score; });
    for (size_t k = 0; k < all.size(); k++) {
        LoRALayer<real> a = lora_layer(lora, all[k].t, all[k].l);
        a.mask[all[k].i] = k < n_mask ? 0 : 1;
    }
}

// lora_E <- lora_E * mask: the masked triplets stay at zero between maskings (PEFT re-masks only at its
// masking steps and, after total_step - tfinal, after every step; with deltaT = 1 that is every step too)
template <typename real>
void adalora_apply_mask(LoRA<real>* lora) {
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        if (lora->lora_E[t] == NULL) continue;
        size_t n = (size_t)lora->L * lora->config.r;
        for (size_t k = 0; k < n; k++) lora->lora_E[t][k] *= lora->adalora_mask[t][k];
    }
}

// PEFT's update_and_allocate, called after the AdamW update of the step just taken (0-based), with its
// gradients still in place: before total_step - tfinal the importance is updated and, at masking steps,
// the triplets masked to the budget; at total_step - tfinal the final mask to target_r on average is fixed
// and the importance state reset; after it the fixed mask holds.
template <typename real>
void adalora_update_and_allocate(LoRA<real>* lora, int step) {
    const LoRAConfig& cfg = lora->config;
    if (!cfg.use_adalora) return;
    int final_step = cfg.adalora_total_step - cfg.adalora_tfinal;
    bool mask_now = false;
    int budget = adalora_budget(cfg, lora->L, step, &mask_now);
    if (step < final_step) {
        adalora_update_importance(lora);
        if (mask_now) adalora_mask_to_budget(lora, budget);
    } else if (step == final_step) {
        adalora_mask_to_budget(lora, budget);
        memset(lora->adalora_avg, 0, lora->num_parameters * sizeof(real));
        memset(lora->adalora_unc, 0, lora->num_parameters * sizeof(real));
    }
    adalora_apply_mask(lora);
}

// the kept triplets of target t at layer l (its rank now)
template <typename real>
int adalora_rank(const LoRA<real>* lora, int t, int l) {
    LoRALayer<real> a = lora_layer(lora, t, l);
    int n = 0;
    for (int i = 0; i < a.r; i++) n += a.mask[i] != 0;
    return n;
}

// the kept triplets of every matrix together (the budget in force)
template <typename real>
int adalora_total_rank(const LoRA<real>* lora) {
    int n = 0;
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        for (int l = 0; l < lora->L && lora->lora_E[t] != NULL; l++) n += adalora_rank(lora, t, l);
    }
    return n;
}

// the ranks per layer as fixed-format log lines: "adalora ranks layer 3: qkv 7 attproj 5 fc 9 fcproj 8"
template <typename real>
std::string adalora_ranks_string(const LoRA<real>* lora) {
    std::string s;
    for (int l = 0; l < lora->L; l++) {
        s += "adalora ranks layer " + std::to_string(l) + ":";
        for (int t = 0; t < LORA_NUM_TARGETS; t++) {
            if (lora->lora_E[t] != NULL) s += std::string(" ") + lora_target_names[t] + " " + std::to_string(adalora_rank(lora, t, l));
        }
        s += "\n";
    }
    return s;
}

// W (L, out, in) of target t += sign * scale * lora_B diag(lora_E) lora_A per layer (PEFT's get_delta_weight)
template <typename real>
void adalora_merge(const LoRA<real>* lora, int t, real* W, int sign) {
    for (int l = 0; l < lora->L; l++) {
        LoRALayer<real> a = lora_layer(lora, t, l);
        std::vector<real> AE((size_t)a.r * a.C);
        adalora_fold_E(AE.data(), a.lora_A, a.lora_E, a.C, a.r);
        lora_merge(W + (size_t)l * a.OC * a.C, AE.data(), a.lora_B, (real)lora->config.scale, a.C, a.OC, a.r, sign);
    }
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
        LoRALayer<real> v = lora_layer(a, t, l);
        std::vector<real> h((size_t)T * v.r); // the bottleneck is not kept: no backward
        lora_forward_naive(out + (size_t)b * T * OC, h.data(), inp + (size_t)b * T * C, v.lora_A, v.lora_B,
                           (real)a->config.scale, T, C, OC, v.r);
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


// ---- the hooks: one adapted matmul's variant work, called by the model's gpt2_lora_forward / _backward.
// W0 (OC, C) and bias (OC) are the frozen matrix at that layer and its bias, as the model's matmul used
// them (dequantized with -Q): DoRA needs them, LoRA does not keep them.

// DoRA, AdaLoRA or a multi-adapter batch instead of the plain branch; false when target t at layer l is plain LoRA
template <typename real>
bool lora_variant_forward(LoRA<real>* lora, int t, int l, real* out, const real* inp, const real* W0, const real* bias, int BT) {
    if (lora->multi != NULL) { lora_multi_forward(lora, t, l, out, inp, BT); return true; }
    if (lora->lora_E[t] != NULL) { // AdaLoRA
        LoRALayer<real> a = lora_layer(lora, t, l, BT);
        adalora_forward(out, a.h, lora->adalora_AE, inp, a.lora_A, a.lora_E, a.lora_B, (real)lora->config.scale, BT, a.C, a.OC, a.r);
        return true;
    }
    if (lora->dora_m[t] == NULL) return false;
    LoRALayer<real> a = lora_layer(lora, t, l, BT);
    dora_forward(out, a.h, a.dora_z, a.dora_n, a.dora_P, inp, bias, W0, a.lora_A, a.lora_B, a.dora_m,
                 (real)lora->config.scale, BT, a.C, a.OC, a.r);
    return true;
}

template <typename real>
bool lora_variant_backward(LoRA<real>* lora, int t, int l, real* dinp, const real* dout, const real* inp, const real* W0, int BT) {
    if (lora->lora_E[t] != NULL) { // AdaLoRA
        LoRALayer<real> a = lora_layer(lora, t, l, BT);
        adalora_backward(dinp, a.dlora_A, a.dlora_E, a.dlora_B, lora->dh, lora->adalora_AE, lora->adalora_dAE, dout, a.h, inp,
                         a.lora_A, a.lora_E, a.lora_B, (real)lora->config.scale, BT, a.C, a.OC, a.r);
        return true;
    }
    if (lora->dora_m[t] == NULL) return false;
    LoRALayer<real> a = lora_layer(lora, t, l, BT);
    dora_backward(dinp, a.dlora_A, a.dlora_B, a.ddora_m, lora->dh, lora->dora_dz, dout, a.h, a.dora_z, a.dora_n, a.dora_P,
                  inp, W0, a.lora_A, a.lora_B, a.dora_m, (real)lora->config.scale, BT, a.C, a.OC, a.r);
    return true;
}

// -V: parses "lora" or a comma list of variants (rslora, dora, pissa), sets them in cfg and re-derives the scale;
// false + err on a bad name
static inline bool lora_parse_variants(const char* list, LoRAConfig* cfg, std::string* err) {
    static const char* const names[] = {"lora", "rslora", "dora", "pissa", "adalora"};
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
            *err = "unknown LoRA variant '" + name + "'; HINT: choose lora, adalora, or a comma list of rslora,dora,pissa";
            return false;
        }
        if (found == 1) cfg->use_rslora = true;
        if (found == 2) cfg->use_dora = true;
        if (found == 3) cfg->init_pissa = true;
        if (found == 4) cfg->use_adalora = true;
        start = end + 1;
    }
    if (cfg->use_adalora && (cfg->use_rslora || cfg->use_dora || cfg->init_pissa)) {
        // PEFT's AdaLoraConfig refuses DoRA; its scale ignores use_rslora; its init is its own (not PiSSA's)
        *err = "adalora cannot be combined with rslora, dora or pissa (PEFT's AdaLoRA has its own scale, alpha / init_r, and init)"
               "; HINT: use -V adalora alone";
        return false;
    }
    cfg->scale = lora_scale_of(*cfg);
    return true;
}

// the resolved variants, for the [LoRA] log block
static inline std::string lora_variants_string(const LoRAConfig& cfg) {
    std::string s = cfg.use_adalora ? "adalora" : cfg.use_rslora ? "rslora" : "lora";
    if (cfg.use_dora) s += ", dora";
    if (cfg.init_pissa) s += ", pissa init";
    if (cfg.use_adalora) {
        char buf[200];
        snprintf(buf, sizeof(buf), " (init_r %d, target_r %d, tinit %d, tfinal %d, deltaT %d, total_step %d, orth_reg %g)",
                 cfg.r, cfg.adalora_target_r, cfg.adalora_tinit, cfg.adalora_tfinal, cfg.adalora_deltaT, cfg.adalora_total_step,
                 cfg.adalora_orth_reg);
        s += buf;
    }
    if (cfg.base_quant != LORA_QUANT_FP32) s += std::string(", base ") + lora_quant_names[cfg.base_quant];
    if (cfg.lr_ratio_B != 1.0f) s += ", lora+ (lr_B = " + std::to_string(cfg.lr_ratio_B) + " * lr)";
    return s;
}
#endif // LORA_H
