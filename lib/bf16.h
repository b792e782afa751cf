// lib/bf16.h: the frozen base in bf16 (-Q bf16) and its matmuls.
//   bf16_round, bf16_widen           fp32 <-> bf16 (round to nearest even; NaN stays NaN; bf16_widen is in lib/fast.h)
//   matmul_bf16_forward_naive / _fast     out  (BT,OC) = inp (BT,C) @ W^T + bias, W (OC,C) in bf16
//   matmul_bf16_backward_naive / _fast    dinp (BT,C) += dout (BT,OC) @ W
//   matmul_bf16_path                      which of the two fast paths this build runs (for the log)
// Two fast paths behind one interface, chosen when compiling:
//   BF16_DOT (the CPU has AVX512_BF16, -march=native sets __AVX512BF16__): the activations are rounded
//     to bf16 while they are packed, and vdpbf16ps multiplies pairs of bf16 and accumulates in fp32
//     (two products per fp32 lane, twice the fp32 FMA rate). The forward reads the weight where it lies
//     (gemm_bf16_dot_rows: no packing and no copy of W); dinp packs pairs of W's rows per tile (gemm_bf16_dot);
//   otherwise: lib/fast.h's fp32 GEMM, which widens the bf16 weights to fp32 as it packs its panels
//     (the memory saving, at fp32 speed; the activations stay fp32).
// The naive twins round exactly as the fast path of the build does, so a test compares them. (One
// difference they do not model: vdpbf16ps reads bf16 denormals, below 1.2e-38, as zero.)
// Like lib/fast.h's, these matmuls are called from one thread (the model's) and parallelize inside.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef __AVX512BF16__
#include <immintrin.h> // _mm512_dpbf16_ps and friends
#define BF16_DOT 1
#else
#define BF16_DOT 0
#endif
#include "fast.h" // bf16_widen, matmul_gemm (the widened path), matmul_stats, matmul_clock, transpose16_32bit

// fp32 -> bf16, the top 16 bits, rounded to nearest even: add 0x7FFF plus the lowest kept bit, then
// truncate. Denormals round the same way (no flushing); a carry out of the largest finite values gives
// inf, as rounding should; inf stays inf; a NaN is kept a (quiet) NaN with its sign, since the rounding
// add could otherwise carry its payload into inf.
// (Written without a branch, so that loops of it vectorize.)
static inline uint16_t bf16_round(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof(u));
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    uint32_t quiet_nan = (u >> 16) | 0x0040u; // NaN: keep the top bits, set the quiet bit
    return (uint16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded);
}

// an activation as the bf16 matmul of this build sees it: rounded to bf16 with dot products, as is otherwise
static inline float bf16_activation(float x) { return BF16_DOT ? bf16_widen(bf16_round(x)) : x; }

static const char* matmul_bf16_path() {
    return BF16_DOT ? "bf16 dot products (AVX512_BF16 vdpbf16ps), fp32 accumulation"
                    : "bf16 weights widened to fp32 while packing, fp32 GEMM (this build has no AVX512_BF16)";
}

// ---- the naive twins: one sequential fp32 sum per output over bf16 operands

// inp (B,T,C), weight (OC,C) bf16, bias (OC) or NULL -> out (B,T,OC)
static void matmul_bf16_forward_naive(float* out, const float* inp, const uint16_t* weight, const float* bias, int B, int T, int C, int OC) {
    int BT = B * T;
    // parallel over rows: each thread writes its own rows of out
    #pragma omp parallel for
    for (int bt = 0; bt < BT; bt++) {
        for (int o = 0; o < OC; o++) {
            float s = 0.0f;
            for (int c = 0; c < C; c++) { s += bf16_activation(inp[(size_t)bt * C + c]) * bf16_widen(weight[(size_t)o * C + c]); }
            out[(size_t)bt * OC + o] = (bias != NULL ? bias[o] : 0.0f) + s;
        }
    }
}

