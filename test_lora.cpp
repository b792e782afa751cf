/*
Tests for train_gpt2_lora: every backward against finite differences in double, the LoRA invariants,
the fast kernels against their naive twins, and clean errors on bad input. doctest makes any failed
check fail the process. Run with `make test` (from the repository root).

The trainer is compiled into this binary (TESTING hides its main), so the tests call the very kernels
and model functions the program runs; the templates let the gradient checks run them in double.
*/
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
#define TESTING
#include "train_gpt2_lora.cpp"

#include <functional>
#include <sys/wait.h>

// ----------------------------------------------------------------------------
// helpers

static std::vector<double> random_vector(Rng* rng, size_t n, double magnitude) {
    std::vector<double> v(n);
    for (size_t i = 0; i < n; i++) { v[i] = magnitude * (2.0 * rng_f32(rng) - 1.0); }
    return v;
}

// Central differences of loss() with respect to every element of x[0..n), compared with grad.
// Returns max |numeric - analytic| / max(|analytic|, |numeric|) over the tensor (0 if both vanish).
// The step is relative to each element's size, so inputs of any magnitude are probed alike.
static double fd_relative_error(double* x, size_t n, const double* grad, const std::function<double()>& loss,
                                const char* label) {
    double maxdiff = 0, maxgrad = 0;
    for (size_t i = 0; i < n; i++) {
        double old = x[i];
        double eps = 1e-5 * std::max(1.0, std::fabs(old));
        x[i] = old + eps;
        double lp = loss();
        x[i] = old - eps;
        double lm = loss();
        x[i] = old;
        double numeric = (lp - lm) / (2 * eps);
        maxdiff = std::max(maxdiff, std::fabs(numeric - grad[i]));
        maxgrad = std::max(maxgrad, std::max(std::fabs(grad[i]), std::fabs(numeric)));
    }
    double rel = maxgrad > 0 ? maxdiff / maxgrad : 0.0;
    MESSAGE(std::string(label) << ": maxdiff " << maxdiff << " (relative " << rel << ", max |grad| " << maxgrad << ")");
    return rel;
}

// Central differences in double: truncation error O(eps^2) ~ 1e-10 relative and rounding ~ 1e-16 / 1e-5,
// so a correct gradient lands near 1e-9; a wrong one (missing scale, transposed index) is off by O(1).
const double tol_fd = 1e-6;

static double dot(const std::vector<double>& a, const double* b) {
    double s = 0;
    for (size_t i = 0; i < a.size(); i++) { s += a[i] * b[i]; }
    return s;
}

// a tiny GPT-2 built in memory; V=61 is padded to Vp=64 so the padding path is exercised
static GPT2Config tiny_config() {
    GPT2Config cfg;
    cfg.max_seq_len = 16;
    cfg.vocab_size = 61;
    cfg.padded_vocab_size = 64;
    cfg.num_layers = 2;
    cfg.num_heads = 2;
    cfg.channels = 32;
    return cfg;
}

// A random GPT-2 init has a tiny LM head (wte ~ N(0, 0.02)): with C=32 no logit can exceed ~0.7, so
// nothing could be learned. Tests that train use wte ~ N(0, 0.2), as a trained model's would be larger.
template <typename real>
static void build_trainable_tiny(GPT2<real>* model, uint64_t seed) {
    gpt2_build_random(model, tiny_config(), seed);
    for (size_t i = 0; i < model->param_sizes[0]; i++) model->params.wte[i] *= 10;
}

static void random_tokens(Rng* rng, std::vector<int>* v, size_t n, int V) {
    v->resize(n);
    for (size_t i = 0; i < n; i++) { (*v)[i] = (int)(rng_u32(rng) % V); }
}

// ----------------------------------------------------------------------------
// LoRA kernels

TEST_CASE("lora_backward matches finite differences (dlora_A, dlora_B, dinp) over ranks, scales, magnitudes") {
    const int BT = 5, C = 7, OC = 6;
    Rng rng;
    rng_seed(&rng, 42);
    for (int r : {1, 3, 8}) {
        for (double scale : {0.5, 2.0}) {
            for (double mag : {1e-2, 1.0, 1e2}) {
                CAPTURE(r); CAPTURE(scale); CAPTURE(mag);
                std::vector<double> inp = random_vector(&rng, (size_t)BT * C, mag);
                std::vector<double> lora_A = random_vector(&rng, (size_t)r * C, mag);
                std::vector<double> lora_B = random_vector(&rng, (size_t)OC * r, mag);
                std::vector<double> base = random_vector(&rng, (size_t)BT * OC, 1.0);
                std::vector<double> w = random_vector(&rng, (size_t)BT * OC, 1.0); // loss = sum(out * w), so dout = w
                std::vector<double> out(base.size()), h((size_t)BT * r), dh((size_t)BT * r);
                auto loss = [&]() {
                    out = base;
                    lora_forward(out.data(), h.data(), inp.data(), lora_A.data(), lora_B.data(), scale, BT, C, OC, r);
                    return dot(w, out.data());
                };
                loss();
                std::vector<double> dinp(inp.size(), 0.0), dA(lora_A.size(), 0.0), dB(lora_B.size(), 0.0);
                lora_backward(dinp.data(), dA.data(), dB.data(), dh.data(), w.data(), h.data(), inp.data(),
                              lora_A.data(), lora_B.data(), scale, BT, C, OC, r);
                CHECK(fd_relative_error(lora_A.data(), lora_A.size(), dA.data(), loss, "dlora_A") < tol_fd);
                CHECK(fd_relative_error(lora_B.data(), lora_B.size(), dB.data(), loss, "dlora_B") < tol_fd);
                CHECK(fd_relative_error(inp.data(), inp.size(), dinp.data(), loss, "dinp") < tol_fd);
            }
        }
    }
}

