// lib/methods.h: the methods LoRA is compared with, as kernels and state: Houlsby adapters, prefix
// tuning and L2-SP (freezing needs no kernel of its own). Skip it on a first reading.
// Not a standalone header: train_gpt2_lora.cpp includes it after its kernels, which these build on
// (matmul_forward, gelu_forward, the attention softmax), and before the model, which holds their state.
#pragma once

// The methods LoRA is compared with: Houlsby adapters, prefix tuning, freezing all but the top blocks
// (gpt2_enable_top_training) and L2-SP regularized fine-tuning (l2sp_*). Full fine-tuning is the core's.
// Two more letters: m = adapter bottleneck width, P = prefix positions per layer.

// one flat buffer of trainable parameters with its gradient and AdamW moments, all the same layout
template <typename real>
struct TrainableBuffer {
    real* params;
    real* grads;
    real* m;
    real* v;
    size_t n;
};

template <typename real>
void trainable_alloc(TrainableBuffer<real>* tb, size_t n, const char* what) {
    tb->n = n;
    tb->params = calloc_real<real>(n, what);
    tb->grads = calloc_real<real>(n, what);
    tb->m = calloc_real<real>(n, what);
    tb->v = calloc_real<real>(n, what);
}

template <typename real>
void trainable_free(TrainableBuffer<real>* tb) {
    free(tb->params);
    free(tb->grads);
    free(tb->m);
    free(tb->v);
    memset(tb, 0, sizeof(*tb));
}

// the gradient of a parameter pointer p inside tb (same offset in the gradient buffer)
template <typename real>
static inline real* grad_of(TrainableBuffer<real>* tb, const real* p) { return tb->grads + (p - tb->params); }

// inp (BT,C), down_w (m,C), down_b (m), up_w (C,m), up_b (C) -> h, hg (BT,m) cached;
// out (BT,C) = inp + gelu(inp @ down_w^T + down_b) @ up_w^T + up_b. out must not alias inp.
template <typename real>
void adapter_forward(real* out, real* h, real* hg, const real* inp, const real* down_w, const real* down_b,
                     const real* up_w, const real* up_b, int BT, int C, int m) {
    matmul_forward(h, inp, down_w, down_b, 1, BT, C, m);     // h = down(inp)
    gelu_forward(hg, h, (size_t)BT * m);                      // hg = gelu(h)
    matmul_forward(out, hg, up_w, up_b, 1, BT, m, C);        // out = up(hg)
    residual_forward(out, out, inp, (size_t)BT * C);         // out += inp, the adapter's own skip
}

// dout (BT,C) -> dinp (BT,C) +=, ddown_w (m,C) +=, ddown_b (m) +=, dup_w (C,m) +=, dup_b (C) +=;
// dh, dhg (BT,m) are scratch (overwritten). dinp must not alias dout.
template <typename real>
void adapter_backward(real* dinp, real* ddown_w, real* ddown_b, real* dup_w, real* dup_b, real* dh, real* dhg,
                      const real* dout, const real* h, const real* hg, const real* inp, const real* down_w,
                      const real* up_w, int BT, int C, int m) {
    // forward was: out = inp + up(gelu(down(inp))); so dinp = dout + down_w^T (gelu'(h) * (up_w^T dout)) per row
    memset(dh, 0, (size_t)BT * m * sizeof(real));
    memset(dhg, 0, (size_t)BT * m * sizeof(real));
    matmul_backward(dhg, dup_w, dup_b, dout, hg, up_w, 1, BT, m, C);
    gelu_backward(dh, h, dhg, (size_t)BT * m);
    matmul_backward(dinp, ddown_w, ddown_b, dh, inp, down_w, 1, BT, C, m);
    #pragma omp parallel for
    for (size_t i = 0; i < (size_t)BT * C; i++) { dinp[i] += dout[i]; } // the skip
}

