// lib/fast.h: the float fast paths behind the naive kernels. The trainer's matmul_forward /
// matmul_backward and lora.h's lora_forward / lora_backward call these for float (the program) and
// their naive twins for double (the finite-difference tests); test_lora.cpp compares each pair.
//   dot_lanes, exp_fast            vectorizable dot product and exp (used by the naive kernels too)
//   bf16_widen                     bf16 bits -> fp32, exact (lib/bf16.h's storage; the GEMM widens it while packing)
//   matmul_gemm                    one BLIS-style blocked GEMM for every matmul of a step, its Bmat in fp32 or bf16
//   transpose16_32bit              a 16 x 16 transpose of 32-bit words (AVX-512: the GEMM's packing, lib/bf16.h)
//   transpose8_32bit               an 8 x 8 one (AVX without AVX-512: the GEMM's packing)
//   transpose8_bf16_widen          the same from bf16 bits, widened (AVX2: the bf16 weights' forward panels)
//   matmul_low_rank                Cmat += alpha * A @ Bmat for a small K (LoRA's rank r), row by row
//   matmul_forward_fast / _backward_fast, lora_forward_fast / _backward_fast
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <time.h>
#include <type_traits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "utils.h" // die
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h> // the shuffles of transpose16_32bit / transpose8_32bit
#endif

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

#ifdef __AVX512F__
// dst[p * dstride + j] = src[j * stride + p] for j, p < 16: a 16 x 16 transpose of 32-bit words in
// four rounds of shuffles (pairs of words, pairs of pairs, then 128-bit lanes twice)
static inline void transpose16_32bit(const uint32_t* src, size_t stride, uint32_t* dst, size_t dstride) {
    // (the masked forms with a full mask: the plain ones start from _mm512_undefined_epi32, which GCC 12's
    // -Wuninitialized reports at -O3)
    const __mmask16 all16 = 0xFFFF;
    const __mmask8 all8 = 0xFF;
    __m512i r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(src + (size_t)i * stride);
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_mask_unpacklo_epi32(r[i], all16, r[i], r[i + 1]);
        t[i + 1] = _mm512_mask_unpackhi_epi32(r[i], all16, r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_mask_unpacklo_epi64(t[i], all8, t[i], t[i + 2]);
        r[i + 1] = _mm512_mask_unpackhi_epi64(t[i], all8, t[i], t[i + 2]);
        r[i + 2] = _mm512_mask_unpacklo_epi64(t[i + 1], all8, t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_mask_unpackhi_epi64(t[i + 1], all8, t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 16; i += 8) {
        for (int j = 0; j < 4; j++) {
            t[i + j] = _mm512_mask_shuffle_i32x4(r[i + j], all16, r[i + j], r[i + j + 4], 0x88);
            t[i + j + 4] = _mm512_mask_shuffle_i32x4(r[i + j], all16, r[i + j], r[i + j + 4], 0xdd);
        }
    }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_mask_shuffle_i32x4(t[j], all16, t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_mask_shuffle_i32x4(t[j], all16, t[j], t[j + 8], 0xdd);
    }
    for (int i = 0; i < 16; i++) _mm512_storeu_si512(dst + (size_t)i * dstride, r[i]);
}

#elif defined(__AVX__)
// dst[p * dstride + j] = row j's element p for j, p < 8: an 8 x 8 transpose of the rows r[0..7] (used as
// scratch: overwritten) in three rounds of shuffles (pairs of words, pairs of pairs, then 128-bit halves)
static inline void transpose8_rows(__m256 r[8], float* dst, size_t dstride) {
    __m256 t[8];
    for (int i = 0; i < 8; i += 2) { // rows a, b -> a0 b0 a1 b1 | a4 b4 a5 b5 and a2 b2 a3 b3 | a6 b6 a7 b7
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) { // -> a0 b0 c0 d0 | a4 b4 c4 d4, and likewise for 1, 2, 3
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int j = 0; j < 4; j++) { // rows a-d of column j with rows e-h of it; column j + 4 from the high halves
        t[j] = _mm256_permute2f128_ps(r[j], r[j + 4], 0x20);
        t[j + 4] = _mm256_permute2f128_ps(r[j], r[j + 4], 0x31);
    }
    for (int i = 0; i < 8; i++) _mm256_storeu_ps(dst + (size_t)i * dstride, t[i]);
}
// dst[p * dstride + j] = src[j * stride + p] for j, p < 8, floats
static inline void transpose8_32bit(const float* src, size_t stride, float* dst, size_t dstride) {
    __m256 r[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(src + (size_t)i * stride);
    transpose8_rows(r, dst, dstride);
}
#ifdef __AVX2__
// the same from bf16 bits, each widened to fp32 exactly (bf16_widen: the bits become a float's top half)
static inline void transpose8_bf16_widen(const uint16_t* src, size_t stride, float* dst, size_t dstride) {
    __m256 r[8];
    for (int i = 0; i < 8; i++) {
        __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(src + (size_t)i * stride)));
        r[i] = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    }
    transpose8_rows(r, dst, dstride);
}
#endif

#endif

// bf16 -> fp32, exact: the bits become the top half of a float
static inline float bf16_widen(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, sizeof(x));
    return x;
}