TEST_CASE("lora_forward adds scale * inp @ (lora_B lora_A)^T, the merged low-rank update") {
    const int BT = 4, C = 9, OC = 5, r = 3;
    const double scale = 1.5;
    Rng rng;
    rng_seed(&rng, 7);
    std::vector<double> inp = random_vector(&rng, (size_t)BT * C, 1.0), lora_A = random_vector(&rng, (size_t)r * C, 1.0);
    std::vector<double> lora_B = random_vector(&rng, (size_t)OC * r, 1.0), out((size_t)BT * OC, 0.0), h((size_t)BT * r);
    lora_forward(out.data(), h.data(), inp.data(), lora_A.data(), lora_B.data(), scale, BT, C, OC, r);
    // delta W = lora_B @ lora_A (OC, C), formed explicitly only here, as the reference
    double maxdiff = 0;
    for (int bt = 0; bt < BT; bt++) {
        for (int o = 0; o < OC; o++) {
            double ref = 0;
            for (int c = 0; c < C; c++) {
                double dw = 0;
                for (int i = 0; i < r; i++) { dw += lora_B[o * r + i] * lora_A[i * C + c]; }
                ref += scale * dw * inp[bt * C + c];
            }
            maxdiff = std::max(maxdiff, std::fabs(ref - out[bt * OC + o]));
        }
    }
    const double tol_merge = 1e-12; // double, sums of 27 products of O(1) numbers: reassociation only
    CHECK(maxdiff < tol_merge);
}

// ----------------------------------------------------------------------------
// GPT-2 kernels, each backward against finite differences in double

TEST_CASE("encoder_backward matches finite differences") {
    const int B = 2, T = 3, C = 4, Vp = 5, maxT = 3;
    Rng rng;
    rng_seed(&rng, 1);
    std::vector<int> inp = {0, 3, 3, 1, 4, 0}; // repeated ids: their gradients must add up
    std::vector<double> wte = random_vector(&rng, (size_t)Vp * C, 1.0), wpe = random_vector(&rng, (size_t)maxT * C, 1.0);
    std::vector<double> w = random_vector(&rng, (size_t)B * T * C, 1.0), out((size_t)B * T * C);
    auto loss = [&]() {
        encoder_forward(out.data(), inp.data(), wte.data(), wpe.data(), B, T, C);
        return dot(w, out.data());
    };
    std::vector<double> dwte(wte.size(), 0.0), dwpe(wpe.size(), 0.0);
    encoder_backward(dwte.data(), dwpe.data(), w.data(), inp.data(), B, T, C);
    CHECK(fd_relative_error(wte.data(), wte.size(), dwte.data(), loss, "dwte") < tol_fd);
    CHECK(fd_relative_error(wpe.data(), wpe.size(), dwpe.data(), loss, "dwpe") < tol_fd);
}

TEST_CASE("layernorm_backward matches finite differences over input magnitudes") {
    const int B = 2, T = 3, C = 8;
    Rng rng;
    rng_seed(&rng, 2);
    for (double mag : {1e-1, 1.0, 1e2}) {
        CAPTURE(mag);
        std::vector<double> inp = random_vector(&rng, (size_t)B * T * C, mag);
        std::vector<double> weight = random_vector(&rng, C, 1.0), bias = random_vector(&rng, C, 1.0);
        std::vector<double> w = random_vector(&rng, (size_t)B * T * C, 1.0);
        std::vector<double> out(inp.size()), mean(B * T), rstd(B * T);
        auto loss = [&]() {
            layernorm_forward(out.data(), mean.data(), rstd.data(), inp.data(), weight.data(), bias.data(), B, T, C);
            return dot(w, out.data());
        };
        loss();
        std::vector<double> dinp(inp.size(), 0.0), dweight(C, 0.0), dbias(C, 0.0);
        layernorm_backward(dinp.data(), dweight.data(), dbias.data(), w.data(), inp.data(), weight.data(), mean.data(), rstd.data(), B, T, C);
        CHECK(fd_relative_error(inp.data(), inp.size(), dinp.data(), loss, "layernorm dinp") < tol_fd);
        CHECK(fd_relative_error(weight.data(), C, dweight.data(), loss, "layernorm dweight") < tol_fd);
        CHECK(fd_relative_error(bias.data(), C, dbias.data(), loss, "layernorm dbias") < tol_fd);
    }
}