// Houlsby adapters: one bottleneck after the attention projection (pos 0) and one after the MLP projection
// (pos 1) of every block, before the residual add. Adapter a = 2 * l + pos.
template <typename real>
struct Adapters {
    int m;                       // bottleneck width; 0 = no adapters
    int L, C;
    real* down_w;                // (L, 2, m, C)
    real* down_b;                // (L, 2, m)
    real* up_w;                  // (L, 2, C, m)
    real* up_b;                  // (L, 2, C)
    TrainableBuffer<real> buf;   // down_w, down_b, up_w, up_b back to back
    // activations, for batches up to act_BT rows
    real* x;                     // (L, 2, BT, C) adapter inputs (the projection outputs)
    real* h;                     // (L, 2, BT, m) bottleneck before GELU
    real* hg;                    // (L, 2, BT, m) bottleneck after GELU
    real* dx;                    // (BT, C) backward scratch: the gradient at the adapter input
    real* dh;                    // (BT, m) backward scratch
    real* dhg;                   // (BT, m) backward scratch
    size_t act_BT;
};

static inline size_t adapters_count_parameters(int L, int C, int m) { return (size_t)L * 2 * (2 * (size_t)m * C + m + C); }

// down_w ~ U(-1/sqrt(C), 1/sqrt(C)), up = 0: every adapter starts as the identity, so the model starts at the base
template <typename real>
void adapters_init(Adapters<real>* ad, int L, int C, int m, uint64_t seed) {
    memset(ad, 0, sizeof(*ad));
    ad->m = m;
    ad->L = L;
    ad->C = C;
    trainable_alloc(&ad->buf, adapters_count_parameters(L, C, m), "adapters");
    ad->down_w = ad->buf.params;
    ad->down_b = ad->down_w + (size_t)L * 2 * m * C;
    ad->up_w = ad->down_b + (size_t)L * 2 * m;
    ad->up_b = ad->up_w + (size_t)L * 2 * C * m;
    Rng rng;
    rng_seed(&rng, seed);
    float bound = 1.0f / sqrtf((float)C);
    for (size_t i = 0; i < (size_t)L * 2 * m * C; i++) { ad->down_w[i] = (real)rng_uniform(&rng, -bound, bound); }
}

template <typename real>
void adapters_allocate_activations(Adapters<real>* ad, size_t BT) {
    size_t La = (size_t)ad->L * 2;
    free(ad->x); free(ad->h); free(ad->hg); free(ad->dx); free(ad->dh); free(ad->dhg);
    ad->x = calloc_real<real>(La * BT * ad->C, "adapter inputs");
    ad->h = calloc_real<real>(La * BT * ad->m, "adapter bottleneck");
    ad->hg = calloc_real<real>(La * BT * ad->m, "adapter bottleneck");
    ad->dx = calloc_real<real>(BT * ad->C, "adapter scratch");
    ad->dh = calloc_real<real>(BT * ad->m, "adapter scratch");
    ad->dhg = calloc_real<real>(BT * ad->m, "adapter scratch");
    ad->act_BT = BT;
}

template <typename real>
size_t adapters_activation_bytes(const Adapters<real>* ad) {
    if (ad->m == 0) return 0;
    size_t BT = ad->act_BT, La = (size_t)ad->L * 2;
    return (La * BT * ((size_t)ad->C + 2 * ad->m) + BT * ((size_t)ad->C + 2 * ad->m)) * sizeof(real);
}

template <typename real>
void adapters_free(Adapters<real>* ad) {
    trainable_free(&ad->buf);
    free(ad->x); free(ad->h); free(ad->hg); free(ad->dx); free(ad->dh); free(ad->dhg);
    memset(ad, 0, sizeof(*ad));
}