// ---- the blocked GEMM ----
// One blocked GEMM serves forward, dinp, dweight and the LoRA branches (but their rank-r updates: matmul_low_rank):
//   Cmat (M,N) += alpha * A (M,K) @ Bmat (K,N), each operand given by strides, so that
//   forward  out  (BT,OC) += inp  (BT,C)    @ weight^T (C,OC)
//   dinp     dinp (BT,C)  += dout (BT,OC)   @ weight   (OC,C)
//   dweight  dw   (OC,C)  += dout^T (OC,BT) @ inp      (BT,C)
// Design (BLIS-like): the output is cut into MC x NC tiles, one OpenMP task each; a tile walks K in
// KC slices; the slice of Bmat is packed into NR-column panels (zero-padded past N), A is read in
// place (or packed into MR-row panels when its k steps are strided); a micro-kernel keeps an MR x NR
// block of the output in registers. It works on whole vectors across the NR output columns, so every
// output is still one sequential sum over k: no reassociation, no -ffast-math.
// The vectors are GCC/Clang vector types (vector_size) as wide as the CPU's widest: the compiler emits
// zmm, ymm or xmm arithmetic from the same source (its auto-vectorizer keeps to 256 bits on AMD tunings,
// half the FMA rate of Zen 5's 512-bit units). The register tile fills most of the vector registers:
#if defined(__AVX512F__)
static const int MATMUL_VEC = 16; // floats per vector (zmm)
static const int MATMUL_MR = 8;   // register tile rows: 8 x 3 = 24 of the 32 zmm registers hold the tile
static const int MATMUL_NR = 48;  // register tile columns: three vectors; 768, 2304, 3072 and 50304 are multiples
#elif defined(__AVX__)
static const int MATMUL_VEC = 8;  // ymm
static const int MATMUL_MR = 6;   // 6 x 2 = 12 of the 16 ymm registers
static const int MATMUL_NR = 16;
#else
static const int MATMUL_VEC = 4;  // xmm (SSE, NEON)
static const int MATMUL_MR = 6;   // 6 x 2 = 12 of 16 registers
static const int MATMUL_NR = 8;
#endif
typedef float matmul_vec __attribute__((vector_size(MATMUL_VEC * sizeof(float))));
// K slice. Each slice ends in a read and a write of every output block, and longer slices make fewer
// of them: on a 2-core Zen 1 (AVX2) forward and dinp ran 8-11% faster with 768 than with 256 (77 -> 84-86
// GFLOP/s, dev/bench_matmul.cpp), though the packed Bmat slice then outgrows L2 (its panels stream from
// there); the SSE build gained 1-5%. With AVX-512 it stays 256 (8 KB strips of A in L1), the slice of the
// Zen 5 numbers in README.md, until `make tune` (dev/tune_gemm.py) measures another there.
#if defined(MATMUL_KC_TRY) // (dev/tune_gemm.py builds variants with other slices; the product never sets it)
static const int MATMUL_KC = MATMUL_KC_TRY;
#elif defined(__AVX512F__)
static const int MATMUL_KC = 256;
#else
static const int MATMUL_KC = 768;
#endif
static const int MATMUL_MC = 264; // tile rows: covers BT = 256, so each weight slice is packed once
static const int MATMUL_NC = 192; // tile columns: the packed Bmat slice is KC*NC*4 = 192 KB (AVX-512), in L2
static const int MATMUL_NC_PACKED_A = 768; // tile columns when A is packed too (dweight): see matmul_gemm
static_assert(MATMUL_MC % MATMUL_MR == 0 && MATMUL_NC % MATMUL_NR == 0 && MATMUL_NR % MATMUL_VEC == 0,
              "tiles hold whole register blocks, register blocks whole vectors");

