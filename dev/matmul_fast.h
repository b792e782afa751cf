// dev/matmul_fast.h: the matmul kernels under development (phase 1 of issue 9).
// Same signatures as llm.c's matmul_forward / matmul_backward; weights stored (OC, C) row-major
// like nn.Linear. Once the core exists these live in train_gpt2_lora.cpp and this file is the
// scratch copy used by dev/bench_matmul.cpp while tuning.
#pragma once
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#ifdef _OPENMP
#include <omp.h>
#endif

// ----------------------------------------------------------------------------
// naive twins: the definition the fast kernels are tested against

// inp (B,T,C), weight (OC,C), bias (OC) or NULL -> out (B,T,OC)
void matmul_forward_naive(float* out, const float* inp, const float* weight, const float* bias,
                          int B, int T, int C, int OC) {
    for (size_t bt = 0; bt < (size_t)B * T; bt++) {
        const float* inp_bt = inp + bt * C;
        float* out_bt = out + bt * OC;
        for (int o = 0; o < OC; o++) {
            const float* w_row = weight + (size_t)o * C;
            float val = (bias != NULL) ? bias[o] : 0.0f;
            for (int c = 0; c < C; c++) { val += inp_bt[c] * w_row[c]; }
            out_bt[o] = val;
        }
    }
}

// dout (B,T,OC) -> dinp (B,T,C) +=, dweight (OC,C) +=, dbias (OC) +=; any of the three may be NULL
void matmul_backward_naive(float* dinp, float* dweight, float* dbias,
                           const float* dout, const float* inp, const float* weight,
                           int B, int T, int C, int OC) {
    // forward was: out[bt,o] = bias[o] + sum_c inp[bt,c] * weight[o,c]
    for (size_t bt = 0; bt < (size_t)B * T; bt++) {
        const float* dout_bt = dout + bt * OC;
        const float* inp_bt = inp + bt * C;
        for (int o = 0; o < OC; o++) {
            const float* w_row = weight + (size_t)o * C;
            float d = dout_bt[o];
            if (dinp != NULL) {   // dinp[bt,c] += dout[bt,o] * weight[o,c]
                float* dinp_bt = dinp + bt * C;
                for (int c = 0; c < C; c++) { dinp_bt[c] += w_row[c] * d; }
            }
            if (dweight != NULL) { // dweight[o,c] += dout[bt,o] * inp[bt,c]
                float* dw_row = dweight + (size_t)o * C;
                for (int c = 0; c < C; c++) { dw_row[c] += inp_bt[c] * d; }
            }
            if (dbias != NULL) { dbias[o] += d; } // dbias[o] += dout[bt,o]
        }
    }
}

// ----------------------------------------------------------------------------
// fast kernels: one blocked GEMM, Cmat (M,N) += A (M,K) @ Bmat (K,N), with A and Bmat given by
// strides so that forward, dinp and dweight are the same loop nest:
//   forward   out  (BT,OC) += inp (BT,C)   @ weight^T (C,OC)
//   dinp      dinp (BT,C)  += dout (BT,OC) @ weight   (OC,C)
//   dweight   dw   (OC,C)  += dout^T (OC,BT) @ inp    (BT,C)
// Design (BLIS-style): the output is cut into MC x NC tiles, one OpenMP task each; inside a tile
// the K dimension is walked in KC slices; each slice of A is packed into MR-row panels and each
// slice of Bmat into NR-column panels (zero-padded at the edges, so there is a single micro-kernel
// and any shape is correct); the micro-kernel keeps an MR x NR block of the output in registers.
// The micro-kernel vectorizes across the NR output columns, so each output element is still one
// sequential sum over k: no reassociation, no -ffast-math needed.

