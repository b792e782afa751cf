// lib/attention_gemm.h: attention for float on long sequences, as small GEMMs per head, without storing
// the (T, T) attention weights. Skip it on a first reading: the per-query attention_forward /
// attention_backward in train_gpt2_lora.cpp is the one to learn from, and the double tests run it.
// Not a standalone header: train_gpt2_lora.cpp includes it right after attention_backward, whose helpers
// (attention_head_rows, max_lanes, exp_lanes, dot_lanes, dropout_keep) it uses, and whose float calls
// dispatch here (attention_by_gemm).
#pragma once

// T >= ATT_GEMM_T and t0 = 0 (attention_by_gemm; with the key/value cache, only the prompt's forward):
// the products of attention_forward and attention_backward, each head's as small GEMMs (lib/fast.h's
// matmul_gemm, called from inside the parallel loop over heads, so on one thread each) over blocks of
// ATT_ROWS query rows. There, each query row is a matrix-vector product, one load per FMA: at T = 1024
// they ran at 16-33 GFLOP/s on a Zen 1 and made attention a fifth of the LoRA step. At T = 64 both forms
// took the same time.
// - The causal mask is zeros: a block of rows computes scores for the keys its last row sees, and each
//   row's entries past its own position are set to zero before anything reads them, so the products over
//   whole blocks add only zeros for masked pairs.
// - Memory: a block's weights live in the thread's scratch while it is used. The forward keeps, for each
//   query row, only its softmax's maximum score and 1 / its sum of exps (att is (B, NH, T, 2) here, not
//   (B, NH, T, T)); the backward computes the block's scores again from q and k (the same GEMM on the same
//   rows on one thread, the same exps, so the same weights bit for bit). That is one more product per
//   block in the backward, and (L, B, NH, T, T) floats fewer: 576 MiB for one sequence of 1024 tokens.
// - Dropout (-R) draws element (t, t2)'s mask at the index the per-query form gives it in att, so both
//   forms drop the same weights.
static const int ATT_ROWS = 64;

// head h of sequence b: its queries, keys and values as (T, hs) rows, in attention_head_rows' slots 0-2
static void attention_head_qkv(const float** q, const float** k, const float** v, const float* qkv, int b, int h, int T, int C, int hs) {
    const float* first = qkv + (size_t)b * T * 3 * C + h * hs;
    *q = attention_head_rows(first, (size_t)3 * C, T, hs, 0);
    *k = attention_head_rows(first + C, (size_t)3 * C, T, hs, 1);
    *v = attention_head_rows(first + 2 * C, (size_t)3 * C, T, hs, 2);
}

// a block of ATT_ROWS rows of T floats in the calling thread's scratch (slot 0: weights, 1: their
// gradient), rows *ld apart (T + 16 where T is a multiple of 256: rows a multiple of 1 KB apart share few
// L1 sets; at T = 1024 the backward ran 3% faster padded)
static float* attention_block_scratch(int slot, int T, size_t* ld) {
    static thread_local std::vector<float> buf[2];
    *ld = (size_t)T + (T % 256 == 0 ? 16 : 0);
    buf[slot].resize((size_t)ATT_ROWS * *ld);
    return buf[slot].data();
}

// query rows i0..n-1 of a head against keys 0..n-1: p[(t - i0) * ld + t2] = softmax over t2 <= t of
// scale * q[t] . k[t2], zero for t2 > t. Row t's maximum score and 1 / its sum of exps are the forward's
// stats_out[2 t], stats_out[2 t + 1]; the backward passes them back as stats_in (and stats_out NULL).
static void attention_block_weights(float* p, size_t ld, float* stats_out, const float* stats_in, const float* q, const float* k,
                                    int i0, int n, int hs, float scale) {
    int m = n - i0;
    for (int i = 0; i < m; i++) { memset(p + (size_t)i * ld, 0, (size_t)n * sizeof(float)); }
    // p[t - i0, t2] = scale * q[t] . k[t2]: Bmat(i, t2) = k[t2 * hs + i]
    matmul_gemm(m, n, hs, scale, q + (size_t)i0 * hs, (size_t)hs, 1, k, 1, (size_t)hs, p, ld);
    for (int t = i0; t < n; t++) {
        float* row = p + (size_t)(t - i0) * ld;
        float maxval = stats_in ? stats_in[2 * (size_t)t] : max_lanes(row, t + 1);
        float sum = exp_lanes(row, t + 1, maxval); // row[t2] = exp(row[t2] - maxval) for t2 <= t
        float inv = stats_in ? stats_in[2 * (size_t)t + 1] : 1 / sum;
        if (stats_out) { stats_out[2 * (size_t)t] = maxval; stats_out[2 * (size_t)t + 1] = inv; }
        for (int t2 = 0; t2 < n; t2++) { row[t2] = t2 <= t ? row[t2] * inv : 0; }
    }
}

// x[t - i0, t2] *= the dropout multiplier of att element (t, t2) of the head whose att starts at index bh
// (mask / (1 - p), as attention_forward draws it), for t2 <= t
static void attention_block_dropout(float* x, size_t ld, int i0, int n, int T, size_t bh, float drop_p, uint64_t drop_key) {
    float drop_scale = 1 / (1 - drop_p);
    for (int t = i0; t < n; t++) {
        float* row = x + (size_t)(t - i0) * ld;
        for (int t2 = 0; t2 <= t; t2++) { row[t2] = dropout_keep(drop_key, bh + (size_t)t * T + t2, drop_p) ? row[t2] * drop_scale : 0; }
    }
}