// dout (B,T,OC), weight (OC,C) bf16 -> dinp (B,T,C) +=
static void matmul_bf16_backward_naive(float* dinp, const float* dout, const uint16_t* weight, int B, int T, int C, int OC) {
    int BT = B * T;
    #pragma omp parallel for
    for (int bt = 0; bt < BT; bt++) {
        for (int c = 0; c < C; c++) {
            float s = 0.0f;
            for (int o = 0; o < OC; o++) { s += bf16_activation(dout[(size_t)bt * OC + o]) * bf16_widen(weight[(size_t)o * C + c]); }
            dinp[(size_t)bt * C + c] += s;
        }
    }
}

// ---- the fast path with AVX512_BF16
// Cmat (M,N) += A (M,K) @ Bmat (K,N), A fp32 row-major with row stride lda, Bmat(k,j) = W[k*rsb + j*csb]
// in bf16. Like matmul_gemm (lib/fast.h), BLIS-style, but both operands are packed as bf16 pairs along k,
// since vdpbf16ps multiplies the pair (a_2p, a_2p+1) by (b_2p, b_2p+1) and adds both products to one
// fp32 lane. A (M x K, in chunks of KCHUNK) is rounded and packed once, shared by all threads; then each
// output tile (a group of M's rows x NC columns) walks K in KC slices, packs its Bmat slice and runs the
// micro-kernel on it: an MR x NR block of the output in 24 of the 32 zmm registers.
#if BF16_DOT
static const int BF16_MR = 8;   // register tile rows
static const int BF16_NR = 48;  // register tile columns: three 16-float vectors; 768, 2304, 3072 and 50304 are multiples
#if defined(BF16_KC_TRY) // (dev/tune_gemm.py builds variants with other slices, even; the product never sets it)
static const int BF16_KC = BF16_KC_TRY;
#else
static const int BF16_KC = 256; // K slice (128 pairs): one packed Bmat panel is 128*48*4 = 24 KB, stays in L1
#endif
static_assert(BF16_KC > 0 && BF16_KC % 2 == 0, "a K slice holds whole bf16 pairs");
static const int BF16_NC = 192; // tile columns: the packed Bmat slice is 96 KB, in L2
static const int BF16_KCHUNK = 4096; // K is packed in chunks of this: all of every block matmul's K at once;
                                     // the LM head's backward (K = Vp) in 13 chunks, 2 MB of packed A each

// the packed A slice, shared by the threads, grown as needed and kept for the life of the process
static uint32_t* bf16_pack_a(size_t n) {
    static uint32_t* buf = NULL;
    static size_t cap = 0;
    if (n > cap) {
        free(buf);
        buf = (uint32_t*)aligned_alloc(64, (n * sizeof(uint32_t) + 63) / 64 * 64);
        if (buf == NULL) die("out of memory for the bf16 matmul's pack buffer\n---> HINT: free some memory");
        cap = n;
    }
    return buf;
}
// per-thread packed Bmat slice
static uint32_t* bf16_pack_b() {
    static thread_local uint32_t* buf = NULL;
    if (buf == NULL) {
        buf = (uint32_t*)aligned_alloc(64, (size_t)(BF16_KC / 2) * BF16_NC * sizeof(uint32_t));
        if (buf == NULL) die("out of memory for the bf16 matmul's pack buffer\n---> HINT: free some memory");
    }
    return buf;
}

// Cmat (m,n) += Ap (MR rows of bf16, row stride lda, kp pairs each) @ Bp (kp pairs, NR columns); m <= MR, n <= NR
static inline void bf16_micro_kernel(int kp, const uint16_t* Ap, size_t lda, const uint32_t* Bp, float* Cmat, size_t ldc, int m, int n) {
    __m512 acc[BF16_MR][3];
    for (int i = 0; i < BF16_MR; i++) { acc[i][0] = acc[i][1] = acc[i][2] = _mm512_setzero_ps(); }
    for (int p = 0; p < kp; p++) {
        __m512bh b0 = (__m512bh)_mm512_load_si512(Bp + (size_t)p * BF16_NR);
        __m512bh b1 = (__m512bh)_mm512_load_si512(Bp + (size_t)p * BF16_NR + 16);
        __m512bh b2 = (__m512bh)_mm512_load_si512(Bp + (size_t)p * BF16_NR + 32);
        #pragma GCC unroll 8
        for (int i = 0; i < BF16_MR; i++) {
            int pair;
            memcpy(&pair, Ap + (size_t)i * lda + 2 * p, sizeof(pair));
            __m512bh ai = (__m512bh)_mm512_set1_epi32(pair);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, b0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, b1);
            acc[i][2] = _mm512_dpbf16_ps(acc[i][2], ai, b2);
        }
    }
    for (int i = 0; i < m; i++) {
        float* c = Cmat + (size_t)i * ldc;
        for (int v = 0; v < 3; v++) {
            int cols = std::min(16, n - 16 * v);
            if (cols <= 0) break;
            __mmask16 mask = (__mmask16)((1u << cols) - 1u);
            __m512 old = _mm512_maskz_loadu_ps(mask, c + 16 * v);
            _mm512_mask_storeu_ps(c + 16 * v, mask, _mm512_add_ps(old, acc[i][v]));
        }
    }
}