#ifndef MATMUL_MR
#define MATMUL_MR 6    // rows of the register tile (MR*NR/8 = 12 of the 16 AVX2 registers)
#endif
#ifndef MATMUL_NR
#define MATMUL_NR 16   // columns of the register tile: two 8-float AVX2 vectors
#endif
#ifndef MATMUL_KC
#define MATMUL_KC 256  // K slice: an NR-column panel of Bmat is KC*NR*4 = 16 KB, stays in L1
#endif
#ifndef MATMUL_MC
#define MATMUL_MC 264  // rows per tile: covers BT=256, so each weight slice is packed only once
#endif
#ifndef MATMUL_NC
#define MATMUL_NC 192  // columns per tile: the packed Bmat slice is KC*NC*4 = 192 KB, in L2
#endif
static const int MR = MATMUL_MR, NR = MATMUL_NR, KC = MATMUL_KC, MC = MATMUL_MC, NC = MATMUL_NC;
static_assert(MC % MR == 0 && NC % NR == 0, "tiles must hold whole register blocks");

// a*b + c as one rounding when the CPU has FMA (twice the throughput); plain a*b + c otherwise
static inline float madd(float a, float b, float c) {
#ifdef __FMA__
    return __builtin_fmaf(a, b, c);
#else
    return a * b + c;
#endif
}

// per-thread buffer for the packed slices (Bmat: KC x NC, then A: MC x KC), allocated once on the
// thread's first matmul and reused forever (no allocation per step)
static float* matmul_pack_buffer() {
    static thread_local float* buf = NULL;
    if (buf == NULL) {
        buf = (float*)aligned_alloc(64, sizeof(float) * ((size_t)KC * NC + (size_t)MC * KC));
        if (buf == NULL) { fprintf(stderr, "matmul: out of memory for the pack buffer\n"); exit(1); }
    }
    return buf;
}