// Timing hook for dev/bench_step: seconds in, and FLOPs done by, the float matmuls since the last
// reset. The model calls them from one thread, so plain accumulation is safe.
struct MatmulStats { double seconds, flops; };
static MatmulStats matmul_stats = {0.0, 0.0};
static double matmul_clock() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// per-thread pack buffer (Bmat slice KC x the wider NC, then A slice MC x KC), allocated on the thread's first
// matmul and reused for the life of the process: no allocation per step
static float* matmul_pack_buffer() {
    static thread_local float* buf = NULL;
    if (buf == NULL) {
        size_t n = (size_t)MATMUL_KC * std::max(MATMUL_NC, MATMUL_NC_PACKED_A) + (size_t)MATMUL_MC * MATMUL_KC;
        buf = (float*)aligned_alloc(64, n * sizeof(float));
        if (buf == NULL) die("out of memory for the matmul pack buffer\n---> HINT: free some memory");
    }
    return buf;
}

// Cmat (m,n) += alpha * A (m,kc) @ Bp (kc,NR): one register block, m <= MR, n <= NR = NV vectors
// (MATMUL_NR / MATMUL_VEC of them, or one for a thin output such as LoRA's r columns).
// A(i,k) = A[i*rsa + k*csa]; Bp is a panel of NR columns, row k at Bp + k*ldb: packed (ldb = NR, zero
// past n, 64-byte aligned) or, for a whole panel, Bmat itself (ldb = its row stride).
// Rows past m re-read row m-1 and their sums are dropped, so one kernel serves every edge. Per k: NV
// vector loads of Bp and MR broadcasts of A feed MR*NV vector FMAs (a * b + acc: contracted into one
// FMA where the CPU has it, as GCC and Clang do by default); acc stays in registers for the whole slice.
template <int NV>
static inline void matmul_micro_kernel(int kc, const float* A, size_t rsa, size_t csa, const float* __restrict Bp, size_t ldb,
                                       float* Cmat, size_t ldc, int m, int n, float alpha) {
    const int MR = MATMUL_MR, VEC = MATMUL_VEC, NR = NV * VEC;
    const float* a_row[MR];
    for (int i = 0; i < MR; i++) { a_row[i] = A + (size_t)(i < m ? i : m - 1) * rsa; }
    // the block of Cmat this kernel adds into at its end, fetched now so that the slice hides the wait
    // (dweight's Cmat is a weight gradient of many MB, not in cache: the LM head's is 154 MB)
    for (int i = 0; i < m; i++) {
        for (int j = 0; j < n; j += 16) { __builtin_prefetch(Cmat + i * ldc + j, 1); }
    }
    matmul_vec acc[MR][NV];
    for (int i = 0; i < MR; i++) {
        for (int v = 0; v < NV; v++) { acc[i][v] = matmul_vec{}; }
    }
    for (int k = 0; k < kc; k++) {
        matmul_vec b[NV];
        for (int v = 0; v < NV; v++) { memcpy(&b[v], Bp + (size_t)k * ldb + v * VEC, sizeof(matmul_vec)); }
        #pragma GCC unroll 16
        for (int i = 0; i < MR; i++) {
            // broadcast (x - 0 is x for every x, -0 included, so the compiler folds it away; 0 + x is not)
            matmul_vec a_ik = a_row[i][(size_t)k * csa] - matmul_vec{};
            for (int v = 0; v < NV; v++) { acc[i][v] = a_ik * b[v] + acc[i][v]; }
        }
    }
    if (m == MR && n == NR) {
        for (int i = 0; i < MR; i++) {
            for (int v = 0; v < NV; v++) {
                matmul_vec c;
                memcpy(&c, Cmat + i * ldc + v * VEC, sizeof(c));
                c += alpha * acc[i][v];
                memcpy(Cmat + i * ldc + v * VEC, &c, sizeof(c));
            }
        }
    } else {
        for (int i = 0; i < m; i++) { // (lanes by subscript: taking acc's address would keep it in memory throughout)
            for (int j = 0; j < n; j++) { Cmat[i * ldc + j] += alpha * acc[i][j / VEC][j % VEC]; }
        }
    }
}