// the adapter at (block l, position pos): proj (BT,C) becomes proj + up(gelu(down(proj))), in place
template <typename real>
void gpt2_adapter_forward(Adapters<real>* ad, int pos, int l, real* proj, int BT) {
    if (ad->m == 0) return;
    int C = ad->C, m = ad->m;
    size_t a = 2 * (size_t)l + pos;
    real* x = ad->x + a * BT * C;
    memcpy(x, proj, (size_t)BT * C * sizeof(real)); // cached: the backward needs the adapter input
    adapter_forward(proj, ad->h + a * BT * m, ad->hg + a * BT * m, x, ad->down_w + a * m * C, ad->down_b + a * m,
                    ad->up_w + a * C * m, ad->up_b + a * C, BT, C, m);
}

// dout (BT,C) at the adapter output -> the gradient at its input: dout itself when there are no adapters
template <typename real>
real* gpt2_adapter_backward(Adapters<real>* ad, int pos, int l, real* dout, int BT) {
    if (ad->m == 0) return dout;
    int C = ad->C, m = ad->m;
    size_t a = 2 * (size_t)l + pos;
    real* down_w = ad->down_w + a * m * C;
    real* down_b = ad->down_b + a * m;
    real* up_w = ad->up_w + a * C * m;
    real* up_b = ad->up_b + a * C;
    memset(ad->dx, 0, (size_t)BT * C * sizeof(real));
    adapter_backward(ad->dx, grad_of(&ad->buf, down_w), grad_of(&ad->buf, down_b), grad_of(&ad->buf, up_w),
                     grad_of(&ad->buf, up_b), ad->dh, ad->dhg, dout, ad->h + a * BT * m, ad->hg + a * BT * m,
                     ad->x + a * BT * C, down_w, up_w, BT, C, m);
    return ad->dx;
}

// Attention with P trainable prefix positions in front of the sequence (prefix tuning).
// qkv (B,T,3C), prefix_k, prefix_v (P,C) -> out (B,T,C); att (B,NH,T,P+T) post-softmax weights cached.
// Column j < P of a row is prefix position j (visible to every query); column P + t2 is real position
// t2, visible to query t when t2 <= t (the causal mask among real tokens is unchanged).
// drop_p, drop_key: dropout on the probabilities (-R), as in attention_forward, the prefix columns included
template <typename real>
void attention_prefix_forward(real* out, real* att, const real* qkv, const real* prefix_k, const real* prefix_v,
                              int B, int T, int C, int NH, int P, int t0 = 0, float drop_p = 0, uint64_t drop_key = 0) {
    int hs = C / NH, TP = P + T, Tq = T - t0; // queries t0..T-1, as in attention_forward
    real scale = 1 / std::sqrt((real)hs);
    // parallel over (b, h), with the same arithmetic as attention_forward (its helpers, in its order), so
    // that P = 0 gives attention_forward's bits
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            // the head's keys transposed, the prefix's first: column j < P is prefix position j, P + t2 position t2
            size_t ld;
            real* kT = attention_head_transposed(&ld, qkv, b, h, 1, T, C, hs, P);
            for (int j = 0; j < P; j++) {
                for (int i = 0; i < hs; i++) { kT[(size_t)i * ld + j] = prefix_k[(size_t)j * C + h * hs + i]; }
            }
            for (int t = t0; t < T; t++) {
                const real* q = qkv + ((size_t)b * T + t) * 3 * C + h * hs;
                real* att_bth = att + (((size_t)b * NH + h) * Tq + (t - t0)) * TP;
                int n = P + t + 1; // visible columns
                const real* a = attention_softmax_row(att_bth, q, kT, ld, hs, n, TP, scale, drop_p, drop_key, (size_t)(att_bth - att));
                // out = a @ [prefix_v; v]: the prefix rows, then the real ones, each out[i] summed in that order
                real* out_bth = out + ((size_t)b * Tq + (t - t0)) * C + h * hs;
                for (int i = 0; i < hs; i++) { out_bth[i] = 0; }
                attention_rows_sum(out_bth, a, prefix_v + h * hs, (size_t)C, P, hs);
                attention_rows_sum(out_bth, a + P, qkv + (size_t)b * T * 3 * C + 2 * C + h * hs, (size_t)3 * C, t + 1, hs);
            }
        }
    }
}