TEST_CASE("matmul_backward matches finite differences, and a NULL dweight means no weight work") {
    const int B = 2, T = 3, C = 5, OC = 4;
    Rng rng;
    rng_seed(&rng, 3);
    std::vector<double> inp = random_vector(&rng, (size_t)B * T * C, 1.0), weight = random_vector(&rng, (size_t)OC * C, 1.0);
    std::vector<double> bias = random_vector(&rng, OC, 1.0), w = random_vector(&rng, (size_t)B * T * OC, 1.0);
    std::vector<double> out((size_t)B * T * OC);
    auto loss = [&]() {
        matmul_forward(out.data(), inp.data(), weight.data(), bias.data(), B, T, C, OC);
        return dot(w, out.data());
    };
    std::vector<double> dinp(inp.size(), 0.0), dweight(weight.size(), 0.0), dbias(OC, 0.0);
    matmul_backward(dinp.data(), dweight.data(), dbias.data(), w.data(), inp.data(), weight.data(), B, T, C, OC);
    CHECK(fd_relative_error(inp.data(), inp.size(), dinp.data(), loss, "matmul dinp") < tol_fd);
    CHECK(fd_relative_error(weight.data(), weight.size(), dweight.data(), loss, "matmul dweight") < tol_fd);
    CHECK(fd_relative_error(bias.data(), OC, dbias.data(), loss, "matmul dbias") < tol_fd);
    // frozen: the same dinp, and nothing else computed
    std::vector<double> dinp2(inp.size(), 0.0);
    matmul_backward(dinp2.data(), (double*)NULL, (double*)NULL, w.data(), inp.data(), weight.data(), B, T, C, OC);
    CHECK(dinp2 == dinp);
}

TEST_CASE("attention_backward matches finite differences over input magnitudes") {
    const int B = 2, T = 4, C = 6, NH = 2;
    Rng rng;
    rng_seed(&rng, 4);
    for (double mag : {1e-1, 1.0, 3.0}) {
        CAPTURE(mag);
        std::vector<double> qkv = random_vector(&rng, (size_t)B * T * 3 * C, mag), w = random_vector(&rng, (size_t)B * T * C, 1.0);
        std::vector<double> out((size_t)B * T * C), att((size_t)B * NH * T * T), datt(att.size());
        auto loss = [&]() {
            attention_forward(out.data(), att.data(), qkv.data(), B, T, C, NH);
            return dot(w, out.data());
        };
        loss();
        std::vector<double> dqkv(qkv.size(), 0.0);
        attention_backward(dqkv.data(), datt.data(), w.data(), qkv.data(), att.data(), B, T, C, NH);
        CHECK(fd_relative_error(qkv.data(), qkv.size(), dqkv.data(), loss, "attention dqkv") < tol_fd);
    }
}

TEST_CASE("gelu_backward matches finite differences") {
    const size_t N = 50;
    Rng rng;
    rng_seed(&rng, 5);
    std::vector<double> inp = random_vector(&rng, N, 4.0), w = random_vector(&rng, N, 1.0), out(N);
    auto loss = [&]() {
        gelu_forward(out.data(), inp.data(), N);
        return dot(w, out.data());
    };
    std::vector<double> dinp(N, 0.0);
    gelu_backward(dinp.data(), inp.data(), w.data(), N);
    CHECK(fd_relative_error(inp.data(), N, dinp.data(), loss, "gelu dinp") < tol_fd);
}

TEST_CASE("fused softmax + cross-entropy backward matches finite differences; padding gets no gradient") {
    const int B = 2, T = 3, V = 7, Vp = 8;
    Rng rng;
    rng_seed(&rng, 6);
    std::vector<double> logits = random_vector(&rng, (size_t)B * T * Vp, 3.0);
    std::vector<int> targets = {0, 6, 3, 3, 1, 5};
    std::vector<double> losses(B * T), lse(B * T);
    auto loss = [&]() {
        crossentropy_forward(losses.data(), lse.data(), logits.data(), targets.data(), B, T, V, Vp);
        double s = 0;
        for (double l : losses) s += l;
        return s / (B * T);
    };
    loss();
    std::vector<double> dlogits = logits;
    crossentropy_backward(dlogits.data(), lse.data(), targets.data(), 1.0 / (B * T), B, T, V, Vp);
    CHECK(fd_relative_error(logits.data(), logits.size(), dlogits.data(), loss, "dlogits") < tol_fd);
    for (int bt = 0; bt < B * T; bt++) { CHECK(dlogits[(size_t)bt * Vp + V] == 0.0); }
}

// ----------------------------------------------------------------------------
// the whole model, end to end, in double

// tiny model in double with LoRA on all targets, lora_B nonzero so that dlora_A is nonzero too
static void build_tiny_lora_model(GPT2<double>* model, unsigned targets, int r, uint64_t seed) {
    gpt2_build_random(model, tiny_config(), seed);
    // perturb layernorm weights and biases away from 1 / 0 so their roles are exercised
    Rng rng;
    rng_seed(&rng, seed + 100);
    for (size_t i = 0; i < model->num_parameters; i++) { model->params_memory[i] += 0.05 * (2.0 * rng_f32(&rng) - 1.0); }
    gpt2_lora_attach(model, lora_config(r, 2.0f * r, targets), seed + 1);
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        if (!model->lora.lora_B[t]) continue;
        size_t n = (size_t)model->config.num_layers * lora_target_out(t, model->config.channels) * r;
        for (size_t i = 0; i < n; i++) { model->lora.lora_B[t][i] = 0.1 * (2.0 * rng_f32(&rng) - 1.0); }
    }
}