// one element of Bmat as the packed panels hold it: fp32 as it is, bf16 widened
static inline float matmul_b_value(float x) { return x; }
static inline float matmul_b_value(uint16_t h) { return bf16_widen(h); }

// Cmat (M,N) += alpha * A (M,K) @ Bmat (K,N); A(i,k) = A[i*rsa + k*csa], Bmat(k,j) = Bmat[k*rsb + j*csb];
// Cmat row-major with row stride ldc, must not alias A or Bmat. Bmat is fp32 (Belem = float) or bf16
// bits (Belem = uint16_t: -Q bf16's frozen weights on a CPU without bf16 dot products, lib/bf16.h),
// widened to fp32 while its panels are packed, so the arithmetic is the same fp32 GEMM either way.
template <typename Belem>
static void matmul_gemm(int M, int N, int K, float alpha, const float* A, size_t rsa, size_t csa,
                        const Belem* Bmat, size_t rsb, size_t csb, float* Cmat, size_t ldc) {
    constexpr bool fp32_b = std::is_same<Belem, float>::value;
    const int MR = MATMUL_MR, KC = MATMUL_KC;
    // a thin output (LoRA's h, dh, and dlora_B where r pads less as columns: N = r) gets panels of one vector, not NR/VEC of
    // them, so that r = 8 does not pay for 48 columns
    const bool thin = N <= MATMUL_VEC;
    const int NR = thin ? MATMUL_VEC : MATMUL_NR;
    // a few rows of output (LoRA's dlora_A and dlora_B^T: M = r) use each panel of Bmat once or twice, so
    // packing it would cost as much as the arithmetic: whole panels with contiguous rows are read in place
    const bool b_in_place = fp32_b && csb == 1 && M <= 2 * MR;
    // wider tiles when A is packed too (dweight): its packing is shared by more columns, and the output's
    // rows are written in longer runs (the LM head's weight gradient, 154 MB, streams through memory)
    int NC = csa != 1 ? MATMUL_NC_PACKED_A : MATMUL_NC, MC = MATMUL_MC;
    // fewer tiles than threads (LoRA's thin matmuls: N = r, or M = r): cut the longer side into one
    // tile per thread, in whole register blocks, so that every thread has a share
    int threads = 1;
#ifdef _OPENMP
    // (called from inside a parallel region, as attention's per-head products are, it runs on this thread alone)
    threads = omp_in_parallel() ? 1 : omp_get_max_threads();
#endif
    int tiles_m = (M + MC - 1) / MC, tiles_n = (N + NC - 1) / NC;
    if (tiles_m * tiles_n < threads) {
        if (N > M) NC = std::max(NR, (N / threads + NR - 1) / NR * NR);
        else MC = std::max(MR, (M / threads + MR - 1) / MR * MR);
    } else if (tiles_m * tiles_n % threads != 0 && tiles_m * tiles_n < 8 * threads) {
        // a few tiles that do not divide among the threads (qkv's weight gradient: 9 on 2 threads) leave
        // one thread idle at the end: cut the rows finer, so that the count is a multiple of the threads
        int tm = ((tiles_m * tiles_n + threads - 1) / threads * threads + tiles_n - 1) / tiles_n;
        MC = std::max(MR, ((M + tm - 1) / tm + MR - 1) / MR * MR);
    }
    tiles_m = (M + MC - 1) / MC, tiles_n = (N + NC - 1) / NC;
    // parallel over output tiles: each task writes only its own MC x NC block of Cmat and packs into
    // its own thread's buffer, so there are no races and no atomics inside the loop.
    // When all of K is one slice (dweight: K = BT), a thread that takes a second tile of the same
    // columns in this call still holds their packed Bmat slice, and does not pack it again (the tiles
    // go down the rows first, so with 2 threads the LM head's 191 row tiles pack their slice twice, not 191 times)
    static std::atomic<uint64_t> gemm_calls{0};
    const uint64_t call = ++gemm_calls;
    #pragma omp parallel for schedule(dynamic, 1)
    for (int t = 0; t < tiles_m * tiles_n; t++) {
        int i0 = (t % tiles_m) * MC, j0 = (t / tiles_m) * NC;
        int mc = std::min(MC, M - i0), nc = std::min(NC, N - j0);
        int npanels = (nc + NR - 1) / NR;
        float* Bp = matmul_pack_buffer();
        float* Ap = Bp + (size_t)KC * std::max(MATMUL_NC, MATMUL_NC_PACKED_A);
        static thread_local uint64_t packed_call = 0; // which call and columns this thread's Bp holds
        static thread_local int packed_j0 = -1;
        bool packed = K <= KC && packed_call == call && packed_j0 == j0;
        packed_call = K <= KC ? call : 0; // (with K in several slices, Bp ends up holding only the last)
        packed_j0 = j0;
        for (int k0 = 0; k0 < K; k0 += KC) {
            int kc = std::min(KC, K - k0);
            // pack the Bmat slice: panel p holds columns j0 + p*NR.., laid out [k][j], zero past N
            for (int p = 0; p < npanels && !packed; p++) {
                float* dst = Bp + (size_t)p * NR * kc;
                int ncols = std::min(NR, nc - p * NR);
                if (b_in_place && ncols == NR) continue;
                const Belem* src = Bmat + (size_t)k0 * rsb + (size_t)(j0 + p * NR) * csb;
                if (csb == 1) { // the panel's rows are contiguous (dinp, dweight): copies of NR floats
                    for (int k = 0; k < kc; k++) {
                        const Belem* src_k = src + (size_t)k * rsb;
                        float* dst_k = dst + (size_t)k * NR;
                        if constexpr (fp32_b) {
                            // (constant sizes, so the copies are inlined: a libc call per row of 16 or 48 floats cost more)
                            if (ncols == NR && NR == MATMUL_NR) { memcpy(dst_k, src_k, MATMUL_NR * sizeof(float)); continue; }
                            if (ncols == NR && NR == MATMUL_VEC) { memcpy(dst_k, src_k, MATMUL_VEC * sizeof(float)); continue; }
                        } else {
                            if (ncols == NR && NR == MATMUL_NR) { // (a constant count, so the widening vectorizes)
                                for (int j = 0; j < MATMUL_NR; j++) { dst_k[j] = matmul_b_value(src_k[j]); }
                                continue;
                            }
                        }
                        for (int j = 0; j < NR; j++) { dst_k[j] = j < ncols ? matmul_b_value(src_k[j]) : 0.0f; }
                    }
                } else {        // its columns are (forward: rows of weight), so read along k: a transpose
                    int k_done = 0;
#ifdef __AVX512F__
                    // a whole panel, by 16 x 16 transposes (16 of the weight's rows, 16 k of each)
                    if (fp32_b && rsb == 1 && ncols == NR) {
                        for (; k_done + 16 <= kc; k_done += 16) {
                            for (int g = 0; g < NR / 16; g++) {
                                transpose16_32bit((const uint32_t*)(src + (size_t)(16 * g) * csb + k_done), csb,
                                                  (uint32_t*)(dst + (size_t)k_done * NR + 16 * g), (size_t)NR);
                            }
                        }
                    }
#elif defined(__AVX__)
                    // a whole panel, by 8 x 8 transposes (bf16 widened as it goes, where AVX2 has the integer widening)
#ifdef __AVX2__
                    const bool by_transposes = true;
#else
                    const bool by_transposes = fp32_b;
#endif
                    if (by_transposes && rsb == 1 && ncols == NR) {
                        for (; k_done + 8 <= kc; k_done += 8) {
                            for (int g = 0; g < NR / 8; g++) {
                                if constexpr (fp32_b) {
                                    transpose8_32bit(src + (size_t)(8 * g) * csb + k_done, csb, dst + (size_t)k_done * NR + 8 * g, (size_t)NR);
                                } else {
#ifdef __AVX2__
                                    transpose8_bf16_widen(src + (size_t)(8 * g) * csb + k_done, csb, dst + (size_t)k_done * NR + 8 * g, (size_t)NR);
#endif
                                }
                            }
                        }
                    }
#endif
                    for (int j = 0; j < NR; j++) {
                        for (int k = k_done; k < kc; k++) { dst[(size_t)k * NR + j] = j < ncols ? matmul_b_value(src[(size_t)j * csb + (size_t)k * rsb]) : 0.0f; }
                    }
                }
            }
            // A is read in place when its rows run along k (forward, dinp). When its k steps are
            // strided (dweight: A = dout^T, a step of OC floats, a new page each), the slice is packed
            // into MR-row panels laid out [k][i], which the kernel reads with rsa = 1, csa = MR.
            const float* A_blk = A + (size_t)i0 * rsa + (size_t)k0 * csa;
            size_t rs = rsa, cs = csa, strip = (size_t)MR * rsa;
            if (csa != 1 && !thin) {
                for (int p = 0; p * MR < mc; p++) {
                    if (rsa == 1 && (p + 1) * MR <= mc) { // a whole strip: MR adjacent floats per k
                        for (int k = 0; k < kc; k++) { memcpy(Ap + (size_t)p * MR * kc + (size_t)k * MR, A_blk + (size_t)p * MR + (size_t)k * csa, MR * sizeof(float)); }
                        continue;
                    }
                    for (int k = 0; k < kc; k++) {
                        for (int i = 0; i < MR; i++) { // rows past mc repeat row mc-1; dropped later
                            int row = std::min(p * MR + i, mc - 1);
                            Ap[(size_t)p * MR * kc + (size_t)k * MR + i] = A_blk[(size_t)row * rsa + (size_t)k * csa];
                        }
                    }
                }
                A_blk = Ap; rs = 1; cs = MR; strip = (size_t)MR * kc;
            }
            // register blocks: an MR-row strip of A against a panel of Bmat, in one of two orders
            auto block = [&](int i, int p) {
                const float* a_strip = A_blk + (size_t)(i / MR) * strip;
                float* c_blk = Cmat + (size_t)(i0 + i) * ldc + (j0 + p * NR);
                int m = std::min(MR, mc - i), n = std::min(NR, nc - p * NR);
                const float* b_panel = Bp + (size_t)p * NR * kc;
                size_t ldb = NR;
                if constexpr (fp32_b) {
                    if (b_in_place && n == NR) { b_panel = Bmat + (size_t)k0 * rsb + (j0 + p * NR); ldb = rsb; }
                }
                if (thin) matmul_micro_kernel<1>(kc, a_strip, rs, cs, b_panel, ldb, c_blk, ldc, m, n, alpha);
                else matmul_micro_kernel<MATMUL_NR / MATMUL_VEC>(kc, a_strip, rs, cs, b_panel, ldb, c_blk, ldc, m, n, alpha);
            };
            // Without AVX-512, when A is packed (dweight): each panel of Bmat (L1) against every strip of the
            // packed A block (MC x kc, 270 KB at BT = 256: L2), as BLIS does. The tile's Bmat slice, 768 columns,
            // is larger than Zen 1's L2, and this order took fcproj's dweight there from 81-84 to 86-87 GFLOP/s.
            // Otherwise each strip of A (L1) against every packed panel of Bmat (L2): A read in place (forward,
            // dinp) is then read once, and with AVX-512 (Zen 5: a 1 MB L2 holds the slice, and a 48-column
            // panel is as large as L1) this is the order its numbers were measured with.
#if defined(__AVX512F__)
            const bool panels_outer = false;
#else
            const bool panels_outer = A_blk == Ap;
#endif
            if (panels_outer) {
                for (int p = 0; p < npanels; p++) {
                    for (int i = 0; i < mc; i += MR) block(i, p);
                }
            } else {
                for (int i = 0; i < mc; i += MR) {
                    for (int p = 0; p < npanels; p++) block(i, p);
                }
            }
        }
    }
}