// dout (B,T,C) -> dqkv (B,T,3C) +=, dprefix_k, dprefix_v (P,C) +=; datt (B,NH,T,P+T) is scratch;
// drop_p, drop_key as the forward had them
template <typename real>
void attention_prefix_backward(real* dqkv, real* dprefix_k, real* dprefix_v, real* datt, const real* dout,
                               const real* qkv, const real* prefix_k, const real* prefix_v, const real* att,
                               int B, int T, int C, int NH, int P, float drop_p = 0, uint64_t drop_key = 0) {
    int hs = C / NH, TP = P + T;
    real scale = 1 / std::sqrt((real)hs);
    real drop_scale = 1 / (1 - (real)drop_p);
    // parallel over heads only: the prefix of head h is shared by every sequence b, and each thread owns
    // head h's channels of dqkv and of dprefix_k / dprefix_v, so no atomics are needed
    #pragma omp parallel for
    for (int h = 0; h < NH; h++) {
        for (int b = 0; b < B; b++) {
            for (int t = 0; t < T; t++) {
                const real* att_bth = att + (((size_t)b * NH + h) * T + t) * TP;
                real* datt_bth = datt + (((size_t)b * NH + h) * T + t) * TP;
                const real* dout_bth = dout + ((size_t)b * T + t) * C + h * hs;
                int n = P + t + 1;
                // forward was: out = sum_j att[j] v[j]; so datt[j] = dout . v[j], dv[j] += att[j] dout
                for (int j = 0; j < n; j++) {
                    size_t voff = j < P ? (size_t)j * C + h * hs : ((size_t)b * T + j - P) * 3 * C + 2 * C + h * hs;
                    const real* v = (j < P ? prefix_v : qkv) + voff;
                    real* dv = (j < P ? dprefix_v : dqkv) + voff;
                    // (with dropout the forward used a = att * m, m = mask / (1 - p): dv gets a, datt gets m * dout . v)
                    real m = drop_p > 0 ? (dropout_keep(drop_key, (size_t)(att_bth - att) + j, drop_p) ? drop_scale : 0) : 1;
                    real a = m * att_bth[j];
                    for (int i = 0; i < hs; i++) { dv[i] += a * dout_bth[i]; }
                    datt_bth[j] = m * dot_lanes(dout_bth, v, hs);
                }
                // forward was: att = softmax(s); so ds[j] = att[j] (datt[j] - sum_i att[i] datt[i])
                real dot = 0;
                for (int j = 0; j < n; j++) { dot += att_bth[j] * datt_bth[j]; }
                // forward was: s[j] = scale q . k[j]; so dq += scale ds[j] k[j], dk[j] += scale ds[j] q
                const real* q = qkv + ((size_t)b * T + t) * 3 * C + h * hs;
                real* dq = dqkv + ((size_t)b * T + t) * 3 * C + h * hs;
                for (int j = 0; j < n; j++) {
                    real ds = att_bth[j] * (datt_bth[j] - dot) * scale;
                    size_t koff = j < P ? (size_t)j * C + h * hs : ((size_t)b * T + j - P) * 3 * C + C + h * hs;
                    const real* k = (j < P ? prefix_k : qkv) + koff;
                    real* dk = (j < P ? dprefix_k : dqkv) + koff;
                    for (int i = 0; i < hs; i++) {
                        dq[i] += ds * k[i];
                        dk[i] += ds * q[i];
                    }
                }
            }
        }
    }
}

// prefix tuning: P trainable key and value vectors per layer (each head sees its hs channels of them)
template <typename real>
struct Prefix {
    int P;                       // prefix positions per layer; 0 = no prefix
    int L, C, NH;
    real* keys;                  // (L, P, C)
    real* values;                // (L, P, C)
    TrainableBuffer<real> buf;   // keys then values
    real* att;                   // (L, B, NH, T, P + T) replaces the model's att when P > 0
    real* datt;                  // (B, NH, T, P + T) backward scratch
    size_t act_att;              // elements of att
};