// ---- the forward with the weight read in place (AVX512_BF16)
// out (M,N) = bias + A (M,K) @ W^T with W (N,K) bf16 row-major, bias (N) or NULL (zero), K even. In the
// forward the pair vdpbf16ps multiplies, (W[o][c], W[o][c+1]), is one 32-bit word of W's row o, so W is the broadcast
// operand read where it lies (no packing of the weight, no copy of it) and the activations are the vector
// operand: A's rows are rounded to bf16 and packed once, transposed into panels of BF16_WR_NR rows laid
// out [pair][row], shared by all threads. The micro-kernel keeps a BF16_WR_MR (weight rows) x BF16_WR_NR
// (activation rows) block of out^T in registers over the whole of K (so each output is one sum over the
// pairs in order, as in gemm_bf16_dot's slices), then transposes it into out's rows, adding the bias as it
// stores (out is written once: it is not first filled with the bias and then read back).
static const int BF16_WR_MR = 12; // weight rows (output columns) per register tile: 12 x 2 = 24 accumulators
static const int BF16_WR_NR = 32; // activation rows (output rows) per register tile: two 16-float vectors; BT = 256 is 8 of them

// out (n rows, m columns) = bias (m, or NULL) + the tile's W rows (row stride ldw, kp pairs) . Ap panel (kp pairs x NR rows)
static inline void bf16_rows_micro_kernel(int kp, const uint16_t* W, size_t ldw, const uint32_t* Ap, const float* bias, float* out, size_t ldc,
                                          int m, int n) {
    const int MR = BF16_WR_MR, NR = BF16_WR_NR;
    const uint16_t* w_row[MR];
    for (int i = 0; i < MR; i++) { w_row[i] = W + (size_t)(i < m ? i : m - 1) * ldw; } // rows past m repeat row m-1, dropped
    __m512 acc[MR][2];
    for (int i = 0; i < MR; i++) { acc[i][0] = acc[i][1] = _mm512_setzero_ps(); }
    for (int p = 0; p < kp; p++) {
        __m512bh a0 = (__m512bh)_mm512_load_si512(Ap + (size_t)p * NR);
        __m512bh a1 = (__m512bh)_mm512_load_si512(Ap + (size_t)p * NR + 16);
        #pragma GCC unroll 12
        for (int i = 0; i < MR; i++) {
            int pair;
            memcpy(&pair, w_row[i] + 2 * (size_t)p, sizeof(pair));
            __m512bh wi = (__m512bh)_mm512_set1_epi32(pair);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], wi, a0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], wi, a1);
        }
    }
    // acc[i][v] lane j is out[row 16v + j][column i]: through a 16 x 16 transpose per v into out's rows
    alignas(64) float tile[16][NR], tile_t[NR][16];
    for (int i = 0; i < 16; i++) { // (rows past MR are zero: the transpose reads 16)
        for (int v = 0; v < 2; v++) { _mm512_store_ps(&tile[i][16 * v], i < MR ? acc[std::min(i, MR - 1)][v] : _mm512_setzero_ps()); }
    }
    for (int v = 0; v < 2; v++) { transpose16_32bit((const uint32_t*)&tile[0][16 * v], NR, (uint32_t*)&tile_t[16 * v][0], 16); }
    __mmask16 mask = (__mmask16)((1u << m) - 1u);
    __m512 b = bias != NULL ? _mm512_maskz_loadu_ps(mask, bias) : _mm512_setzero_ps();
    for (int j = 0; j < n; j++) { _mm512_mask_storeu_ps(out + (size_t)j * ldc, mask, _mm512_add_ps(b, _mm512_load_ps(tile_t[j]))); }
}