// Cmat (M,N) += alpha * A (M,K) @ Bmat (K,N), all row-major and contiguous, for a small K (LoRA's
// out += scale * h @ lora_B^T and dinp += dh @ lora_A: K = r). The GEMM above would spend most of its
// time on Cmat: K steps of arithmetic per register block, against a read and a write of the block, six or
// eight rows apart. Here each row of Cmat is formed in a row buffer (K passes over Bmat's rows, which
// stay in cache) and then added into Cmat in one sequential pass, which the hardware prefetches. Each
// output is the same sum over k in order as in matmul_gemm, then alpha times it added to Cmat.
static void matmul_low_rank(int M, int N, int K, float alpha, const float* A, const float* Bmat, float* Cmat) {
    const int NB = 1024; // columns per row buffer (4 KB, in L1), and per pass over Bmat (K x NB floats)
    // parallel over rows: each thread writes only its own rows of Cmat
    #pragma omp parallel for
    for (int i = 0; i < M; i++) {
        float acc[NB];
        const float* a = A + (size_t)i * K;
        float* c = Cmat + (size_t)i * N;
        for (int j0 = 0; j0 < N; j0 += NB) {
            int nb = std::min(NB, N - j0);
            for (int j = 0; j < nb; j++) { acc[j] = 0.0f; }
            int k = 0;
            for (; k + 4 <= K; k += 4) { // four k per pass over acc (each acc[j] still takes them in order)
                const float* b = Bmat + (size_t)k * N + j0;
                float a0 = a[k], a1 = a[k + 1], a2 = a[k + 2], a3 = a[k + 3];
                for (int j = 0; j < nb; j++) {
                    float s = acc[j];
                    s += a0 * b[j];
                    s += a1 * b[N + j];
                    s += a2 * b[2 * (size_t)N + j];
                    s += a3 * b[3 * (size_t)N + j];
                    acc[j] = s;
                }
            }
            for (; k < K; k++) {
                float a_ik = a[k];
                const float* b = Bmat + (size_t)k * N + j0;
                for (int j = 0; j < nb; j++) { acc[j] += a_ik * b[j]; }
            }
            for (int j = 0; j < nb; j++) { c[j0 + j] += alpha * acc[j]; }
        }
    }
}