// Cmat (m,n) += A (m,kc) @ Bp (kc,NR) for one register block, m <= MR, n <= NR.
// A(i,k) = A[i*rsa + k*csa] is read in place; Bp is a packed panel, row k at Bp + k*NR (zero
// padded past n). Rows past m read row m-1 again and their sums are dropped, so one kernel serves
// every edge. With MR, NR compile-time constants the compiler keeps acc in 12 registers and turns
// the j loop into NR/8 vector FMAs: per k, 2 vector loads + 6 broadcasts feed 12 FMAs.
static inline void matmul_micro_kernel(int kc, const float* A, size_t rsa, size_t csa,
                                       const float* __restrict Bp, float* Cmat, size_t ldc, int m, int n, float alpha) {
    const float* a_row[MR];
    for (int i = 0; i < MR; i++) { a_row[i] = A + (size_t)(i < m ? i : m - 1) * rsa; }
    float acc[MR][NR] = {};
    for (int k = 0; k < kc; k++) {
        const float* b = Bp + (size_t)k * NR;
        for (int i = 0; i < MR; i++) {
            float a_ik = a_row[i][(size_t)k * csa];
            // "unroll 1": if GCC fully unrolls j before vectorizing, it falls back to 128-bit
            // SLP with acc spilled to the stack (4x slower); kept as a loop it becomes ymm FMAs
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

// Cmat (M,N) += alpha * A (M,K) @ Bmat (K,N); A(i,k) = A[i*rsa + k*csa], Bmat(k,j) = Bmat[k*rsb + j*csb],
// Cmat row-major with leading dimension ldc. Cmat must not alias A or Bmat.
static void matmul_gemm(int M, int N, int K, float alpha, const float* A, size_t rsa, size_t csa,
                        const float* Bmat, size_t rsb, size_t csb, float* Cmat, size_t ldc) {
    int tiles_m = (M + MC - 1) / MC, tiles_n = (N + NC - 1) / NC;
    int tiles = tiles_m * tiles_n;
    // parallel over output tiles: each task writes only its own MC x NC block of Cmat, and the
    // pack buffer is per thread, so there are no races and no atomics
    #pragma omp parallel for schedule(dynamic, 1)
    for (int t = 0; t < tiles; t++) {
        int i0 = (t % tiles_m) * MC, j0 = (t / tiles_m) * NC;
        int mc = (M - i0 < MC) ? M - i0 : MC, nc = (N - j0 < NC) ? N - j0 : NC;
        int npanels = (nc + NR - 1) / NR;
        float* Bp = matmul_pack_buffer();
        for (int k0 = 0; k0 < K; k0 += KC) {
            int kc = (K - k0 < KC) ? K - k0 : KC;
            // pack Bmat slice: panel p holds columns j0+p*NR .. +NR, laid out [k][j], zero past N
            for (int p = 0; p < npanels; p++) {
                float* dst = Bp + (size_t)p * NR * kc;
                int ncols = (nc - p * NR < NR) ? nc - p * NR : NR;
                const float* src = Bmat + (size_t)k0 * rsb + (size_t)(j0 + p * NR) * csb;
                if (csb == 1) {      // rows of the panel are contiguous
                    for (int k = 0; k < kc; k++) {
                        const float* s = src + (size_t)k * rsb;
                        for (int j = 0; j < NR; j++) { dst[(size_t)k * NR + j] = (j < ncols) ? s[j] : 0.0f; }
                    }
                } else {             // columns are contiguous (forward: rows of weight): read along k
                    for (int j = 0; j < NR; j++) {
                        const float* s = src + (size_t)j * csb;
                        for (int k = 0; k < kc; k++) { dst[(size_t)k * NR + j] = (j < ncols) ? s[(size_t)k * rsb] : 0.0f; }
                    }
                }
            }
            // A is read in place when its rows run along k (forward, dinp). Otherwise (dweight: A is
            // dout^T, whose k steps are OC floats apart, a new page each) the slice is packed into
            // MR-row panels laid out [k][i], which the same micro-kernel reads with rsa=1, csa=MR.
            const float* A_blk = A + (size_t)i0 * rsa + (size_t)k0 * csa;
            size_t rs = rsa, cs = csa, panel_stride = (size_t)MR * rsa;
            if (csa != 1) {
                float* Ap = Bp + (size_t)KC * NC;
                for (int p = 0; p * MR < mc; p++) {
                    float* dst = Ap + (size_t)p * MR * kc;
                    for (int k = 0; k < kc; k++) {
                        for (int i = 0; i < MR; i++) { // rows past mc repeat row mc-1; their sums are dropped
                            int row = (p * MR + i < mc) ? p * MR + i : mc - 1;
                            dst[(size_t)k * MR + i] = A_blk[(size_t)row * rsa + (size_t)k * csa];
                        }
                    }
                }
                A_blk = Ap; rs = 1; cs = MR; panel_stride = (size_t)MR * kc;
            }
            // register blocks: an MR-row strip of A (L1) against every packed Bmat panel (L2)
            for (int i = 0; i < mc; i += MR) {
                int m = (mc - i < MR) ? mc - i : MR;
                const float* a_strip = A_blk + (size_t)(i / MR) * panel_stride;
                for (int pj = 0; pj < npanels; pj++) {
                    int n = (nc - pj * NR < NR) ? nc - pj * NR : NR;
                    float* c_blk = Cmat + (size_t)(i0 + i) * ldc + (j0 + pj * NR);
                    matmul_micro_kernel(kc, a_strip, rs, cs, Bp + (size_t)pj * NR * kc, c_blk, ldc, m, n, alpha);
                }
            }
        }
    }
}

// inp (B,T,C), weight (OC,C), bias (OC) or NULL -> out (B,T,OC)
void matmul_forward(float* out, const float* inp, const float* weight, const float* bias,
                    int B, int T, int C, int OC) {
    size_t BT = (size_t)B * T;
    // out starts as the bias (or zero) and the GEMM accumulates inp @ weight^T into it
    // parallel over rows: each thread writes its own rows of out
    #pragma omp parallel for
    for (size_t bt = 0; bt < BT; bt++) {
        float* out_bt = out + bt * OC;
        for (int o = 0; o < OC; o++) { out_bt[o] = (bias != NULL) ? bias[o] : 0.0f; }
    }
    // out (BT,OC) += inp (BT,C) @ weight^T: Bmat(c,o) = weight[o*C + c]
    matmul_gemm((int)BT, OC, C, 1.0f, inp, C, 1, weight, 1, C, out, OC);
}

// dout (B,T,OC) -> dinp (B,T,C) +=, dweight (OC,C) +=, dbias (OC) +=; any of the three may be NULL
// (a frozen weight passes dweight = dbias = NULL and pays nothing for them)
void matmul_backward(float* dinp, float* dweight, float* dbias,
                     const float* dout, const float* inp, const float* weight,
                     int B, int T, int C, int OC) {
    // forward was: out = inp @ weight^T + bias; so now:
    size_t BT = (size_t)B * T;
    if (dinp != NULL) {     // dinp (BT,C) += dout (BT,OC) @ weight (OC,C)
        matmul_gemm((int)BT, C, OC, 1.0f, dout, OC, 1, weight, C, 1, dinp, C);
    }
    if (dweight != NULL) {  // dweight (OC,C) += dout^T (OC,BT) @ inp (BT,C)
        matmul_gemm(OC, C, (int)BT, 1.0f, dout, 1, OC, inp, C, 1, dweight, C);
    }
    if (dbias != NULL) {    // dbias[o] += sum_bt dout[bt,o]
        // parallel over output channels: each thread owns a range of dbias
        #pragma omp parallel for
        for (int o0 = 0; o0 < OC; o0 += 64) {
            int o1 = (o0 + 64 < OC) ? o0 + 64 : OC;
            for (size_t bt = 0; bt < BT; bt++) {
                const float* dout_bt = dout + bt * OC;
                for (int o = o0; o < o1; o++) { dbias[o] += dout_bt[o]; }
            }
        }
    }
}

// ----------------------------------------------------------------------------
// LoRA branches as thin GEMMs (float fast path; lora.h's templates are the naive twins,
// reachable for floats as lora_forward<float> / lora_backward<float>)

// inp (BT,C), lora_A (r,C), lora_B (OC,r) -> h (BT,r) cached; out (BT,OC) += scale * h @ lora_B^T
void lora_forward(float* out, float* h, const float* inp, const float* lora_A, const float* lora_B,
                  float scale, int BT, int C, int OC, int r) {
    // h = inp @ lora_A^T: (BT,C) @ (C,r), Bmat(c,i) = lora_A[i*C + c]
    memset(h, 0, (size_t)BT * r * sizeof(float));
    matmul_gemm(BT, r, C, 1.0f, inp, C, 1, lora_A, 1, C, h, r);
    // out += scale * h @ lora_B^T: (BT,r) @ (r,OC), Bmat(i,o) = lora_B[o*r + i]; never forms lora_B @ lora_A
    matmul_gemm(BT, OC, r, scale, h, r, 1, lora_B, 1, r, out, OC);
}

// dout (BT,OC), h (BT,r), inp (BT,C), lora_A (r,C), lora_B (OC,r)
//   -> dlora_B (OC,r) +=, dlora_A (r,C) +=, dinp (BT,C) += (dinp may be NULL); dh (BT,r) is scratch
void lora_backward(float* dinp, float* dlora_A, float* dlora_B, float* dh,
                   const float* dout, const float* h, const float* inp, const float* lora_A, const float* lora_B,
                   float scale, int BT, int C, int OC, int r) {
    // forward was: out += scale * h @ lora_B^T with h = inp @ lora_A^T; so now:
    // dlora_B (OC,r) += scale * dout^T @ h: A(o,bt) = dout[bt*OC + o]
    matmul_gemm(OC, r, BT, scale, dout, 1, OC, h, r, 1, dlora_B, r);
    // dh (BT,r) = scale * dout @ lora_B
    memset(dh, 0, (size_t)BT * r * sizeof(float));
    matmul_gemm(BT, r, OC, scale, dout, OC, 1, lora_B, r, 1, dh, r);
    // dlora_A (r,C) += dh^T @ inp: A(i,bt) = dh[bt*r + i]
    matmul_gemm(r, C, BT, 1.0f, dh, 1, r, inp, C, 1, dlora_A, C);
    // dinp (BT,C) += dh @ lora_A
    if (dinp != NULL) matmul_gemm(BT, C, r, 1.0f, dh, r, 1, lora_A, C, 1, dinp, C);
}