static void gemm_bf16_dot_rows(int M, int N, int K, const float* A, size_t lda, const uint16_t* W, size_t ldw, const float* bias,
                               float* out, size_t ldc) {
    const int MR = BF16_WR_MR, NR = BF16_WR_NR;
    const int kp = K / 2, panels = (M + NR - 1) / NR, strips = (N + MR - 1) / MR;
    uint32_t* Ap = bf16_pack_a((size_t)panels * kp * NR);
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    // tasks: groups of up to 4 weight strips (their rows stay in L1/L2 while every panel passes), at least
    // 4 tasks a thread where N allows, so a thread the machine's load delays only takes fewer
    const int group = std::max(1, std::min(4, strips / (4 * threads)));
    const int tasks = (strips + group - 1) / group;
    #pragma omp parallel
    {
        // pack A: panel q, pair p, row j at (q * kp + p) * NR + j, the two activations rounded to bf16
        // (the even k in the low half); zero past M
        #pragma omp for
        for (int row = 0; row < panels * NR; row++) {
            uint32_t* dst = Ap + (size_t)(row / NR) * kp * NR + row % NR;
            if (row < M) {
                const float* a = A + (size_t)row * lda;
                for (int p = 0; p < kp; p++) { dst[(size_t)p * NR] = (uint32_t)bf16_round(a[2 * p]) | (uint32_t)bf16_round(a[2 * p + 1]) << 16; }
            } else {
                for (int p = 0; p < kp; p++) { dst[(size_t)p * NR] = 0; }
            }
        }
        // (the implicit barrier: A is packed before any task reads it)
        #pragma omp for schedule(dynamic, 1)
        for (int t = 0; t < tasks; t++) {
            int s0 = t * group, s1 = std::min(strips, s0 + group);
            for (int q = 0; q < panels; q++) {
                for (int s = s0; s < s1; s++) {
                    int o0 = s * MR, bt0 = q * NR;
                    bf16_rows_micro_kernel(kp, W + (size_t)o0 * ldw, ldw, Ap + (size_t)q * kp * NR, bias != NULL ? bias + o0 : NULL,
                                           out + (size_t)bt0 * ldc + o0, ldc,
                                           std::min(MR, N - o0), std::min(NR, M - bt0));
                }
            }
        }
    }
}