TEST_CASE("end to end: the gradient of the loss w.r.t. every adapter parameter matches finite differences") {
    const int B = 2, T = 5;
    GPT2<double> model;
    build_tiny_lora_model(&model, LORA_ALL_TARGETS, 2, 11);
    Rng rng;
    rng_seed(&rng, 12);
    std::vector<int> inputs, targets;
    random_tokens(&rng, &inputs, B * T, model.config.vocab_size);
    random_tokens(&rng, &targets, B * T, model.config.vocab_size);
    auto loss = [&]() {
        gpt2_forward(&model, inputs.data(), targets.data(), B, T);
        return model.mean_loss;
    };
    loss();
    gpt2_zero_grad(&model);
    gpt2_backward(&model);
    std::vector<double> grads(model.lora.grads_memory, model.lora.grads_memory + model.lora.num_parameters);
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        std::string target = lora_target_names[t];
        CAPTURE(target);
        size_t off_A = model.lora.lora_A[t] - model.lora.params_memory, off_B = model.lora.lora_B[t] - model.lora.params_memory;
        size_t nA = (size_t)model.config.num_layers * 2 * lora_target_in(t, model.config.channels);
        size_t nB = (size_t)model.config.num_layers * lora_target_out(t, model.config.channels) * 2;
        std::string la = std::string("model dlora_A ") + lora_target_names[t], lb = std::string("model dlora_B ") + lora_target_names[t];
        CHECK(fd_relative_error(model.lora.lora_A[t], nA, grads.data() + off_A, loss, la.c_str()) < tol_fd);
        CHECK(fd_relative_error(model.lora.lora_B[t], nB, grads.data() + off_B, loss, lb.c_str()) < tol_fd);
    }
    gpt2_free(&model);
}

TEST_CASE("end to end, full fine-tuning: every base tensor's gradient matches finite differences") {
    const int B = 2, T = 5;
    GPT2<double> model;
    gpt2_build_random(&model, tiny_config(), 21);
    Rng rng;
    rng_seed(&rng, 22);
    for (size_t i = 0; i < model.num_parameters; i++) { model.params_memory[i] += 0.05 * (2.0 * rng_f32(&rng) - 1.0); }
    gpt2_enable_full_training(&model);
    std::vector<int> inputs, targets;
    random_tokens(&rng, &inputs, B * T, model.config.vocab_size);
    random_tokens(&rng, &targets, B * T, model.config.vocab_size);
    auto loss = [&]() {
        gpt2_forward(&model, inputs.data(), targets.data(), B, T);
        return model.mean_loss;
    };
    loss();
    gpt2_zero_grad(&model);
    gpt2_backward(&model);
    // 60 evenly spread elements of each of the 16 tensors (the whole tensor when smaller)
    size_t off = 0;
    for (int k = 0; k < NUM_PARAMETER_TENSORS; k++) {
        size_t n = model.param_sizes[k], stride = std::max<size_t>(1, n / 60);
        std::vector<double> sub_x, sub_g;
        double maxdiff = 0, maxgrad = 0;
        for (size_t i = 0; i < n; i += stride) {
            double* x = model.params_memory + off + i;
            double g = model.grads_memory[off + i], old = *x, eps = 1e-5 * std::max(1.0, std::fabs(old));
            *x = old + eps;
            double lp = loss();
            *x = old - eps;
            double lm = loss();
            *x = old;
            double numeric = (lp - lm) / (2 * eps);
            maxdiff = std::max(maxdiff, std::fabs(numeric - g));
            maxgrad = std::max(maxgrad, std::max(std::fabs(g), std::fabs(numeric)));
        }
        double rel = maxgrad > 0 ? maxdiff / maxgrad : 0;
        MESSAGE("full d" << std::string(param_tensor_names[k]) << ": maxdiff " << maxdiff << " relative " << rel);
        std::string name = param_tensor_names[k];
        CAPTURE(name);
        CHECK(rel < tol_fd);
        off += n;
    }
    gpt2_free(&model);
}

// ----------------------------------------------------------------------------
// LoRA invariants, in float as the program runs

TEST_CASE("lora_B = 0 gives logits bit-identical to the base model") {
    const int B = 2, T = 8;
    GPT2<float> base, adapted;
    gpt2_build_random(&base, tiny_config(), 31);
    gpt2_build_random(&adapted, tiny_config(), 31);
    gpt2_lora_attach(&adapted, lora_config(4, 8.0f, LORA_ALL_TARGETS), 32);
    Rng rng;
    rng_seed(&rng, 33);
    std::vector<int> inputs;
    random_tokens(&rng, &inputs, B * T, base.config.vocab_size);
    gpt2_forward(&base, inputs.data(), (const int*)NULL, B, T);
    gpt2_forward(&adapted, inputs.data(), (const int*)NULL, B, T);
    size_t n = (size_t)B * T * base.config.padded_vocab_size;
    CHECK(memcmp(base.acts.logits, adapted.acts.logits, n * sizeof(float)) == 0);
    gpt2_free(&base);
    gpt2_free(&adapted);
}

