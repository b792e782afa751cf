// lib/rng.h: random numbers: xorshift64* seeded through splitmix64, the same stream on every platform
// (lora_A's init, shuffling, sampling, the tests' random tensors).
#pragma once

#include <cmath>
#include <cstdint>

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