// keys, values ~ N(0, 0.02^2): near zero, so each prefix position starts with a score near 0 and a value near 0
template <typename real>
void prefix_init(Prefix<real>* pf, int L, int C, int NH, int P, uint64_t seed) {
    memset(pf, 0, sizeof(*pf));
    pf->P = P;
    pf->L = L;
    pf->C = C;
    pf->NH = NH;
    trainable_alloc(&pf->buf, 2 * (size_t)L * P * C, "prefix");
    pf->keys = pf->buf.params;
    pf->values = pf->keys + (size_t)L * P * C;
    Rng rng;
    rng_seed(&rng, seed);
    for (size_t i = 0; i < pf->buf.n; i++) { pf->buf.params[i] = (real)(0.02f * rng_normal(&rng)); }
}

template <typename real>
void prefix_allocate_activations(Prefix<real>* pf, int B, int T) {
    free(pf->att);
    free(pf->datt);
    size_t row = (size_t)B * pf->NH * T * (pf->P + T);
    pf->act_att = (size_t)pf->L * row;
    pf->att = calloc_real<real>(pf->act_att, "prefix attention");
    pf->datt = calloc_real<real>(row, "prefix attention scratch");
}

template <typename real>
size_t prefix_activation_bytes(const Prefix<real>* pf) {
    return pf->P == 0 ? 0 : (pf->act_att + pf->act_att / pf->L) * sizeof(real);
}

template <typename real>
void prefix_free(Prefix<real>* pf) {
    trainable_free(&pf->buf);
    free(pf->att);
    free(pf->datt);
    memset(pf, 0, sizeof(*pf));
}

template <typename real>
void gpt2_prefix_attention_forward(Prefix<real>* pf, int l, real* out, const real* qkv, int B, int T, int t0 = 0,
                                   float drop_p = 0, uint64_t drop_key = 0) {
    int C = pf->C, P = pf->P;
    // layer l's weights at (L, B, NH, T - t0, P + T): within the (L, B, NH, T, P + T) allocated for training
    attention_prefix_forward(out, pf->att + (size_t)l * B * pf->NH * (T - t0) * (P + T), qkv, pf->keys + (size_t)l * P * C,
                             pf->values + (size_t)l * P * C, B, T, C, pf->NH, P, t0, drop_p, drop_key);
}

template <typename real>
void gpt2_prefix_attention_backward(Prefix<real>* pf, int l, real* dqkv, const real* dout, const real* qkv, int B, int T,
                                    float drop_p = 0, uint64_t drop_key = 0) {
    int C = pf->C, P = pf->P;
    real* keys = pf->keys + (size_t)l * P * C;
    real* values = pf->values + (size_t)l * P * C;
    attention_prefix_backward(dqkv, grad_of(&pf->buf, keys), grad_of(&pf->buf, values), pf->datt, dout, qkv, keys, values,
                              pf->att + (size_t)l * B * pf->NH * T * (P + T), B, T, C, pf->NH, P, drop_p, drop_key);
}

// L2-SP: the penalty lambda/2 ||W - W0||^2 pulls the fine-tuned weights W toward the pretrained W0.
// params, params0 (n) -> returns lambda/2 * sum (params - params0)^2
template <typename real>
double l2sp_forward(const real* params, const real* params0, size_t n, float lambda) {
    double sum = 0;
    #pragma omp parallel for reduction(+ : sum)
    for (size_t i = 0; i < n; i++) { double d = (double)params[i] - (double)params0[i]; sum += d * d; }
    return 0.5 * lambda * sum;
}

// grads (n) += lambda * (params - params0), the derivative of the penalty above
template <typename real>
void l2sp_backward(real* grads, const real* params, const real* params0, size_t n, float lambda) {
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) { grads[i] += (real)lambda * (params[i] - params0[i]); }
}