TEST_CASE("base parameters are bit-identical after LoRA training steps; the loss on one batch halves in 100 steps") {
    const int B = 2, T = 8;
    GPT2<float> model;
    build_trainable_tiny(&model, 41);
    std::vector<float> before(model.params_memory, model.params_memory + model.num_parameters);
    gpt2_lora_attach(&model, lora_config(8, 16.0f, LORA_ALL_TARGETS), 42);
    Rng rng;
    rng_seed(&rng, 43);
    std::vector<int> inputs, targets;
    random_tokens(&rng, &inputs, B * T, model.config.vocab_size);
    random_tokens(&rng, &targets, B * T, model.config.vocab_size);
    float first = 0, last = 0;
    for (int step = 0; step < 100; step++) {
        gpt2_forward(&model, inputs.data(), targets.data(), B, T);
        if (step == 0) first = model.mean_loss;
        last = model.mean_loss;
        gpt2_zero_grad(&model);
        gpt2_backward(&model);
        gpt2_update(&model, 1e-2f, 0.9f, 0.999f, 1e-8f, 0.0f, step + 1);
    }
    MESSAGE("loss on one repeated batch: " << first << " -> " << last);
    CHECK(memcmp(before.data(), model.params_memory, model.num_parameters * sizeof(float)) == 0);
    CHECK(model.grads_memory == nullptr); // frozen base: no gradient buffers at all
    CHECK(model.m_memory == nullptr);
    CHECK(last <= 0.5f * first);
    gpt2_free(&model);
}

TEST_CASE("trainable count equals the sum of L * r * (in + out) over adapted matrices") {
    GPT2Config cfg = tiny_config();
    int C = cfg.channels, L = cfg.num_layers;
    for (unsigned targets : {1u, 3u, 5u, 15u}) {
        for (int r : {1, 4}) {
            GPT2<float> model;
            gpt2_build_random(&model, cfg, 51);
            gpt2_lora_attach(&model, lora_config(r, 1.0f, targets), 52);
            // spelled out per target: qkv C -> 3C, attproj C -> C, fc C -> 4C, fcproj 4C -> C
            size_t expect = 0;
            if (targets & 1) expect += (size_t)L * r * (C + 3 * C);
            if (targets & 2) expect += (size_t)L * r * (C + C);
            if (targets & 4) expect += (size_t)L * r * (C + 4 * C);
            if (targets & 8) expect += (size_t)L * r * (4 * C + C);
            CAPTURE(targets); CAPTURE(r);
            CHECK(model.lora.num_parameters == expect);
            CHECK(gpt2_trainable_parameters(&model) == expect);
            gpt2_free(&model);
        }
    }
}

TEST_CASE("lora_A init is kaiming-uniform within 1/sqrt(in), lora_B is zero, and the seed decides it") {
    GPT2<float> a, b;
    gpt2_build_random(&a, tiny_config(), 61);
    gpt2_build_random(&b, tiny_config(), 61);
    gpt2_lora_attach(&a, lora_config(4, 4.0f, LORA_ALL_TARGETS), 7);
    gpt2_lora_attach(&b, lora_config(4, 4.0f, LORA_ALL_TARGETS), 7);
    CHECK(memcmp(a.lora.params_memory, b.lora.params_memory, a.lora.num_parameters * sizeof(float)) == 0);
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        int in = lora_target_in(t, a.config.channels), out = lora_target_out(t, a.config.channels);
        float bound = 1.0f / sqrtf((float)in), maxabs = 0;
        for (size_t i = 0; i < (size_t)a.config.num_layers * 4 * in; i++) maxabs = std::max(maxabs, fabsf(a.lora.lora_A[t][i]));
        CHECK(maxabs <= bound);
        CHECK(maxabs > 0.5f * bound); // actually spread over the range, not stuck near zero
        for (size_t i = 0; i < (size_t)a.config.num_layers * out * 4; i++) CHECK(a.lora.lora_B[t][i] == 0.0f);
    }
    gpt2_free(&a);
    gpt2_free(&b);
}

TEST_CASE("targets parse by name; an unknown name is an error") {
    unsigned mask = 0;
    std::string err;
    CHECK(lora_parse_targets("qkv,fcproj", &mask, &err));
    CHECK(mask == ((1u << LORA_QKV) | (1u << LORA_FCPROJ)));
    CHECK_FALSE(lora_parse_targets("qkv,mlp", &mask, &err));
    CHECK(err.find("mlp") != std::string::npos);
    CHECK(err.find("HINT") != std::string::npos);
}

// ----------------------------------------------------------------------------
// fast kernels against their naive twins

