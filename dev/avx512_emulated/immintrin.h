// dev/avx512_emulated/immintrin.h: stands in for the compiler's <immintrin.h> in `make test-isa`'s
// builds of the AVX-512 paths on a CPU without AVX-512 (dev/isa.mk puts this folder first on the include
// path and defines __AVX512F__, and __AVX512BF16__ for the bf16 path). The intrinsics of lib/fast.h and
// lib/bf16.h then come from SIMDe (Debian libsimde-dev), which implements each one in portable C: slow,
// but the same source, so the tests check the AVX-512 code on any machine. Its results are the
// instructions' own, but for _mm512_dpbf16_ps: SIMDe adds the two products one at a time and does not
// flush denormals, which the tests' bounds for the bf16 matmuls cover. Never part of the product.
#pragma once

#define SIMDE_ENABLE_NATIVE_ALIASES // _mm512_add_ps and friends name SIMDe's versions
#define SIMDE_NO_NATIVE             // portable code only: nothing from the real <immintrin.h>
#include <simde/x86/avx512.h>

// What SIMDe 0.7.4 (Debian 12) implements but gives no native name to, named here. A newer SIMDe that
// names one itself does so with a macro (skipped here) or the same typedef (which C++ lets us repeat).
#ifndef __mmask16
typedef simde__mmask16 __mmask16;
#endif
#ifndef __mmask8
typedef simde__mmask8 __mmask8;
#endif
#ifndef _mm512_mask_shuffle_i32x4
#define _mm512_mask_shuffle_i32x4(src, k, a, b, imm) simde_mm512_mask_shuffle_i32x4(src, k, a, b, imm)
#endif
// the masked load and store: a lane whose mask bit is 0 is neither read nor written (the instructions
// do not fault on those lanes, and the callers rely on it at the end of a row)
#ifndef _mm512_maskz_loadu_ps
static inline simde__m512 _mm512_maskz_loadu_ps(__mmask16 k, const void* p) {
    float lanes[16];
    for (int i = 0; i < 16; i++) { lanes[i] = (k >> i) & 1 ? ((const float*)p)[i] : 0.0f; }
    return simde_mm512_loadu_ps(lanes);
}
#endif
#ifndef _mm512_mask_storeu_ps
static inline void _mm512_mask_storeu_ps(void* p, __mmask16 k, simde__m512 v) {
    float lanes[16];
    simde_mm512_storeu_ps(lanes, v);
    for (int i = 0; i < 16; i++) {
        if ((k >> i) & 1) ((float*)p)[i] = lanes[i];
    }
}
#endif
