// lib/attention_gemm.h: attention for float on long sequences, as small GEMMs per head. Skip it on a
// first reading: the per-query attention_forward / attention_backward in train_gpt2_lora.cpp is the one to
// learn from, and the double tests run it.
// Not a standalone header: train_gpt2_lora.cpp includes it right after attention_backward, whose helpers
// (attention_head_rows, max_lanes, exp_lanes, dot_lanes) it uses, and whose float calls dispatch here
// (attention_by_gemm).
#pragma once

// T >= 128, no dropout, no key/value cache (attention_by_gemm): the products of attention_forward and
// attention_backward, each head's as small GEMMs (lib/fast.h's matmul_gemm, called from inside the
// parallel loop over heads, so on one thread each) over blocks of ATT_ROWS query or key rows. There, each
// query row is a matrix-vector product, one load per FMA: at T = 1024 they ran at 16-33 GFLOP/s on a
// Zen 1 and made attention a fifth of the LoRA step. At T = 64 both forms took the same time. The causal
// mask is zeros: a block of rows computes scores for the keys its last row sees, and each row's entries
// past its own position are set to zero before anything reads them, so the products over whole blocks add
// only zeros for masked pairs.
static const int ATT_ROWS = 64;

// head h of sequence b: its queries, keys and values as (T, hs) rows, in attention_head_rows' slots 0-2
static void attention_head_qkv(const float** q, const float** k, const float** v, const float* qkv, int b, int h, int T, int C, int hs) {
    const float* first = qkv + (size_t)b * T * 3 * C + h * hs;
    *q = attention_head_rows(first, (size_t)3 * C, T, hs, 0);
    *k = attention_head_rows(first + C, (size_t)3 * C, T, hs, 1);
    *v = attention_head_rows(first + 2 * C, (size_t)3 * C, T, hs, 2);
}

// qkv (B,T,3C) -> out (B,T,C), att (B,NH,T,T): attention_forward with t0 = 0 and no dropout
void attention_forward_gemm(float* out, float* att, const float* qkv, int B, int T, int C, int NH) {
    int hs = C / NH;
    float scale = 1 / std::sqrt((float)hs);
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            const float *q, *k, *v;
            attention_head_qkv(&q, &k, &v, qkv, b, h, T, C, hs);
            float* att_bh = att + ((size_t)b * NH + h) * T * T;
            float* out_bh = out + (size_t)b * T * C + h * hs; // row t at out_bh + t * C
            for (int i0 = 0; i0 < T; i0 += ATT_ROWS) {
                int n = std::min(T, i0 + ATT_ROWS), m = n - i0; // query rows i0..n-1 see keys 0..n-1 at most
                // att[t, 0..n) = scale * q[t] . k[t2]: Bmat(i, t2) = k[t2 * hs + i]
                for (int t = i0; t < n; t++) { memset(att_bh + (size_t)t * T, 0, (size_t)n * sizeof(float)); }
                matmul_gemm(m, n, hs, scale, q + (size_t)i0 * hs, (size_t)hs, 1, k, 1, (size_t)hs, att_bh + (size_t)i0 * T, (size_t)T);
                // softmax over the keys t2 <= t, zero after them
                for (int t = i0; t < n; t++) {
                    float* row = att_bh + (size_t)t * T;
                    float maxval = max_lanes(row, t + 1);
                    float inv = 1 / exp_lanes(row, t + 1, maxval);
                    for (int j = 0; j < T; j++) { row[j] = j <= t ? row[j] * inv : 0; }
                    memset(out_bh + (size_t)t * C, 0, (size_t)hs * sizeof(float));
                }
                // out[t] = att[t, 0..n) @ v[0..n)
                matmul_gemm(m, hs, n, 1.0f, att_bh + (size_t)i0 * T, (size_t)T, 1, v, (size_t)hs, 1, out_bh + (size_t)i0 * C, (size_t)C);
            }
        }
    }
}

// dout (B,T,C) -> dqkv (B,T,3C) +=; datt (B,NH,T,T) scratch: attention_backward without dropout
void attention_backward_gemm(float* dqkv, float* datt, const float* dout, const float* qkv, const float* att, int B, int T, int C, int NH) {
    int hs = C / NH;
    float scale = 1 / std::sqrt((float)hs);
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            const float *q, *k, *v;
            attention_head_qkv(&q, &k, &v, qkv, b, h, T, C, hs);
            const float* dout_h = attention_head_rows(dout + (size_t)b * T * C + h * hs, (size_t)C, T, hs, 3);
            const float* att_bh = att + ((size_t)b * NH + h) * T * T;
            float* datt_bh = datt + ((size_t)b * NH + h) * T * T;
            float* dq = dqkv + (size_t)b * T * 3 * C + h * hs; // row t at dq + t * 3C; dk, dv C and 2C after
            // pass 1, by blocks of query rows: datt, then ds in its place, then dq
            for (int i0 = 0; i0 < T; i0 += ATT_ROWS) {
                int n = std::min(T, i0 + ATT_ROWS), m = n - i0;
                // forward was: out[t] = sum_t2 a[t, t2] v[t2]; so datt[t, t2] = dout[t] . v[t2]
                for (int t = i0; t < n; t++) { memset(datt_bh + (size_t)t * T, 0, (size_t)n * sizeof(float)); }
                matmul_gemm(m, n, hs, 1.0f, dout_h + (size_t)i0 * hs, (size_t)hs, 1, v, 1, (size_t)hs, datt_bh + (size_t)i0 * T, (size_t)T);
                // forward was: a = softmax(s); so ds[t2] = a[t2] (datt[t2] - sum_j a[j] datt[j]), held as scale * ds
                for (int t = i0; t < n; t++) {
                    const float* a = att_bh + (size_t)t * T;
                    float* row = datt_bh + (size_t)t * T;
                    float dot = dot_lanes(a, row, t + 1);
                    for (int j = 0; j < T; j++) { row[j] = j <= t ? a[j] * (row[j] - dot) * scale : 0; }
                }
                // forward was: s[t, t2] = scale q[t] . k[t2]; so dq[t] += scale ds[t, 0..n) @ k[0..n)
                matmul_gemm(m, hs, n, 1.0f, datt_bh + (size_t)i0 * T, (size_t)T, 1, k, (size_t)hs, 1, dq + (size_t)i0 * 3 * C, (size_t)3 * C);
            }
            // pass 2, by blocks of key rows t2 = j0..: dv[t2] += sum_t a[t, t2] dout[t] and dk[t2] += sum_t
            // scale ds[t, t2] q[t] over t >= j0 (a and ds are zero for t < t2): A(i, kk) = a[(j0 + kk) * T + j0 + i]
            for (int j0 = 0; j0 < T; j0 += ATT_ROWS) {
                int m = std::min(ATT_ROWS, T - j0);
                size_t at = (size_t)j0 * T + j0;
                matmul_gemm(m, hs, T - j0, 1.0f, att_bh + at, 1, (size_t)T, dout_h + (size_t)j0 * hs, (size_t)hs, 1, dq + 2 * C + (size_t)j0 * 3 * C, (size_t)3 * C);
                matmul_gemm(m, hs, T - j0, 1.0f, datt_bh + at, 1, (size_t)T, q + (size_t)j0 * hs, (size_t)hs, 1, dq + C + (size_t)j0 * 3 * C, (size_t)3 * C);
            }
        }
    }
}