TEST_CASE("the float matmul fast path equals its naive twin") {
    Rng rng;
    rng_seed(&rng, 71);
    const int shapes[][4] = {{1, 1, 1, 1}, {2, 3, 17, 5}, {3, 7, 64, 96}, {1, 13, 130, 67}};
    for (auto& s : shapes) {
        int B = s[0], T = s[1], C = s[2], OC = s[3];
        CAPTURE(C); CAPTURE(OC);
        std::vector<float> inp((size_t)B * T * C), weight((size_t)OC * C), bias(OC), dout((size_t)B * T * OC);
        for (auto* v : {&inp, &weight, &bias, &dout}) for (float& x : *v) x = rng_uniform(&rng, -1, 1);
        std::vector<float> out1((size_t)B * T * OC), out2(out1.size());
        matmul_forward(out1.data(), inp.data(), weight.data(), bias.data(), B, T, C, OC);
        matmul_forward_naive(out2.data(), inp.data(), weight.data(), bias.data(), B, T, C, OC);
        // fp32 sums of C products of O(1) terms, summed in another order: error ~ C * 2^-24
        const float tol_matmul = 1e-5f * C;
        float maxdiff = 0;
        for (size_t i = 0; i < out1.size(); i++) maxdiff = std::max(maxdiff, fabsf(out1[i] - out2[i]));
        CHECK(maxdiff <= tol_matmul);
        std::vector<float> dinp1(inp.size(), 0.5f), dw1(weight.size(), 0.5f), db1(OC, 0.5f);
        std::vector<float> dinp2 = dinp1, dw2 = dw1, db2 = db1;
        matmul_backward(dinp1.data(), dw1.data(), db1.data(), dout.data(), inp.data(), weight.data(), B, T, C, OC);
        matmul_backward_naive(dinp2.data(), dw2.data(), db2.data(), dout.data(), inp.data(), weight.data(), B, T, C, OC);
        const float tol_back = 1e-5f * std::max(OC, B * T);
        maxdiff = 0;
        for (size_t i = 0; i < dinp1.size(); i++) maxdiff = std::max(maxdiff, fabsf(dinp1[i] - dinp2[i]));
        for (size_t i = 0; i < dw1.size(); i++) maxdiff = std::max(maxdiff, fabsf(dw1[i] - dw2[i]));
        for (size_t i = 0; i < db1.size(); i++) maxdiff = std::max(maxdiff, fabsf(db1[i] - db2[i]));
        CHECK(maxdiff <= tol_back);
    }
}

// ----------------------------------------------------------------------------
// bad input: clear errors with a HINT, from the readers and from the binary

struct TempDir {
    std::string path;
    TempDir() {
        char tmpl[] = "/tmp/test_lora_XXXXXX";
        path = mkdtemp(tmpl);
    }
    ~TempDir() { std::string cmd = "rm -rf '" + path + "'"; if (system(cmd.c_str())) {} }
    std::string file(const char* name) const { return path + "/" + name; }
};

static void write_bytes(const std::string& path, const void* data, size_t n) {
    FILE* f = fopen(path.c_str(), "wb");
    REQUIRE(f != NULL);
    if (n) REQUIRE(fwrite(data, 1, n, f) == n);
    fclose(f);
}

static void write_tiny_checkpoint(const std::string& path) {
    GPT2<float> model;
    build_trainable_tiny(&model, 81);
    REQUIRE(gpt2_write_checkpoint(&model, path.c_str()) == "");
    gpt2_free(&model);
}

static void write_tokens(const std::string& path, const std::vector<uint16_t>& tokens) {
    int header[256] = {0};
    header[0] = TOKENS_MAGIC;
    header[1] = 1;
    header[2] = (int)tokens.size();
    std::vector<char> bytes(sizeof(header) + 2 * tokens.size());
    memcpy(bytes.data(), header, sizeof(header));
    memcpy(bytes.data() + sizeof(header), tokens.data(), 2 * tokens.size());
    write_bytes(path, bytes.data(), bytes.size());
}

static std::vector<char> read_all(const std::string& path) {
    std::vector<char> v;
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) return v;
    int c;
    while ((c = fgetc(f)) != EOF) v.push_back((char)c);
    fclose(f);
    return v;
}