static void gemm_bf16_dot(int M, int N, int K, const float* A, size_t lda, const uint16_t* W, size_t rsb, size_t csb,
                          float* Cmat, size_t ldc) {
    const int MR = BF16_MR, NR = BF16_NR, KC = BF16_KC, NC = BF16_NC, KCH = BF16_KCHUNK;
    int strips = (M + MR - 1) / MR;                 // MR-row strips of A, the last zero-padded
    int tiles_n = (N + NC - 1) / NC;
    // tiles: the output's columns in NC blocks; when there are fewer than threads, the rows are cut too
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    int strips_per_tile = strips;
    if (tiles_n < threads) strips_per_tile = std::max(1, (strips + threads - 1) / threads);
    int tiles_m = (strips + strips_per_tile - 1) / strips_per_tile;
    const size_t Mpad = (size_t)strips * MR;        // rows of the packed A, the last strip's zero-padded
    uint16_t* Ap = (uint16_t*)bf16_pack_a((size_t)(std::min(K, KCH) + KC - 1) / KC * Mpad * KC / 2);
    for (int c0 = 0; c0 < K; c0 += KCH) {
        int kch = std::min(KCH, K - c0), slices = (kch + KC - 1) / KC;
        #pragma omp parallel
        {
            // pack the chunk of A: slice ks, row i at (ks * Mpad + i) * KC, the row's KC activations rounded to
            // bf16 (so pair p, the even k in the low half, is the 32 bits at 2p); zero past M and past K
            #pragma omp for
            for (int w = 0; w < slices * strips; w++) {
                int ks = w / strips, s = w % strips, k0 = c0 + ks * KC, kc = std::min(KC, K - k0);
                for (int i = 0; i < MR; i++) {
                    int row = s * MR + i;
                    uint16_t* dst = Ap + ((size_t)ks * Mpad + row) * KC;
                    const float* a = A + (size_t)row * lda + k0;
                    int k = 0;
                    if (row < M) {
                        for (; k < kc; k++) { dst[k] = bf16_round(a[k]); }
                    }
                    for (; k < KC; k++) { dst[k] = 0; }
                }
            }
            // (the implicit barrier: A's chunk is packed before any tile reads it; no other barrier until
            // the chunk's end, so a thread that the machine's load delays only takes fewer tiles)
            #pragma omp for schedule(dynamic, 1)
            for (int t = 0; t < tiles_m * tiles_n; t++) {
                int s0 = (t % tiles_m) * strips_per_tile, s1 = std::min(strips, s0 + strips_per_tile);
                int j0 = (t / tiles_m) * NC, nc = std::min(NC, N - j0), npanels = (nc + NR - 1) / NR;
                uint32_t* Bp = bf16_pack_b();
                for (int ks = 0; ks < slices; ks++) {
                    int k0 = c0 + ks * KC, kc = std::min(KC, K - k0), kp = (kc + 1) / 2;
                    // pack the Bmat slice: panel q holds columns j0 + q*NR.., laid out [pair][column], zero past N and K
                    for (int q = 0; q < npanels; q++) {
                        uint32_t* dst = Bp + (size_t)q * kp * NR;
                        int col0 = j0 + q * NR;
                        if (csb == 1 && col0 + NR <= N) { // dinp, a whole panel: the pair is two rows of W, each read along j
                            for (int p = 0; p < kp; p++) {
                                const uint16_t* w0 = W + (size_t)(k0 + 2 * p) * rsb + col0;
                                const uint16_t* w1 = w0 + rsb;
                                bool has_hi = 2 * p + 1 < kc;
                                for (int j = 0; j < NR; j++) { dst[(size_t)p * NR + j] = (uint32_t)w0[j] | (has_hi ? (uint32_t)w1[j] << 16 : 0u); }
                            }
                            continue;
                        }
                        int p_done = 0; // pairs packed by 16 x 16 transposes
                        if (rsb == 1 && csb % 2 == 0 && kc % 2 == 0 && col0 + NR <= N) {
                            // forward, a whole panel: pair p of column j is 32 bits of W's row j, so 16 pairs of
                            // 16 rows are one 16 x 16 transpose of 32-bit words
                            for (; p_done + 16 <= kp; p_done += 16) {
                                for (int g = 0; g < NR / 16; g++) {
                                    const uint32_t* src = (const uint32_t*)(W + (size_t)(col0 + 16 * g) * csb + k0) + p_done;
                                    transpose16_32bit(src, csb / 2, dst + (size_t)p_done * NR + 16 * g, (size_t)NR);
                                }
                            }
                        }
                        for (int j = 0; j < NR; j++) {
                            int col = j0 + q * NR + j;
                            if (col >= N) {
                                for (int p = 0; p < kp; p++) { dst[(size_t)p * NR + j] = 0; }
                                continue;
                            }
                            const uint16_t* w = W + (size_t)col * csb + (size_t)k0 * rsb;
                            if (rsb == 1 && kc % 2 == 0) { // forward: the pair is adjacent in the weight's row
                                for (int p = p_done; p < kp; p++) {
                                    uint32_t pair;
                                    memcpy(&pair, w + 2 * p, sizeof(pair));
                                    dst[(size_t)p * NR + j] = pair;
                                }
                            } else {
                                for (int p = 0; p < kp; p++) {
                                    uint32_t lo = w[(size_t)(2 * p) * rsb], hi = 2 * p + 1 < kc ? w[(size_t)(2 * p + 1) * rsb] : 0u;
                                    dst[(size_t)p * NR + j] = lo | (hi << 16);
                                }
                            }
                        }
                    }
                    for (int q = 0; q < npanels; q++) {
                        for (int s = s0; s < s1; s++) {
                            int i = s * MR;
                            bf16_micro_kernel(kp, Ap + ((size_t)ks * Mpad + i) * KC, (size_t)KC, Bp + (size_t)q * kp * NR,
                                              Cmat + (size_t)i * ldc + j0 + q * NR, ldc, std::min(MR, M - i), std::min(NR, nc - q * NR));
                        }
                    }
                }
            }
        }
    }
}
#endif

