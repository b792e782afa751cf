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

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

// ----------------------------------------------------------------------------
// random numbers: xorshift64*, seeded, the same stream on every platform

struct Rng { uint64_t state; };

static inline void rng_seed(Rng* rng, uint64_t seed) {
    // splitmix64 once, so that small seeds (0, 1, 2) still give well-mixed states
    uint64_t z = seed + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    rng->state = (z ^ (z >> 31)) | 1ull;
}
static inline uint32_t rng_u32(Rng* rng) {
    rng->state ^= rng->state >> 12;
    rng->state ^= rng->state << 25;
    rng->state ^= rng->state >> 27;
    return (uint32_t)((rng->state * 0x2545F4914F6CDD1Dull) >> 32);
}
// uniform in [0, 1), 24 bits of mantissa
static inline float rng_f32(Rng* rng) { return (rng_u32(rng) >> 8) / 16777216.0f; }
static inline float rng_uniform(Rng* rng, float lo, float hi) { return lo + (hi - lo) * rng_f32(rng); }
static inline float rng_normal(Rng* rng) {
    // Box-Muller; 1 - u keeps the log argument in (0, 1]
    float u1 = 1.0f - rng_f32(rng), u2 = rng_f32(rng);
    return sqrtf(-2.0f * logf(u1)) * cosf(6.283185307179586f * u2);
}

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

// inp (BT,C), lora_A (r,C), lora_B (OC,r) -> h (BT,r) cached; out (BT,OC) += scale * h @ lora_B^T
template <typename real>
void lora_forward(real* out, real* h, const real* inp, const real* lora_A, const real* lora_B,
                  real scale, int BT, int C, int OC, int r) {
    // parallel over rows of the batch: each thread owns rows h[bt,:] and out[bt,:]
    #pragma omp parallel for
    for (int bt = 0; bt < BT; bt++) {
        const real* inp_bt = inp + (size_t)bt * C;
        real* h_bt = h + (size_t)bt * r;
        // h = inp @ lora_A^T: the r-dimensional bottleneck
        for (int i = 0; i < r; i++) {
            const real* lora_A_row = lora_A + (size_t)i * C;
            real sum = 0;
            for (int c = 0; c < C; c++) { sum += inp_bt[c] * lora_A_row[c]; }
            h_bt[i] = sum;
        }
        // out += scale * h @ lora_B^T, skipped only in the sense that lora_B = 0 adds exact zeros
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
void lora_backward(real* dinp, real* dlora_A, real* dlora_B, real* dh,
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
};

// the number of adapter parameters: sum over enabled targets of L * r * (in + out)
static inline size_t lora_count_parameters(LoRAConfig cfg, int L, int C) {
    size_t n = 0;
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        if (cfg.targets & (1u << t)) {
            n += (size_t)L * cfg.r * (lora_target_in(t, C) + lora_target_out(t, C));
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
}

template <typename real>
size_t lora_activation_bytes(const LoRA<real>* lora) {
    size_t n = 0;
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        if (lora->h[t]) n += (size_t)lora->L * lora->act_BT * lora->config.r;
    }
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
    for (int t = 0; t < LORA_NUM_TARGETS; t++) { free(lora->h[t]); }
    free(lora->dh);
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
template <typename real>
void lora_merge_all(const LoRA<real>* lora, real* const base[LORA_NUM_TARGETS], int sign) {
    int r = lora->config.r;
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        if (lora->lora_A[t] == NULL) continue;
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

#endif // LORA_H