static bool has(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

TEST_CASE("checkpoint reader: missing, wrong magic, wrong version, truncated and padded files give a clear error") {
    TempDir dir;
    std::string good = dir.file("good.bin");
    write_tiny_checkpoint(good);
    GPT2<float> model;
    std::string err = gpt2_read_checkpoint(&model, good.c_str());
    CHECK(err == "");
    gpt2_free(&model);

    err = gpt2_read_checkpoint(&model, dir.file("missing.bin").c_str());
    CHECK(has(err, "missing.bin"));
    CHECK(has(err, "HINT"));

    std::vector<char> bytes = read_all(good);
    std::vector<char> bad = bytes;
    ((int*)bad.data())[0] = TOKENS_MAGIC;
    write_bytes(dir.file("magic.bin"), bad.data(), bad.size());
    err = gpt2_read_checkpoint(&model, dir.file("magic.bin").c_str());
    CHECK(has(err, "magic"));
    CHECK(has(err, "token file"));
    CHECK(has(err, "HINT"));

    bad = bytes;
    ((int*)bad.data())[1] = 5;
    write_bytes(dir.file("version.bin"), bad.data(), bad.size());
    err = gpt2_read_checkpoint(&model, dir.file("version.bin").c_str());
    CHECK(has(err, "version 5"));
    CHECK(has(err, "HINT"));

    write_bytes(dir.file("trunc.bin"), bytes.data(), bytes.size() - 4);
    err = gpt2_read_checkpoint(&model, dir.file("trunc.bin").c_str());
    CHECK(has(err, "truncated"));
    CHECK(has(err, "trunc.bin"));

    write_bytes(dir.file("short.bin"), bytes.data(), 100);
    err = gpt2_read_checkpoint(&model, dir.file("short.bin").c_str());
    CHECK(has(err, "truncated"));

    bad = bytes;
    bad.push_back(0);
    write_bytes(dir.file("long.bin"), bad.data(), bad.size());
    err = gpt2_read_checkpoint(&model, dir.file("long.bin").c_str());
    CHECK(has(err, "trailing"));

    bad = bytes;
    ((int*)bad.data())[6] = -32; // C
    write_bytes(dir.file("shape.bin"), bad.data(), bad.size());
    err = gpt2_read_checkpoint(&model, dir.file("shape.bin").c_str());
    CHECK(has(err, "impossible shapes"));
}

TEST_CASE("token reader: wrong magic, truncated file, and token ids >= V give a clear error") {
    TempDir dir;
    const int V = 61;
    TokenFile tf;
    write_tokens(dir.file("ok.bin"), {1, 2, 3, 60});
    CHECK(tokens_read(&tf, dir.file("ok.bin").c_str(), V, "-i") == "");
    CHECK(tf.tokens.size() == 4);

    write_tokens(dir.file("big.bin"), {1, 2, 61, 3});
    std::string err = tokens_read(&tf, dir.file("big.bin").c_str(), V, "-i");
    CHECK(has(err, "id 61"));
    CHECK(has(err, "V=61"));
    CHECK(has(err, "HINT"));

    std::vector<char> bytes = read_all(dir.file("ok.bin"));
    write_bytes(dir.file("trunc.bin"), bytes.data(), bytes.size() - 1);
    err = tokens_read(&tf, dir.file("trunc.bin").c_str(), V, "-i");
    CHECK(has(err, "truncated"));

    ((int*)bytes.data())[0] = CHECKPOINT_MAGIC;
    write_bytes(dir.file("magic.bin"), bytes.data(), bytes.size());
    err = tokens_read(&tf, dir.file("magic.bin").c_str(), V, "-i");
    CHECK(has(err, "model checkpoint"));

    DataLoader loader;
    err = dataloader_init(&loader, dir.file("ok.bin").c_str(), 2, 4, V, false, 0, "-i");
    CHECK(has(err, "fewer than one batch"));
}

TEST_CASE("tokenizer reader: decodes pieces and rejects truncated files") {
    TempDir dir;
    int header[256] = {0};
    header[0] = TOKENIZER_MAGIC;
    header[1] = 2;
    header[2] = 2;
    header[3] = 1;
    std::vector<char> bytes((char*)header, (char*)header + sizeof(header));
    const char body[] = {2, 'h', 'i', 1, '!'};
    bytes.insert(bytes.end(), body, body + sizeof(body));
    write_bytes(dir.file("tok.bin"), bytes.data(), bytes.size());
    Tokenizer tok;
    CHECK(tokenizer_read(&tok, dir.file("tok.bin").c_str()) == "");
    CHECK(tok.pieces.size() == 2);
    CHECK(tok.pieces[0] == "hi");
    CHECK(tok.eot_token == 1);
    write_bytes(dir.file("trunc.bin"), bytes.data(), bytes.size() - 1);
    std::string err = tokenizer_read(&tok, dir.file("trunc.bin").c_str());
    CHECK(has(err, "truncated"));
}

// runs the trainer binary (path from $TRAIN_BIN, set by make test) and returns its exit code and output
static int run_trainer(const std::string& args, std::string* output) {
    const char* bin = getenv("TRAIN_BIN");
    std::string cmd = std::string(bin ? bin : "./train_gpt2_lora") + " " + args + " 2>&1";
    FILE* p = popen(cmd.c_str(), "r");
    REQUIRE(p != NULL);
    char buf[4096];
    size_t n;
    output->clear();
    while ((n = fread(buf, 1, sizeof(buf), p)) > 0) output->append(buf, n);
    int status = pclose(p);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST_CASE("the trainer binary: bad inputs exit non-zero with a message naming the flag or file; good input trains") {
    TempDir dir;
    std::string ckpt = dir.file("tiny.bin"), tokens = dir.file("tokens.bin");
    write_tiny_checkpoint(ckpt);
    // a learnable stream: a fixed cycle through the vocabulary
    std::vector<uint16_t> ids(400);
    for (size_t i = 0; i < ids.size(); i++) ids[i] = (uint16_t)((i * 7) % 61);
    write_tokens(tokens, ids);
    std::string common = "-e " + ckpt + " -i " + tokens + " -j " + tokens + " -b 2 -t 8 -v 0 -s 0";
    std::string out;

    CHECK(run_trainer("-e " + dir.file("missing.bin") + " -i " + tokens + " -j " + tokens, &out) != 0);
    CHECK(has(out, "missing.bin"));
    CHECK(has(out, "-e"));
    CHECK(has(out, "HINT"));

    CHECK(run_trainer(common + " -r 0", &out) != 0);
    CHECK(has(out, "-r"));
    CHECK(run_trainer(common + " -t 999", &out) != 0);
    CHECK(has(out, "maxT"));
    CHECK(run_trainer(common + " -b 0", &out) != 0);
    CHECK(has(out, "-b"));
    CHECK(run_trainer(common + " -l -1", &out) != 0);
    CHECK(has(out, "-l"));
    CHECK(run_trainer(common + " -q qkv,foo", &out) != 0);
    CHECK(has(out, "foo"));
    CHECK(run_trainer(common + " -Z 1", &out) != 0);
    CHECK(has(out, "unknown flag"));
    CHECK(run_trainer(common + " -b abc", &out) != 0);
    CHECK(has(out, "-b"));

    std::vector<uint16_t> bad_ids = ids;
    bad_ids[17] = 61;
    write_tokens(dir.file("bad_tokens.bin"), bad_ids);
    CHECK(run_trainer("-e " + ckpt + " -i " + dir.file("bad_tokens.bin") + " -j " + tokens + " -b 2 -t 8", &out) != 0);
    CHECK(has(out, "-i"));
    CHECK(has(out, "id 61"));

    // and a good run trains: the loss falls
    CHECK(run_trainer(common + " -x 30 -l 0.01 -c " + dir.file("no_tokenizer.bin"), &out) != 0); // named but missing tokenizer
    CHECK(has(out, "-c"));
    int rc = run_trainer(common + " -x 30 -l 0.01", &out);
    CHECK(rc == 0);
    CHECK(has(out, "step 30/30"));
    float first = -1, last = -1;
    size_t p1 = out.find("first train loss: "), p2 = out.find("last train loss: ");
    REQUIRE(p1 != std::string::npos);
    REQUIRE(p2 != std::string::npos);
    first = strtof(out.c_str() + p1 + 18, NULL);
    last = strtof(out.c_str() + p2 + 17, NULL);
    MESSAGE("trainer binary, 30 LoRA steps on a cyclic stream: loss " << first << " -> " << last);
    CHECK(last < 0.5f * first);
}

// ----------------------------------------------------------------------------
// ---- LoRA variants ----
// rsLoRA, LoRA+, DoRA, quantized base (int8 / NF4), PiSSA, multi-adapter batches (issue 13)

// random adapters on a tiny model: lora_B nonzero so the branch contributes
template <typename real>
static void randomize_lora_B(LoRA<real>* lora, int L, int C, uint64_t seed, double magnitude) {
    Rng rng;
    rng_seed(&rng, seed);
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        if (!lora->lora_B[t]) continue;
        size_t n = (size_t)L * lora_target_out(t, C) * lora->config.r;
        for (size_t i = 0; i < n; i++) { lora->lora_B[t][i] = (real)(magnitude * (2.0 * rng_f32(&rng) - 1.0)); }
    }
}

// the base's adapted matrices as lora_merge_all wants them
template <typename real>
static void base_matrices(GPT2<real>* model, real* base[LORA_NUM_TARGETS]) {
    base[LORA_QKV] = model->params.qkvw;
    base[LORA_ATTPROJ] = model->params.attprojw;
    base[LORA_FC] = model->params.fcw;
    base[LORA_FCPROJ] = model->params.fcprojw;
}

TEST_CASE("rsLoRA: scale = alpha / sqrt(r), and the forward adds exactly alpha / sqrt(r) * lora_B lora_A") {
    LoRAConfig plain = lora_config(16, 32.0f, LORA_ALL_TARGETS);
    LoRAConfig rs = lora_config_rslora(plain, true);
    CHECK(plain.scale == 2.0f);   // 32 / 16, exact in fp32
    CHECK(rs.scale == 8.0f);      // 32 / sqrt(16), exact in fp32
    CHECK(lora_config_rslora(rs, false).scale == 2.0f);
    // the model: rsLoRA adapters unmerged vs the base with alpha / sqrt(r) * lora_B lora_A added by hand
    const int B = 2, T = 6, r = 4;
    const double alpha = 3.0;
    GPT2<double> adapted, merged;
    gpt2_build_random(&adapted, tiny_config(), 61);
    gpt2_build_random(&merged, tiny_config(), 61);
    gpt2_lora_attach(&adapted, lora_config_rslora(lora_config(r, (float)alpha, LORA_ALL_TARGETS), true), 62);
    int L = adapted.config.num_layers, C = adapted.config.channels;
    randomize_lora_B(&adapted.lora, L, C, 63, 0.1);
    double* base[LORA_NUM_TARGETS];
    base_matrices(&merged, base);
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        int in = lora_target_in(t, C), out = lora_target_out(t, C);
        for (int l = 0; l < L; l++) {
            lora_merge(base[t] + (size_t)l * out * in, adapted.lora.lora_A[t] + (size_t)l * r * in,
                       adapted.lora.lora_B[t] + (size_t)l * out * r, alpha / std::sqrt((double)r), in, out, r, +1);
        }
    }
    Rng rng;
    rng_seed(&rng, 64);
    std::vector<int> inputs;
    random_tokens(&rng, &inputs, B * T, adapted.config.vocab_size);
    gpt2_forward(&adapted, inputs.data(), (const int*)NULL, B, T);
    gpt2_forward(&merged, inputs.data(), (const int*)NULL, B, T);
    double maxdiff = 0;
    for (size_t i = 0; i < (size_t)B * T * adapted.config.padded_vocab_size; i++) {
        maxdiff = std::max(maxdiff, std::fabs(adapted.acts.logits[i] - merged.acts.logits[i]));
    }
    const double tol_rslora = 1e-12; // double: merged vs unmerged differ only by rounding order
    MESSAGE("rsLoRA logits unmerged vs merged by hand: maxdiff " << maxdiff);
    CHECK(maxdiff < tol_rslora);
    gpt2_free(&adapted);
    gpt2_free(&merged);
}
// ---- end of LoRA variants ----