// ---- the fast path without AVX512_BF16 (compiled everywhere, so the tests check it on any CPU)
// Cmat (M,N) += A (M,K) @ Bmat (K,N) with Bmat(k,j) = W[k*rsb + j*csb] in bf16: lib/fast.h's fp32 GEMM,
// which widens the bf16 weight as it packs its panels (no fp32 copy of the weight)
static void gemm_bf16_widened(int M, int N, int K, const float* A, size_t lda, const uint16_t* W, size_t rsb, size_t csb,
                              float* Cmat, size_t ldc) {
    matmul_gemm(M, N, K, 1.0f, A, lda, 1, W, rsb, csb, Cmat, ldc);
}

// Cmat (M,N) += A (M,K) @ Bmat (K,N), Bmat in bf16 as above: the build's fast path
static void gemm_bf16(int M, int N, int K, const float* A, size_t lda, const uint16_t* W, size_t rsb, size_t csb, float* Cmat, size_t ldc) {
#if BF16_DOT
    gemm_bf16_dot(M, N, K, A, lda, W, rsb, csb, Cmat, ldc);
#else
    gemm_bf16_widened(M, N, K, A, lda, W, rsb, csb, Cmat, ldc);
#endif
}

// inp (B,T,C), weight (OC,C) bf16, bias (OC) or NULL -> out (B,T,OC); the fast twin of matmul_bf16_forward_naive
static void matmul_bf16_forward_fast(float* out, const float* inp, const uint16_t* weight, const float* bias, int B, int T, int C, int OC) {
    double t0 = matmul_clock();
    int BT = B * T;
#if BF16_DOT
    if (BT >= MATMUL_MR && C % 2 == 0) { // out (BT,OC) = bias + inp @ weight^T, the weight read in place
        gemm_bf16_dot_rows(BT, OC, C, inp, (size_t)C, weight, (size_t)C, bias, out, (size_t)OC);
        matmul_stats.flops += 2.0 * BT * C * OC;
        matmul_stats.seconds += matmul_clock() - t0;
        return;
    }
#endif
    // otherwise (a few rows, an odd C, or no AVX512_BF16) out starts as the bias (or 0) and the GEMM accumulates into it
    #pragma omp parallel for
    for (int bt = 0; bt < BT; bt++) {
        for (int o = 0; o < OC; o++) { out[(size_t)bt * OC + o] = bias != NULL ? bias[o] : 0.0f; }
    }
    if (BT < MATMUL_MR) {
        // a row or a few (generation with the key/value cache): dot products along the weight rows,
        // which stream from memory once (parallel over output channels)
        #pragma omp parallel for
        for (int o = 0; o < OC; o++) {
            for (int bt = 0; bt < BT; bt++) {
                float s = 0.0f;
                for (int c = 0; c < C; c++) { s += bf16_activation(inp[(size_t)bt * C + c]) * bf16_widen(weight[(size_t)o * C + c]); }
                out[(size_t)bt * OC + o] += s;
            }
        }
    } else {
        // out (BT,OC) += inp (BT,C) @ weight^T: Bmat(c,o) = weight[o*C + c]
        gemm_bf16(BT, OC, C, inp, (size_t)C, weight, 1, (size_t)C, out, (size_t)OC);
    }
    matmul_stats.flops += 2.0 * BT * C * OC;
    matmul_stats.seconds += matmul_clock() - t0;
}

// dout (B,T,OC), weight (OC,C) bf16 -> dinp (B,T,C) +=; the fast twin of matmul_bf16_backward_naive.
// (A bf16 weight is frozen: it has no weight gradient.)
static void matmul_bf16_backward_fast(float* dinp, const float* dout, const uint16_t* weight, int B, int T, int C, int OC) {
    double t0 = matmul_clock();
    int BT = B * T;
    // dinp (BT,C) += dout (BT,OC) @ weight (OC,C): Bmat(o,c) = weight[o*C + c]
    gemm_bf16(BT, C, OC, dout, (size_t)OC, weight, (size_t)C, 1, dinp, (size_t)C);
    matmul_stats.flops += 2.0 * BT * C * OC;
    matmul_stats.seconds += matmul_clock() - t0;
}