// qkv (B,T,3C) -> out (B,T,C), stats (B,NH,T,2): attention_forward with t0 = 0
void attention_forward_gemm(float* out, float* stats, const float* qkv, int B, int T, int C, int NH, float drop_p, uint64_t drop_key) {
    int hs = C / NH;
    float scale = 1 / std::sqrt((float)hs);
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            const float *q, *k, *v;
            attention_head_qkv(&q, &k, &v, qkv, b, h, T, C, hs);
            size_t bh = (size_t)b * NH + h, ld;
            float* p = attention_block_scratch(0, T, &ld);
            float* out_bh = out + (size_t)b * T * C + h * hs; // row t at out_bh + t * C
            for (int i0 = 0; i0 < T; i0 += ATT_ROWS) {
                int n = std::min(T, i0 + ATT_ROWS), m = n - i0; // query rows i0..n-1 see keys 0..n-1 at most
                attention_block_weights(p, ld, stats + bh * T * 2, NULL, q, k, i0, n, hs, scale);
                if (drop_p > 0) attention_block_dropout(p, ld, i0, n, T, bh * T * T, drop_p, drop_key);
                // out[t] = p[t, 0..n) @ v[0..n)
                for (int t = i0; t < n; t++) { memset(out_bh + (size_t)t * C, 0, (size_t)hs * sizeof(float)); }
                matmul_gemm(m, hs, n, 1.0f, p, ld, 1, v, (size_t)hs, 1, out_bh + (size_t)i0 * C, (size_t)C);
            }
        }
    }
}

// dout (B,T,C) -> dqkv (B,T,3C) +=: attention_backward, from the forward's stats; drop_p, drop_key as the
// forward had them. One pass per head by blocks of query rows: the weights again, datt, ds, then dq of the
// block's rows and the block's share of dk and dv of keys 0..n-1.
void attention_backward_gemm(float* dqkv, const float* dout, const float* qkv, const float* stats, int B, int T, int C, int NH,
                             float drop_p, uint64_t drop_key) {
    int hs = C / NH;
    float scale = 1 / std::sqrt((float)hs);
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            const float *q, *k, *v;
            attention_head_qkv(&q, &k, &v, qkv, b, h, T, C, hs);
            const float* dout_h = attention_head_rows(dout + (size_t)b * T * C + h * hs, (size_t)C, T, hs, 3);
            size_t bh = (size_t)b * NH + h, ld;
            float* p = attention_block_scratch(0, T, &ld);
            float* ds = attention_block_scratch(1, T, &ld);
            float* dq = dqkv + (size_t)b * T * 3 * C + h * hs; // row t at dq + t * 3C; dk, dv C and 2C after
            float* dk = dq + C;
            float* dv = dq + 2 * C;
            for (int i0 = 0; i0 < T; i0 += ATT_ROWS) {
                int n = std::min(T, i0 + ATT_ROWS), m = n - i0;
                attention_block_weights(p, ld, NULL, stats + bh * T * 2, q, k, i0, n, hs, scale); // the forward's weights again
                // forward was: out[t] = sum_t2 a[t, t2] v[t2], a = p * mask / (1 - p_drop); so
                // datt[t, t2] = mask / (1 - p_drop) * dout[t] . v[t2] (ds holds it first)
                for (int i = 0; i < m; i++) { memset(ds + (size_t)i * ld, 0, (size_t)n * sizeof(float)); }
                matmul_gemm(m, n, hs, 1.0f, dout_h + (size_t)i0 * hs, (size_t)hs, 1, v, 1, (size_t)hs, ds, ld);
                if (drop_p > 0) attention_block_dropout(ds, ld, i0, n, T, bh * T * T, drop_p, drop_key);
                // forward was: p = softmax(s); so ds[t2] = p[t2] (datt[t2] - sum_j p[j] datt[j]), held as scale * ds
                for (int t = i0; t < n; t++) {
                    const float* a = p + (size_t)(t - i0) * ld;
                    float* row = ds + (size_t)(t - i0) * ld;
                    float dot = dot_lanes(a, row, t + 1);
                    for (int t2 = 0; t2 < n; t2++) { row[t2] = t2 <= t ? a[t2] * (row[t2] - dot) * scale : 0; }
                }
                // forward was: s[t, t2] = scale q[t] . k[t2]; so dq[t] += scale ds[t, 0..n) @ k[0..n) and
                // dk[t2] += sum_t scale ds[t, t2] q[t] (A(t2, i) = ds[i * ld + t2], the block's transpose)
                matmul_gemm(m, hs, n, 1.0f, ds, ld, 1, k, (size_t)hs, 1, dq + (size_t)i0 * 3 * C, (size_t)3 * C);
                matmul_gemm(n, hs, m, 1.0f, ds, 1, ld, q + (size_t)i0 * hs, (size_t)hs, 1, dk, (size_t)3 * C);
                // and dv[t2] += sum_t a[t, t2] dout[t]
                if (drop_p > 0) attention_block_dropout(p, ld, i0, n, T, bh * T * T, drop_p, drop_key);
                matmul_gemm(n, hs, m, 1.0f, p, 1, ld, dout_h + (size_t)i0 * hs, (size_t)hs, 1, dv, (size_t)3 * C);
            }
        }
    }
}
