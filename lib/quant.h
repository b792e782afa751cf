// lib/quant.h: block-wise quantization of frozen weights, QLoRA-style (Dettmers et al. 2023): int8, NF4
// and int2 codes with one fp32 absmax per block of LORA_QUANT_BLOCK weights, and bf16 (16 bits, no
// absmax: the "LoRA 16-bit" base of the LoRA literature), quantize_forward / dequantize_forward, and -Q's names. The model stores its block matrices this way with -Q (see
// gpt2_quantize_layer in the trainer); lora.h keeps only the adapter's record of it (LoRAConfig.base_quant).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include "bf16.h" // bf16_round, bf16_widen: -Q bf16's storage (and its matmuls, which the trainer calls)

// The base's adapted matrices are stored in blocks of LORA_QUANT_BLOCK consecutive weights (row-major
// (out, in), flattened), each block with its own fp32 absmax:
//   int8: q = round(127 x / absmax) in [-127, 127], x ~ q absmax / 127; error <= absmax / 254 per weight
//   nf4:  q = the index of the NF4 level nearest to x / absmax, two per byte, x ~ level[q] absmax;
//         error <= absmax * (largest gap between neighbouring levels) / 2 = 0.1385 absmax per weight
//   int2: q = the index of the nearest of the 4 uniform levels -1, -1/3, 1/3, 1 (no zero), four per
//         byte, x ~ level[q] absmax; error <= absmax / 3 per weight. The 2-bit row of the memory tables
//         in the LoRA literature (QLoRA itself stops at 4 bits)
//   bf16: the top 16 bits of the fp32 weight, rounded to nearest even (lib/bf16.h), two bytes a weight and
//         no absmax; relative error <= 2^-9 per weight. Unlike the codes above, the matmuls read it
//         directly (lib/bf16.h: bf16 dot products with AVX512_BF16, else widened while packing), so no
//         layer is dequantized for them; only DoRA, merging and -M's checkpoint widen it to fp32.
// (QLoRA also quantizes the absmax values themselves, "double quantization"; here they stay fp32.)
// LoRA trains on top in fp32. A matrix is dequantized whole, one layer at a time, into one (out, in) scratch just
// before its matmul (forward and the dinp backward; the frozen base has no weight gradient), so the
// fp32 matmul and its fast path run unchanged on the dequantized weights.
enum LoRAQuant { LORA_QUANT_FP32, LORA_QUANT_INT8, LORA_QUANT_NF4, LORA_QUANT_INT2, LORA_QUANT_BF16, LORA_NUM_QUANTS };
static const char* const lora_quant_names[LORA_NUM_QUANTS] = {"fp32", "int8", "nf4", "int2", "bf16"};
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
// bytes of codes for n weights (absmax adds 4 bytes per block); bf16: 2 bytes a weight
static inline size_t lora_quant_code_bytes(int quant, size_t n) {
    if (quant == LORA_QUANT_BF16) return 2 * n;
    size_t k = (size_t)lora_quant_per_byte(quant);
    return (n + k - 1) / k;
}
static inline size_t lora_quant_blocks(size_t n) { return (n + LORA_QUANT_BLOCK - 1) / LORA_QUANT_BLOCK; }
// the absmax values stored for n weights: one per block, none for bf16
static inline size_t lora_quant_absmax_count(int quant, size_t n) { return quant == LORA_QUANT_BF16 ? 0 : lora_quant_blocks(n); }

// the index of the level nearest to x (the first of two equally near)
static inline int nearest_level(float x, const float* levels, int nlevels) {
    int best = 0;
    for (int k = 1; k < nlevels; k++) {
        if (std::fabs(x - levels[k]) < std::fabs(x - levels[best])) best = k;
    }
    return best;
}

// W (n) -> q (lora_quant_code_bytes), absmax (lora_quant_absmax_count)
template <typename real>
void quantize_forward(uint8_t* q, float* absmax, const real* W, size_t n, int quant) {
    if (quant == LORA_QUANT_BF16) { // (a double weight is rounded to fp32 first)
        #pragma omp parallel for
        for (size_t i = 0; i < n; i++) {
            uint16_t h = bf16_round((float)W[i]);
            memcpy(q + 2 * i, &h, sizeof(h));
        }
        return;
    }
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
    if (quant == LORA_QUANT_BF16) {
        #pragma omp parallel for
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, q + 2 * i, sizeof(h));
            W[i] = (real)bf16_widen(h);
        }
        return;
    }
    // parallel over weights: each thread writes its own W[i]
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) {
        float amax = absmax[i / LORA_QUANT_BLOCK];
        if (quant == LORA_QUANT_INT8) W[i] = (real)((float)(int8_t)q[i] * (amax / 127.0f));
        else if (quant == LORA_QUANT_NF4) W[i] = (real)(nf4_levels[(q[i / 2] >> (4 * (i % 2))) & 15] * amax);
        else W[i] = (real)(int2_levels[(q[i / 4] >> (2 * (i % 4))) & 3] * amax);
    }
}

// -Q: "fp32", "int8", "nf4", "int2" or "bf16" -> *quant (a LoRAQuant); false + err on a bad name
static inline bool lora_parse_quant(const char* name, int* quant, std::string* err) {
    for (int k = 0; k < LORA_NUM_QUANTS; k++) {
        if (strcmp(name, lora_quant_names[k]) == 0) { *quant = k; return true; }
    }
    *err = std::string("unknown base quantization '") + name + "'; HINT: choose fp32, int8, nf4, int2 or bf16";
    return false;
}