// inp (B,T,C), weight (OC,C), bias (OC) or NULL -> out (B,T,OC); the fast twin of matmul_forward_naive
void matmul_forward_fast(float* out, const float* inp, const float* weight, const float* bias, int B, int T, int C, int OC) {
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
void matmul_backward_fast(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
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

// The LoRA branch as two thin GEMMs, never forming lora_B @ lora_A: the fast twins of lora.h's
// lora_forward_naive / lora_backward_naive (lora.h's lora_forward / lora_backward pick one by type).
// inp (BT,C), lora_A (r,C), lora_B (OC,r) -> h (BT,r) cached; out (BT,OC) += scale * h @ lora_B^T
void lora_forward_fast(float* out, float* h, const float* inp, const float* lora_A, const float* lora_B,
                       float scale, int BT, int C, int OC, int r) {
    // h = inp @ lora_A^T: Bmat(c,i) = lora_A[i*C + c]
    memset(h, 0, (size_t)BT * r * sizeof(float));
    matmul_gemm(BT, r, C, 1.0f, inp, C, 1, lora_A, 1, C, h, r);
    // out += scale * h @ lora_B^T: a rank-r update of out, with lora_B^T (r,OC) written out first
    static std::vector<float> lora_B_t; // (scratch: the model calls its matmuls from one thread)
    lora_B_t.resize((size_t)r * OC);
    for (int o = 0; o < OC; o++) {
        for (int i = 0; i < r; i++) { lora_B_t[(size_t)i * OC + o] = lora_B[(size_t)o * r + i]; }
    }
    matmul_low_rank(BT, OC, r, scale, h, lora_B_t.data(), out);
}

// dout (BT,OC), h (BT,r), inp (BT,C), lora_A (r,C), lora_B (OC,r)
//   -> dlora_B (OC,r) +=, dlora_A (r,C) +=, dinp (BT,C) += (dinp may be NULL); dh (BT,r) is scratch
void lora_backward_fast(float* dinp, float* dlora_A, float* dlora_B, float* dh, const float* dout, const float* h,
                        const float* inp, const float* lora_A, const float* lora_B, float scale, int BT, int C, int OC, int r) {
    // forward was: out += scale * h @ lora_B^T with h = inp @ lora_A^T; so now:
    // dlora_B (OC,r) += scale * dout^T @ h. As written, r is the output's width: panels of whole vectors,
    // and A = dout^T strided (a cache line per element of a column). Its transpose dlora_B^T (r,OC) =
    // scale * h^T @ dout makes r the height, in MR-row strips, with dout's rows read in place as Bmat.
    // Whichever pads r less does the work (AVX-512, r = 8: the transpose, one 8-row strip against 16-wide
    // vectors; AVX2: 8-wide vectors against 6-row strips); the transpose goes through a scratch.
    const int r_as_rows = (r + MATMUL_MR - 1) / MATMUL_MR * MATMUL_MR, r_as_cols = (r + MATMUL_VEC - 1) / MATMUL_VEC * MATMUL_VEC;
    if (r_as_rows <= r_as_cols) {
        static std::vector<float> dlora_B_t; // (scratch: the model calls its matmuls from one thread)
        dlora_B_t.assign((size_t)r * OC, 0.0f);
        matmul_gemm(r, OC, BT, scale, h, 1, r, dout, OC, 1, dlora_B_t.data(), OC);
        for (int o = 0; o < OC; o++) {
            for (int i = 0; i < r; i++) { dlora_B[(size_t)o * r + i] += dlora_B_t[(size_t)i * OC + o]; }
        }
    } else {
        matmul_gemm(OC, r, BT, scale, dout, 1, OC, h, r, 1, dlora_B, r);
    }
    // dh (BT,r) = scale * dout @ lora_B
    memset(dh, 0, (size_t)BT * r * sizeof(float));
    matmul_gemm(BT, r, OC, scale, dout, OC, 1, lora_B, r, 1, dh, r);
    // dlora_A (r,C) += dh^T @ inp, with A(i,bt) = dh[bt*r + i]
    matmul_gemm(r, C, BT, 1.0f, dh, 1, r, inp, C, 1, dlora_A, C);
    // dinp (BT,C) += dh @ lora_A, a rank-r update
    if (dinp != NULL) matmul_low_rank(BT, C, r, 1.0f, dh, lora_A, dinp);
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
