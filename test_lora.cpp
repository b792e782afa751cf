/*
Tests for train_gpt2_lora: every backward against finite differences in double, the LoRA invariants,
the fast kernels against their naive twins, and clean errors on bad input. doctest makes any failed
check fail the process. Run with `make test` (from the repository root).

The trainer is compiled into this binary (TESTING hides its main), so the tests call the very kernels
and model functions the program runs; the templates let the gradient checks run them in double.
*/

/*
Contents: one doctest test suite per subject, in this order. `./build/omp/test_lora -ts=gradients` runs one
suite (`-ts=files,binary` several, `-ts=NAME -ltc` lists its test cases); `make test` runs them all.
  gradients   every backward against finite differences in double: the kernels and the whole model
  invariants  LoRA invariants: lora_B = 0 is the base, the base is untouched, counts, init, targets
  fast-twins  the fast kernels (blocked matmul, thin LoRA GEMMs, exp_fast, the bf16 matmuls) against their naive twins
  training    training mechanics: learning-rate schedule, clipping, non-finite guard, resume, determinism
  variants    LoRA variants: rsLoRA, LoRA+, DoRA, PiSSA, AdaLoRA, quantized base (int8/NF4/int2/bf16), multi-adapter
  methods     the other adaptation methods: Houlsby adapters, prefix tuning, freezing, L2-SP
  files       file readers and writers (llm.c, adapter.bin, safetensors, JSON, PEFT), atomic writes, fuzzing
  generation  sampling, generation with the adapter merged and unmerged, the key/value cache
  parity      parity with the PyTorch twin's committed fixtures and with llm.c's debug state
  binary      runs the trainer binary ($TRAIN_BIN): flags, files, resume, merge, SIGINT, data parallel
  layout      the source tree: the product (trainer, lora.h, lib/) includes nothing under dev/
  tokenizer   the GPT-2 BPE tokenizer: its suite lives in dev/test_tokenizer.cpp, linked into this binary
Each suite starts with the helpers only its tests use; the helpers several suites share come first.
*/

#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
#define TESTING
#include "train_gpt2_lora.cpp"

#include <cfloat>
#include <fcntl.h>
#include <functional>
#include <map>
#include <limits>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include "dev/fuzz/fuzz_files.h"

// ----------------------------------------------------------------------------
// helpers shared by several suites

// -- finite differences and random data

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

static void random_tokens(Rng* rng, std::vector<int>* v, size_t n, int V) {
    v->resize(n);
    for (size_t i = 0; i < n; i++) { (*v)[i] = (int)(rng_u32(rng) % V); }
}

// -- tiny models

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

static uint64_t tiny_base_sum(const GPT2<float>* model) { return base_checksum(model->params_memory, model->num_parameters); }

// trains steps [from, to) of a LoRA run exactly as main does, appending each step's loss
static void train_steps(GPT2<float>* model, DataLoader* loader, int from, int to, std::vector<float>* losses) {
    for (int step = from; step < to; step++) {
        dataloader_next_batch(loader);
        gpt2_train_mode(model, true, step); // the step's dropout masks (-D, -R), when their p > 0
        gpt2_forward(model, loader->inputs.data(), loader->targets.data(), loader->B, loader->T);
        gpt2_zero_grad(model);
        gpt2_backward(model);
        gpt2_train_mode(model, false);
        adalora_orth_loss_backward(&model->lora); // as the trainer's loop: AdaLoRA's regulariser, importance and masks
        gpt2_update(model, 1e-2f, 0.9f, 0.999f, 1e-8f, 0.01f, step + 1);
        adalora_update_and_allocate(&model->lora, step);
        losses->push_back(model->mean_loss);
    }
}

// two models trained on the same batches of a token file (V = 61, the tiny models'): the losses of each,
// and the largest difference between them at any step
static double train_side_by_side(GPT2<float>* a, GPT2<float>* b, const std::string& tokens, int B, int T, int steps,
                                 std::vector<float>* losses_a, std::vector<float>* losses_b) {
    gpt2_allocate(a, B, T);
    gpt2_allocate(b, B, T);
    DataLoader la, lb;
    REQUIRE(dataloader_init(&la, tokens.c_str(), B, T, 61, false, 0, "-i") == "");
    REQUIRE(dataloader_init(&lb, tokens.c_str(), B, T, 61, false, 0, "-i") == "");
    train_steps(a, &la, 0, steps, losses_a);
    train_steps(b, &lb, 0, steps, losses_b);
    double maxdiff = 0;
    for (int k = 0; k < steps; k++) maxdiff = std::max(maxdiff, (double)std::fabs((*losses_a)[k] - (*losses_b)[k]));
    return maxdiff;
}

// -- random adapters

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

// three different adapters (ranks, scales, targets) with nonzero lora_B, for a tiny model
template <typename real>
static void make_three_adapters(LoRA<real> adapters[3], int L, int C) {
    LoRAConfig cfgs[3] = {lora_config(2, 4.0f, LORA_ALL_TARGETS), lora_config_rslora(lora_config(4, 2.0f, (1u << LORA_QKV) | (1u << LORA_FC)), true),
                          lora_config(3, 6.0f, (1u << LORA_ATTPROJ) | (1u << LORA_FCPROJ))};
    for (int k = 0; k < 3; k++) {
        lora_init(&adapters[k], cfgs[k], L, C, 140 + k);
        randomize_lora_B(&adapters[k], L, C, 150 + k, 0.2);
    }
}

// -- files

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

static void write_cyclic_tokens(const std::string& path, size_t n) {
    std::vector<uint16_t> ids(n);
    Rng rng;
    rng_seed(&rng, 808);
    for (size_t i = 0; i < n; i++) ids[i] = (uint16_t)(i % 5 == 0 ? rng_u32(&rng) % 61 : (i * 7) % 61);
    write_tokens(path, ids);
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

static std::string file_string(const std::string& path) {
    std::vector<char> v = read_all(path);
    return std::string(v.begin(), v.end());
}

// names of the files in dir ending in .tmp: a crash or failed write must leave none
static std::vector<std::string> tmp_files(const std::string& dir) {
    std::vector<std::string> found;
    std::string cmd = "ls -a '" + dir + "'";
    FILE* p = popen(cmd.c_str(), "r");
    char line[4096];
    while (p != NULL && fgets(line, sizeof(line), p)) {
        std::string name(line);
        while (!name.empty() && name.back() == '\n') name.pop_back();
        if (name.size() >= 4 && name.compare(name.size() - 4, 4, ".tmp") == 0) found.push_back(name);
    }
    if (p) pclose(p);
    return found;
}

static bool has(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

// ----------------------------------------------------------------------------
// gradients: every backward against finite differences in double, kernels then the whole model

TEST_SUITE_BEGIN("gradients");

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

// attention_backward's dqkv against central differences of loss = w . attention_forward(qkv), with qkv
// drawn at magnitude mag and w at 1 (in that order, from rng); returns fd_relative_error's relative error
static double attention_fd_error(Rng* rng, int B, int T, int C, int NH, double mag, const char* label) {
    std::vector<double> qkv = random_vector(rng, (size_t)B * T * 3 * C, mag), w = random_vector(rng, (size_t)B * T * C, 1.0);
    std::vector<double> out((size_t)B * T * C), att((size_t)B * NH * T * T), datt(att.size());
    auto loss = [&]() {
        attention_forward(out.data(), att.data(), qkv.data(), B, T, C, NH);
        return dot(w, out.data());
    };
    loss();
    std::vector<double> dqkv(qkv.size(), 0.0);
    attention_backward(dqkv.data(), datt.data(), w.data(), qkv.data(), att.data(), B, T, C, NH);
    return fd_relative_error(qkv.data(), qkv.size(), dqkv.data(), loss, label);
}

TEST_CASE("attention_backward matches finite differences over input magnitudes") {
    Rng rng;
    rng_seed(&rng, 4);
    for (double mag : {1e-1, 1.0, 3.0}) {
        CAPTURE(mag);
        CHECK(attention_fd_error(&rng, 2, 4, 6, 2, mag, "attention dqkv") < tol_fd); // B = 2, T = 4, C = 6, NH = 2
    }
}

TEST_CASE("attention_backward matches finite differences at longer T") {
    // T = 37: the backward gathers att's columns ATT_COLS (16) at a time, so 37 has two whole blocks, a
    // partial one and the causal triangle inside each; T = 256: the transposed keys and values get a row
    // of ATT_KEYS more (256 is a multiple of 256). A small head (hs = 2) keeps the differences cheap.
    Rng rng;
    rng_seed(&rng, 14);
    for (int T : {37, 256}) {
        CAPTURE(T);
        CHECK(attention_fd_error(&rng, 1, T, 2, 1, 1.0, "attention dqkv, longer T") < tol_fd); // B = 1, C = 2, NH = 1
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

// -C, trainable token rows: a tied row's gradient has the input embedding's part (positions holding the
// token) and the LM head's part (every position's logit of the token); each token below isolates one
TEST_CASE("trainable token rows (-C): each row's gradient, input embedding + LM head, matches finite differences; nothing else of wte moves") {
    const int B = 2, T = 5;
    GPT2<double> model;
    build_tiny_lora_model(&model, LORA_ALL_TARGETS, 2, 31);
    const int V = model.config.vocab_size, C = model.config.channels;
    // inputs use ids 0..29 only, targets 0..44: id 7 is an input (and maybe a target), 40 only a target
    // (the head's part and the softmax's), 55 neither (the softmax's pull alone)
    Rng rng;
    rng_seed(&rng, 32);
    std::vector<int> inputs, targets;
    random_tokens(&rng, &inputs, B * T, 30);
    random_tokens(&rng, &targets, B * T, 45);
    inputs[3] = 7;
    targets[6] = 40;
    for (int id : inputs) REQUIRE(id != 40);
    std::vector<int> ids = {7, 40, 55, inputs[0] == 7 ? 8 : inputs[0]};
    if (ids[3] == 40 || ids[3] == 55) ids[3] = 9;
    REQUIRE(gpt2_token_rows_attach(&model, ids) == "");
    REQUIRE(model.tokens.n == 4);
    TokenRows<double>* tr = &model.tokens;
    auto loss = [&]() {
        token_rows_write(tr, model.params.wte); // the forward reads the rows through wte
        gpt2_forward(&model, inputs.data(), targets.data(), B, T);
        return (double)model.mean_loss;
    };
    loss();
    gpt2_zero_grad(&model);
    gpt2_backward(&model);
    std::vector<double> grads(tr->grads, tr->grads + (size_t)tr->n * C);
    const char* names[4] = {"input token 7", "target-only token 40", "unseen token 55", "another input token"};
    for (int s = 0; s < 4; s++) {
        CAPTURE(s);
        CHECK(fd_relative_error(tr->rows + (size_t)s * C, C, grads.data() + (size_t)s * C, loss, names[s]) < tol_fd);
    }
    loss(); // wte holds the rows as they are again (the differences left their last probe in it)
    // the input part alone is the difference with the head part: a row of a token never in the input gets
    // only the head part, so for token 40 the input-embedding backward must add exactly nothing
    std::vector<double> head_only((size_t)C, 0.0);
    {
        TokenRows<double> one = {};
        token_rows_attach(&one, std::vector<int>{40}, model.params.wte, V, C);
        std::vector<double> dencoded((size_t)B * T * C, 1.0);
        token_rows_encoder_backward(&one, dencoded.data(), inputs.data(), B * T);
        for (int c = 0; c < C; c++) CHECK(one.grads[c] == 0.0); // exact: no position holds token 40
        token_rows_encoder_backward(&one, dencoded.data(), targets.data(), B * T); // as if the targets were the input
        CHECK(one.grads[0] == (double)std::count(targets.begin(), targets.end(), 40)); // exact: a sum of ones
        token_rows_free(&one);
    }
    // an update moves the four rows of wte and no other value of the model
    std::vector<double> before(model.params_memory, model.params_memory + model.num_parameters);
    gpt2_update(&model, 1e-2f, 0.9f, 0.999f, 1e-8f, 0.0f, 1);
    size_t moved_other = 0, moved_rows = 0;
    for (size_t i = 0; i < model.num_parameters; i++) {
        if (model.params_memory[i] == before[i]) continue;
        bool in_rows = false;
        for (int id : ids) in_rows |= i >= (size_t)id * C && i < (size_t)(id + 1) * C;
        (in_rows ? moved_rows : moved_other)++;
    }
    CHECK(moved_other == 0);
    CHECK(moved_rows == (size_t)4 * C);
    CHECK(gpt2_trainable_parameters(&model) == model.lora.num_parameters + (size_t)4 * C);
    // detached, wte holds the base's rows again, bit for bit
    gpt2_token_rows_detach(&model);
    CHECK(memcmp(model.params_memory, before.data(), before.size() * sizeof(double)) == 0);
    gpt2_free(&model);
}

// -- dropout (-D on LoRA's branch, -R GPT-2's own): the masks are a hash of a key, so a fixed key is a fixed
// mask and the finite differences see the very function the backward differentiates

TEST_CASE("dropout_backward matches finite differences with a fixed mask (its key); the forward scales kept values by 1/(1-p)") {
    const size_t N = 200;
    const uint64_t key = dropout_key(5, 3, 1, DROP_ATTPROJ);
    Rng rng;
    rng_seed(&rng, 31);
    for (float p : {0.1f, 0.5f}) {
        CAPTURE(p);
        std::vector<double> inp = random_vector(&rng, N, 2.0), w = random_vector(&rng, N, 1.0), out(N);
        auto loss = [&]() {
            dropout_forward(out.data(), inp.data(), N, p, key);
            return dot(w, out.data());
        };
        loss();
        size_t kept = 0;
        for (size_t i = 0; i < N; i++) {
            bool keep = dropout_keep(key, i, p);
            kept += keep;
            // exactly inp / (1 - p) or exactly 0: one multiply by the scale, in double
            CHECK(out[i] == (keep ? inp[i] * (1 / (1 - (double)p)) : 0.0));
        }
        CHECK(kept > 0);
        CHECK(kept < N); // the mask bites: some dropped, some kept
        std::vector<double> dinp(N, 0.0);
        dropout_backward(dinp.data(), w.data(), N, p, key);
        CHECK(fd_relative_error(inp.data(), N, dinp.data(), loss, "dropout dinp") < tol_fd);
        // in place (the model drops proj and the embeddings where they lie): the same values
        loss(); // out for inp itself again (the finite differences left it at a perturbed input)
        std::vector<double> inplace = inp;
        dropout_forward(inplace.data(), inplace.data(), N, p, key);
        CHECK(memcmp(inplace.data(), out.data(), N * sizeof(double)) == 0);
    }
}

TEST_CASE("attention_backward with dropout on the probabilities matches finite differences (a fixed mask); so does the prefix attention's") {
    const int B = 2, T = 4, C = 6, NH = 2, P = 2;
    const float p = 0.3f;
    const uint64_t key = dropout_key(9, 0, 0, DROP_ATTENTION);
    Rng rng;
    rng_seed(&rng, 32);
    for (double mag : {1e-1, 1.0, 3.0}) {
        CAPTURE(mag);
        std::vector<double> qkv = random_vector(&rng, (size_t)B * T * 3 * C, mag), w = random_vector(&rng, (size_t)B * T * C, 1.0);
        std::vector<double> out((size_t)B * T * C), out0(out.size()), att((size_t)B * NH * T * T), datt(att.size());
        attention_forward(out0.data(), att.data(), qkv.data(), B, T, C, NH);
        auto loss = [&]() {
            attention_forward(out.data(), att.data(), qkv.data(), B, T, C, NH, 0, p, key);
            return dot(w, out.data());
        };
        loss();
        CHECK(out != out0); // the mask changed the output
        std::vector<double> dqkv(qkv.size(), 0.0);
        attention_backward(dqkv.data(), datt.data(), w.data(), qkv.data(), att.data(), B, T, C, NH, p, key);
        CHECK(fd_relative_error(qkv.data(), qkv.size(), dqkv.data(), loss, "attention dqkv with dropout") < tol_fd);

        // prefix tuning's attention (-X with -R): the same mask rule over its P + T columns
        std::vector<double> pk = random_vector(&rng, (size_t)P * C, mag), pv = random_vector(&rng, (size_t)P * C, mag);
        std::vector<double> patt((size_t)B * NH * T * (P + T)), pdatt(patt.size());
        auto ploss = [&]() {
            attention_prefix_forward(out.data(), patt.data(), qkv.data(), pk.data(), pv.data(), B, T, C, NH, P, 0, p, key);
            return dot(w, out.data());
        };
        ploss();
        std::vector<double> pdqkv(qkv.size(), 0.0), dpk(pk.size(), 0.0), dpv(pv.size(), 0.0);
        attention_prefix_backward(pdqkv.data(), dpk.data(), dpv.data(), pdatt.data(), w.data(), qkv.data(), pk.data(), pv.data(),
                                  patt.data(), B, T, C, NH, P, p, key);
        CHECK(fd_relative_error(qkv.data(), qkv.size(), pdqkv.data(), ploss, "prefix attention dqkv with dropout") < tol_fd);
        CHECK(fd_relative_error(pk.data(), pk.size(), dpk.data(), ploss, "prefix attention dprefix_k with dropout") < tol_fd);
        CHECK(fd_relative_error(pv.data(), pv.size(), dpv.data(), ploss, "prefix attention dprefix_v with dropout") < tol_fd);
    }
}

// max |numeric - analytic| / max |.| over `samples` evenly spread elements of x (the whole of x when smaller)
static double fd_sampled_relative_error(double* x, size_t n, const double* grad, const std::function<double()>& loss, size_t samples) {
    size_t stride = std::max<size_t>(1, n / samples);
    double maxdiff = 0, maxgrad = 0;
    for (size_t i = 0; i < n; i += stride) {
        double old = x[i], eps = 1e-5 * std::max(1.0, std::fabs(old));
        x[i] = old + eps;
        double lp = loss();
        x[i] = old - eps;
        double lm = loss();
        x[i] = old;
        double numeric = (lp - lm) / (2 * eps);
        maxdiff = std::max(maxdiff, std::fabs(numeric - grad[i]));
        maxgrad = std::max(maxgrad, std::max(std::fabs(grad[i]), std::fabs(numeric)));
    }
    return maxgrad > 0 ? maxdiff / maxgrad : 0.0;
}

TEST_CASE("end to end with dropout: -D and -R adapter gradients, and -R full fine-tuning's every tensor, match finite differences with one step's masks") {
    const int B = 2, T = 5;
    Rng rng;
    rng_seed(&rng, 33);
    std::vector<int> inputs, targets;
    random_tokens(&rng, &inputs, B * T, tiny_config().vocab_size);
    random_tokens(&rng, &targets, B * T, tiny_config().vocab_size);
    // LoRA with its branch dropout (-D 0.3) and GPT-2's (-R 0.2): p larger than usual so that in a tiny
    // model every site drops something
    {
        GPT2<double> model;
        build_tiny_lora_model(&model, LORA_ALL_TARGETS, 2, 34);
        auto loss = [&]() {
            gpt2_forward(&model, inputs.data(), targets.data(), B, T);
            return model.mean_loss;
        };
        double undropped = loss();
        model.lora.config.dropout = 0.3f;
        model.drop.gpt2_p = 0.2f;
        model.drop.seed = 35;
        gpt2_train_mode(&model, true, 7); // step 7's masks, the same at every call of loss()
        double dropped = loss();
        CHECK(dropped != undropped);
        gpt2_zero_grad(&model);
        gpt2_backward(&model);
        std::vector<double> grads(model.lora.grads_memory, model.lora.grads_memory + model.lora.num_parameters);
        for (int t = 0; t < LORA_NUM_TARGETS; t++) {
            std::string target = lora_target_names[t];
            CAPTURE(target);
            size_t off_A = model.lora.lora_A[t] - model.lora.params_memory, off_B = model.lora.lora_B[t] - model.lora.params_memory;
            size_t nA = (size_t)model.config.num_layers * 2 * lora_target_in(t, model.config.channels);
            size_t nB = (size_t)model.config.num_layers * lora_target_out(t, model.config.channels) * 2;
            std::string la = "dropout: model dlora_A " + target, lb = "dropout: model dlora_B " + target;
            CHECK(fd_relative_error(model.lora.lora_A[t], nA, grads.data() + off_A, loss, la.c_str()) < tol_fd);
            CHECK(fd_relative_error(model.lora.lora_B[t], nB, grads.data() + off_B, loss, lb.c_str()) < tol_fd);
        }
        gpt2_train_mode(&model, false);
        CHECK(loss() == undropped); // out of train mode: no mask at all
        gpt2_free(&model);
    }
    // full fine-tuning with -R 0.2: every tensor, the embeddings' gradient through their mask included
    {
        GPT2<double> model;
        gpt2_build_random(&model, tiny_config(), 36);
        for (size_t i = 0; i < model.num_parameters; i++) { model.params_memory[i] += 0.05 * (2.0 * rng_f32(&rng) - 1.0); }
        gpt2_enable_full_training(&model);
        model.drop.gpt2_p = 0.2f;
        model.drop.seed = 37;
        gpt2_train_mode(&model, true, 3);
        auto loss = [&]() {
            gpt2_forward(&model, inputs.data(), targets.data(), B, T);
            return model.mean_loss;
        };
        loss();
        gpt2_zero_grad(&model);
        gpt2_backward(&model);
        size_t off = 0;
        for (int k = 0; k < NUM_PARAMETER_TENSORS; k++) {
            std::string name = param_tensor_names[k];
            CAPTURE(name);
            double rel = fd_sampled_relative_error(model.params_memory + off, model.param_sizes[k], model.grads_memory + off, loss, 40);
            MESSAGE("dropout, full d" << name << ": relative " << rel);
            CHECK(rel < tol_fd);
            off += model.param_sizes[k];
        }
        gpt2_free(&model);
    }
}

TEST_SUITE_END();

// ----------------------------------------------------------------------------
// invariants: LoRA invariants, in float as the program runs

TEST_SUITE_BEGIN("invariants");

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

TEST_SUITE_END();

// ----------------------------------------------------------------------------
// fast-twins: fast kernels against their naive twins

// The blocked float matmul (and the LoRA branches built on it) against their naive twins, on shapes
// that leave a remainder for every tile size (AVX2: MR=6, NR=16, KC=768, MC=264, NC=192) and on the
// GPT-2 124M shapes at a small BT. Gradients start nonzero, so accumulation (+=) is checked too.

// max |fast - naive| / max |naive|: the error relative to the size of the result
static double fast_vs_naive(const std::vector<float>& fast, const std::vector<float>& naive) {
    double maxdiff = 0, scale = 0;
    for (size_t i = 0; i < fast.size(); i++) {
        maxdiff = std::max(maxdiff, std::fabs((double)fast[i] - (double)naive[i]));
        scale = std::max(scale, std::fabs((double)naive[i]));
    }
    return scale > 0 ? maxdiff / scale : maxdiff;
}

// Both kernels sum the same fp32 products in a different order (KC slices, FMA rounding): their
// difference grows like sqrt(K) * 2^-24 relative to the largest output, ~1.4e-5 at K = 50304 in the
// worst case; 3e-5 keeps a 2x margin there while an indexing bug gives O(1).
const double tol_fast_matmul = 3e-5;

static std::vector<float> uniform_floats(Rng* rng, size_t n) {
    std::vector<float> v(n);
    for (float& x : v) x = rng_uniform(rng, -1, 1);
    return v;
}

TEST_SUITE_BEGIN("fast-twins");

TEST_CASE("attention in float on long sequences (per-head GEMMs, the weights recomputed) matches the double attention, with and without dropout") {
    // {B, T, C, NH}: T >= ATT_GEMM_T takes the GEMM form in float; 200 and 129 end in a partial block of
    // rows, and hs = 30 and 3 are no multiple of any vector width. Float's att is the GEMM form's row
    // statistics, (B, NH, T, 2), and the backward reads nothing else of the forward's (no datt is passed);
    // they and out start as garbage, as in a model whose earlier layers used them. Dropout at p = 0.3 must
    // drop the same weights as the double per-query form, which draws element (t, t2) at the same index.
    // Float against double: sums of up to T products in float round to ~1e-6 of the largest value
    // (measured 1e-7 to 9e-7), so 1e-5 leaves room and still catches any wrong or missing term, which
    // moves a result by O(1) of its size.
    const double tol_float_attention = 1e-5;
    const int shapes[][4] = {{2, 128, 128, 2}, {1, 200, 90, 3}, {1, 129, 12, 4}};
    Rng rng;
    rng_seed(&rng, 15);
    for (const auto& sh : shapes) {
        for (float drop_p : {0.0f, 0.3f}) {
            int B = sh[0], T = sh[1], C = sh[2], NH = sh[3];
            CAPTURE(T);
            CAPTURE(C);
            CAPTURE(drop_p);
            const uint64_t key = 1234;
            REQUIRE(attention_by_gemm(T, 0));
            std::vector<double> qkv = random_vector(&rng, (size_t)B * T * 3 * C, 1.0), w = random_vector(&rng, (size_t)B * T * C, 1.0);
            std::vector<double> out((size_t)B * T * C), att((size_t)B * NH * T * T), datt(att.size()), dqkv(qkv.size(), 0.0);
            attention_forward(out.data(), att.data(), qkv.data(), B, T, C, NH, 0, drop_p, key);
            attention_backward(dqkv.data(), datt.data(), w.data(), qkv.data(), att.data(), B, T, C, NH, drop_p, key);
            std::vector<float> qkv_f(qkv.begin(), qkv.end()), w_f(w.begin(), w.end()), out_f(out.size(), -7.0f);
            std::vector<float> stats_f(attention_cache_floats<float>(B, NH, T), -7.0f), dqkv_f(qkv.size(), 0.0f);
            REQUIRE(stats_f.size() == (size_t)B * NH * T * 2);
            attention_forward(out_f.data(), stats_f.data(), qkv_f.data(), B, T, C, NH, 0, drop_p, key);
            attention_backward(dqkv_f.data(), (float*)NULL, w_f.data(), qkv_f.data(), stats_f.data(), B, T, C, NH, drop_p, key);
            // (the double results rounded to float for fast_vs_naive: 6e-8 relative at most)
            CHECK(fast_vs_naive(out_f, std::vector<float>(out.begin(), out.end())) < tol_float_attention);
            CHECK(fast_vs_naive(dqkv_f, std::vector<float>(dqkv.begin(), dqkv.end())) < tol_float_attention);
        }
    }
}

TEST_CASE("a float model on long sequences (attention's GEMM form) matches the double model: loss and every LoRA gradient, a shorter T in the same allocation, -R, and the key/value cache") {
    // The GEMM form keeps each attention row's softmax statistics instead of its weights, so a float
    // model's att is smaller than a double one's, yet the same allocation must serve a shorter batch in
    // the per-query form (T = 100) and generation's cache. Float against double through two layers:
    // ~1e-6 of the largest value; 1e-4 leaves room, while a wrong or stale statistic, or a dropout mask
    // drawn at another index, moves the loss and the gradients by O(1) of their size.
    const double tol_float_model = 1e-4;
    const float tol_kv = 1e-5f; // the cache against a forward over the whole context (see the generation suite)
    GPT2Config cfg = tiny_config();
    cfg.max_seq_len = 160;
    const int B = 2, Tmax = 160, L = cfg.num_layers, NH = cfg.num_heads, C = cfg.channels;
    GPT2<double> d;
    GPT2<float> f;
    gpt2_build_random(&d, cfg, 61);
    gpt2_build_random(&f, cfg, 61);
    gpt2_lora_attach(&d, lora_config(2, 4.0f, LORA_ALL_TARGETS), 62);
    gpt2_lora_attach(&f, lora_config(2, 4.0f, LORA_ALL_TARGETS), 62);
    randomize_lora_B(&d.lora, L, C, 63, 0.2);
    randomize_lora_B(&f.lora, L, C, 63, 0.2);
    gpt2_allocate(&d, B, Tmax);
    gpt2_allocate(&f, B, Tmax);
    // float: room for the statistics (2 per row) or a batch of T <= 127's weights; double: the weights
    CHECK(f.act_sizes[ACT_ATT] == (size_t)L * B * NH * std::max(2 * Tmax, (ATT_GEMM_T - 1) * (ATT_GEMM_T - 1)));
    CHECK(d.act_sizes[ACT_ATT] == (size_t)L * B * NH * Tmax * Tmax);
    Rng rng;
    rng_seed(&rng, 64);
    std::vector<int> inputs, targets;
    random_tokens(&rng, &inputs, (size_t)B * Tmax, cfg.vocab_size);
    random_tokens(&rng, &targets, (size_t)B * Tmax, cfg.vocab_size);
    for (int T : {Tmax, 100}) {
        for (float p : {0.0f, 0.2f}) {
            CAPTURE(T);
            CAPTURE(p);
            auto step = [&](auto* m) {
                m->drop.gpt2_p = p; // -R p
                m->drop.seed = 65;
                gpt2_train_mode(m, true, 3);
                gpt2_forward(m, inputs.data(), targets.data(), B, T);
                gpt2_zero_grad(m);
                gpt2_backward(m);
                gpt2_train_mode(m, false);
            };
            step(&d);
            step(&f);
            CHECK(std::fabs(f.mean_loss - d.mean_loss) < tol_float_model * std::fabs(d.mean_loss));
            std::vector<float> gf(f.lora.grads_memory, f.lora.grads_memory + f.lora.num_parameters);
            std::vector<float> gd(d.lora.grads_memory, d.lora.grads_memory + d.lora.num_parameters);
            CHECK(fast_vs_naive(gf, gd) < tol_float_model);
        }
    }
    // the cache: a prompt of 140 positions (the GEMM form, its statistics in the cache's scratch), then a
    // position more (the per-query form over 141 keys), against one forward over all 141
    f.drop.gpt2_p = 0;
    int Vp = cfg.padded_vocab_size;
    gpt2_kv_start(&f);
    gpt2_forward(&f, inputs.data(), (const int*)NULL, 1, 140);
    gpt2_forward(&f, inputs.data() + 140, (const int*)NULL, 1, 1);
    std::vector<float> cached(f.acts.logits, f.acts.logits + Vp);
    f.kv_on = false;
    gpt2_forward(&f, inputs.data(), (const int*)NULL, 1, 141);
    std::vector<float> full(f.acts.logits + (size_t)140 * Vp, f.acts.logits + (size_t)141 * Vp);
    CHECK(fast_vs_naive(cached, full) < tol_kv);
    gpt2_free(&d);
    gpt2_free(&f);
}

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

TEST_CASE("fast matmul vs naive: forward, dinp, dweight, dbias on odd and GPT-2 124M shapes; NULL grads skip") {
    Rng rng;
    rng_seed(&rng, 909);
    // {B, T, C, OC}: odd sizes around every tile edge, K > KC, BT > MC, OC > NC; then 124M at BT = 4..8
    const int shapes[][4] = {{1, 1, 1, 1}, {1, 5, 7, 3}, {2, 7, 13, 37}, {3, 11, 29, 131}, {1, 37, 257, 17},
                             {1, 300, 33, 200}, {2, 133, 19, 45}, {1, 7, 600, 390}, {1, 9, 1000, 70},
                             {2, 4, 768, 2304}, {2, 4, 768, 3072}, {2, 4, 3072, 768}, {1, 4, 768, 50304}};
    for (auto& s : shapes) {
        int B = s[0], T = s[1], C = s[2], OC = s[3];
        CAPTURE(B); CAPTURE(T); CAPTURE(C); CAPTURE(OC);
        size_t BT = (size_t)B * T;
        std::vector<float> inp = uniform_floats(&rng, BT * C), weight = uniform_floats(&rng, (size_t)OC * C);
        std::vector<float> bias = uniform_floats(&rng, OC), dout = uniform_floats(&rng, BT * OC);
        std::vector<float> out_fast(BT * OC), out_naive(BT * OC);
        matmul_forward(out_fast.data(), inp.data(), weight.data(), bias.data(), B, T, C, OC);
        matmul_forward_naive(out_naive.data(), inp.data(), weight.data(), bias.data(), B, T, C, OC);
        CHECK(fast_vs_naive(out_fast, out_naive) <= tol_fast_matmul);
        matmul_forward(out_fast.data(), inp.data(), weight.data(), (const float*)NULL, B, T, C, OC);
        matmul_forward_naive(out_naive.data(), inp.data(), weight.data(), (const float*)NULL, B, T, C, OC);
        CHECK(fast_vs_naive(out_fast, out_naive) <= tol_fast_matmul);

        // all three gradients, accumulated onto nonzero values
        std::vector<float> dinp_f = uniform_floats(&rng, BT * C), dw_f = uniform_floats(&rng, (size_t)OC * C);
        std::vector<float> db_f = uniform_floats(&rng, OC);
        std::vector<float> dinp_n = dinp_f, dw_n = dw_f, db_n = db_f;
        matmul_backward(dinp_f.data(), dw_f.data(), db_f.data(), dout.data(), inp.data(), weight.data(), B, T, C, OC);
        matmul_backward_naive(dinp_n.data(), dw_n.data(), db_n.data(), dout.data(), inp.data(), weight.data(), B, T, C, OC);
        CHECK(fast_vs_naive(dinp_f, dinp_n) <= tol_fast_matmul);
        CHECK(fast_vs_naive(dw_f, dw_n) <= tol_fast_matmul);
        CHECK(fast_vs_naive(db_f, db_n) <= tol_fast_matmul);

        // frozen weight: only dinp, which must equal what the full call added
        std::vector<float> dinp_only(BT * C, 0.0f), dinp_ref(BT * C, 0.0f), dw_ref((size_t)OC * C, 0.0f);
        matmul_backward(dinp_only.data(), (float*)NULL, (float*)NULL, dout.data(), inp.data(), weight.data(), B, T, C, OC);
        matmul_backward_naive(dinp_ref.data(), (float*)NULL, (float*)NULL, dout.data(), inp.data(), weight.data(), B, T, C, OC);
        CHECK(fast_vs_naive(dinp_only, dinp_ref) <= tol_fast_matmul);
        // no dinp (layer 0 with frozen embeddings): dweight alone
        std::vector<float> dw_only((size_t)OC * C, 0.0f);
        matmul_backward((float*)NULL, dw_only.data(), (float*)NULL, dout.data(), inp.data(), weight.data(), B, T, C, OC);
        matmul_backward_naive((float*)NULL, dw_ref.data(), (float*)NULL, dout.data(), inp.data(), weight.data(), B, T, C, OC);
        CHECK(fast_vs_naive(dw_only, dw_ref) <= tol_fast_matmul);
    }
}

TEST_CASE("fast LoRA kernels (thin GEMMs) vs the naive lora.h templates, over ranks and odd shapes") {
    Rng rng;
    rng_seed(&rng, 910);
    // {BT, C, OC, r}: r below, at and above the register tile width; BT beyond one tile
    const int shapes[][4] = {{1, 1, 1, 1}, {7, 13, 37, 3}, {33, 64, 192, 8}, {300, 29, 131, 17}, {64, 768, 2304, 8}};
    for (auto& s : shapes) {
        int BT = s[0], C = s[1], OC = s[2], r = s[3];
        CAPTURE(BT); CAPTURE(C); CAPTURE(OC); CAPTURE(r);
        float scale = 2.0f;
        std::vector<float> inp = uniform_floats(&rng, (size_t)BT * C), lora_A = uniform_floats(&rng, (size_t)r * C);
        std::vector<float> lora_B = uniform_floats(&rng, (size_t)OC * r), dout = uniform_floats(&rng, (size_t)BT * OC);
        std::vector<float> out_f = uniform_floats(&rng, (size_t)BT * OC), out_n = out_f;
        std::vector<float> h_f((size_t)BT * r), h_n((size_t)BT * r);
        lora_forward(out_f.data(), h_f.data(), inp.data(), lora_A.data(), lora_B.data(), scale, BT, C, OC, r);
        lora_forward_naive<float>(out_n.data(), h_n.data(), inp.data(), lora_A.data(), lora_B.data(), scale, BT, C, OC, r);
        CHECK(fast_vs_naive(h_f, h_n) <= tol_fast_matmul);
        CHECK(fast_vs_naive(out_f, out_n) <= tol_fast_matmul);
        for (bool with_dinp : {true, false}) {
            CAPTURE(with_dinp);
            std::vector<float> dinp_f = uniform_floats(&rng, (size_t)BT * C), dA_f = uniform_floats(&rng, (size_t)r * C);
            std::vector<float> dB_f = uniform_floats(&rng, (size_t)OC * r), dh_f((size_t)BT * r), dh_n((size_t)BT * r);
            std::vector<float> dinp_n = dinp_f, dA_n = dA_f, dB_n = dB_f;
            lora_backward(with_dinp ? dinp_f.data() : NULL, dA_f.data(), dB_f.data(), dh_f.data(), dout.data(), h_n.data(),
                          inp.data(), lora_A.data(), lora_B.data(), scale, BT, C, OC, r);
            lora_backward_naive<float>(with_dinp ? dinp_n.data() : NULL, dA_n.data(), dB_n.data(), dh_n.data(), dout.data(), h_n.data(),
                                 inp.data(), lora_A.data(), lora_B.data(), scale, BT, C, OC, r);
            CHECK(fast_vs_naive(dinp_f, dinp_n) <= tol_fast_matmul);
            CHECK(fast_vs_naive(dA_f, dA_n) <= tol_fast_matmul);
            CHECK(fast_vs_naive(dB_f, dB_n) <= tol_fast_matmul);
        }
    }
}

TEST_CASE("max_lanes equals the plain running max exactly, at every length and with NaNs skipped") {
    // exact: a maximum does not depend on the order it is taken in, so no tolerance
    Rng rng;
    rng_seed(&rng, 7);
    for (int n = 0; n <= 70; n++) {
        std::vector<float> x(n);
        for (int i = 0; i < n; i++) x[i] = rng_uniform(&rng, -100.0f, 100.0f);
        if (n > 20) x[n / 3] = NAN; // a NaN is never greater, so both skip it
        float plain = -1e30f;
        for (int i = 0; i < n; i++) { if (x[i] > plain) plain = x[i]; }
        CHECK(max_lanes(x.data(), n) == plain);
    }
}

TEST_CASE("exp_fast (float): within 1 ulp of exp over [-87.3, 0], exactly 1 at 0, 0 below; GELU's float tanh from it") {
    const double tol_exp_rel = 0x1p-23;        // 1 ulp of a float: range reduction + degree-7 polynomial + roundings
    const double tol_tanh_abs = 3e-7;          // GELU needs absolute accuracy; (1 - e)/(1 + e) loses relative accuracy near 0
    double worst = 0, worst_tanh = 0;
    for (int i = 0; i <= 873000; i++) {        // x = 0 .. -87.3 in steps of 1e-4
        float x = -1e-4f * (float)i;
        double exact = std::exp((double)x);
        worst = std::max(worst, std::fabs((double)exp_fast(x) - exact) / exact);
        float u = x / 8.0f;                    // tanh matters on about [-10, 10]; odd, so both signs
        worst_tanh = std::max(worst_tanh, std::fabs((double)gelu_tanh(u) - std::tanh((double)u)));
        worst_tanh = std::max(worst_tanh, std::fabs((double)gelu_tanh(-u) - std::tanh((double)-u)));
    }
    MESSAGE("exp_fast: max relative error " << worst << "; float tanh: max absolute error " << worst_tanh);
    CHECK(worst < tol_exp_rel);
    CHECK(worst_tanh < tol_tanh_abs);
    CHECK(exp_fast(0.0f) == 1.0f);             // the softmax's max element counts exactly 1
    CHECK(exp_fast(-88.0f) == 0.0f);           // below 2^-126: 0 (a softmax term that small adds nothing)
    CHECK(exp_fast(-1e30f) == 0.0f);
    CHECK(std::isnan(exp_fast(std::nanf(""))));
    CHECK(gelu_tanh(0.0f) == 0.0f);
    CHECK(gelu_tanh(100.0f) == 1.0f);
    CHECK(gelu_tanh(-100.0f) == -1.0f);
    CHECK(gelu_tanh(1e30f) == 1.0f);
    CHECK(exp_fast(-1.0) == std::exp(-1.0));   // double (the finite-difference tests) is std::exp itself
}

// -- bf16 (-Q bf16): the rounding helper and the bf16 matmuls

static uint16_t bits_to_bf16(uint32_t u) {
    float x;
    memcpy(&x, &u, sizeof(x));
    return bf16_round(x);
}

TEST_CASE("bf16: bf16_round rounds to nearest even on hand-picked values (ties, denormals, overflow, inf, NaN)") {
    // {fp32 bits, the bf16 bits round-to-nearest-even gives}, worked out by hand from the bit patterns
    const uint32_t cases[][2] = {
        {0x3F800000u, 0x3F80u}, // 1.0: exact
        {0x3F808000u, 0x3F80u}, // 1 + 2^-8: a tie between 0x3F80 and 0x3F81, to the even one
        {0x3F818000u, 0x3F82u}, // 1 + 3*2^-8: a tie between 0x3F81 and 0x3F82, to the even one (up)
        {0x3F808001u, 0x3F81u}, // just above the tie: up
        {0x3F807FFFu, 0x3F80u}, // just below it: down
        {0xBF808000u, 0xBF80u}, // negative tie: the magnitude rounds the same way
        {0xBF818000u, 0xBF82u},
        {0x00000000u, 0x0000u}, // +0 and -0 keep their sign
        {0x80000000u, 0x8000u},
        {0x00000001u, 0x0000u}, // the smallest denormal rounds to 0
        {0x00008000u, 0x0000u}, // a denormal tie to even 0
        {0x00018000u, 0x0002u}, // a denormal tie to even 2 (up)
        {0x0000C000u, 0x0001u}, // above the tie: up
        {0x807FFFFFu, 0x8080u}, // the largest negative denormal rounds up into the smallest normal
        {0x7F7F7FFFu, 0x7F7Fu}, // below the largest bf16: down
        {0x7F7FFFFFu, 0x7F80u}, // the largest float is past the largest bf16's half step: inf
        {0x7F800000u, 0x7F80u}, // +inf and -inf stay
        {0xFF800000u, 0xFF80u},
        {0x7FC00000u, 0x7FC0u}, // a quiet NaN stays the same NaN
        {0x7F800001u, 0x7FC0u}, // a signalling NaN with only a low payload bit: still a NaN (quiet), not inf
        {0xFFFFFFFFu, 0xFFFFu}, // a NaN whose payload would carry into the sign: kept a NaN
    };
    for (auto& c : cases) {
        CAPTURE(c[0]);
        CHECK(bits_to_bf16(c[0]) == c[1]);
    }
    // every bf16 value but NaN widens exactly and rounds back to itself
    int not_roundtrip = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        bool nan = (h & 0x7F80u) == 0x7F80u && (h & 0x7Fu) != 0;
        if (!nan && bf16_round(bf16_widen((uint16_t)h)) != h) not_roundtrip++;
        if (nan && !std::isnan(bf16_widen(bf16_round(bf16_widen((uint16_t)h))))) not_roundtrip++;
    }
    CHECK(not_roundtrip == 0);
    // random finite floats: the result is the nearer of the two neighbouring bf16 values (distances in
    // double, exact here), the even one on a tie
    Rng rng;
    rng_seed(&rng, 211);
    int wrong = 0;
    for (int i = 0; i < 200000; i++) {
        uint32_t u = rng_u32(&rng);
        if ((u & 0x7F800000u) == 0x7F800000u) continue; // inf / NaN: above
        float x;
        memcpy(&x, &u, sizeof(x));
        uint16_t lo = (uint16_t)(u >> 16), hi = (uint16_t)(lo + 1); // truncation, and the next one away from 0
        // (past the largest finite bf16, hi is inf, which rounding treats as 2^128)
        double vhi = (hi & 0x7FFFu) == 0x7F80u ? std::copysign(std::ldexp(1.0, 128), (double)x) : (double)bf16_widen(hi);
        double dlo = std::fabs((double)x - bf16_widen(lo)), dhi = std::fabs(vhi - x);
        uint16_t want = dlo < dhi ? lo : dhi < dlo ? hi : (lo % 2 == 0 ? lo : hi);
        if (bf16_round(x) != want) wrong++;
    }
    CHECK(wrong == 0);
}

TEST_CASE("bf16: the bf16 matmuls (this build's fast path and the widened one) equal their naive twins within the fp32 summation bound") {
    MESSAGE("bf16 matmul path of this build: " << std::string(matmul_bf16_path()));
    Rng rng;
    rng_seed(&rng, 221);
    // {B, T, C, OC}: one row and a few (the dot-product path), edges of the register blocks (dinp: 8 x 48;
    // the forward's in-place weight: 12 weight rows x 32 activation rows) and of the K slices, an odd K (the
    // forward's packed path), and K past the 4096 chunk of the packed activations (forward: C; dinp: OC)
    const int shapes[][4] = {{1, 1, 1, 1}, {1, 5, 3, 7}, {2, 3, 17, 5}, {3, 7, 64, 96}, {1, 13, 130, 67}, {2, 40, 4100, 50}, {1, 20, 33, 4099}};
    std::map<std::string, double> worst_of; // the largest difference seen, as a fraction of its bound
    for (auto& s : shapes) {
        int B = s[0], T = s[1], C = s[2], OC = s[3], BT = B * T;
        CAPTURE(C); CAPTURE(OC); CAPTURE(BT);
        std::vector<float> inp((size_t)BT * C), bias(OC), dout((size_t)BT * OC);
        std::vector<uint16_t> weight((size_t)OC * C);
        for (auto* v : {&inp, &bias, &dout}) for (float& x : *v) x = rng_uniform(&rng, -1, 1);
        for (uint16_t& w : weight) w = bf16_round(rng_uniform(&rng, -1, 1));
        // Both sides sum the same terms (the bias and K products, each exact in fp32: bf16 x bf16 has 16
        // significant bits) in different orders; each sum is within (K+1) u sum|terms| of the exact one
        // (u = 2^-24), so they differ by at most 2 (K+1) u sum|terms|. The widened path multiplies fp32
        // activations (one more rounding per product): 2 (K+2) u.
        const double u = std::ldexp(1.0, -24);
        auto check_forward = [&](const std::vector<float>& got, const std::vector<float>& want, bool round_act, const char* what) {
            int over = 0;
            double worst = 0;
            for (int bt = 0; bt < BT; bt++) {
                for (int o = 0; o < OC; o++) {
                    double mag = std::fabs(bias[o]);
                    for (int c = 0; c < C; c++) {
                        float a = round_act ? bf16_widen(bf16_round(inp[(size_t)bt * C + c])) : inp[(size_t)bt * C + c];
                        mag += std::fabs((double)a * bf16_widen(weight[(size_t)o * C + c]));
                    }
                    const double tol_bf16_forward = 2.0 * (C + 2) * u * mag;
                    double d = std::fabs((double)got[(size_t)bt * OC + o] - want[(size_t)bt * OC + o]);
                    if (d > tol_bf16_forward) over++;
                    worst = std::max(worst, d / tol_bf16_forward);
                }
            }
            worst_of[std::string(what) + " forward"] = std::max(worst_of[std::string(what) + " forward"], worst);
            CHECK(over == 0);
        };
        auto check_backward = [&](const std::vector<float>& got, const std::vector<float>& want, bool round_act, const char* what) {
            int over = 0;
            double worst = 0;
            for (int bt = 0; bt < BT; bt++) {
                for (int c = 0; c < C; c++) {
                    double mag = 0.5; // the 0.5 both start from
                    for (int o = 0; o < OC; o++) {
                        float d = round_act ? bf16_widen(bf16_round(dout[(size_t)bt * OC + o])) : dout[(size_t)bt * OC + o];
                        mag += std::fabs((double)d * bf16_widen(weight[(size_t)o * C + c]));
                    }
                    const double tol_bf16_backward = 2.0 * (OC + 2) * u * mag;
                    double d = std::fabs((double)got[(size_t)bt * C + c] - want[(size_t)bt * C + c]);
                    if (d > tol_bf16_backward) over++;
                    worst = std::max(worst, d / tol_bf16_backward);
                }
            }
            worst_of[std::string(what) + " dinp"] = std::max(worst_of[std::string(what) + " dinp"], worst);
            CHECK(over == 0);
        };
        // this build's fast path against the naive twin (both round the activations iff BF16_DOT)
        std::vector<float> out1((size_t)BT * OC), out2(out1.size());
        matmul_bf16_forward_fast(out1.data(), inp.data(), weight.data(), bias.data(), B, T, C, OC);
        matmul_bf16_forward_naive(out2.data(), inp.data(), weight.data(), bias.data(), B, T, C, OC);
        check_forward(out1, out2, BF16_DOT, "fast");
        std::vector<float> dinp1((size_t)BT * C, 0.5f), dinp2 = dinp1;
        matmul_bf16_backward_fast(dinp1.data(), dout.data(), weight.data(), B, T, C, OC);
        matmul_bf16_backward_naive(dinp2.data(), dout.data(), weight.data(), B, T, C, OC);
        check_backward(dinp1, dinp2, BF16_DOT, "fast");
        // the widened path (the fast path of a CPU without AVX512_BF16) against the fp32 naive matmul on
        // the widened weights: the activations stay fp32
        std::vector<float> wide(weight.size());
        for (size_t i = 0; i < wide.size(); i++) wide[i] = bf16_widen(weight[i]);
        std::vector<float> out3(out1.size());
        for (int bt = 0; bt < BT; bt++) for (int o = 0; o < OC; o++) out3[(size_t)bt * OC + o] = bias[o];
        gemm_bf16_widened(BT, OC, C, inp.data(), (size_t)C, weight.data(), 1, (size_t)C, out3.data(), (size_t)OC);
        matmul_forward_naive(out2.data(), inp.data(), wide.data(), bias.data(), B, T, C, OC);
        check_forward(out3, out2, false, "widened");
        std::vector<float> dinp3((size_t)BT * C, 0.5f);
        dinp2.assign(dinp3.size(), 0.5f);
        gemm_bf16_widened(BT, C, OC, dout.data(), (size_t)OC, weight.data(), (size_t)C, 1, dinp3.data(), (size_t)C);
        matmul_backward_naive(dinp2.data(), (float*)NULL, (float*)NULL, dout.data(), inp.data(), wide.data(), B, T, C, OC);
        check_backward(dinp3, dinp2, false, "widened");
    }
    for (auto& w : worst_of) MESSAGE(w.first << ": worst difference " << w.second << " of the bound");
}

TEST_SUITE_END();

// ----------------------------------------------------------------------------
// training: learning-rate schedule, clipping, non-finite guard, exact resume, determinism

// n LoRA steps on the tiny model over a token stream, batches shuffled or not; returns the losses
static std::vector<float> train_tiny_run(const std::string& tokens, bool shuffle, int n, std::vector<float>* adapter) {
    const int B = 2, T = 8;
    GPT2<float> model;
    build_trainable_tiny(&model, 101);
    gpt2_lora_attach(&model, lora_config(4, 8.0f, LORA_ALL_TARGETS), 102);
    gpt2_allocate(&model, B, T);
    DataLoader loader;
    REQUIRE(dataloader_init(&loader, tokens.c_str(), B, T, model.config.vocab_size, shuffle, 103, "-i") == "");
    std::vector<float> losses;
    for (int step = 0; step < n; step++) {
        dataloader_next_batch(&loader);
        gpt2_forward(&model, loader.inputs.data(), loader.targets.data(), B, T);
        losses.push_back(model.mean_loss);
        gpt2_zero_grad(&model);
        gpt2_backward(&model);
        gpt2_update(&model, 1e-2f, 0.9f, 0.999f, 1e-8f, 0.01f, step + 1);
    }
    adapter->assign(model.lora.params_memory, model.lora.params_memory + model.lora.num_parameters);
    gpt2_free(&model);
    return losses;
}

TEST_SUITE_BEGIN("training");

TEST_CASE("learning-rate schedule: linear warmup, then a cosine to lr * final_frac at the last step") {
    const double tol = 1e-6; // relative: the schedule is computed in double and returned as float
    const float lr = 1e-3f;
    const int steps = 100, warmup = 10;
    // warmup: lr * (step + 1) / warmup, reaching lr at the last warmup step
    CHECK(lr_schedule(lr, 0, steps, warmup, 0.1f) == doctest::Approx(1e-4).epsilon(tol));
    CHECK(lr_schedule(lr, 4, steps, warmup, 0.1f) == doctest::Approx(5e-4).epsilon(tol));
    // the first decayed step is lr, the last is lr * final_frac, the midpoint halfway between
    CHECK(lr_schedule(lr, warmup, steps, warmup, 0.1f) == doctest::Approx(1e-3).epsilon(tol));
    CHECK(lr_schedule(lr, steps - 1, steps, warmup, 0.1f) == doctest::Approx(1e-4).epsilon(tol));
    int mid = warmup + (steps - 1 - warmup) / 2; // (99 - 10) / 2 = 44.5 -> 44: just before the midpoint
    double expected_mid = 1e-3 * (0.1 + 0.5 * (1.0 + cos(M_PI * (mid - warmup) / (double)(steps - 1 - warmup))) * 0.9);
    CHECK(lr_schedule(lr, mid, steps, warmup, 0.1f) == doctest::Approx(expected_mid).epsilon(tol));
    // never increases after the warmup
    for (int s = warmup + 1; s < steps; s++) {
        CHECK(lr_schedule(lr, s, steps, warmup, 0.1f) <= lr_schedule(lr, s - 1, steps, warmup, 0.1f));
    }
    // the defaults (-y 0 -z 1) keep it constant, bit for bit
    for (int s = 0; s < steps; s++) { CHECK(lr_schedule(lr, s, steps, 0, 1.0f) == lr); }
}

TEST_CASE("gradient clipping: the returned norm is the global L2 norm; above max_norm every gradient is scaled down to it") {
    const double tol = 1e-12; // relative, in double
    GPT2<double> model;
    build_tiny_lora_model(&model, LORA_ALL_TARGETS, 2, 21);
    Rng rng;
    rng_seed(&rng, 22);
    std::vector<int> inputs, targets;
    random_tokens(&rng, &inputs, 2 * 5, model.config.vocab_size);
    random_tokens(&rng, &targets, 2 * 5, model.config.vocab_size);
    gpt2_forward(&model, inputs.data(), targets.data(), 2, 5);
    gpt2_zero_grad(&model);
    gpt2_backward(&model);
    const double* g = model.lora.grads_memory;
    size_t n = model.lora.num_parameters;
    std::vector<double> before(g, g + n);
    double sumsq = 0;
    for (double x : before) sumsq += x * x;
    double norm = sqrt(sumsq);
    REQUIRE(norm > 0);
    // max_norm 0 measures only; a max_norm above the norm changes nothing
    CHECK(gpt2_clip_grad_norm(&model, 0.0f) == doctest::Approx(norm).epsilon(tol));
    CHECK(gpt2_clip_grad_norm(&model, (float)(2 * norm)) == doctest::Approx(norm).epsilon(tol));
    for (size_t i = 0; i < n; i++) { CHECK(g[i] == before[i]); }
    // below it: scaled by max_norm / norm, so the new norm is max_norm and the direction is kept
    float max_norm = (float)(norm / 4);
    CHECK(gpt2_clip_grad_norm(&model, max_norm) == doctest::Approx(norm).epsilon(tol));
    CHECK(gpt2_clip_grad_norm(&model, 0.0f) == doctest::Approx(max_norm).epsilon(tol));
    for (size_t i = 0; i < n; i++) { CHECK(g[i] == doctest::Approx(before[i] * max_norm / norm).epsilon(tol)); }
    gpt2_free(&model);
}

TEST_CASE("non-finite guard: a NaN gradient or an inf loss is caught before the update, naming the step") {
    const int B = 2, T = 8;
    GPT2<float> model;
    build_trainable_tiny(&model, 91);
    gpt2_lora_attach(&model, lora_config(4, 8.0f, LORA_ALL_TARGETS), 92);
    Rng rng;
    rng_seed(&rng, 93);
    std::vector<int> inputs, targets;
    random_tokens(&rng, &inputs, B * T, model.config.vocab_size);
    random_tokens(&rng, &targets, B * T, model.config.vocab_size);
    gpt2_forward(&model, inputs.data(), targets.data(), B, T);
    gpt2_zero_grad(&model);
    gpt2_backward(&model);
    CHECK(gpt2_check_step_finite(&model, 7) == "");
    model.lora.grads_memory[model.lora.num_parameters / 2] = NAN;
    std::string err = gpt2_check_step_finite(&model, 7);
    CHECK(has(err, "gradient"));
    CHECK(has(err, "step 7"));
    CHECK(has(err, "HINT"));
    model.lora.grads_memory[model.lora.num_parameters / 2] = 0;
    model.mean_loss = INFINITY;
    err = gpt2_check_step_finite(&model, 8);
    CHECK(has(err, "train loss is inf at step 8"));
    gpt2_free(&model);
}

TEST_CASE("dropout masks: the same (seed, step, layer, site) draws the same mask; another step, layer, site or seed another; about 1 - p is kept") {
    const size_t N = 1 << 20;
    const float p = 0.1f;
    auto mask = [&](uint64_t key) {
        std::vector<char> m(N);
        for (size_t i = 0; i < N; i++) m[i] = dropout_keep(key, i, p);
        return m;
    };
    std::vector<char> m = mask(dropout_key(1337, 5, 2, DROP_LORA + LORA_FC));
    CHECK(mask(dropout_key(1337, 5, 2, DROP_LORA + LORA_FC)) == m);   // reproducible: the backward, a resumed run
    CHECK(mask(dropout_key(1337, 6, 2, DROP_LORA + LORA_FC)) != m);   // the next step
    CHECK(mask(dropout_key(1337, 5, 3, DROP_LORA + LORA_FC)) != m);   // another layer
    CHECK(mask(dropout_key(1337, 5, 2, DROP_LORA + LORA_QKV)) != m);  // another matmul
    CHECK(mask(dropout_key(1337, 5, 2, DROP_ATTPROJ)) != m);          // another site
    CHECK(mask(dropout_key(1338, 5, 2, DROP_LORA + LORA_FC)) != m);   // another seed (-n, or another rank)
    // the kept fraction: N Bernoulli(1 - p) draws have standard deviation sqrt(p (1 - p) / N) = 2.9e-4;
    // 6 of them (a false alarm about once in 10^9 runs, were the hash truly random) is 1.8e-3
    const double tol_kept = 6 * std::sqrt(p * (1 - p) / (double)N);
    for (int step : {0, 1, 1000}) {
        for (float q : {0.1f, 0.5f, 0.9f}) {
            uint64_t key = dropout_key(1337, step, 0, DROP_ATTENTION);
            size_t kept = 0;
            for (size_t i = 0; i < N; i++) kept += dropout_keep(key, i, q);
            double frac = (double)kept / N, tol = 6 * std::sqrt(q * (1 - q) / (double)N);
            CAPTURE(step); CAPTURE(q);
            MESSAGE("kept fraction at p = " << q << ", step " << step << ": " << frac << " (expected " << 1 - q << ")");
            CHECK(std::fabs(frac - (1 - q)) < tol);
        }
    }
    CHECK(tol_kept < 2e-3);
    // pairs of neighbours are independent too: kept-and-kept occurs (1 - p)^2 of the time
    size_t both = 0;
    for (size_t i = 0; i + 1 < N; i += 2) both += m[i] && m[i + 1];
    double pair_frac = (double)both / (N / 2), pair_sd = std::sqrt(0.81 * 0.19 / (N / 2));
    CHECK(std::fabs(pair_frac - 0.81) < 6 * pair_sd);
}

TEST_CASE("dropout is off at evaluation and generation: outside a training step, or without targets, the model is bit for bit the undropped one; p = 0 allocates nothing") {
    const int B = 2, T = 8;
    GPT2<float> plain, dropped;
    for (GPT2<float>* m : {&plain, &dropped}) {
        build_trainable_tiny(m, 111);
        gpt2_lora_attach(m, lora_config(4, 8.0f, LORA_ALL_TARGETS), 112);
        randomize_lora_B(&m->lora, m->config.num_layers, m->config.channels, 113, 0.2);
        gpt2_allocate(m, B, T);
    }
    dropped.lora.config.dropout = 0.1f;
    dropped.drop.gpt2_p = 0.1f;
    dropped.drop.seed = 114;
    Rng rng;
    rng_seed(&rng, 115);
    std::vector<int> inputs, targets;
    random_tokens(&rng, &inputs, B * T, 61);
    random_tokens(&rng, &targets, B * T, 61);
    size_t nlogits = (size_t)B * T * plain.config.padded_vocab_size;
    auto same_logits = [&]() { return memcmp(plain.acts.logits, dropped.acts.logits, nlogits * sizeof(float)) == 0; };
    gpt2_forward(&plain, inputs.data(), targets.data(), B, T);
    // evaluation (gpt2_validate's forward): not in a training step
    gpt2_forward(&dropped, inputs.data(), targets.data(), B, T);
    CHECK(same_logits());
    CHECK(dropped.mean_loss == plain.mean_loss);
    // in a training step but without targets (inference): no mask either
    gpt2_train_mode(&dropped, true, 4);
    gpt2_forward(&dropped, inputs.data(), NULL, B, T);
    CHECK(same_logits());
    // generation, which runs between training steps, draws the same tokens (key/value cache on)
    Rng r1, r2;
    rng_seed(&r1, 116);
    rng_seed(&r2, 116);
    gpt2_train_mode(&dropped, false);
    CHECK(gpt2_generate(&plain, std::vector<int>{1, 2, 3}, 12, &r1, 1.0f, 0) == gpt2_generate(&dropped, std::vector<int>{1, 2, 3}, 12, &r2, 1.0f, 0));
    // a training step's forward does draw masks, and a different loss
    gpt2_forward(&plain, inputs.data(), targets.data(), B, T);
    gpt2_train_mode(&dropped, true, 4);
    gpt2_forward(&dropped, inputs.data(), targets.data(), B, T);
    CHECK(dropped.drop.drawn);
    CHECK(!same_logits());
    CHECK(dropped.drop.lora_x != NULL);
    CHECK(gpt2_dropout_bytes(&dropped) > 0);
    // p = 0: a training step allocates no scratch and counts none
    gpt2_train_mode(&plain, true, 4);
    gpt2_forward(&plain, inputs.data(), targets.data(), B, T);
    gpt2_zero_grad(&plain);
    gpt2_backward(&plain);
    CHECK(!plain.drop.drawn);
    CHECK(plain.drop.lora_x == NULL);
    CHECK(plain.drop.lora_dx == NULL);
    CHECK(plain.drop.dproj == NULL);
    CHECK(gpt2_dropout_bytes(&plain) == 0);
    gpt2_free(&plain);
    gpt2_free(&dropped);
}

// A LoRA run trained straight through into *a, and the same run interrupted at step split: saved with
// its train state to adapter, thrown away, read into the fresh *c and trained on to the end. prepare sets
// what a run needs beyond cfg (GPT-2's dropout, say) on each model before it trains. Seeds: seed (lora_A),
// seed + 1 (the loader's shuffle), seed + 2 (the sampler). a and c are the caller's to free.
struct ResumedRun {
    std::vector<float> straight, resumed; // every step's loss; the resumed run's first split are from before the save
    TrainState state;                     // as saved at split
};
static ResumedRun train_straight_and_resumed(GPT2<float>* a, GPT2<float>* c, const std::string& ckpt, const std::string& tokens,
                                             const std::string& adapter, const LoRAConfig& cfg, uint64_t seed, int B, int T,
                                             int steps, int split, const std::function<void(GPT2<float>*)>& prepare) {
    ResumedRun run;
    auto start = [&](GPT2<float>* model, DataLoader* loader) { // a model and loader as the trainer makes them
        REQUIRE(gpt2_read_checkpoint(model, ckpt.c_str()) == "");
        gpt2_lora_attach(model, cfg, seed);
        gpt2_allocate(model, B, T);
        prepare(model);
        REQUIRE(dataloader_init(loader, tokens.c_str(), B, T, 61, true, seed + 1, "-i") == "");
    };
    DataLoader la;
    start(a, &la);
    train_steps(a, &la, 0, steps, &run.straight);
    {
        GPT2<float> b;
        DataLoader lb;
        start(&b, &lb);
        train_steps(&b, &lb, 0, split, &run.resumed);
        Rng sample_rng;
        rng_seed(&sample_rng, seed + 2);
        run.state = train_state_capture(split, &lb, &sample_rng);
        REQUIRE(lora_file_write(adapter.c_str(), &b, tiny_base_sum(&b), &run.state) == "");
        gpt2_free(&b);
    }
    REQUIRE(gpt2_read_checkpoint(c, ckpt.c_str()) == "");
    gpt2_allocate(c, B, T);
    TrainState state;
    bool has_state = false;
    REQUIRE(lora_file_read(adapter.c_str(), c, tiny_base_sum(c), &state, &has_state) == "");
    REQUIRE(has_state);
    prepare(c);
    DataLoader lc;
    REQUIRE(dataloader_init(&lc, tokens.c_str(), B, T, 61, true, 12345 /* any seed: the state replaces it */, "-i") == "");
    REQUIRE(train_state_restore(state, &lc, adapter.c_str()) == "");
    train_steps(c, &lc, state.step, steps, &run.resumed);
    REQUIRE(run.resumed.size() == run.straight.size());
    return run;
}

TEST_CASE("resume: training from a saved adapter continues bit for bit like the uninterrupted run, with dropout (-D, -R) too") {
    const int B = 2, T = 8, steps = 10, split = 4;
    // p = 0.1 on both: LoRA's branch (kept in adapter.bin) and GPT-2's (the flag, given again on resume)
    std::vector<float> losses_undropped; // the run with p = 0, which dropout must change
    for (float p : {0.0f, 0.1f}) {
        CAPTURE(p);
        TempDir dir;
        std::string ckpt = dir.file("base.bin"), tokens = dir.file("tokens.bin"), adapter = dir.file("adapter.bin");
        write_tiny_checkpoint(ckpt);
        write_cyclic_tokens(tokens, 150); // 9 batches of B*T: the 10 steps cross an epoch (a reshuffle)
        LoRAConfig cfg = lora_config(4, 8.0f, LORA_ALL_TARGETS);
        cfg.dropout = p;

        GPT2<float> a, c;
        auto gpt2_dropout = [&](GPT2<float>* model) { model->drop.gpt2_p = p; model->drop.seed = 76; }; // -R, given again on resume
        ResumedRun run = train_straight_and_resumed(&a, &c, ckpt, tokens, adapter, cfg, 77, B, T, steps, split, gpt2_dropout);
        const std::vector<float>& losses_a = run.straight;
        const std::vector<float>& losses_b = run.resumed;
        const TrainState& state = run.state;
        CHECK(c.lora.config.dropout == p); // adapter.bin keeps lora_dropout
        MESSAGE("resume at step " << split << ": losses " << losses_a[split] << " .. " << losses_a[steps - 1] << " (uninterrupted) vs "
                << losses_b[split] << " .. " << losses_b[steps - 1] << " (resumed)");
        CHECK(memcmp(losses_a.data(), losses_b.data(), losses_a.size() * sizeof(float)) == 0); // bit for bit
        size_t n = a.lora.num_parameters;
        CHECK(memcmp(a.lora.params_memory, c.lora.params_memory, n * sizeof(float)) == 0);
        CHECK(memcmp(a.lora.m_memory, c.lora.m_memory, n * sizeof(float)) == 0);
        CHECK(memcmp(a.lora.v_memory, c.lora.v_memory, n * sizeof(float)) == 0);
        CHECK(losses_a[steps - 1] < losses_a[0]); // and it did learn something
        if (p == 0) losses_undropped = losses_a;
        else CHECK(losses_a != losses_undropped); // the masks were drawn: the run is another one

        // a loader of another shape cannot take the state
        DataLoader other;
        REQUIRE(dataloader_init(&other, tokens.c_str(), B, 4, 61, true, 78, "-i") == "");
        std::string err = train_state_restore(state, &other, adapter.c_str());
        CHECK(has(err, "T=8"));
        CHECK(has(err, "HINT"));
        gpt2_free(&a);
        gpt2_free(&c);
    }
}

TEST_CASE("determinism: two runs with the same seed and thread count give bit-identical losses and adapters (shuffle off and on)") {
    TempDir dir;
    std::vector<uint16_t> ids(700);
    Rng rng;
    rng_seed(&rng, 104);
    for (uint16_t& id : ids) id = (uint16_t)(rng_u32(&rng) % 61);
    write_tokens(dir.file("tokens.bin"), ids);
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    for (bool shuffle : {false, true}) {
        CAPTURE(shuffle);
        CAPTURE(threads);
        std::vector<float> adapter1, adapter2;
        // 60 steps: more than the 43 batches of an epoch, so a reshuffle happens too
        std::vector<float> losses1 = train_tiny_run(dir.file("tokens.bin"), shuffle, 60, &adapter1);
        std::vector<float> losses2 = train_tiny_run(dir.file("tokens.bin"), shuffle, 60, &adapter2);
        REQUIRE(losses1.size() == losses2.size());
        CHECK(memcmp(losses1.data(), losses2.data(), losses1.size() * sizeof(float)) == 0);
        REQUIRE(adapter1.size() == adapter2.size());
        CHECK(memcmp(adapter1.data(), adapter2.data(), adapter1.size() * sizeof(float)) == 0);
        MESSAGE("shuffle " << shuffle << ", " << threads << " threads: 60 losses identical, last " << losses1.back());
    }
}

TEST_SUITE_END();

// ----------------------------------------------------------------------------
// variants: LoRA variants (rsLoRA, LoRA+, DoRA, PiSSA, quantized base, multi-adapter batches)

// the floats of the 12 tensors besides qkvw, attprojw, fcw, fcprojw, written out from the shapes
static size_t non_block_floats(GPT2Config c) {
    size_t C = c.channels, L = c.num_layers;
    return (size_t)c.padded_vocab_size * C + (size_t)c.max_seq_len * C // wte, wpe
           + L * (2 * C + 3 * C + C + 2 * C + 4 * C + C)               // ln1w ln1b, qkvb, attprojb, ln2w ln2b, fcb, fcprojb
           + 2 * C;                                                   // lnfw, lnfb
}

TEST_SUITE_BEGIN("variants");

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

TEST_CASE("LoRA+: one AdamW step moves lora_B with lr * ratio and lora_A with lr, element by element") {
    const int B = 2, T = 5, r = 3;
    const float lr = 1e-2f, ratio = 16.0f, wd = 0.1f, eps = 1e-8f;
    GPT2<double> model;
    gpt2_build_random(&model, tiny_config(), 71);
    LoRAConfig cfg = lora_config(r, 6.0f, (1u << LORA_QKV) | (1u << LORA_FC) | (1u << LORA_FCPROJ)); // no attproj: a gap
    cfg.lr_ratio_B = ratio;
    gpt2_lora_attach(&model, cfg, 72);
    int L = model.config.num_layers, C = model.config.channels;
    randomize_lora_B(&model.lora, L, C, 73, 0.1);
    Rng rng;
    rng_seed(&rng, 74);
    std::vector<int> inputs, targets;
    random_tokens(&rng, &inputs, B * T, model.config.vocab_size);
    random_tokens(&rng, &targets, B * T, model.config.vocab_size);
    gpt2_forward(&model, inputs.data(), targets.data(), B, T);
    gpt2_zero_grad(&model);
    gpt2_backward(&model);
    size_t n = model.lora.num_parameters;
    std::vector<double> p0(model.lora.params_memory, model.lora.params_memory + n);
    std::vector<double> g(model.lora.grads_memory, model.lora.grads_memory + n);
    gpt2_update(&model, lr, 0.9f, 0.999f, eps, wd, 1);
    // which elements are lora_B, from the tensor list (independent of lora_lr_ranges)
    std::vector<char> is_B(n, 0);
    size_t nB = 0;
    for (const LoRATensor& x : lora_tensor_list(cfg, L, C)) {
        if (!x.is_B) continue;
        for (size_t i = 0; i < (size_t)x.rows * x.cols; i++) { is_B[x.offset + i] = 1; nB++; }
    }
    CHECK(nB == (size_t)L * r * (3 * C + 4 * C + C));
    // AdamW at t = 1: m = (1 - b1) g, v = (1 - b2) g^2, so mhat = g and vhat = g^2 after bias correction:
    // p1 = p0 - lr_e * (g / (|g| + eps) + wd * p0), lr_e = lr * ratio on lora_B, lr on lora_A
    double maxdiff = 0;
    for (size_t i = 0; i < n; i++) {
        double lr_e = is_B[i] ? (double)lr * ratio : (double)lr;
        double expect = p0[i] - lr_e * (g[i] / (std::fabs(g[i]) + (double)eps) + (double)wd * p0[i]);
        maxdiff = std::max(maxdiff, std::fabs(model.lora.params_memory[i] - expect));
    }
    // double arithmetic, but lr, betas and eps enter as floats: same values either way, so only
    // rounding of a few operations on O(lr * ratio) = O(0.2) steps remains
    const double tol_loraplus = 1e-12;
    MESSAGE("LoRA+ step vs the per-element formula: maxdiff " << maxdiff);
    CHECK(maxdiff < tol_loraplus);
    // and with the ratio, a lora_B step really is ratio times larger than it would be without
    CHECK(std::fabs(model.lora.params_memory[model.lora.lora_B[LORA_QKV] - model.lora.params_memory] -
                    p0[model.lora.lora_B[LORA_QKV] - model.lora.params_memory]) > 1.0 * lr);
    gpt2_free(&model);
}

// -- DoRA

TEST_CASE("DoRA: the row norm without forming lora_B lora_A equals the norm of the formed matrix") {
    const int C = 7, OC = 5, r = 3;
    Rng rng;
    rng_seed(&rng, 81);
    std::vector<double> W0 = random_vector(&rng, (size_t)OC * C, 1.0), lora_A = random_vector(&rng, (size_t)r * C, 0.5);
    std::vector<double> lora_B = random_vector(&rng, (size_t)OC * r, 0.5), n(OC), P((size_t)OC * r);
    const double scale = 1.7;
    dora_norm_forward(n.data(), P.data(), W0.data(), lora_A.data(), lora_B.data(), scale, C, OC, r);
    std::vector<double> V = W0;
    lora_merge(V.data(), lora_A.data(), lora_B.data(), scale, C, OC, r, +1);
    double maxdiff = 0;
    for (int o = 0; o < OC; o++) {
        double sum = 0;
        for (int c = 0; c < C; c++) { sum += V[(size_t)o * C + c] * V[(size_t)o * C + c]; }
        maxdiff = std::max(maxdiff, std::fabs(std::sqrt(sum) - n[o]));
    }
    const double tol_norm = 1e-12; // double, O(1) norms: the expansion only reorders the sums
    CHECK(maxdiff < tol_norm);
}

TEST_CASE("dora_backward matches finite differences (m, lora_A, lora_B, inp) over magnitudes") {
    const int BT = 4, C = 6, OC = 5, r = 2;
    Rng rng;
    rng_seed(&rng, 82);
    for (double mag : {0.1, 1.0, 3.0}) {
        CAPTURE(mag);
        std::vector<double> inp = random_vector(&rng, (size_t)BT * C, mag), w = random_vector(&rng, (size_t)BT * OC, 1.0);
        std::vector<double> W0 = random_vector(&rng, (size_t)OC * C, 0.5), bias = random_vector(&rng, OC, 0.5);
        std::vector<double> lora_A = random_vector(&rng, (size_t)r * C, 0.5), lora_B = random_vector(&rng, (size_t)OC * r, 0.5);
        std::vector<double> m = random_vector(&rng, OC, 1.0);
        for (double& x : m) x += 1.5; // magnitudes are positive in practice (they start at row norms)
        const double scale = 1.3;
        std::vector<double> out((size_t)BT * OC), h((size_t)BT * r), z((size_t)BT * OC), n(OC), P((size_t)OC * r);
        auto loss = [&]() {
            matmul_forward_naive(out.data(), inp.data(), W0.data(), bias.data(), 1, BT, C, OC);
            dora_forward(out.data(), h.data(), z.data(), n.data(), P.data(), inp.data(), bias.data(), W0.data(),
                         lora_A.data(), lora_B.data(), m.data(), scale, BT, C, OC, r);
            return dot(w, out.data());
        };
        loss();
        std::vector<double> dinp(inp.size(), 0.0), dA(lora_A.size(), 0.0), dB(lora_B.size(), 0.0), dm(OC, 0.0);
        std::vector<double> dh((size_t)BT * r), dz((size_t)BT * OC);
        // as in the model: the base matmul passes dout @ W0, dora_backward adds the rest
        matmul_backward_naive(dinp.data(), (double*)NULL, (double*)NULL, w.data(), inp.data(), W0.data(), 1, BT, C, OC);
        dora_backward(dinp.data(), dA.data(), dB.data(), dm.data(), dh.data(), dz.data(), w.data(), h.data(), z.data(),
                      n.data(), P.data(), inp.data(), W0.data(), lora_A.data(), lora_B.data(), m.data(), scale, BT, C, OC, r);
        CHECK(fd_relative_error(m.data(), m.size(), dm.data(), loss, "dora dm") < tol_fd);
        CHECK(fd_relative_error(lora_A.data(), lora_A.size(), dA.data(), loss, "dora dlora_A") < tol_fd);
        CHECK(fd_relative_error(lora_B.data(), lora_B.size(), dB.data(), loss, "dora dlora_B") < tol_fd);
        CHECK(fd_relative_error(inp.data(), inp.size(), dinp.data(), loss, "dora dinp") < tol_fd);
    }
}

TEST_CASE("DoRA in the model: starts at the base (m = row norms), and every adapter gradient matches finite differences") {
    const int B = 2, T = 5, r = 2;
    GPT2<double> base, model;
    gpt2_build_random(&base, tiny_config(), 91);
    gpt2_build_random(&model, tiny_config(), 91);
    LoRAConfig cfg = lora_config(r, 4.0f, LORA_ALL_TARGETS);
    std::string err;
    REQUIRE(lora_parse_variants("dora", &cfg, &err));
    gpt2_lora_attach(&model, cfg, 92);
    int L = model.config.num_layers, C = model.config.channels;
    CHECK(model.lora.num_parameters == lora_count_parameters(lora_config(r, 4.0f, LORA_ALL_TARGETS), L, C) + (size_t)L * (3 + 1 + 4 + 1) * C);
    Rng rng;
    rng_seed(&rng, 93);
    std::vector<int> inputs, targets;
    random_tokens(&rng, &inputs, B * T, model.config.vocab_size);
    random_tokens(&rng, &targets, B * T, model.config.vocab_size);
    gpt2_forward(&base, inputs.data(), (const int*)NULL, B, T);
    gpt2_forward(&model, inputs.data(), (const int*)NULL, B, T);
    double maxdiff = 0;
    for (size_t i = 0; i < (size_t)B * T * model.config.padded_vocab_size; i++) {
        maxdiff = std::max(maxdiff, std::fabs(base.acts.logits[i] - model.acts.logits[i]));
    }
    const double tol_dora_init = 1e-12; // m / n = 1 exactly; (out - bias) + bias rounds in double
    CHECK(maxdiff < tol_dora_init);
    // move away from init: lora_B and m nonzero / off the norms, then the whole gradient by central differences
    randomize_lora_B(&model.lora, L, C, 94, 0.1);
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        for (size_t i = 0; i < (size_t)L * lora_target_out(t, C); i++) { model.lora.dora_m[t][i] *= 1.0 + 0.2 * (rng_f32(&rng) - 0.5); }
    }
    auto loss = [&]() {
        gpt2_forward(&model, inputs.data(), targets.data(), B, T);
        return model.mean_loss;
    };
    loss();
    gpt2_zero_grad(&model);
    gpt2_backward(&model);
    std::vector<double> grads(model.lora.grads_memory, model.lora.grads_memory + model.lora.num_parameters);
    CHECK(fd_relative_error(model.lora.params_memory, model.lora.num_parameters, grads.data(), loss,
                            "model DoRA: lora_A, lora_B and m of every target") < tol_fd);
    gpt2_free(&base);
    gpt2_free(&model);
}

TEST_CASE("DoRA merge: the merged plain model equals the DoRA forward, and unmerge restores W0") {
    const int B = 2, T = 5, r = 2;
    GPT2<double> model, merged;
    gpt2_build_random(&model, tiny_config(), 181);
    gpt2_build_random(&merged, tiny_config(), 181);
    LoRAConfig cfg = lora_config(r, 4.0f, LORA_ALL_TARGETS);
    std::string err;
    REQUIRE(lora_parse_variants("dora", &cfg, &err));
    gpt2_lora_attach(&model, cfg, 182);
    int L = model.config.num_layers, C = model.config.channels;
    randomize_lora_B(&model.lora, L, C, 183, 0.1);
    for (int t = 0; t < LORA_NUM_TARGETS; t++) { model.lora.dora_m[t][1] *= 1.3; }
    std::vector<double> W0(merged.params_memory, merged.params_memory + merged.num_parameters);
    double* base[LORA_NUM_TARGETS];
    base_matrices(&merged, base);
    lora_merge_all(&model.lora, base, +1);
    std::vector<int> inputs(B * T);
    for (int i = 0; i < B * T; i++) inputs[i] = (7 * i) % model.config.vocab_size;
    gpt2_forward(&model, inputs.data(), (const int*)NULL, B, T);
    gpt2_forward(&merged, inputs.data(), (const int*)NULL, B, T);
    double maxdiff = 0;
    for (size_t i = 0; i < (size_t)B * T * model.config.padded_vocab_size; i++) {
        maxdiff = std::max(maxdiff, std::fabs(model.acts.logits[i] - merged.acts.logits[i]));
    }
    const double tol_dora_merge = 1e-12; // double: the same W, formed vs factored
    CHECK(maxdiff < tol_dora_merge);
    lora_merge_all(&model.lora, base, -1);
    double wdiff = 0;
    for (size_t i = 0; i < merged.num_parameters; i++) { wdiff = std::max(wdiff, std::fabs(merged.params_memory[i] - W0[i])); }
    CHECK(wdiff < tol_dora_merge);
    gpt2_free(&model);
    gpt2_free(&merged);
}

// -- PiSSA

TEST_CASE("PiSSA's SVD (randomized subspace iteration) agrees with a Jacobi eigen-decomposition of W^T W") {
    const int OC = 12, C = 9, r = 3;
    Rng rng;
    rng_seed(&rng, 121);
    std::vector<double> W = random_vector(&rng, (size_t)OC * C, 1.0);
    std::vector<double> U((size_t)OC * r), S(r), Vt((size_t)r * C);
    svd_top_forward(U.data(), S.data(), Vt.data(), W.data(), OC, C, r, 8, 122);
    // direct: W^T W = V diag(S^2) V^T, eigen-decomposed by the same Jacobi rotations but on the full (C, C) matrix
    std::vector<double> G((size_t)C * C), E((size_t)C * C);
    for (int i = 0; i < C; i++) {
        for (int j = 0; j < C; j++) {
            double sum = 0;
            for (int o = 0; o < OC; o++) { sum += W[(size_t)o * C + i] * W[(size_t)o * C + j]; }
            G[(size_t)i * C + j] = sum;
        }
    }
    jacobi_eigen(G.data(), E.data(), C);
    std::vector<int> order(C);
    for (int i = 0; i < C; i++) order[i] = i;
    std::sort(order.begin(), order.end(), [&](int a, int b) { return G[(size_t)a * C + a] > G[(size_t)b * C + b]; });
    // double throughout; squaring into W^T W costs a factor cond ~ 10 of the 1e-16 relative precision
    const double tol_svd = 1e-10;
    for (int i = 0; i < r; i++) {
        double sigma = std::sqrt(G[(size_t)order[i] * C + order[i]]);
        CHECK(std::fabs(S[i] - sigma) < tol_svd * S[0]);
        // the same right singular vector up to sign: |v_i . v_i'| = 1
        double d = 0;
        for (int c = 0; c < C; c++) { d += Vt[(size_t)i * C + c] * E[(size_t)c * C + order[i]]; }
        CHECK(std::fabs(std::fabs(d) - 1) < tol_svd);
        // and u_i = W v_i / sigma_i
        double maxdiff = 0;
        for (int o = 0; o < OC; o++) {
            double wv = 0;
            for (int c = 0; c < C; c++) { wv += W[(size_t)o * C + c] * Vt[(size_t)i * C + c]; }
            maxdiff = std::max(maxdiff, std::fabs(wv / S[i] - U[(size_t)o * r + i]));
        }
        CHECK(maxdiff < tol_svd);
    }
}

TEST_CASE("PiSSA: scale * lora_B lora_A is the top-r SVD part, and the model's forward is unchanged at init") {
    const int B = 2, T = 6, r = 4;
    GPT2<float> base, model;
    gpt2_build_random(&base, tiny_config(), 131);
    gpt2_build_random(&model, tiny_config(), 131);
    LoRAConfig cfg = lora_config(r, 8.0f, LORA_ALL_TARGETS);
    std::string err;
    REQUIRE(lora_parse_variants("pissa", &cfg, &err));
    gpt2_lora_attach(&model, cfg, 132);
    int C = model.config.channels;
    // the residual's largest singular value is the (r+1)-th of W0: the top r moved into the adapter
    float* W0[LORA_NUM_TARGETS];
    float* Wres[LORA_NUM_TARGETS];
    base_matrices(&base, W0);
    base_matrices(&model, Wres);
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        int in = lora_target_in(t, C), out = lora_target_out(t, C);
        std::vector<double> U((size_t)out * (r + 1)), S(r + 1), Vt((size_t)(r + 1) * in), Ur((size_t)out), Sr(1), Vr(in);
        svd_top_forward(U.data(), S.data(), Vt.data(), W0[t], out, in, r + 1, 30, 133);
        svd_top_forward(Ur.data(), Sr.data(), Vr.data(), Wres[t], out, in, 1, 30, 134);
        CAPTURE(t);
        // Eckart-Young: no rank-r subtraction leaves less than sigma_{r+1}(W0); the exact top-r SVD leaves
        // exactly that. A random matrix's spectrum decays slowly, so LORA_PISSA_ITERS subspace iterations
        // land within a few percent; a wrong split (wrong scale, wrong side) would leave O(sigma_1).
        const double tol_sigma_lo = 1e-4; // fp32 rounding of the residual, relative to sigma_1
        const double tol_sigma_hi = 0.05; // how far from optimal the iterated subspace may be
        MESSAGE("target " << t << ": sigma_1(residual) " << Sr[0] << ", sigma_{r+1}(W0) " << S[r] << ", sigma_1(W0) " << S[0]);
        CHECK(Sr[0] > S[r] - tol_sigma_lo * S[0]);
        CHECK(Sr[0] < S[r] * (1 + tol_sigma_hi));
        CHECK(S[r] < (1 - 2 * tol_sigma_hi) * S[0]); // the spectrum decays enough for the check above to mean something
    }
    Rng rng;
    rng_seed(&rng, 135);
    std::vector<int> inputs;
    random_tokens(&rng, &inputs, B * T, model.config.vocab_size);
    gpt2_forward(&base, inputs.data(), (const int*)NULL, B, T);
    gpt2_forward(&model, inputs.data(), (const int*)NULL, B, T);
    double maxdiff = 0, maxlogit = 0;
    for (size_t i = 0; i < (size_t)B * T * model.config.padded_vocab_size; i++) {
        maxdiff = std::max(maxdiff, (double)std::fabs(base.acts.logits[i] - model.acts.logits[i]));
        maxlogit = std::max(maxlogit, (double)std::fabs(base.acts.logits[i]));
    }
    // fp32: W0 = residual + scale lora_B lora_A holds to a few ulp of |W0| per weight, and the residual
    // and low-rank branch round separately; through 2 layers that stays far below 1e-4 of the logits
    const double tol_pissa_init = 1e-4;
    MESSAGE("PiSSA init: logits maxdiff " << maxdiff << " (max |logit| " << maxlogit << ")");
    CHECK(maxdiff < tol_pissa_init * std::max(1.0, maxlogit));
    gpt2_free(&base);
    gpt2_free(&model);
}

// -- quantized base (int8, NF4, int2): error bounds, the model on it, memory, adapters trained on it

TEST_CASE("quantized base: int8, NF4 and int2 quantize -> dequantize stay within their per-block error bounds") {
    const size_t n = 1000; // not a multiple of 64: the last block is partial
    Rng rng;
    rng_seed(&rng, 101);
    std::vector<float> W(n);
    for (size_t i = 0; i < n; i++) { W[i] = 0.02f * rng_normal(&rng) * (1 + (float)(i / 64)); } // blocks of different scales
    for (size_t i = 128; i < 192; i++) { W[i] = 0; } // an all-zero block must come back as zeros
    W[5] = 0.3f; // an outlier sets its block's absmax
    // the largest gap between neighbouring NF4 levels (between 0.7229... and 1)
    float max_gap = 0;
    for (int k = 0; k < 15; k++) { max_gap = std::max(max_gap, nf4_levels[k + 1] - nf4_levels[k]); }
    for (int quant : {(int)LORA_QUANT_INT8, (int)LORA_QUANT_NF4, (int)LORA_QUANT_INT2}) {
        CAPTURE(quant);
        std::vector<uint8_t> q(lora_quant_code_bytes(quant, n));
        std::vector<float> absmax(lora_quant_blocks(n)), D(n);
        quantize_forward(q.data(), absmax.data(), W.data(), n, quant);
        dequantize_forward(D.data(), q.data(), absmax.data(), n, quant);
        CHECK(q.size() == (quant == LORA_QUANT_INT8 ? n : quant == LORA_QUANT_NF4 ? n / 2 : n / 4)); // n = 1000
        size_t worst_block = 0;
        double worst = 0; // the largest error as a fraction of its block's bound
        for (size_t b = 0; b < absmax.size(); b++) {
            float amax = 0;
            for (size_t i = b * 64; i < std::min(n, b * 64 + 64); i++) { amax = std::max(amax, std::fabs(W[i])); }
            CHECK(absmax[b] == amax);
            // int8: half a step of absmax / 127; NF4: half the widest level gap; int2: half the gap of 2/3
            // between its uniform levels. Plus fp32 rounding of the scaling (a few ulp of absmax).
            double half_gap = quant == LORA_QUANT_INT8 ? 0.5 / 127 : quant == LORA_QUANT_NF4 ? 0.5 * max_gap : 1.0 / 3.0;
            double bound = amax * half_gap + 4 * amax * 1.2e-7;
            for (size_t i = b * 64; i < std::min(n, b * 64 + 64); i++) {
                double err = std::fabs((double)W[i] - D[i]);
                CHECK(err <= bound);
                if (bound > 0 && err / bound > worst) { worst = err / bound; worst_block = b; }
            }
        }
        MESSAGE(std::string(lora_quant_names[quant]) << ": worst error " << worst << " of the bound (block " << worst_block << ")");
        for (size_t i = 128; i < 192; i++) { CHECK(D[i] == 0.0f); }
        // NF4 and int2 pick the nearest level: no other level is closer to W / absmax
        if (quant != LORA_QUANT_INT8) {
            const float* levels = quant == LORA_QUANT_NF4 ? nf4_levels : int2_levels;
            int nlevels = quant == LORA_QUANT_NF4 ? 16 : 4, not_nearest = 0;
            for (size_t i = 0; i < n; i++) {
                float amax = absmax[i / 64];
                if (amax == 0) continue;
                float x = W[i] / amax, got = D[i] / amax;
                for (int k = 0; k < nlevels; k++) { if (std::fabs(x - levels[k]) < std::fabs(x - got) - 1e-6f) not_nearest++; }
            }
            CHECK(not_nearest == 0);
        }
    }
}

TEST_CASE("quantized base: the model's forward and adapter gradients equal an fp32 model holding the dequantized weights") {
    const int B = 2, T = 6, r = 4;
    for (int quant : {(int)LORA_QUANT_INT8, (int)LORA_QUANT_NF4, (int)LORA_QUANT_INT2}) {
        CAPTURE(quant);
        GPT2<float> qmodel, ref;
        gpt2_build_random(&qmodel, tiny_config(), 111);
        gpt2_build_random(&ref, tiny_config(), 111);
        LoRAConfig cfg = lora_config(r, 8.0f, LORA_ALL_TARGETS);
        cfg.base_quant = quant;
        gpt2_lora_attach(&qmodel, cfg, 112);
        gpt2_lora_attach(&ref, lora_config(r, 8.0f, LORA_ALL_TARGETS), 112);
        int L = qmodel.config.num_layers, C = qmodel.config.channels;
        randomize_lora_B(&qmodel.lora, L, C, 113, 0.1);
        randomize_lora_B(&ref.lora, L, C, 113, 0.1);
        // the reference: fp32 matrices replaced by dequantize(quantize(W)), computed here layer by layer
        float* base[LORA_NUM_TARGETS];
        base_matrices(&ref, base);
        for (int t = 0; t < LORA_NUM_TARGETS; t++) {
            size_t n = (size_t)lora_target_out(t, C) * lora_target_in(t, C);
            std::vector<uint8_t> q(lora_quant_code_bytes(quant, n));
            std::vector<float> absmax(lora_quant_blocks(n));
            for (int l = 0; l < L; l++) {
                quantize_forward(q.data(), absmax.data(), base[t] + (size_t)l * n, n, quant);
                dequantize_forward(base[t] + (size_t)l * n, q.data(), absmax.data(), n, quant);
            }
        }
        CHECK(gpt2_block_matrix_bytes(&qmodel, quant) < gpt2_block_matrix_bytes(&qmodel, LORA_QUANT_FP32) / (quant == LORA_QUANT_INT8 ? 3 : quant == LORA_QUANT_NF4 ? 6 : 10));
        Rng rng;
        rng_seed(&rng, 114);
        std::vector<int> inputs, targets;
        random_tokens(&rng, &inputs, B * T, qmodel.config.vocab_size);
        random_tokens(&rng, &targets, B * T, qmodel.config.vocab_size);
        gpt2_forward(&qmodel, inputs.data(), targets.data(), B, T);
        gpt2_forward(&ref, inputs.data(), targets.data(), B, T);
        double maxdiff = 0;
        for (size_t i = 0; i < (size_t)B * T * qmodel.config.padded_vocab_size; i++) {
            maxdiff = std::max(maxdiff, (double)std::fabs(qmodel.acts.logits[i] - ref.acts.logits[i]));
        }
        // the same fp32 weights reach the same matmul kernels in the same order
        const double tol_quant_logits = 1e-6;
        MESSAGE(std::string(lora_quant_names[quant]) << " base vs fp32 on dequantized weights: logits maxdiff " << maxdiff);
        CHECK(maxdiff < tol_quant_logits);
        gpt2_zero_grad(&qmodel);
        gpt2_backward(&qmodel);
        gpt2_zero_grad(&ref);
        gpt2_backward(&ref);
        double gdiff = 0, gmax = 0;
        for (size_t i = 0; i < qmodel.lora.num_parameters; i++) {
            gdiff = std::max(gdiff, (double)std::fabs(qmodel.lora.grads_memory[i] - ref.lora.grads_memory[i]));
            gmax = std::max(gmax, (double)std::fabs(ref.lora.grads_memory[i]));
        }
        const double tol_quant_grads = 1e-5; // relative to the largest gradient; fp32, same kernels
        CHECK(gdiff <= tol_quant_grads * gmax);
        gpt2_free(&qmodel);
        gpt2_free(&ref);
    }
}

TEST_CASE("[Memory] counts -C's token rows: the trained rows and the base's copy in parameters, grads and AdamW's m, v per row") {
    GPT2<float> model;
    build_trainable_tiny(&model, 83);
    gpt2_lora_attach(&model, lora_config(4, 8.0f, LORA_ALL_TARGETS), 84);
    MemoryBytes before = gpt2_memory_bytes(&model);
    REQUIRE(gpt2_token_rows_attach(&model, std::vector<int>{3, 17, 60}) == "");
    MemoryBytes after = gpt2_memory_bytes(&model);
    size_t row_bytes = (size_t)3 * model.config.channels * sizeof(float); // exact byte counts: no tolerance
    CHECK(after.params - before.params == 2 * row_bytes);
    CHECK(after.grads - before.grads == row_bytes);
    CHECK(after.optimizer - before.optimizer == 2 * row_bytes);
    gpt2_token_rows_detach(&model);
    gpt2_free(&model);
}

TEST_CASE("quantized base: the fp32 block matrices are gone, and the model equals an fp32 model on the dequantized weights") {
    const int B = 2, T = 8, steps = 8;
    TempDir dir;
    std::string ckpt = dir.file("base.bin");
    write_tiny_checkpoint(ckpt); // build_trainable_tiny(81)
    for (int quant : {(int)LORA_QUANT_INT8, (int)LORA_QUANT_NF4, (int)LORA_QUANT_INT2}) {
        CAPTURE(quant);
        GPT2<float> q, ref;
        REQUIRE(gpt2_read_checkpoint(&q, ckpt.c_str(), true) == ""); // as the trainer reads it for -Q
        build_trainable_tiny(&ref, 81);
        LoRAConfig cfg = lora_config(4, 8.0f, LORA_ALL_TARGETS);
        cfg.base_quant = quant;
        gpt2_lora_attach(&q, cfg, 122);
        gpt2_lora_attach(&ref, lora_config(4, 8.0f, LORA_ALL_TARGETS), 122);
        GPT2Config c = q.config;
        size_t C = c.channels, L = c.num_layers;

        // the bytes, counted here from the shapes: each layer's matrix is quantized alone, in blocks of 64
        // weights with one fp32 absmax each; int8 one byte a weight, NF4 half, int2 a quarter; plus the matmuls' scratch,
        // one dequantized fp32 layer of the largest matrix, (4C, C), shared by all four
        size_t kept = non_block_floats(c), codes = 0, absmax = 0, scratch = 4 * C * C * sizeof(float);
        for (size_t n : {3 * C * C, C * C, 4 * C * C, 4 * C * C}) {
            codes += L * (quant == LORA_QUANT_INT8 ? n : quant == LORA_QUANT_NF4 ? (n + 1) / 2 : (n + 3) / 4);
            absmax += L * ((n + 63) / 64) * sizeof(float);
        }
        CHECK(q.num_params_stored == kept);
        CHECK(q.num_parameters == ref.num_parameters); // the logical model is unchanged
        CHECK(q.params.qkvw == nullptr);
        CHECK(q.params.attprojw == nullptr);
        CHECK(q.params.fcw == nullptr);
        CHECK(q.params.fcprojw == nullptr);
        MemoryBytes mq = gpt2_memory_bytes(&q), mr = gpt2_memory_bytes(&ref);
        CHECK(mr.base == ref.num_parameters * sizeof(float));
        CHECK(mq.base == kept * sizeof(float) + codes + absmax + scratch);
        CHECK(mq.params < mr.params);
        MESSAGE(std::string(lora_quant_names[quant]) << ": parameter bytes " << mq.params << " vs fp32 " << mr.params);

        // the 12 kept tensors moved down intact: bit-identical to the fp32 model's
        const float* qt[] = {q.params.wte, q.params.wpe, q.params.ln1w, q.params.ln1b, q.params.qkvb, q.params.attprojb,
                             q.params.ln2w, q.params.ln2b, q.params.fcb, q.params.fcprojb, q.params.lnfw, q.params.lnfb};
        const float* rt[] = {ref.params.wte, ref.params.wpe, ref.params.ln1w, ref.params.ln1b, ref.params.qkvb, ref.params.attprojb,
                             ref.params.ln2w, ref.params.ln2b, ref.params.fcb, ref.params.fcprojb, ref.params.lnfw, ref.params.lnfb};
        const int idx[] = {0, 1, 2, 3, 5, 7, 8, 9, 11, 13, 14, 15};
        for (int k = 0; k < 12; k++) {
            CAPTURE(param_tensor_names[idx[k]]);
            CHECK(memcmp(qt[k], rt[k], q.param_sizes[idx[k]] * sizeof(float)) == 0);
        }

        // the reference: the fp32 model's matrices replaced by dequantize(quantize(W)), layer by layer here
        float* base[LORA_NUM_TARGETS];
        base_matrices(&ref, base);
        for (int t = 0; t < LORA_NUM_TARGETS; t++) {
            size_t n = (size_t)lora_target_out(t, (int)C) * lora_target_in(t, (int)C);
            std::vector<uint8_t> codes_l(lora_quant_code_bytes(quant, n));
            std::vector<float> absmax_l(lora_quant_blocks(n));
            for (size_t l = 0; l < L; l++) {
                quantize_forward(codes_l.data(), absmax_l.data(), base[t] + l * n, n, quant);
                dequantize_forward(base[t] + l * n, codes_l.data(), absmax_l.data(), n, quant);
            }
        }
        // the whole base as -M writes it: exactly those values (the same dequantization, no arithmetic after it)
        std::vector<float> full(q.num_parameters);
        gpt2_expand_params(&q, full.data());
        CHECK(memcmp(full.data(), ref.params_memory, full.size() * sizeof(float)) == 0);

        // training: the same batches on both, losses equal and falling
        std::string tokens = dir.file("tokens.bin");
        write_cyclic_tokens(tokens, 150);
        std::vector<float> losses_q, losses_r;
        double maxdiff = train_side_by_side(&q, &ref, tokens, B, T, steps, &losses_q, &losses_r);
        // the same fp32 weights reach the same kernels in the same order: equal to the last bit in practice;
        // allow fp32 rounding of a loss of ~4 (a wrong dequantized layer would be off by > 1e-3)
        const double tol_quant_losses = 1e-6;
        MESSAGE(std::string(lora_quant_names[quant]) << ": loss " << losses_q[0] << " -> " << losses_q[steps - 1] << ", max |quantized - fp32 dequantized| " << maxdiff);
        CHECK(maxdiff <= tol_quant_losses);
        // falling: int8 and NF4. int2 damages this tiny base so much that 8 steps at this lr raise the loss
        // (6.08 -> 6.15, and the fp32 model on the same weights does the same: the equality above)
        if (quant != LORA_QUANT_INT2) CHECK(losses_q[steps - 1] < losses_q[0]);

        // logits after training, and a merged checkpoint (-M) read back as a plain GPT-2: the dequantized base + adapters
        Rng rng;
        rng_seed(&rng, 123);
        std::vector<int> inputs;
        random_tokens(&rng, &inputs, B * T, c.vocab_size);
        gpt2_forward(&q, inputs.data(), (const int*)NULL, B, T);
        gpt2_forward(&ref, inputs.data(), (const int*)NULL, B, T);
        size_t nl = (size_t)B * T * c.padded_vocab_size;
        double ldiff = 0, maxlogit = 0;
        for (size_t i = 0; i < nl; i++) {
            ldiff = std::max(ldiff, (double)std::fabs(q.acts.logits[i] - ref.acts.logits[i]));
            maxlogit = std::max(maxlogit, (double)std::fabs(q.acts.logits[i]));
        }
        const double tol_quant_logits = 1e-6 * std::max(1.0, maxlogit); // same weights, same kernels (see above)
        CHECK(ldiff <= tol_quant_logits);
        std::string merged_path = dir.file("merged.bin");
        REQUIRE(write_merged_checkpoint(&q, merged_path.c_str()) == "");
        GPT2<float> merged;
        REQUIRE(gpt2_read_checkpoint(&merged, merged_path.c_str()) == "");
        gpt2_forward(&merged, inputs.data(), (const int*)NULL, B, T);
        double mdiff = 0;
        for (size_t i = 0; i < nl; i++) mdiff = std::max(mdiff, (double)std::fabs(merged.acts.logits[i] - q.acts.logits[i]));
        // as in the fp32 merge test: the merged and unmerged paths sum the same products in another order
        const double tol_merged_logits = 1e-5 * std::max(1.0, maxlogit);
        MESSAGE(std::string(lora_quant_names[quant]) << ": merged (dequantized base) vs unmerged logits maxdiff " << mdiff);
        CHECK(mdiff <= tol_merged_logits);
        // nothing else can write or merge the fp32 matrices it no longer has
        CHECK(has(gpt2_write_checkpoint(&q, dir.file("plain.bin").c_str()), "HINT"));
        gpt2_free(&merged);
        gpt2_free(&q);
        gpt2_free(&ref);
    }
}

// -- bf16 base (-Q bf16)

// rounds a model's block matrices and wte to bf16 values in place: the fp32 model on the same weights
static void round_base_to_bf16(GPT2<float>* model) {
    float* W[] = {model->params.wte, model->params.qkvw, model->params.attprojw, model->params.fcw, model->params.fcprojw};
    size_t n[] = {model->param_sizes[0], model->param_sizes[4], model->param_sizes[6], model->param_sizes[10], model->param_sizes[12]};
    for (int k = 0; k < 5; k++) for (size_t i = 0; i < n[k]; i++) W[k][i] = bf16_widen(bf16_round(W[k][i]));
}

// writes a model as llm.c's bf16 checkpoint (version 5): the same header, every parameter rounded to bf16
static void write_bf16_checkpoint(const GPT2<float>* model, const std::string& path) {
    int header[256] = {0};
    header[0] = CHECKPOINT_MAGIC;
    header[1] = 5;
    header[2] = model->config.max_seq_len;
    header[3] = model->config.vocab_size;
    header[4] = model->config.num_layers;
    header[5] = model->config.num_heads;
    header[6] = model->config.channels;
    header[7] = model->config.padded_vocab_size;
    std::vector<uint16_t> h(model->num_parameters);
    for (size_t i = 0; i < h.size(); i++) h[i] = bf16_round(model->params_memory[i]);
    std::vector<char> bytes(sizeof(header) + 2 * h.size());
    memcpy(bytes.data(), header, sizeof(header));
    memcpy(bytes.data() + sizeof(header), h.data(), 2 * h.size());
    write_bytes(path, bytes.data(), bytes.size());
}

TEST_CASE("bf16 base: logits, loss and LoRA gradients are within a stated tolerance of the fp32 model on the same weights") {
    const int B = 2, T = 8, r = 4;
    GPT2<float> q, ref;
    build_trainable_tiny(&q, 111);
    build_trainable_tiny(&ref, 111);
    LoRAConfig cfg = lora_config(r, 8.0f, LORA_ALL_TARGETS);
    cfg.base_quant = LORA_QUANT_BF16;
    gpt2_lora_attach(&q, cfg, 112);
    round_base_to_bf16(&ref); // the same weights in fp32
    gpt2_lora_attach(&ref, lora_config(r, 8.0f, LORA_ALL_TARGETS), 112);
    int L = q.config.num_layers, C = q.config.channels, Vp = q.config.padded_vocab_size;
    randomize_lora_B(&q.lora, L, C, 113, 0.1);
    randomize_lora_B(&ref.lora, L, C, 113, 0.1);
    // built in memory, the model keeps its fp32 wte, rounded in place to the bf16 values it also holds
    REQUIRE(q.wte_bf16 != nullptr);
    CHECK(memcmp(q.params.wte, ref.params.wte, q.param_sizes[0] * sizeof(float)) == 0);
    // two bytes a block-matrix weight, no absmax
    CHECK(gpt2_block_matrix_bytes(&q, LORA_QUANT_BF16) * 2 == gpt2_block_matrix_bytes(&q, LORA_QUANT_FP32));
    Rng rng;
    rng_seed(&rng, 114);
    std::vector<int> inputs, targets;
    random_tokens(&rng, &inputs, B * T, q.config.vocab_size);
    random_tokens(&rng, &targets, B * T, q.config.vocab_size);
    gpt2_forward(&q, inputs.data(), targets.data(), B, T);
    gpt2_forward(&ref, inputs.data(), targets.data(), B, T);
    double ldiff = 0, lmax = 0;
    for (size_t i = 0; i < (size_t)B * T * Vp; i++) {
        ldiff = std::max(ldiff, (double)std::fabs(q.acts.logits[i] - ref.acts.logits[i]));
        lmax = std::max(lmax, (double)std::fabs(ref.acts.logits[i]));
    }
    // The weights are equal; what differs is that the bf16 matmuls round their activations to bf16
    // (relative error <= 2^-9 = 0.002 each) when this build has AVX512_BF16 (else nothing differs but
    // the summation order). Such errors average out over the sums and the layers; 1% of the largest
    // logit is 5x the 2^-9 of one rounding, and a wrong kernel (a transposed or unrounded weight, a
    // dropped K slice) moves logits by O(their size).
    const double tol_bf16_logits = 1e-2 * std::max(1.0, lmax);
    const double tol_bf16_loss = 1e-2; // of a loss ~4: the same argument, on the log-sum-exp of the logits
    MESSAGE("bf16 base vs fp32 on the same weights: logits maxdiff " << ldiff << " (max |logit| " << lmax << "), loss "
            << q.mean_loss << " vs " << ref.mean_loss);
    CHECK(ldiff <= tol_bf16_logits);
    CHECK(std::fabs(q.mean_loss - ref.mean_loss) <= tol_bf16_loss);
    gpt2_zero_grad(&q);
    gpt2_backward(&q);
    gpt2_zero_grad(&ref);
    gpt2_backward(&ref);
    double gdiff = 0, gmax = 0;
    for (size_t i = 0; i < q.lora.num_parameters; i++) {
        gdiff = std::max(gdiff, (double)std::fabs(q.lora.grads_memory[i] - ref.lora.grads_memory[i]));
        gmax = std::max(gmax, (double)std::fabs(ref.lora.grads_memory[i]));
    }
    // the backward rounds dout to bf16 in the same way at every frozen matmul: 2% of the largest gradient
    const double tol_bf16_grads = 2e-2;
    MESSAGE("bf16 base vs fp32 on the same weights: LoRA gradients maxdiff " << gdiff << " of max " << gmax);
    CHECK(gdiff <= tol_bf16_grads * gmax);
    gpt2_free(&q);
    gpt2_free(&ref);
}

TEST_CASE("bf16 base read from llm.c fp32 (v3) and bf16 (v5) files: only bf16 held, training tracks fp32, -M writes the widened base + adapter") {
    const int B = 2, T = 8, steps = 8;
    TempDir dir;
    std::string v3 = dir.file("base.bin"), v5 = dir.file("base_bf16.bin");
    write_tiny_checkpoint(v3); // build_trainable_tiny(81)
    {
        GPT2<float> m;
        build_trainable_tiny(&m, 81);
        write_bf16_checkpoint(&m, v5);
        gpt2_free(&m);
    }
    std::string tokens = dir.file("tokens.bin");
    write_cyclic_tokens(tokens, 150);
    GPT2<float> held[2];
    const char* paths[2] = {v3.c_str(), v5.c_str()};
    for (int k = 0; k < 2; k++) {
        CAPTURE(paths[k]);
        GPT2<float>& q = held[k];
        REQUIRE(gpt2_read_checkpoint(&q, paths[k], true) == ""); // as the trainer reads it for -Q
        LoRAConfig cfg = lora_config(4, 8.0f, LORA_ALL_TARGETS);
        cfg.base_quant = LORA_QUANT_BF16;
        gpt2_lora_attach(&q, cfg, 122);
        GPT2Config c = q.config;
        size_t C = c.channels, L = c.num_layers, wte = (size_t)c.padded_vocab_size * C;
        // held: the 11 other tensors in fp32, wte and the block matrices in bf16 (2 bytes); no fp32
        // scratch (the matmuls read bf16; DoRA and merging allocate the (4C, C) one they dequantize into)
        CHECK(q.params.wte == nullptr);
        CHECK(q.params.qkvw == nullptr);
        CHECK(q.params.fcprojw == nullptr);
        CHECK(q.quant_w == nullptr);
        CHECK(q.num_params_stored == non_block_floats(c) - wte);
        MemoryBytes mq = gpt2_memory_bytes(&q);
        CHECK(mq.base == (non_block_floats(c) - wte) * sizeof(float) + 2 * (12 * L * C * C) + 2 * wte);
    }
    // the v5 file's bf16 values are the v3 file's rounded: both models hold the same bits (the v5 one
    // exactly as its file has them)
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        size_t n = held[0].config.num_layers * lora_quant_code_bytes(LORA_QUANT_BF16, (size_t)lora_target_out(t, held[0].config.channels) * lora_target_in(t, held[0].config.channels));
        CHECK(memcmp(held[0].quant_q[t], held[1].quant_q[t], n) == 0);
    }
    CHECK(memcmp(held[0].wte_bf16, held[1].wte_bf16, held[0].param_sizes[0] * sizeof(uint16_t)) == 0);
    gpt2_free(&held[1]);
    GPT2<float>& q = held[0];

    // training: the same batches on the bf16 base and on the original fp32 base
    GPT2<float> ref;
    build_trainable_tiny(&ref, 81);
    gpt2_lora_attach(&ref, lora_config(4, 8.0f, LORA_ALL_TARGETS), 122);
    std::vector<float> losses_q, losses_r;
    double maxdiff = train_side_by_side(&q, &ref, tokens, B, T, steps, &losses_q, &losses_r);
    // bf16 weights (2^-9 relative each) and activations move this tiny model's loss by ~2e-3; 2e-2 is
    // 10x that, while a bf16 path that broke the model (a wrong layer, wte unrounded in one place and
    // not the other) moves a loss of ~6 by 0.1 or more
    const double tol_bf16_curve = 2e-2;
    MESSAGE("bf16 base: loss " << losses_q[0] << " -> " << losses_q[steps - 1] << "; fp32 " << losses_r[0] << " -> "
            << losses_r[steps - 1] << "; max |bf16 - fp32| " << maxdiff);
    CHECK(maxdiff <= tol_bf16_curve);
    CHECK(losses_q[steps - 1] < losses_q[0]);

    // -M: the merged fp32 checkpoint is the bf16 base widened to fp32 plus the adapter, exactly: the
    // widened values, then lora_merge_all's arithmetic on them, nothing else
    std::string merged_path = dir.file("merged.bin");
    REQUIRE(write_merged_checkpoint(&q, merged_path.c_str()) == "");
    GPT2<float> merged, widened;
    REQUIRE(gpt2_read_checkpoint(&merged, merged_path.c_str()) == "");
    build_trainable_tiny(&widened, 81);
    round_base_to_bf16(&widened);
    std::vector<float> full(q.num_parameters);
    gpt2_expand_params(&q, full.data());
    CHECK(memcmp(full.data(), widened.params_memory, full.size() * sizeof(float)) == 0); // the widened base
    float* base[LORA_NUM_TARGETS];
    base_matrices(&widened, base);
    lora_merge_all(&q.lora, base, +1); // + the adapter
    CHECK(memcmp(merged.params_memory, widened.params_memory, merged.num_parameters * sizeof(float)) == 0);
    // and nothing can write the fp32 base it no longer holds
    CHECK(has(gpt2_write_checkpoint(&q, dir.file("plain.bin").c_str()), "HINT"));
    gpt2_free(&widened);
    gpt2_free(&merged);
    gpt2_free(&ref);
    gpt2_free(&q);
}

TEST_CASE("quantized base: an adapter trained on -Q checks against the fp32 base file and reloads quantized, or fp32 on request") {
    const int B = 2, T = 8;
    TempDir dir;
    std::string ckpt = dir.file("base.bin"), tokens = dir.file("tokens.bin"), adapter = dir.file("adapter.bin");
    write_tiny_checkpoint(ckpt);
    write_cyclic_tokens(tokens, 150);
    GPT2<float> a;
    REQUIRE(gpt2_read_checkpoint(&a, ckpt.c_str()) == "");
    uint64_t sum = tiny_base_sum(&a); // as main takes it: of the file as read, before quantizing
    LoRAConfig cfg = lora_config(4, 8.0f, LORA_ALL_TARGETS);
    cfg.base_quant = LORA_QUANT_NF4;
    gpt2_lora_attach(&a, cfg, 131);
    gpt2_allocate(&a, B, T);
    DataLoader la;
    REQUIRE(dataloader_init(&la, tokens.c_str(), B, T, 61, false, 0, "-i") == "");
    std::vector<float> losses;
    train_steps(&a, &la, 0, 3, &losses);
    Rng sample_rng;
    rng_seed(&sample_rng, 132);
    TrainState state = train_state_capture(3, &la, &sample_rng);
    REQUIRE(lora_file_write(adapter.c_str(), &a, sum, &state) == "");
    Rng rng;
    rng_seed(&rng, 133);
    std::vector<int> inputs;
    random_tokens(&rng, &inputs, B * T, a.config.vocab_size);
    gpt2_forward(&a, inputs.data(), (const int*)NULL, B, T);
    size_t nl = (size_t)B * T * a.config.padded_vocab_size;

    // a fresh load of the same file: the checksum matches, and the adapter comes back on an NF4 base
    GPT2<float> c;
    REQUIRE(gpt2_read_checkpoint(&c, ckpt.c_str()) == "");
    CHECK(tiny_base_sum(&c) == sum);
    TrainState s;
    bool has_state = false;
    REQUIRE(lora_file_read(adapter.c_str(), &c, tiny_base_sum(&c), &s, &has_state) == "");
    CHECK(has_state);
    CHECK(c.lora.config.base_quant == LORA_QUANT_NF4);
    CHECK(memcmp(c.lora.m_memory, a.lora.m_memory, a.lora.num_parameters * sizeof(float)) == 0);
    gpt2_forward(&c, inputs.data(), (const int*)NULL, B, T);
    CHECK(memcmp(c.acts.logits, a.acts.logits, nl * sizeof(float)) == 0); // the same codes, the same adapter: bit for bit

    // asked for fp32 (-A with -Q fp32): the same adapter on the original fp32 base, which differs a little
    GPT2<float> d;
    REQUIRE(gpt2_read_checkpoint(&d, ckpt.c_str()) == "");
    REQUIRE(lora_file_read(adapter.c_str(), &d, tiny_base_sum(&d), &s, &has_state, LORA_QUANT_FP32) == "");
    CHECK(d.lora.config.base_quant == LORA_QUANT_FP32);
    CHECK(d.params.qkvw != nullptr);
    gpt2_forward(&d, inputs.data(), (const int*)NULL, B, T);
    double maxdiff = 0;
    for (size_t i = 0; i < nl; i++) maxdiff = std::max(maxdiff, (double)std::fabs(d.acts.logits[i] - a.acts.logits[i]));
    MESSAGE("NF4-trained adapter on the fp32 base vs the NF4 base: logits maxdiff " << maxdiff);
    CHECK(maxdiff > 0); // NF4 rounding is visible in the logits
    // the base read with its block matrices left on disk (what main does for -Q): the same checksum,
    // streamed from the file, and the same model after the attach quantizes them layer by layer from it
    GPT2<float> g;
    REQUIRE(gpt2_read_checkpoint(&g, ckpt.c_str(), true) == "");
    CHECK(g.num_params_stored == non_block_floats(g.config));
    CHECK(g.params.qkvw == nullptr);
    uint64_t file_sum = 0;
    REQUIRE(checkpoint_checksum(ckpt.c_str(), &file_sum) == "");
    CHECK(file_sum == sum);
    REQUIRE(lora_file_read(adapter.c_str(), &g, file_sum, &s, &has_state) == ""); // NF4, as the file says
    CHECK(g.params.qkvw == nullptr);
    gpt2_forward(&g, inputs.data(), (const int*)NULL, B, T);
    CHECK(memcmp(g.acts.logits, a.acts.logits, nl * sizeof(float)) == 0);
    // another adapter on the same model reads the block matrices from the file again; an fp32 one cannot
    REQUIRE(lora_file_read(adapter.c_str(), &g, file_sum, &s, &has_state) == "");
    gpt2_forward(&g, inputs.data(), (const int*)NULL, B, T);
    CHECK(memcmp(g.acts.logits, a.acts.logits, nl * sizeof(float)) == 0);
    std::string fp32_err = lora_file_read(adapter.c_str(), &g, file_sum, &s, &has_state, LORA_QUANT_FP32);
    CHECK(has(fp32_err, "-Q"));
    CHECK(has(fp32_err, "HINT"));
    gpt2_free(&g);
    // a corrupt base-storage field is refused
    std::vector<char> bytes = read_all(adapter);
    int bad = 7;
    memcpy(bytes.data() + 29 * 4, &bad, 4);
    write_bytes(dir.file("bad.bin"), bytes.data(), bytes.size());
    GPT2<float> e;
    REQUIRE(gpt2_read_checkpoint(&e, ckpt.c_str()) == "");
    std::string err = lora_file_read(dir.file("bad.bin").c_str(), &e, tiny_base_sum(&e), &s, &has_state);
    CHECK(has(err, "base storage=7"));
    CHECK(has(err, "HINT"));
    CHECK(e.params.qkvw != nullptr); // nothing attached, nothing dropped
    gpt2_free(&a);
    gpt2_free(&c);
    gpt2_free(&d);
    gpt2_free(&e);
}

TEST_CASE("quantized base read layer by layer from the file equals quantizing it in memory (with PiSSA and DoRA too)") {
    const int B = 2, T = 8;
    TempDir dir;
    std::string ckpt = dir.file("base.bin");
    write_tiny_checkpoint(ckpt);
    for (int variant = 0; variant < 2; variant++) {
        CAPTURE(variant);
        LoRAConfig cfg = lora_config(4, 8.0f, variant == 0 ? LORA_ALL_TARGETS : (1u << LORA_QKV) | (1u << LORA_FC));
        cfg.base_quant = variant == 0 ? LORA_QUANT_INT8 : LORA_QUANT_NF4;
        cfg.use_dora = cfg.init_pissa = variant == 1; // PiSSA changes W before it is quantized: per layer, in the scratch
        GPT2<float> whole, ondisk;
        REQUIRE(gpt2_read_checkpoint(&whole, ckpt.c_str()) == "");
        REQUIRE(gpt2_read_checkpoint(&ondisk, ckpt.c_str(), true) == "");
        gpt2_lora_attach(&whole, cfg, 141);
        gpt2_lora_attach(&ondisk, cfg, 141);
        CHECK(ondisk.num_params_stored == non_block_floats(ondisk.config));
        CHECK(whole.num_params_stored == whole.num_parameters); // (built in memory: the fp32 copies stay, unread)
        std::vector<float> full_whole(whole.num_parameters), full_ondisk(ondisk.num_parameters);
        gpt2_expand_params(&whole, full_whole.data());
        gpt2_expand_params(&ondisk, full_ondisk.data());
        CHECK(memcmp(full_whole.data(), full_ondisk.data(), full_whole.size() * sizeof(float)) == 0); // the same codes
        CHECK(memcmp(whole.lora.params_memory, ondisk.lora.params_memory, whole.lora.num_parameters * sizeof(float)) == 0);
        Rng rng;
        rng_seed(&rng, 142);
        std::vector<int> inputs, targets;
        random_tokens(&rng, &inputs, B * T, whole.config.vocab_size);
        random_tokens(&rng, &targets, B * T, whole.config.vocab_size);
        randomize_lora_B(&whole.lora, whole.config.num_layers, whole.config.channels, 143, 0.1);
        randomize_lora_B(&ondisk.lora, ondisk.config.num_layers, ondisk.config.channels, 143, 0.1);
        gpt2_forward(&whole, inputs.data(), targets.data(), B, T);
        gpt2_forward(&ondisk, inputs.data(), targets.data(), B, T);
        size_t nl = (size_t)B * T * whole.config.padded_vocab_size;
        CHECK(memcmp(whole.acts.logits, ondisk.acts.logits, nl * sizeof(float)) == 0); // the same codes: bit for bit
        gpt2_zero_grad(&whole);
        gpt2_backward(&whole);
        gpt2_zero_grad(&ondisk);
        gpt2_backward(&ondisk);
        CHECK(memcmp(whole.lora.grads_memory, ondisk.lora.grads_memory, whole.lora.num_parameters * sizeof(float)) == 0);
        gpt2_free(&whole);
        gpt2_free(&ondisk);
    }
}

// -- several adapters: one per sequence of a batch, or a weighted combination

TEST_CASE("multi-adapter batch: each sequence with its own adapter equals running that adapter alone") {
    const int B = 4, T = 6;
    GPT2<float> multi;
    gpt2_build_random(&multi, tiny_config(), 141);
    int L = multi.config.num_layers, C = multi.config.channels;
    LoRA<float> adapters[3];
    make_three_adapters(adapters, L, C);
    const LoRA<float>* ptrs[3] = {&adapters[0], &adapters[1], &adapters[2]};
    const int index[B] = {2, 0, 1, 0};
    lora_multi_set(&multi.lora, ptrs, index, T, L, C);
    Rng rng;
    rng_seed(&rng, 142);
    std::vector<int> inputs;
    random_tokens(&rng, &inputs, B * T, multi.config.vocab_size);
    gpt2_forward(&multi, inputs.data(), (const int*)NULL, B, T);
    int Vp = multi.config.padded_vocab_size;
    // one model per adapter: the same base, the adapter's parameters copied in, one sequence at a time
    double maxdiff = 0;
    for (int b = 0; b < B; b++) {
        GPT2<float> single;
        gpt2_build_random(&single, tiny_config(), 141);
        const LoRA<float>* a = ptrs[index[b]];
        gpt2_lora_attach(&single, a->config, 0);
        memcpy(single.lora.params_memory, a->params_memory, a->num_parameters * sizeof(float));
        gpt2_forward(&single, inputs.data() + (size_t)b * T, (const int*)NULL, 1, T);
        for (size_t i = 0; i < (size_t)T * Vp; i++) {
            maxdiff = std::max(maxdiff, (double)std::fabs(single.acts.logits[i] - multi.acts.logits[(size_t)b * T * Vp + i]));
        }
        gpt2_free(&single);
    }
    // fp32: the same kernels on the same rows; only the base matmul's blocking may differ with the batch size
    const double tol_multi = 1e-5;
    MESSAGE("multi-adapter batch vs each adapter alone: logits maxdiff " << maxdiff);
    CHECK(maxdiff < tol_multi);
    multi.lora.multi = NULL; // the holder owns nothing
    gpt2_free(&multi);
    for (int k = 0; k < 3; k++) lora_free(&adapters[k]);
}

TEST_CASE("weighted combination of adapters: one adapter whose delta is sum_k w_k scale_k lora_B_k lora_A_k") {
    const int B = 2, T = 6;
    GPT2<double> combined, merged;
    gpt2_build_random(&combined, tiny_config(), 161);
    gpt2_build_random(&merged, tiny_config(), 161);
    int L = combined.config.num_layers, C = combined.config.channels;
    LoRA<double> adapters[3], mix;
    make_three_adapters(adapters, L, C);
    const LoRA<double>* ptrs[3] = {&adapters[0], &adapters[1], &adapters[2]};
    const float weights[3] = {0.5f, 1.25f, -0.75f};
    lora_combine(&mix, ptrs, weights, 3);
    CHECK(mix.config.r == 2 + 4 + 3);
    CHECK(mix.config.targets == LORA_ALL_TARGETS);
    gpt2_lora_attach(&combined, mix.config, 0);
    memcpy(combined.lora.params_memory, mix.params_memory, mix.num_parameters * sizeof(double));
    // the reference: every adapter merged into the base with weight * its own scale
    double* base[LORA_NUM_TARGETS];
    base_matrices(&merged, base);
    for (int k = 0; k < 3; k++) {
        for (int t = 0; t < LORA_NUM_TARGETS; t++) {
            if (adapters[k].lora_A[t] == NULL) continue;
            int in = lora_target_in(t, C), out = lora_target_out(t, C), r = adapters[k].config.r;
            for (int l = 0; l < L; l++) {
                lora_merge(base[t] + (size_t)l * out * in, adapters[k].lora_A[t] + (size_t)l * r * in, adapters[k].lora_B[t] + (size_t)l * out * r,
                           (double)weights[k] * adapters[k].config.scale, in, out, r, +1);
            }
        }
    }
    Rng rng;
    rng_seed(&rng, 162);
    std::vector<int> inputs;
    random_tokens(&rng, &inputs, B * T, combined.config.vocab_size);
    gpt2_forward(&combined, inputs.data(), (const int*)NULL, B, T);
    gpt2_forward(&merged, inputs.data(), (const int*)NULL, B, T);
    double maxdiff = 0;
    for (size_t i = 0; i < (size_t)B * T * combined.config.padded_vocab_size; i++) {
        maxdiff = std::max(maxdiff, std::fabs(combined.acts.logits[i] - merged.acts.logits[i]));
    }
    const double tol_combine = 1e-12; // double: the same sum, merged vs unmerged order
    MESSAGE("combined adapter vs weighted merge: logits maxdiff " << maxdiff);
    CHECK(maxdiff < tol_combine);
    gpt2_free(&combined);
    gpt2_free(&merged);
    lora_free(&mix);
    for (int k = 0; k < 3; k++) lora_free(&adapters[k]);
}

// -- the variants in adapter.bin and the PEFT files

TEST_CASE("variants in adapter files: adapter.bin round-trips rsLoRA+DoRA+PiSSA; PEFT gets use_dora, init_lora_weights and the magnitudes") {
    const int B = 1, T = 6;
    GPT2<float> model, loaded;
    gpt2_build_random(&model, tiny_config(), 171);
    gpt2_build_random(&loaded, tiny_config(), 171);
    uint64_t base_sum = base_checksum(model.params_memory, model.num_parameters); // of the original base, as main() takes it
    LoRAConfig cfg = lora_config(2, 4.0f, LORA_ALL_TARGETS);
    std::string err;
    REQUIRE(lora_parse_variants("rslora,dora,pissa", &cfg, &err));
    gpt2_lora_attach(&model, cfg, 172);
    int C = model.config.channels;
    for (int t = 0; t < LORA_NUM_TARGETS; t++) { model.lora.dora_m[t][0] *= 1.5f; } // trained-looking magnitudes
    std::string json = peft_config_json(model.lora.config, "gpt2");
    CHECK(json.find("\"use_rslora\": true") != std::string::npos);
    CHECK(json.find("\"use_dora\": true") != std::string::npos);
    CHECK(json.find("\"init_lora_weights\": \"pissa\"") != std::string::npos);
    TempDir dir;
    REQUIRE(lora_file_write(dir.file("adapter.bin").c_str(), &model, base_sum, NULL) == "");
    TrainState state;
    bool has_state = true;
    REQUIRE(lora_file_read(dir.file("adapter.bin").c_str(), &loaded, base_sum, &state, &has_state) == "");
    CHECK(loaded.lora.config.use_rslora);
    CHECK(loaded.lora.config.use_dora);
    CHECK(loaded.lora.config.init_pissa);
    REQUIRE(loaded.lora.num_parameters == model.lora.num_parameters);
    CHECK(memcmp(loaded.lora.params_memory, model.lora.params_memory, model.lora.num_parameters * sizeof(float)) == 0);
    // the PiSSA residual base is recomputed bit for bit (seeded SVD, same code)
    CHECK(memcmp(loaded.params_memory, model.params_memory, model.num_parameters * sizeof(float)) == 0);
    std::vector<int> inputs(B * T, 3);
    gpt2_forward(&model, inputs.data(), (const int*)NULL, B, T);
    gpt2_forward(&loaded, inputs.data(), (const int*)NULL, B, T);
    CHECK(memcmp(model.acts.logits, loaded.acts.logits, (size_t)B * T * model.config.padded_vocab_size * sizeof(float)) == 0);
    // PEFT's safetensors hold one magnitude vector (out) per adapted module
    REQUIRE(peft_export(dir.path.c_str(), &model, "gpt2") == "");
    SafeTensors st;
    REQUIRE(safetensors_read(dir.file(PEFT_WEIGHTS_FILE).c_str(), &st) == "");
    const SafeTensor* m = st.find("base_model.model.transformer.h.1.mlp.c_fc.lora_magnitude_vector");
    REQUIRE(m != NULL);
    CHECK(m->shape == std::vector<size_t>{(size_t)4 * C});
    CHECK(st.values(m)[0] == model.lora.dora_m[LORA_FC][(size_t)4 * C]); // layer 1, row 0
    gpt2_free(&model);
    gpt2_free(&loaded);
}

TEST_CASE("PEFT import of DoRA: use_dora with the magnitudes gives the same model; PiSSA is refused (its residual base is not in the files)") {
    const int B = 1, T = 6;
    GPT2<float> model, loaded;
    gpt2_build_random(&model, tiny_config(), 191);
    gpt2_build_random(&loaded, tiny_config(), 191);
    LoRAConfig cfg = lora_config(2, 4.0f, (1u << LORA_QKV) | (1u << LORA_FCPROJ));
    std::string err;
    REQUIRE(lora_parse_variants("dora", &cfg, &err));
    gpt2_lora_attach(&model, cfg, 192);
    Rng rng;
    rng_seed(&rng, 193);
    for (size_t i = 0; i < model.lora.num_parameters; i++) model.lora.params_memory[i] += rng_uniform(&rng, -0.1f, 0.1f); // lora_A, lora_B and m all trained-looking
    TempDir dir;
    REQUIRE(peft_export(dir.path.c_str(), &model, "gpt2") == "");
    REQUIRE(peft_import(dir.path.c_str(), &loaded) == "");
    CHECK(loaded.lora.config.use_dora);
    CHECK(loaded.lora.config.targets == model.lora.config.targets);
    REQUIRE(loaded.lora.num_parameters == model.lora.num_parameters);
    // bit-identical: the files carry fp32 values, and the magnitudes overwrite attach's ||W0||_row
    CHECK(memcmp(loaded.lora.params_memory, model.lora.params_memory, model.lora.num_parameters * sizeof(float)) == 0);
    std::vector<int> inputs(B * T);
    for (int i = 0; i < B * T; i++) inputs[i] = (5 * i + 1) % model.config.vocab_size;
    gpt2_forward(&model, inputs.data(), (const int*)NULL, B, T);
    gpt2_forward(&loaded, inputs.data(), (const int*)NULL, B, T);
    CHECK(memcmp(model.acts.logits, loaded.acts.logits, (size_t)B * T * model.config.padded_vocab_size * sizeof(float)) == 0);

    // a magnitude missing, or of the wrong length: clear errors naming the tensor
    SafeTensors st;
    REQUIRE(safetensors_read(dir.file(PEFT_WEIGHTS_FILE).c_str(), &st) == "");
    std::vector<SafeTensorOut> keep, shorter;
    std::vector<std::vector<float>> copies;
    for (const SafeTensor& x : st.tensors) copies.emplace_back(st.values(&x), st.values(&x) + (x.end - x.begin) / sizeof(float));
    const std::string victim = "base_model.model.transformer.h.1.mlp.c_proj.lora_magnitude_vector";
    for (size_t i = 0; i < st.tensors.size(); i++) {
        const SafeTensor& x = st.tensors[i];
        if (x.name != victim) keep.push_back({x.name, x.shape, copies[i].data()});
        shorter.push_back({x.name, x.name == victim ? std::vector<size_t>{x.shape[0] - 1} : x.shape, copies[i].data()});
    }
    REQUIRE(safetensors_write(dir.file(PEFT_WEIGHTS_FILE).c_str(), keep) == "");
    err = peft_import(dir.path.c_str(), &loaded);
    CHECK(has(err, victim.c_str()));
    CHECK(has(err, "use_dora"));
    REQUIRE(safetensors_write(dir.file(PEFT_WEIGHTS_FILE).c_str(), shorter) == "");
    err = peft_import(dir.path.c_str(), &loaded);
    CHECK(has(err, victim.c_str()));
    CHECK(has(err, "shape"));

    // PiSSA: refused with the reason and the two ways out
    std::string config;
    REQUIRE(read_text_file(dir.file(PEFT_CONFIG_FILE).c_str(), "config", "", &config) == "");
    size_t at = config.find("\"init_lora_weights\": true");
    REQUIRE(at != std::string::npos);
    config.replace(at, strlen("\"init_lora_weights\": true"), "\"init_lora_weights\": \"pissa_niter_4\"");
    write_bytes(dir.file(PEFT_CONFIG_FILE), config.data(), config.size());
    err = peft_import(dir.path.c_str(), &loaded);
    CHECK(has(err, "PiSSA"));
    CHECK(has(err, "residual base"));
    CHECK(has(err, "HINT"));
    gpt2_free(&model);
    gpt2_free(&loaded);
}

// -- AdaLoRA

TEST_CASE("adalora_backward matches finite differences (lora_A, lora_E, lora_B, inp) over magnitudes") {
    const int BT = 4, C = 6, OC = 5, r = 3;
    Rng rng;
    rng_seed(&rng, 301);
    for (double mag : {0.1, 1.0, 3.0}) {
        CAPTURE(mag);
        std::vector<double> inp = random_vector(&rng, (size_t)BT * C, mag), w = random_vector(&rng, (size_t)BT * OC, 1.0);
        std::vector<double> lora_A = random_vector(&rng, (size_t)r * C, 0.5), lora_B = random_vector(&rng, (size_t)OC * r, 0.5);
        std::vector<double> lora_E = random_vector(&rng, r, 1.0);
        const double scale = 1.3;
        std::vector<double> out((size_t)BT * OC), h((size_t)BT * r), AE((size_t)r * C), dAE((size_t)r * C);
        auto loss = [&]() {
            std::fill(out.begin(), out.end(), 0.0);
            adalora_forward(out.data(), h.data(), AE.data(), inp.data(), lora_A.data(), lora_E.data(), lora_B.data(), scale, BT, C, OC, r);
            return dot(w, out.data());
        };
        loss();
        // the forward against its definition: out = scale * inp @ (lora_B diag(lora_E) lora_A)^T
        double maxdiff = 0;
        for (int bt = 0; bt < BT; bt++) {
            for (int o = 0; o < OC; o++) {
                double sum = 0;
                for (int i = 0; i < r; i++) {
                    for (int c = 0; c < C; c++) sum += lora_B[o * r + i] * lora_E[i] * lora_A[i * C + c] * inp[bt * C + c];
                }
                maxdiff = std::max(maxdiff, std::fabs(scale * sum - out[bt * OC + o]));
            }
        }
        const double tol_adalora_forward = 1e-12; // two summation orders of the same O(10)-term products in double
        CHECK(maxdiff < tol_adalora_forward * std::max(1.0, mag));
        std::vector<double> dinp(inp.size(), 0.0), dA(lora_A.size(), 0.0), dB(lora_B.size(), 0.0), dE(r, 0.0), dh((size_t)BT * r);
        adalora_backward(dinp.data(), dA.data(), dE.data(), dB.data(), dh.data(), AE.data(), dAE.data(), w.data(), h.data(), inp.data(),
                         lora_A.data(), lora_E.data(), lora_B.data(), scale, BT, C, OC, r);
        CHECK(fd_relative_error(lora_A.data(), lora_A.size(), dA.data(), loss, "adalora dlora_A") < tol_fd);
        CHECK(fd_relative_error(lora_E.data(), lora_E.size(), dE.data(), loss, "adalora dlora_E") < tol_fd);
        CHECK(fd_relative_error(lora_B.data(), lora_B.size(), dB.data(), loss, "adalora dlora_B") < tol_fd);
        CHECK(fd_relative_error(inp.data(), inp.size(), dinp.data(), loss, "adalora dinp") < tol_fd);
    }
}

TEST_CASE("AdaLoRA's orthogonality regulariser: ||M - I||_F of lora_A (Q Q^T) and lora_B (P^T P), its gradient by finite differences, 0 at the minimum") {
    const int C = 7, OC = 5, r = 3;
    Rng rng;
    rng_seed(&rng, 302);
    std::vector<double> A = random_vector(&rng, (size_t)r * C, 0.6), B = random_vector(&rng, (size_t)OC * r, 0.6), D;
    // the value against its definition, the Gram matrices formed directly
    auto direct = [&](bool rows_of_A) {
        double s2 = 0;
        for (int i = 0; i < r; i++) {
            for (int j = 0; j < r; j++) {
                double m = 0;
                if (rows_of_A) { for (int c = 0; c < C; c++) m += A[i * C + c] * A[j * C + c]; }
                else { for (int o = 0; o < OC; o++) m += B[o * r + i] * B[o * r + j]; }
                m -= i == j ? 1 : 0;
                s2 += m * m;
            }
        }
        return std::sqrt(s2);
    };
    const double tol_orth_value = 1e-13; // the same sums in another order, in double
    CHECK(std::fabs(adalora_orth_forward(A.data(), r, C, (size_t)C, 1, &D) - direct(true)) < tol_orth_value);
    CHECK(std::fabs(adalora_orth_forward(B.data(), r, OC, 1, (size_t)r, &D) - direct(false)) < tol_orth_value);
    const double dnorm = 0.7;
    for (int which = 0; which < 2; which++) {
        std::vector<double>& X = which == 0 ? A : B;
        int n = which == 0 ? C : OC;
        size_t si = which == 0 ? (size_t)C : 1, sk = which == 0 ? 1 : (size_t)r;
        auto loss = [&]() { return dnorm * adalora_orth_forward(X.data(), r, n, si, sk, &D); };
        double norm = adalora_orth_forward(X.data(), r, n, si, sk, &D);
        std::vector<double> dX(X.size(), 0.0);
        adalora_orth_backward(dX.data(), X.data(), D, norm, dnorm, r, n, si, sk);
        CHECK(fd_relative_error(X.data(), X.size(), dX.data(), loss, which == 0 ? "orth dlora_A" : "orth dlora_B") < tol_fd);
    }
    // orthonormal rows: the norm is 0 (its minimum, not differentiable) and the gradient taken is 0, not NaN
    std::vector<double> Q((size_t)r * C, 0.0), dQ((size_t)r * C, 0.0);
    for (int i = 0; i < r; i++) Q[i * C + i] = 1;
    double zero = adalora_orth_forward(Q.data(), r, C, (size_t)C, 1, &D);
    CHECK(zero == 0.0);
    adalora_orth_backward(dQ.data(), Q.data(), D, zero, dnorm, r, C, (size_t)C, 1);
    for (double d : dQ) CHECK(d == 0.0);
}

// a tiny double model with an AdaLoRA adapter of init_r r, lora_E random (its init is 0: nothing would flow)
static LoRAConfig adalora_test_config(int r, int target_r, int tinit, int tfinal, int deltaT, int total_step) {
    LoRAConfig cfg = lora_config(r, 6.0f, LORA_ALL_TARGETS);
    std::string err;
    REQUIRE(lora_parse_variants("adalora", &cfg, &err));
    cfg.adalora_target_r = target_r;
    cfg.adalora_tinit = tinit;
    cfg.adalora_tfinal = tfinal;
    cfg.adalora_deltaT = deltaT;
    cfg.adalora_total_step = total_step;
    return cfg;
}

TEST_CASE("AdaLoRA in the model: starts at the base (lora_E = 0, PEFT's init), and the whole gradient, cross-entropy plus the regulariser, matches finite differences") {
    const int B = 2, T = 5, r = 3;
    GPT2<double> base, model;
    gpt2_build_random(&base, tiny_config(), 311);
    gpt2_build_random(&model, tiny_config(), 311);
    LoRAConfig cfg = adalora_test_config(r, 2, 0, 0, 1, 10);
    CHECK(std::fabs(cfg.scale - 6.0f / (3.0f + 1e-5f)) == 0.0f); // PEFT: lora_alpha / (ranknum + 1e-5)
    gpt2_lora_attach(&model, cfg, 312);
    int L = model.config.num_layers, C = model.config.channels;
    CHECK(model.lora.num_parameters == lora_count_parameters(lora_config(r, 6.0f, LORA_ALL_TARGETS), L, C) + (size_t)L * 4 * r);
    double sum2 = 0;
    size_t n_AB = lora_count_parameters(lora_config(r, 6.0f, LORA_ALL_TARGETS), L, C);
    for (size_t i = 0; i < n_AB; i++) sum2 += model.lora.params_memory[i] * model.lora.params_memory[i];
    const double tol_init_std = 0.002; // the sample std of ~1000 N(0, 0.02^2) draws is within 0.02 +- 10%
    CHECK(std::fabs(std::sqrt(sum2 / n_AB) - 0.02) < tol_init_std);
    Rng rng;
    rng_seed(&rng, 313);
    std::vector<int> inputs, targets;
    random_tokens(&rng, &inputs, B * T, model.config.vocab_size);
    random_tokens(&rng, &targets, B * T, model.config.vocab_size);
    gpt2_forward(&base, inputs.data(), (const int*)NULL, B, T);
    gpt2_forward(&model, inputs.data(), (const int*)NULL, B, T);
    for (size_t i = 0; i < (size_t)B * T * model.config.padded_vocab_size; i++) REQUIRE(base.acts.logits[i] == model.acts.logits[i]); // exact: lora_E = 0 adds zeros
    // away from init: lora_E, lora_A, lora_B of O(0.3), then the loss PEFT trains, cross-entropy + regulariser
    for (size_t i = 0; i < model.lora.num_parameters; i++) model.lora.params_memory[i] = 0.6 * (rng_f32(&rng) - 0.5);
    auto loss = [&]() {
        gpt2_forward(&model, inputs.data(), targets.data(), B, T);
        std::vector<double> keep(model.lora.grads_memory, model.lora.grads_memory + model.lora.num_parameters);
        double orth = adalora_orth_loss_backward(&model.lora); // its value; the gradient it adds is put back
        memcpy(model.lora.grads_memory, keep.data(), keep.size() * sizeof(double));
        return model.mean_loss + orth;
    };
    loss();
    gpt2_zero_grad(&model);
    gpt2_backward(&model);
    double orth = adalora_orth_loss_backward(&model.lora);
    CHECK(orth > 0);
    std::vector<double> grads(model.lora.grads_memory, model.lora.grads_memory + model.lora.num_parameters);
    CHECK(fd_relative_error(model.lora.params_memory, model.lora.num_parameters, grads.data(), loss,
                            "model AdaLoRA: lora_A, lora_B, lora_E of every target, with the regulariser") < tol_fd);
    // merge: the merged plain model equals the AdaLoRA forward (PEFT's get_delta_weight = scale lora_B diag(E) lora_A)
    gpt2_forward(&model, inputs.data(), (const int*)NULL, B, T);
    std::vector<double> unmerged(model.acts.logits, model.acts.logits + (size_t)B * T * model.config.padded_vocab_size);
    std::vector<double> W0(model.params_memory, model.params_memory + model.num_parameters);
    gpt2_lora_merge(&model, +1);
    LoRA<double> kept = model.lora;
    memset(&model.lora, 0, sizeof(model.lora));
    gpt2_forward(&model, inputs.data(), (const int*)NULL, B, T);
    double maxdiff = 0;
    for (size_t i = 0; i < unmerged.size(); i++) maxdiff = std::max(maxdiff, std::fabs(unmerged[i] - model.acts.logits[i]));
    const double tol_adalora_merge = 1e-12; // one model, two summation orders, in double
    CHECK(maxdiff < tol_adalora_merge);
    model.lora = kept;
    gpt2_lora_merge(&model, -1);
    maxdiff = 0;
    for (size_t i = 0; i < W0.size(); i++) maxdiff = std::max(maxdiff, std::fabs(W0[i] - model.params_memory[i]));
    CHECK(maxdiff < tol_adalora_merge);
    gpt2_free(&base);
    gpt2_free(&model);
}

TEST_CASE("AdaLoRA's importance: the averages and the triplet scores against PEFT's definition, computed directly") {
    LoRA<double> lora;
    const int L = 2, C = 4, r = 3;
    lora_init(&lora, adalora_test_config(r, 2, 0, 0, 1, 10), L, C, 321);
    size_t n = lora.num_parameters;
    Rng rng;
    rng_seed(&rng, 322);
    std::vector<double> avg(n, 0.0), unc(n, 0.0);
    for (int step = 0; step < 3; step++) {
        for (size_t k = 0; k < n; k++) {
            lora.params_memory[k] = 2 * rng_f32(&rng) - 1;
            lora.grads_memory[k] = 2 * rng_f32(&rng) - 1;
            double I = std::fabs(lora.params_memory[k] * lora.grads_memory[k]); // the definition, step by step
            avg[k] = 0.85 * avg[k] + 0.15 * I;
            unc[k] = 0.85 * unc[k] + 0.15 * std::fabs(I - avg[k]);
        }
        adalora_update_importance(&lora);
    }
    const double tol_importance = 1e-15; // the same three multiply-adds per step in double
    for (size_t k = 0; k < n; k++) {
        CHECK(std::fabs(lora.adalora_avg[k] - avg[k]) < tol_importance);
        CHECK(std::fabs(lora.adalora_unc[k] - unc[k]) < tol_importance);
    }
    // the triplet score of fc (OC = 4C) at layer 1, triplet 2: s(E) + mean_c s(A[2,c]) + mean_o s(B[o,2]), s = avg * unc
    int t = LORA_FC, l = 1, i = 2, OC = 4 * C;
    size_t offA = (size_t)(lora.lora_A[t] - lora.params_memory) + (size_t)l * r * C;
    size_t offB = (size_t)(lora.lora_B[t] - lora.params_memory) + (size_t)l * OC * r;
    size_t offE = (size_t)(lora.lora_E[t] - lora.params_memory) + (size_t)l * r;
    double sA = 0, sB = 0;
    for (int c = 0; c < C; c++) sA += avg[offA + i * C + c] * unc[offA + i * C + c];
    for (int o = 0; o < OC; o++) sB += avg[offB + o * r + i] * unc[offB + o * r + i];
    double expected = avg[offE + i] * unc[offE + i] + sA / C + sB / OC;
    CHECK(std::fabs(adalora_triplet_score(&lora, t, l, i) - expected) < 1e-15);
    lora_free(&lora);
}

TEST_CASE("AdaLoRA's budget schedule against PEFT's cubic formula, before tinit, inside, at and after total_step - tfinal") {
    // L = 2, all four targets: 8 matrices, init_r 12 -> 96 triplets, target_r 8 -> 64
    LoRAConfig cfg = adalora_test_config(12, 8, 20, 40, 10, 200);
    const int L = 2, init_bgt = 96, target_bgt = 64;
    bool mask_now = true;
    CHECK(adalora_budget(cfg, L, 0, &mask_now) == init_bgt);
    CHECK(!mask_now);
    CHECK(adalora_budget(cfg, L, 20, &mask_now) == init_bgt); // step <= tinit
    CHECK(!mask_now);
    for (int step : {21, 30, 50, 95, 100, 159, 160}) {
        CAPTURE(step);
        double mul = 1.0 - (step - 20) / 140.0; // 1 - (step - tinit) / (total_step - tfinal - tinit)
        int expected = (int)std::floor((init_bgt - target_bgt) * mul * mul * mul + target_bgt);
        CHECK(adalora_budget(cfg, L, step, &mask_now) == expected);
        CHECK(mask_now == (step % 10 == 0));
    }
    CHECK(adalora_budget(cfg, L, 50, &mask_now) == 64 + (int)(32 * std::pow(1 - 30 / 140.0, 3))); // 64 + 15 = 79
    CHECK(adalora_budget(cfg, L, 50, &mask_now) == 79);
    CHECK(adalora_budget(cfg, L, 160, &mask_now) == target_bgt); // at total_step - tfinal the cube is 0
    CHECK(adalora_budget(cfg, L, 161, &mask_now) == target_bgt);
    CHECK(mask_now);
    CHECK(adalora_budget(cfg, L, 199, &mask_now) == target_bgt);
}

TEST_CASE("AdaLoRA's masking keeps exactly the budget, the most important triplets, and the final mask holds after total_step - tfinal") {
    LoRA<double> lora;
    const int L = 2, C = 4, r = 4;
    // 8 matrices x 4 = 32 triplets; target_r 2 -> 16; tinit 1, tfinal 2, deltaT 1, total_step 6
    lora_init(&lora, adalora_test_config(r, 2, 1, 2, 1, 6), L, C, 331);
    size_t n = lora.num_parameters;
    Rng rng;
    rng_seed(&rng, 332);
    auto random_step = [&]() {
        for (size_t k = 0; k < n; k++) {
            lora.params_memory[k] = 2 * rng_f32(&rng) - 1;
            lora.grads_memory[k] = 2 * rng_f32(&rng) - 1;
        }
    };
    for (int step = 0; step < 6; step++) {
        CAPTURE(step);
        random_step();
        std::vector<double> E_before;
        for (int t = 0; t < LORA_NUM_TARGETS; t++) E_before.insert(E_before.end(), lora.lora_E[t], lora.lora_E[t] + L * r);
        std::vector<double> mask_before(lora.adalora_mask_memory, lora.adalora_mask_memory + 32);
        adalora_update_and_allocate(&lora, step);
        bool mask_now = false;
        int budget = adalora_budget(lora.config, L, step, &mask_now);
        if (step == 0 || step == 1) CHECK(adalora_total_rank(&lora) == 32); // step <= tinit: nothing masked
        if (step >= 2) CHECK(adalora_total_rank(&lora) == budget);            // exactly the budget, every step
        if (step >= 4) CHECK(budget == 16);                                    // from total_step - tfinal on: the target
        // the kept triplets are the highest scores (scores read before the reset at total_step - tfinal)
        if (step == 2 || step == 3) {
            double lowest_kept = 1e300, highest_masked = -1;
            for (int t = 0; t < LORA_NUM_TARGETS; t++) {
                for (int l = 0; l < L; l++) {
                    for (int i = 0; i < r; i++) {
                        double s = adalora_triplet_score(&lora, t, l, i);
                        if (lora.adalora_mask[t][l * r + i] != 0) lowest_kept = std::min(lowest_kept, s);
                        else highest_masked = std::max(highest_masked, s);
                    }
                }
            }
            CHECK(highest_masked <= lowest_kept);
        }
        // masked lora_E are 0, kept ones untouched
        size_t k = 0;
        for (int t = 0; t < LORA_NUM_TARGETS; t++) {
            for (int j = 0; j < L * r; j++, k++) {
                if (lora.adalora_mask[t][j] == 0) CHECK(lora.lora_E[t][j] == 0.0);
                else CHECK(lora.lora_E[t][j] == E_before[k]);
            }
        }
        // after total_step - tfinal (step 4) the mask is fixed
        if (step == 5) CHECK(memcmp(mask_before.data(), lora.adalora_mask_memory, 32 * sizeof(double)) == 0);
        if (step == 4) { // and the importance state was reset
            for (size_t q = 0; q < n; q++) CHECK(lora.adalora_avg[q] == 0.0);
        }
    }
    std::string ranks = adalora_ranks_string(&lora);
    CHECK(has(ranks, "adalora ranks layer 0: qkv "));
    CHECK(has(ranks, "adalora ranks layer 1: qkv "));
    lora_free(&lora);
}

TEST_CASE("AdaLoRA: -V adalora refuses rslora, dora and pissa beside it; GGUF refuses the adapter") {
    for (const char* list : {"adalora,dora", "rslora,adalora", "adalora,pissa"}) {
        CAPTURE(list);
        LoRAConfig cfg = lora_config(4, 8.0f, LORA_ALL_TARGETS);
        std::string err;
        CHECK(!lora_parse_variants(list, &cfg, &err));
        CHECK(has(err, "adalora"));
        CHECK(has(err, "HINT"));
    }
    // and GGUF (-L) writes no adapter.gguf for it, saying why: llama.cpp's LoRA has no lora_E
    CHECK(has(gguf_adapter_refusal(adalora_test_config(4, 2, 0, 0, 1, 10)), "AdaLoRA"));
}

TEST_CASE("AdaLoRA in files: adapter.bin round-trips lora_E, the masks and the importance state (exact resume); PEFT's layout keeps the kept triplets and rank_pattern, and imports to the same model") {
    const int B = 2, T = 8, steps = 8, split = 5;
    TempDir dir;
    std::string ckpt = dir.file("base.bin"), tokens = dir.file("tokens.bin"), adapter = dir.file("adapter.bin");
    write_tiny_checkpoint(ckpt);
    write_cyclic_tokens(tokens, 150);
    LoRAConfig cfg = adalora_test_config(4, 2, 1, 2, 1, steps); // the final mask at step 6

    // uninterrupted, and interrupted at split (masks in force, importance mid-way), saved and resumed
    GPT2<float> a, c;
    ResumedRun run = train_straight_and_resumed(&a, &c, ckpt, tokens, adapter, cfg, 341, B, T, steps, split, [](GPT2<float>*) {});
    const std::vector<float>& losses_a = run.straight;
    const std::vector<float>& losses_b = run.resumed;
    CHECK(adalora_total_rank(&a.lora) == a.config.num_layers * 4 * 2); // the target budget
    CHECK(c.lora.config.use_adalora);
    CHECK(c.lora.config.adalora_target_r == 2);
    CHECK(c.lora.config.adalora_total_step == steps);
    CHECK(memcmp(losses_a.data(), losses_b.data(), losses_a.size() * sizeof(float)) == 0); // bit for bit
    size_t n = a.lora.num_parameters;
    CHECK(memcmp(a.lora.params_memory, c.lora.params_memory, n * sizeof(float)) == 0);
    CHECK(memcmp(a.lora.adalora_mask_memory, c.lora.adalora_mask_memory, adalora_mask_count(cfg, a.config.num_layers) * sizeof(float)) == 0);

    // PEFT's layout: the kept triplets only, rank_pattern in the config; imported, the same logits
    std::string peft_dir = dir.file("peft");
    REQUIRE(mkdir(peft_dir.c_str(), 0755) == 0);
    REQUIRE(peft_export(peft_dir.c_str(), &a, "gpt2") == "");
    std::string config_text;
    REQUIRE(read_text_file((peft_dir + "/" PEFT_CONFIG_FILE).c_str(), "config", "", &config_text) == "");
    CHECK(has(config_text, "\"peft_type\": \"ADALORA\""));
    CHECK(has(config_text, "\"init_r\": 4"));
    CHECK(has(config_text, "\"target_r\": 2"));
    CHECK(has(config_text, "\"transformer.h.0.attn.c_attn.lora_E\": ["));
    SafeTensors st;
    REQUIRE(safetensors_read((peft_dir + "/" PEFT_WEIGHTS_FILE).c_str(), &st) == "");
    const SafeTensor* E0 = st.find("base_model.model.transformer.h.0.attn.c_attn.lora_E");
    REQUIRE(E0 != NULL);
    CHECK(E0->shape.size() == 2);
    CHECK(E0->shape[0] == (size_t)adalora_rank(&a.lora, LORA_QKV, 0));
    CHECK(E0->shape[1] == 1);
    const SafeTensor* B0 = st.find("base_model.model.transformer.h.0.attn.c_attn.lora_B");
    REQUIRE(B0 != NULL);
    CHECK(B0->shape[1] == E0->shape[0]);
    GPT2<float> d;
    REQUIRE(gpt2_read_checkpoint(&d, ckpt.c_str()) == "");
    REQUIRE(peft_import(peft_dir.c_str(), &d) == "");
    CHECK(d.lora.config.use_adalora);
    CHECK(d.lora.config.scale == a.lora.config.scale);
    CHECK(memcmp(a.lora.adalora_mask_memory, d.lora.adalora_mask_memory, adalora_mask_count(cfg, a.config.num_layers) * sizeof(float)) == 0);
    std::vector<int> inputs(B * T);
    for (int i = 0; i < B * T; i++) inputs[i] = (i * 7) % 61;
    gpt2_forward(&a, inputs.data(), (const int*)NULL, B, T);
    gpt2_allocate(&d, B, T);
    gpt2_forward(&d, inputs.data(), (const int*)NULL, B, T);
    double maxdiff = 0;
    for (size_t i = 0; i < (size_t)B * T * a.config.padded_vocab_size; i++) maxdiff = std::max(maxdiff, (double)std::fabs(a.acts.logits[i] - d.acts.logits[i]));
    CHECK(maxdiff == 0.0); // masked triplets have lora_E = 0 exactly: dropping them changes no bit
    // a rank_pattern that does not fit the tensors is refused, naming the tensor
    std::string bad = config_text;
    size_t at = bad.find("\"transformer.h.0.attn.c_attn.lora_E\": [") + strlen("\"transformer.h.0.attn.c_attn.lora_E\": [");
    bool first_true = bad.compare(at, 4, "true") == 0;
    bad.replace(at, first_true ? 4 : 5, first_true ? "false" : "true");
    REQUIRE(write_atomically((peft_dir + "/" PEFT_CONFIG_FILE).c_str(), {{bad.data(), bad.size()}}) == "");
    GPT2<float> e;
    REQUIRE(gpt2_read_checkpoint(&e, ckpt.c_str()) == "");
    std::string err = peft_import(peft_dir.c_str(), &e);
    CHECK(has(err, "c_attn.lora_"));
    CHECK(has(err, "rank_pattern"));
    gpt2_free(&a);
    gpt2_free(&c);
    gpt2_free(&d);
    gpt2_free(&e);
}

TEST_SUITE_END();

// ----------------------------------------------------------------------------
// methods: the other adaptation methods (adapters, prefix tuning, freezing, L2-SP): gradients and init

// perturbs every base parameter by up to +-0.05 so layernorm weights and biases are not exactly 1 / 0
static void build_tiny_perturbed(GPT2<double>* model, uint64_t seed) {
    gpt2_build_random(model, tiny_config(), seed);
    Rng rng;
    rng_seed(&rng, seed + 100);
    for (size_t i = 0; i < model->num_parameters; i++) { model->params_memory[i] += 0.05 * (2.0 * rng_f32(&rng) - 1.0); }
}

// forward + backward once on random tokens; returns the loss closure for finite differences
static std::function<double()> tiny_loss_and_backward(GPT2<double>* model, std::vector<int>* inputs, std::vector<int>* targets,
                                                      uint64_t seed, bool with_penalty = false) {
    const int B = 2, T = 5;
    Rng rng;
    rng_seed(&rng, seed);
    random_tokens(&rng, inputs, B * T, model->config.vocab_size);
    random_tokens(&rng, targets, B * T, model->config.vocab_size);
    auto loss = [=]() {
        gpt2_forward(model, inputs->data(), targets->data(), B, T);
        return (double)model->mean_loss + (with_penalty ? (double)model->reg_loss : 0.0);
    };
    loss();
    gpt2_zero_grad(model);
    gpt2_backward(model);
    return loss;
}

// central differences on up to 40 evenly spread elements of x[0..n)
static double fd_sampled(double* x, size_t n, const double* grad, const std::function<double()>& loss, const std::string& label) {
    size_t stride = std::max<size_t>(1, n / 40);
    double maxdiff = 0, maxgrad = 0;
    for (size_t i = 0; i < n; i += stride) {
        double old = x[i], eps = 1e-5 * std::max(1.0, std::fabs(old));
        x[i] = old + eps;
        double lp = loss();
        x[i] = old - eps;
        double lm = loss();
        x[i] = old;
        double numeric = (lp - lm) / (2 * eps);
        maxdiff = std::max(maxdiff, std::fabs(numeric - grad[i]));
        maxgrad = std::max(maxgrad, std::max(std::fabs(grad[i]), std::fabs(numeric)));
    }
    double rel = maxgrad > 0 ? maxdiff / maxgrad : 0;
    MESSAGE(label << ": maxdiff " << maxdiff << " relative " << rel);
    return rel;
}

TEST_SUITE_BEGIN("methods");

TEST_CASE("adapter_backward matches finite differences (dinp, down and up weights and biases)") {
    const int BT = 5, C = 6, m = 3;
    Rng rng;
    rng_seed(&rng, 1001);
    for (double mag : {1e-1, 1.0, 3.0}) {
        CAPTURE(mag);
        std::vector<double> inp = random_vector(&rng, (size_t)BT * C, mag), w = random_vector(&rng, (size_t)BT * C, 1.0);
        std::vector<double> down_w = random_vector(&rng, (size_t)m * C, 0.5), down_b = random_vector(&rng, m, 0.5);
        std::vector<double> up_w = random_vector(&rng, (size_t)C * m, 0.5), up_b = random_vector(&rng, C, 0.5);
        std::vector<double> out((size_t)BT * C), h((size_t)BT * m), hg((size_t)BT * m), dh(h.size()), dhg(h.size());
        auto loss = [&]() {
            adapter_forward(out.data(), h.data(), hg.data(), inp.data(), down_w.data(), down_b.data(), up_w.data(), up_b.data(), BT, C, m);
            return dot(w, out.data());
        };
        loss();
        std::vector<double> dinp(inp.size(), 0.0), ddown_w(down_w.size(), 0.0), ddown_b(m, 0.0), dup_w(up_w.size(), 0.0), dup_b(C, 0.0);
        adapter_backward(dinp.data(), ddown_w.data(), ddown_b.data(), dup_w.data(), dup_b.data(), dh.data(), dhg.data(), w.data(),
                         h.data(), hg.data(), inp.data(), down_w.data(), up_w.data(), BT, C, m);
        CHECK(fd_relative_error(inp.data(), inp.size(), dinp.data(), loss, "adapter dinp") < tol_fd);
        CHECK(fd_relative_error(down_w.data(), down_w.size(), ddown_w.data(), loss, "adapter ddown_w") < tol_fd);
        CHECK(fd_relative_error(down_b.data(), m, ddown_b.data(), loss, "adapter ddown_b") < tol_fd);
        CHECK(fd_relative_error(up_w.data(), up_w.size(), dup_w.data(), loss, "adapter dup_w") < tol_fd);
        CHECK(fd_relative_error(up_b.data(), C, dup_b.data(), loss, "adapter dup_b") < tol_fd);
    }
}

TEST_CASE("attention_prefix_backward matches finite differences; with P = 0 it is plain causal attention") {
    const int B = 2, T = 4, C = 6, NH = 2, P = 3;
    Rng rng;
    rng_seed(&rng, 1002);
    for (double mag : {1e-1, 1.0, 3.0}) {
        CAPTURE(mag);
        std::vector<double> qkv = random_vector(&rng, (size_t)B * T * 3 * C, mag), w = random_vector(&rng, (size_t)B * T * C, 1.0);
        std::vector<double> pk = random_vector(&rng, (size_t)P * C, mag), pv = random_vector(&rng, (size_t)P * C, mag);
        std::vector<double> out((size_t)B * T * C), att((size_t)B * NH * T * (P + T)), datt(att.size());
        auto loss = [&]() {
            attention_prefix_forward(out.data(), att.data(), qkv.data(), pk.data(), pv.data(), B, T, C, NH, P);
            return dot(w, out.data());
        };
        loss();
        std::vector<double> dqkv(qkv.size(), 0.0), dpk(pk.size(), 0.0), dpv(pv.size(), 0.0);
        attention_prefix_backward(dqkv.data(), dpk.data(), dpv.data(), datt.data(), w.data(), qkv.data(), pk.data(), pv.data(),
                                  att.data(), B, T, C, NH, P);
        CHECK(fd_relative_error(qkv.data(), qkv.size(), dqkv.data(), loss, "prefix attention dqkv") < tol_fd);
        CHECK(fd_relative_error(pk.data(), pk.size(), dpk.data(), loss, "prefix attention dprefix_k") < tol_fd);
        CHECK(fd_relative_error(pv.data(), pv.size(), dpv.data(), loss, "prefix attention dprefix_v") < tol_fd);
        // P = 0: the same arithmetic as attention_forward, so the same bits
        std::vector<double> out0(out.size()), att0((size_t)B * NH * T * T), out1(out.size()), att1(att0.size());
        attention_prefix_forward(out0.data(), att0.data(), qkv.data(), pk.data(), pv.data(), B, T, C, NH, 0);
        attention_forward(out1.data(), att1.data(), qkv.data(), B, T, C, NH);
        CHECK(out0 == out1);
    }
}

TEST_CASE("end to end, adapters: every adapter parameter's gradient matches finite differences") {
    GPT2<double> model;
    build_tiny_perturbed(&model, 1101);
    const int m = 3;
    gpt2_adapters_attach(&model, m, 1102);
    // up = 0 at init would leave down with a zero gradient; make them nonzero so both are checked
    Rng rng;
    rng_seed(&rng, 1103);
    for (size_t i = 0; i < model.adapters.buf.n; i++) model.adapters.buf.params[i] += 0.1 * (2.0 * rng_f32(&rng) - 1.0);
    std::vector<int> inputs, targets;
    auto loss = tiny_loss_and_backward(&model, &inputs, &targets, 1104);
    std::vector<double> grads(model.adapters.buf.grads, model.adapters.buf.grads + model.adapters.buf.n);
    CHECK(fd_relative_error(model.adapters.buf.params, model.adapters.buf.n, grads.data(), loss, "model adapters (all)") < tol_fd);
    gpt2_free(&model);
}

TEST_CASE("adapters and LoRA-free base: up = 0 at init gives logits bit-identical to the base") {
    const int B = 2, T = 8;
    GPT2<float> base, adapted;
    gpt2_build_random(&base, tiny_config(), 1111);
    gpt2_build_random(&adapted, tiny_config(), 1111);
    gpt2_adapters_attach(&adapted, 4, 1112);
    Rng rng;
    rng_seed(&rng, 1113);
    std::vector<int> inputs;
    random_tokens(&rng, &inputs, B * T, base.config.vocab_size);
    gpt2_forward(&base, inputs.data(), (const int*)NULL, B, T);
    gpt2_forward(&adapted, inputs.data(), (const int*)NULL, B, T);
    size_t n = (size_t)B * T * base.config.padded_vocab_size;
    CHECK(memcmp(base.acts.logits, adapted.acts.logits, n * sizeof(float)) == 0);
    CHECK(gpt2_trainable_parameters(&adapted) == adapters_count_parameters(2, 32, 4));
    gpt2_free(&base);
    gpt2_free(&adapted);
}

TEST_CASE("end to end, prefix tuning: every prefix key and value gradient matches finite differences") {
    GPT2<double> model;
    build_tiny_perturbed(&model, 1201);
    gpt2_prefix_attach(&model, 3, 1202);
    // larger than the 0.02 init so the prefix carries real attention weight
    for (size_t i = 0; i < model.prefix.buf.n; i++) model.prefix.buf.params[i] *= 20;
    std::vector<int> inputs, targets;
    auto loss = tiny_loss_and_backward(&model, &inputs, &targets, 1203);
    std::vector<double> grads(model.prefix.buf.grads, model.prefix.buf.grads + model.prefix.buf.n);
    CHECK(fd_relative_error(model.prefix.buf.params, model.prefix.buf.n, grads.data(), loss, "model prefix keys+values") < tol_fd);
    CHECK(model.prefix.buf.n == 2 * (size_t)2 * 3 * 32); // 2 (keys, values) * L * P * C
    gpt2_free(&model);
}

TEST_CASE("end to end, freezing: the top block and lnf gradients match finite differences; nothing below is touched") {
    GPT2<double> model;
    build_tiny_perturbed(&model, 1301);
    gpt2_enable_top_training(&model, 1); // L = 2: block 1 and lnf train; block 0 and the embeddings are frozen
    int L = model.config.num_layers;
    CHECK(model.grads.wte == (double*)NULL);
    CHECK(model.grads.wpe == (double*)NULL);
    std::vector<int> inputs, targets;
    auto loss = tiny_loss_and_backward(&model, &inputs, &targets, 1302);
    // each trained tensor's tail, against central differences on the parameter it belongs to
    size_t p = 0, g = 0, trained = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        size_t n = model.param_sizes[i] - model.top_offsets[i];
        if (n > 0) {
            std::string label = std::string("freeze d") + param_tensor_names[i];
            std::vector<double> grad(model.top_grads + g, model.top_grads + g + n);
            CAPTURE(label);
            CHECK(fd_sampled(model.params_memory + p + model.top_offsets[i], n, grad.data(), loss, label) < tol_fd);
        }
        if (i >= 2 && i <= 13) CHECK(n == model.param_sizes[i] / L); // one block of L
        p += model.param_sizes[i];
        g += n;
        trained += n;
    }
    CHECK(trained == gpt2_trainable_parameters(&model));
    // a step changes block 1 and lnf only: block 0 and the embeddings stay bit-identical
    std::vector<double> before(model.params_memory, model.params_memory + model.num_parameters);
    loss();
    gpt2_zero_grad(&model);
    gpt2_backward(&model);
    gpt2_update(&model, 1e-2f, 0.9f, 0.999f, 1e-8f, 0.0f, 1);
    size_t changed_frozen = 0, changed_trained = 0;
    p = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        for (size_t j = 0; j < model.param_sizes[i]; j++) {
            bool differs = model.params_memory[p + j] != before[p + j];
            if (j < model.top_offsets[i]) changed_frozen += differs;
            else changed_trained += differs;
        }
        p += model.param_sizes[i];
    }
    CHECK(changed_frozen == 0);
    CHECK(changed_trained > trained / 2);
    gpt2_free(&model);
}

TEST_CASE("end to end, BitFit: every bias gradient matches finite differences; no weight has a gradient or moves") {
    GPT2<double> model;
    build_tiny_perturbed(&model, 1351);
    gpt2_enable_bitfit(&model);
    // the weights and embeddings have no gradient buffer at all; every bias tensor has one, whole
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        CAPTURE(param_tensor_names[i]);
        CHECK(model.top_offsets[i] == (param_tensor_is_bias(i) ? 0 : model.param_sizes[i]));
    }
    CHECK(model.grads.wte == (double*)NULL);
    CHECK(model.grads.qkvw == (double*)NULL);
    CHECK(model.grads.ln1w == (double*)NULL);
    CHECK(model.grads.ln1b != (double*)NULL);
    std::vector<int> inputs, targets;
    auto loss = tiny_loss_and_backward(&model, &inputs, &targets, 1352);
    size_t p = 0, g = 0, trained = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        size_t n = model.param_sizes[i] - model.top_offsets[i];
        if (n > 0) {
            std::string label = std::string("bitfit d") + param_tensor_names[i];
            std::vector<double> grad(model.top_grads + g, model.top_grads + g + n);
            CAPTURE(label);
            // block 0's ln1 bias too: its gradient needs the backward through block 0's ln1
            CHECK(fd_sampled(model.params_memory + p, n, grad.data(), loss, label) < tol_fd);
        }
        p += model.param_sizes[i];
        g += n;
        trained += n;
    }
    int L = model.config.num_layers, C = model.config.channels;
    CHECK(trained == (size_t)L * (C + 3 * C + C + C + 4 * C + C) + C); // ln1b qkvb attprojb ln2b fcb fcprojb, lnfb
    CHECK(trained == gpt2_trainable_parameters(&model));
    // a step moves biases only
    std::vector<double> before(model.params_memory, model.params_memory + model.num_parameters);
    loss();
    gpt2_zero_grad(&model);
    gpt2_backward(&model);
    gpt2_update(&model, 1e-2f, 0.9f, 0.999f, 1e-8f, 0.0f, 1);
    size_t changed_weights = 0, changed_biases = 0;
    p = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        for (size_t j = 0; j < model.param_sizes[i]; j++) {
            bool differs = model.params_memory[p + j] != before[p + j];
            if (param_tensor_is_bias(i)) changed_biases += differs;
            else changed_weights += differs;
        }
        p += model.param_sizes[i];
    }
    CHECK(changed_weights == 0);
    CHECK(changed_biases > trained / 2);
    gpt2_free(&model);
}

TEST_CASE("end to end, L2-SP: gradients of loss + lambda/2 ||W - W0||^2 match finite differences") {
    GPT2<double> model;
    build_tiny_perturbed(&model, 1401);
    const float lambda = 0.5f;
    gpt2_enable_l2sp(&model, lambda);
    // move W away from W0 so the penalty and its gradient are not zero
    Rng rng;
    rng_seed(&rng, 1402);
    for (size_t i = 0; i < model.num_parameters; i++) model.params_memory[i] += 0.05 * (2.0 * rng_f32(&rng) - 1.0);
    std::vector<int> inputs, targets;
    auto loss = tiny_loss_and_backward(&model, &inputs, &targets, 1403, true);
    CHECK(model.reg_loss > 0);
    size_t off = 0;
    for (int k = 0; k < NUM_PARAMETER_TENSORS; k++) {
        std::vector<double> grad(model.grads_memory + off, model.grads_memory + off + model.param_sizes[k]);
        std::string label = std::string("l2sp d") + param_tensor_names[k];
        CAPTURE(label);
        CHECK(fd_sampled(model.params_memory + off, model.param_sizes[k], grad.data(), loss, label) < tol_fd);
        off += model.param_sizes[k];
    }
    // at W = W0 the penalty is exactly zero
    memcpy(model.params_memory, model.params0, model.num_parameters * sizeof(double));
    loss();
    CHECK(model.reg_loss == 0.0);
    gpt2_free(&model);
}

TEST_SUITE_END();

// ----------------------------------------------------------------------------
// files: readers and writers, clear errors with a HINT on bad input, atomic writes, fuzzed readers

// a tiny float model with an adapter whose every parameter (lora_B included) is random, so that the
// adapter really changes the logits
static void build_adapted_tiny(GPT2<float>* model, unsigned targets, int r, uint64_t seed) {
    build_trainable_tiny(model, seed);
    gpt2_lora_attach(model, lora_config(r, 2.0f * r, targets), seed + 1);
    Rng rng;
    rng_seed(&rng, seed + 2);
    for (size_t i = 0; i < model->lora.num_parameters; i++) model->lora.params_memory[i] = rng_uniform(&rng, -0.2f, 0.2f);
}

// writes a safetensors file by hand: u64 length, header as given, data bytes
static void write_safetensors_raw(const std::string& path, const std::string& header, size_t data_bytes, uint64_t N = UINT64_MAX) {
    std::vector<char> bytes(8 + header.size() + data_bytes, 0);
    if (N == UINT64_MAX) N = header.size();
    memcpy(bytes.data(), &N, 8);
    memcpy(bytes.data() + 8, header.data(), header.size());
    write_bytes(path, bytes.data(), bytes.size());
}

// RLIMIT_FSIZE makes writes past `bytes` fail with EFBIG, as a full disk fails them with ENOSPC
struct FileSizeCap {
    struct rlimit old;
    void (*old_handler)(int);
    explicit FileSizeCap(rlim_t bytes) {
        old_handler = signal(SIGXFSZ, SIG_IGN); // the default action would kill the writer
        getrlimit(RLIMIT_FSIZE, &old);
        struct rlimit cap = old;
        cap.rlim_cur = bytes;
        REQUIRE(setrlimit(RLIMIT_FSIZE, &cap) == 0);
    }
    ~FileSizeCap() {
        setrlimit(RLIMIT_FSIZE, &old);
        signal(SIGXFSZ, old_handler);
    }
};

// -- reliability: fuzzed readers

// Every file reader gets mutants of a file it accepts: truncations at every header offset and a sample
// of body offsets, every header byte flipped, each header int set to huge, negative and zero values,
// and (for the JSON parts) each number replaced by a huge or negative one. Each mutant must give either
// success or a clean error that names the file and carries a HINT: no crash, no hang, and, while the
// mutants run, no allocation of more than 4 GB (a reader that sizes a buffer from an unchecked header
// fails here; under `make asan` the same cap comes from max_allocation_size_mb, and ASan proves the
// reads stay in bounds). The libFuzzer targets in dev/fuzz/ drive the same readers with random bytes.

// caps the data segment at 4 GB while alive (not under ASan, whose shadow memory counts too)
struct AllocationCap {
    struct rlimit old;
    bool set = false;
    AllocationCap() {
#if !defined(__SANITIZE_ADDRESS__)
        getrlimit(RLIMIT_DATA, &old);
        struct rlimit cap = old;
        cap.rlim_cur = (rlim_t)4 << 30;
        if (old.rlim_max == RLIM_INFINITY || old.rlim_max > cap.rlim_cur) set = setrlimit(RLIMIT_DATA, &cap) == 0;
#endif
    }
    ~AllocationCap() { if (set) setrlimit(RLIMIT_DATA, &old); }
};

// a reader under test: reads path, returns "" or its error message
using ReaderFn = std::function<std::string(const std::string& path)>;

struct MutationCounts { size_t mutants = 0, accepted = 0, rejected = 0; };

// runs the reader on bytes and checks that the outcome is clean; must_fail for mutants never valid
static void mutant(const char* reader, const std::string& what, const std::string& bytes, const ReaderFn& read,
                   bool must_fail, const std::string& name, MutationCounts* counts) {
    MemFile file(bytes.data(), bytes.size());
    std::string err = read(file.path);
    std::string named = name.empty() ? file.path : name;
    counts->mutants++;
    (err.empty() ? counts->accepted : counts->rejected)++;
    if (must_fail) CHECK_MESSAGE(!err.empty(), std::string(reader) << ": " << what << " was accepted");
    if (!err.empty()) {
        CHECK_MESSAGE(has(err, named.c_str()), std::string(reader) << ": " << what << ": error does not name the file: " << err);
        CHECK_MESSAGE(has(err, "HINT"), std::string(reader) << ": " << what << ": error has no HINT: " << err);
    }
}

struct MutationPlan {
    size_t header_bytes = 0;    // the fixed header: every offset is a truncation point, every byte is flipped
    int int_fields = 0;         // how many leading int32 header slots get the extreme values
    bool text = false;          // trailing whitespace may be cut without harm (JSON, vocab.bpe)
    size_t numbers_end = 0;     // digit runs in [0, numbers_end) become huge or negative (JSON parts)
    std::string name;           // what the errors must name; "" = the mutated file's own path
};

static MutationCounts mutate_reader(const char* reader, const std::string& good, MutationPlan plan, const ReaderFn& read) {
    size_t header_bytes = plan.header_bytes;
    const std::string& name = plan.name;
    AllocationCap cap;
    MutationCounts counts;
    {
        MemFile file(good.data(), good.size());
        std::string err = read(file.path);
        REQUIRE_MESSAGE(err.empty(), std::string(reader) << ": the unmutated file is rejected: " << err);
    }
    size_t must_fail_below = good.size();
    if (plan.text) { while (must_fail_below > 0 && isspace((unsigned char)good[must_fail_below - 1])) must_fail_below--; }
    header_bytes = std::min(header_bytes, good.size());
    // truncations: every header offset, then 64 body offsets and the last byte
    std::vector<size_t> cuts;
    for (size_t n = 0; n <= header_bytes; n++) cuts.push_back(n);
    size_t body = good.size() - header_bytes;
    for (size_t k = 1; k <= 64 && body > 0; k++) cuts.push_back(header_bytes + body * k / 65);
    cuts.push_back(good.size() - 1);
    for (size_t n : cuts) {
        if (n >= good.size()) continue;
        mutant(reader, "truncated to " + std::to_string(n) + " bytes", good.substr(0, n), read, n < must_fail_below, name, &counts);
    }
    // flipped bytes: all bits of every header byte, the top bit too; 64 body bytes
    std::vector<size_t> flips;
    for (size_t i = 0; i < header_bytes; i++) flips.push_back(i);
    for (size_t k = 0; k < 64 && body > 0; k++) flips.push_back(header_bytes + body * k / 64);
    for (size_t i : flips) {
        for (unsigned char mask : {0xFFu, 0x80u, 0x01u}) {
            std::string bad = good;
            bad[i] = (char)(bad[i] ^ mask);
            mutant(reader, "byte " + std::to_string(i) + " ^ " + std::to_string(mask), bad, read, false, name, &counts);
        }
    }
    // header ints: huge, negative, zero, and one past the file size
    const int32_t extremes[] = {0, -1, 1, -2147483647 - 1, 2147483647, 1 << 30, -(1 << 30), 65536, (int32_t)good.size() + 1};
    for (int field = 0; field < plan.int_fields && (size_t)(field + 1) * 4 <= good.size(); field++) {
        for (int32_t v : extremes) {
            std::string bad = good;
            memcpy(&bad[(size_t)field * 4], &v, 4);
            mutant(reader, "header int " + std::to_string(field) + " = " + std::to_string(v), bad, read, false, name, &counts);
        }
    }
    // numbers in text: each run of digits (within the header part) becomes huge or negative
    if (plan.numbers_end > 0) {
        const char* numbers[] = {"99999999999999999999", "18446744073709551615", "-1", "-99999999", "4294967296", "0"};
        size_t limit = std::min(plan.numbers_end, good.size());
        size_t runs = 0;
        for (size_t i = 0; i < limit && runs < 400; i++) {
            if (!isdigit((unsigned char)good[i]) || (i > 0 && isdigit((unsigned char)good[i - 1]))) continue;
            size_t j = i;
            while (j < limit && isdigit((unsigned char)good[j])) j++;
            runs++;
            for (const char* num : numbers) {
                std::string bad = good.substr(0, i) + num + good.substr(j);
                mutant(reader, "number at byte " + std::to_string(i) + " = " + num, bad, read, false, name, &counts);
            }
        }
    }
    MESSAGE(std::string(reader) << ": " << counts.mutants << " mutants, " << counts.rejected << " rejected cleanly, " << counts.accepted << " accepted");
    CHECK(counts.rejected > 0);
    return counts;
}

// the tiny base of the fuzzed-reader tests: V=8 (Vp=8), maxT=4, L=1, NH=1, C=4 -- a 2224-byte checkpoint
static void build_fuzz_base(GPT2<float>* model) { gpt2_build_random(model, GPT2Config{4, 8, 8, 1, 1, 4}, 1); }

TEST_SUITE_BEGIN("files");

// -- llm.c files: checkpoint, tokens, tokenizer

TEST_CASE("checkpoint reader: llm.c bf16 checkpoints (version 5) read widened; truncated, padded and wrong-version ones give a clear error") {
    TempDir dir;
    std::string good = dir.file("bf16.bin");
    GPT2<float> m;
    build_trainable_tiny(&m, 81);
    write_bf16_checkpoint(&m, good);
    GPT2<float> model;
    REQUIRE(gpt2_read_checkpoint(&model, good.c_str()) == "");
    // every parameter is the bf16 value widened: exactly the fp32 one rounded to bf16
    int wrong = 0;
    for (size_t i = 0; i < m.num_parameters; i++) wrong += model.params_memory[i] != bf16_widen(bf16_round(m.params_memory[i]));
    CHECK(wrong == 0);
    gpt2_free(&model);
    gpt2_free(&m);

    std::vector<char> bytes = read_all(good);
    write_bytes(dir.file("trunc.bin"), bytes.data(), bytes.size() - 2);
    std::string err = gpt2_read_checkpoint(&model, dir.file("trunc.bin").c_str());
    CHECK(has(err, "truncated"));
    CHECK(has(err, "trunc.bin"));
    CHECK(has(err, "bf16"));
    CHECK(has(err, "HINT"));
    err = gpt2_read_checkpoint(&model, dir.file("trunc.bin").c_str(), true); // as -Q bf16 reads it
    CHECK(has(err, "truncated"));

    std::vector<char> bad = bytes;
    bad.push_back(0);
    bad.push_back(0);
    write_bytes(dir.file("long.bin"), bad.data(), bad.size());
    err = gpt2_read_checkpoint(&model, dir.file("long.bin").c_str());
    CHECK(has(err, "trailing"));

    for (int version : {4, 6, 2}) {
        CAPTURE(version);
        bad = bytes;
        ((int*)bad.data())[1] = version;
        write_bytes(dir.file("version.bin"), bad.data(), bad.size());
        err = gpt2_read_checkpoint(&model, dir.file("version.bin").c_str());
        CHECK(has(err, strprintf("version %d, expected 3 (fp32) or 5 (bf16)", version).c_str()));
        CHECK(has(err, "HINT"));
    }
    // an fp32 file labelled version 5 has twice the bytes its header needs
    std::string v3 = dir.file("fp32.bin");
    write_tiny_checkpoint(v3);
    bad = read_all(v3);
    ((int*)bad.data())[1] = 5;
    write_bytes(dir.file("v5_of_fp32.bin"), bad.data(), bad.size());
    err = gpt2_read_checkpoint(&model, dir.file("v5_of_fp32.bin").c_str());
    CHECK(has(err, "version 5, bf16"));
    CHECK(has(err, "trailing"));
}

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

    // a safetensors file (its JSON header starts at byte 8; read_llmc_header, shared by every llm.c reader)
    bad = bytes;
    const std::string st_head = std::string("\x08\0\0\0\0\0\0\0", 8) + "{\"a\":{}}";
    memcpy(bad.data(), st_head.data(), st_head.size());
    write_bytes(dir.file("model.safetensors"), bad.data(), bad.size());
    err = gpt2_read_checkpoint(&model, dir.file("model.safetensors").c_str());
    CHECK(has(err, "safetensors"));
    CHECK(has(err, "model.safetensors"));

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

TEST_CASE("tokenizer reader: decodes pieces, rejects truncated files and a version 1 file that is not GPT-2's 50257 tokens") {
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
    // version 1 has no end-of-text field: it means GPT-2's 50257 tokens, so these 2 are refused (found by make fuzz)
    ((int*)bytes.data())[1] = 1;
    write_bytes(dir.file("v1.bin"), bytes.data(), bytes.size());
    err = tokenizer_read(&tok, dir.file("v1.bin").c_str());
    CHECK(has(err, "version 1"));
    CHECK(has(err, "50257"));
    CHECK(has(err, "HINT"));
}

// -- adapter.bin, the merged checkpoint, safetensors, JSON, PEFT

TEST_CASE("adapter file: save -> load round trip is bit-identical (weights, AdamW moments, step, loader and sampler state)") {
    TempDir dir;
    GPT2<float> model, loaded;
    build_adapted_tiny(&model, (1u << LORA_QKV) | (1u << LORA_FCPROJ), 3, 901);
    size_t n = model.lora.num_parameters;
    Rng rng;
    rng_seed(&rng, 902);
    for (size_t i = 0; i < n; i++) { model.lora.m_memory[i] = rng_normal(&rng); model.lora.v_memory[i] = rng_f32(&rng); }
    write_cyclic_tokens(dir.file("tokens.bin"), 400);
    DataLoader loader;
    REQUIRE(dataloader_init(&loader, dir.file("tokens.bin").c_str(), 2, 8, 61, true, 903, "-i") == "");
    for (int i = 0; i < 30; i++) dataloader_next_batch(&loader); // past an epoch boundary: a reshuffled order
    Rng sample_rng;
    rng_seed(&sample_rng, 904);
    rng_u32(&sample_rng);
    TrainState saved = train_state_capture(30, &loader, &sample_rng);
    uint64_t sum = tiny_base_sum(&model);
    std::string path = dir.file("adapter.bin");
    REQUIRE(lora_file_write(path.c_str(), &model, sum, &saved) == "");
    CHECK(read_all(path).size() == 1024 + 3 * n * sizeof(float) + loader.num_batches * sizeof(uint64_t));

    build_trainable_tiny(&loaded, 901); // the same base
    TrainState state;
    bool has_state = false;
    REQUIRE(lora_file_read(path.c_str(), &loaded, tiny_base_sum(&loaded), &state, &has_state) == "");
    CHECK(has_state);
    CHECK(loaded.lora.config.r == 3);
    CHECK(loaded.lora.config.alpha == model.lora.config.alpha);
    CHECK(loaded.lora.config.targets == model.lora.config.targets);
    REQUIRE(loaded.lora.num_parameters == n);
    CHECK(memcmp(loaded.lora.params_memory, model.lora.params_memory, n * sizeof(float)) == 0);
    CHECK(memcmp(loaded.lora.m_memory, model.lora.m_memory, n * sizeof(float)) == 0);
    CHECK(memcmp(loaded.lora.v_memory, model.lora.v_memory, n * sizeof(float)) == 0);
    CHECK(state.step == 30);
    CHECK(state.sample_rng.state == sample_rng.state);
    CHECK(state.loader_rng.state == loader.rng.state);
    CHECK(state.loader_position == loader.position);
    CHECK(state.loader_order == loader.order);
    CHECK(state.loader_shuffle);

    // rsLoRA survives the round trip (it changes the scale), and weights only: no state, smaller file
    model.lora.config = lora_config_rslora(model.lora.config, true);
    REQUIRE(lora_file_write(path.c_str(), &model, sum, NULL) == "");
    CHECK(read_all(path).size() == 1024 + n * sizeof(float));
    REQUIRE(lora_file_read(path.c_str(), &loaded, tiny_base_sum(&loaded), &state, &has_state) == "");
    CHECK(!has_state);
    CHECK(loaded.lora.config.use_rslora);
    CHECK(loaded.lora.config.scale == model.lora.config.scale);
    CHECK(memcmp(loaded.lora.params_memory, model.lora.params_memory, n * sizeof(float)) == 0);
    gpt2_free(&model);
    gpt2_free(&loaded);
}

// -C: a tiny adapter with trained token rows (moved off the base's values, moments nonzero); its base is
// build_trainable_tiny(seed), untouched on disk
static void build_adapted_tiny_with_rows(GPT2<float>* model, const std::vector<int>& ids, uint64_t seed) {
    build_adapted_tiny(model, LORA_ALL_TARGETS, 2, seed);
    REQUIRE(gpt2_token_rows_attach(model, ids) == "");
    TokenRows<float>* tr = &model->tokens;
    Rng rng;
    rng_seed(&rng, seed + 3);
    for (size_t i = 0; i < token_rows_count(tr); i++) {
        tr->rows[i] += rng_uniform(&rng, -0.5f, 0.5f);
        tr->m[i] = rng_normal(&rng);
        tr->v[i] = rng_f32(&rng);
    }
    token_rows_write(tr, model->params.wte);
}

TEST_CASE("trainable token rows (-C) in the files: adapter.bin keeps ids, rows and moments (slot 37); PEFT's key and trainable_token_indices; -M writes the rows") {
    TempDir dir;
    const std::vector<int> ids = {60, 3, 17};
    GPT2<float> model, loaded, base;
    build_adapted_tiny_with_rows(&model, ids, 951);
    build_trainable_tiny(&base, 951);
    uint64_t sum = tiny_base_sum(&base); // of the base as on disk, not of the model's wte holding the rows
    const int C = model.config.channels;
    const size_t nt = ids.size() * C, n = model.lora.num_parameters;
    const TokenRows<float>* tr = &model.tokens;

    // adapter.bin with the optimizer state: the rows last, after the LoRA parts
    write_cyclic_tokens(dir.file("tokens.bin"), 400);
    DataLoader loader;
    REQUIRE(dataloader_init(&loader, dir.file("tokens.bin").c_str(), 2, 8, 61, false, 952, "-i") == "");
    Rng sample_rng;
    rng_seed(&sample_rng, 953);
    TrainState saved = train_state_capture(0, &loader, &sample_rng);
    std::string path = dir.file("adapter.bin");
    REQUIRE(lora_file_write(path.c_str(), &model, sum, &saved) == "");
    std::vector<char> bytes = read_all(path);
    CHECK(bytes.size() == 1024 + 3 * n * sizeof(float) + loader.num_batches * sizeof(uint64_t) + ids.size() * sizeof(int) + 3 * nt * sizeof(float));
    int slot37;
    memcpy(&slot37, bytes.data() + 37 * 4, 4);
    CHECK(slot37 == 3);
    build_trainable_tiny(&loaded, 951);
    TrainState state;
    bool has_state = false;
    REQUIRE(lora_file_read(path.c_str(), &loaded, tiny_base_sum(&loaded), &state, &has_state) == "");
    REQUIRE(loaded.tokens.n == 3);
    CHECK(std::vector<int>(loaded.tokens.ids, loaded.tokens.ids + 3) == ids);
    CHECK(memcmp(loaded.tokens.rows, tr->rows, nt * sizeof(float)) == 0);
    CHECK(memcmp(loaded.tokens.m, tr->m, nt * sizeof(float)) == 0);
    CHECK(memcmp(loaded.tokens.v, tr->v, nt * sizeof(float)) == 0);
    CHECK(memcmp(loaded.tokens.base, base.params.wte + 60 * C, C * sizeof(float)) == 0); // the base's row kept to restore
    CHECK(memcmp(loaded.params_memory, model.params_memory, model.num_parameters * sizeof(float)) == 0); // wte holds the rows
    // a file without rows (slot 37 = 0, as every older file) loaded over it puts the base's rows back
    GPT2<float> plain;
    build_adapted_tiny(&plain, LORA_ALL_TARGETS, 2, 951);
    REQUIRE(lora_file_write(path.c_str(), &plain, sum, NULL) == "");
    CHECK(read_all(path).size() == 1024 + n * sizeof(float));
    REQUIRE(lora_file_read(path.c_str(), &loaded, sum, &state, &has_state) == "");
    CHECK(loaded.tokens.n == 0);
    CHECK(memcmp(loaded.params_memory, base.params_memory, base.num_parameters * sizeof(float)) == 0);
    // a corrupt count is refused naming the file
    REQUIRE(lora_file_write(path.c_str(), &model, sum, NULL) == "");
    bytes = read_all(path);
    int bad = 62;
    memcpy(bytes.data() + 37 * 4, &bad, 4);
    write_bytes(path, bytes.data(), bytes.size());
    std::string err = lora_file_read(path.c_str(), &loaded, sum, &state, &has_state);
    CHECK(has(err, "adapter.bin"));
    CHECK(has(err, "token rows"));

    // PEFT: the rows under the wrapped embedding's key, their ids as trainable_token_indices
    std::string peft = dir.file("peft");
    REQUIRE(mkdir(peft.c_str(), 0755) == 0);
    REQUIRE(peft_export(peft.c_str(), &model, "gpt2") == "");
    std::string config = file_string(peft + "/adapter_config.json");
    CHECK(has(config, "\"trainable_token_indices\": [60, 3, 17]"));
    SafeTensors st;
    REQUIRE(safetensors_read((peft + "/adapter_model.safetensors").c_str(), &st) == "");
    const SafeTensor* s = st.find("base_model.model.transformer.wte.token_adapter.trainable_tokens_delta");
    REQUIRE(s != NULL);
    CHECK(s->shape == std::vector<size_t>{3, (size_t)C});
    CHECK(memcmp(st.values(s), tr->rows, nt * sizeof(float)) == 0); // the rows' values, as PEFT's "delta" holds
    GPT2<float> imported;
    build_trainable_tiny(&imported, 951);
    REQUIRE(peft_import(peft.c_str(), &imported) == "");
    REQUIRE(imported.tokens.n == 3);
    CHECK(memcmp(imported.params_memory, model.params_memory, model.num_parameters * sizeof(float)) == 0);
    CHECK(memcmp(imported.lora.params_memory, model.lora.params_memory, n * sizeof(float)) == 0);
    // PEFT's dict form names the embedding; another module, a repeated id or a missing tensor is refused
    std::string text = file_string(peft + "/adapter_config.json");
    auto with_indices = [&](const std::string& value) {
        std::string t = text;
        size_t at = t.find("[60, 3, 17]");
        t.replace(at, strlen("[60, 3, 17]"), value);
        write_bytes(peft + "/adapter_config.json", t.data(), t.size());
        gpt2_free(&imported);
        build_trainable_tiny(&imported, 951);
        return peft_import(peft.c_str(), &imported);
    };
    CHECK(with_indices("{\"wte\": [60, 3, 17]}") == "");
    CHECK(has(with_indices("{\"lm_head\": [60, 3, 17]}"), "trainable_token_indices"));
    CHECK(has(with_indices("[60, 3, 3]"), "twice"));
    CHECK(has(with_indices("[60, 3, 61]"), "below V"));
    CHECK(has(with_indices("[60, 3]"), "trainable_tokens_delta"));

    // -M: the merged checkpoint holds the rows in wte (the head reads the same tied rows)
    std::string merged = dir.file("merged.bin");
    REQUIRE(write_merged_checkpoint(&model, merged.c_str()) == "");
    GPT2<float> m;
    REQUIRE(gpt2_read_checkpoint(&m, merged.c_str()) == "");
    for (int k = 0; k < 3; k++) CHECK(memcmp(m.params.wte + (size_t)ids[k] * C, tr->rows + (size_t)k * C, C * sizeof(float)) == 0);
    CHECK(memcmp(m.params.wte + 5 * C, base.params.wte + 5 * C, C * sizeof(float)) == 0); // an unselected row: the base's
    for (GPT2<float>* g : {&model, &loaded, &base, &plain, &imported, &m}) gpt2_free(g);
}

TEST_CASE("adapter reader: wrong magic or version, truncation, trailing bytes, shape mismatch and a wrong base give clear errors") {
    TempDir dir;
    GPT2<float> model;
    build_adapted_tiny(&model, LORA_ALL_TARGETS, 2, 921);
    uint64_t sum = tiny_base_sum(&model);
    write_cyclic_tokens(dir.file("tokens.bin"), 400);
    DataLoader loader;
    REQUIRE(dataloader_init(&loader, dir.file("tokens.bin").c_str(), 2, 8, 61, false, 0, "-i") == "");
    Rng sample_rng;
    rng_seed(&sample_rng, 1);
    TrainState state = train_state_capture(3, &loader, &sample_rng);
    std::string good = dir.file("good.bin");
    REQUIRE(lora_file_write(good.c_str(), &model, sum, &state) == "");
    std::vector<char> bytes = read_all(good);
    GPT2<float> target;
    build_trainable_tiny(&target, 921);
    TrainState s;
    bool hs = false;
    auto read_bad = [&](const char* name, const std::vector<char>& content) {
        write_bytes(dir.file(name), content.data(), content.size());
        std::string err = lora_file_read(dir.file(name).c_str(), &target, sum, &s, &hs);
        CHECK(has(err, name)); // every message names the file
        CHECK(has(err, "HINT"));
        CHECK(target.lora.params_memory == nullptr); // nothing half-attached on failure
        return err;
    };
    CHECK(lora_file_read(good.c_str(), &target, sum, &s, &hs) == "");
    lora_free(&target.lora);

    std::string err = lora_file_read(dir.file("missing.bin").c_str(), &target, sum, &s, &hs);
    CHECK(has(err, "missing.bin"));
    std::vector<char> bad = bytes;
    ((int*)bad.data())[0] = CHECKPOINT_MAGIC;
    CHECK(has(read_bad("magic.bin", bad), "model checkpoint"));
    bad = bytes;
    ((int*)bad.data())[1] = 2;
    CHECK(has(read_bad("version.bin", bad), "version 2"));
    CHECK(has(read_bad("trunc.bin", std::vector<char>(bytes.begin(), bytes.end() - 8)), "truncated"));
    CHECK(has(read_bad("short.bin", std::vector<char>(bytes.begin(), bytes.begin() + 100)), "truncated"));
    bad = bytes;
    bad.push_back(0);
    CHECK(has(read_bad("long.bin", bad), "trailing bytes"));
    bad = bytes;
    ((int*)bad.data())[2] = 0; // r
    CHECK(has(read_bad("config.bin", bad), "impossible config"));
    bad = bytes;
    ((int*)bad.data())[2] = 3; // r=3: the parameter count no longer matches
    CHECK(has(read_bad("count.bin", bad), "parameters"));
    bad = bytes;
    uint64_t* order = (uint64_t*)(bad.data() + bad.size() - loader.num_batches * sizeof(uint64_t));
    order[1] = order[0]; // not a permutation
    CHECK(has(read_bad("order.bin", bad), "impossible training state"));

    // a base of another shape, and a base of the same shape with other weights
    GPT2<float> wide;
    GPT2Config cfg = tiny_config();
    cfg.channels = 16;
    gpt2_build_random(&wide, cfg, 1);
    err = lora_file_read(good.c_str(), &wide, tiny_base_sum(&wide), &s, &hs);
    CHECK(has(err, "C=32"));
    CHECK(has(err, "C=16"));
    CHECK(has(err, "HINT"));
    GPT2<float> other;
    build_trainable_tiny(&other, 922);
    err = lora_file_read(good.c_str(), &other, tiny_base_sum(&other), &s, &hs);
    CHECK(has(err, "belongs to another base"));
    CHECK(has(err, "-e"));
    CHECK(other.lora.params_memory == nullptr);

    // a safetensors file passed as adapter.bin is recognised
    REQUIRE(peft_export(dir.path.c_str(), &model, "gpt2") == "");
    err = lora_file_read(dir.file("adapter_model.safetensors").c_str(), &target, sum, &s, &hs);
    CHECK(has(err, "safetensors"));
    CHECK(has(err, "directory"));
    gpt2_free(&model);
    gpt2_free(&target);
    gpt2_free(&wide);
    gpt2_free(&other);
}

TEST_CASE("merge: the merged checkpoint's logits equal the unmerged adapter's; unmerge restores the base") {
    const int B = 2, T = 8;
    TempDir dir;
    GPT2<float> model;
    build_adapted_tiny(&model, LORA_ALL_TARGETS, 4, 911);
    std::vector<float> base(model.params_memory, model.params_memory + model.num_parameters);
    Rng rng;
    rng_seed(&rng, 912);
    std::vector<int> inputs;
    random_tokens(&rng, &inputs, B * T, model.config.vocab_size);
    gpt2_forward(&model, inputs.data(), (const int*)NULL, B, T);
    size_t nl = (size_t)B * T * model.config.padded_vocab_size;
    std::vector<float> unmerged(model.acts.logits, model.acts.logits + nl);

    std::string path = dir.file("merged.bin");
    REQUIRE(write_merged_checkpoint(&model, path.c_str()) == "");
    GPT2<float> merged; // a plain GPT-2, read back the way -e reads any checkpoint
    REQUIRE(gpt2_read_checkpoint(&merged, path.c_str()) == "");
    CHECK(merged.lora.num_parameters == 0);
    gpt2_forward(&merged, inputs.data(), (const int*)NULL, B, T);
    double maxdiff = 0, maxlogit = 0, maxdelta = 0;
    for (size_t i = 0; i < nl; i++) {
        maxdiff = std::max(maxdiff, (double)std::fabs(merged.acts.logits[i] - unmerged[i]));
        maxlogit = std::max(maxlogit, (double)std::fabs(unmerged[i]));
    }
    for (size_t i = 0; i < base.size(); i++) maxdelta = std::max(maxdelta, (double)std::fabs(merged.params_memory[i] - base[i]));
    // The two paths sum the same products in a different order (C=32 / 4C=128 terms of the matmul plus
    // r=4 of the branch, over 2 layers and the LM head), each fp32 sum off by ~1e-7 relative: ~1e-6 of
    // the logit scale. A wrong merge (transpose, missing scale) is off by O(maxdelta * |x|) ~ 1e-1.
    const double tol_merged_logits = 1e-5 * std::max(1.0, maxlogit);
    MESSAGE("merged vs unmerged logits: maxdiff " << maxdiff << " (max |logit| " << maxlogit << ", max |delta W| " << maxdelta << ")");
    CHECK(maxdelta > 1e-2); // the adapter did change the weights
    CHECK(maxdiff <= tol_merged_logits);

    // unmerge (write_merged_checkpoint merges, writes, unmerges): each weight is back within one rounding
    // of |W0| + |delta|, i.e. 2^-23 relative: the same delta, computed the same way, was added and subtracted
    size_t worst = 0;
    double worst_excess = -1, maxerr = 0;
    for (size_t i = 0; i < base.size(); i++) {
        double err = std::fabs((double)model.params_memory[i] - base[i]);
        double bound = std::ldexp(std::fabs((double)base[i]) + std::fabs((double)merged.params_memory[i] - base[i]), -23);
        maxerr = std::max(maxerr, err);
        if (err - bound > worst_excess) { worst_excess = err - bound; worst = i; }
    }
    MESSAGE("unmerge: max |W - W0| = " << maxerr << "; worst element " << worst << " exceeds its bound by " << worst_excess);
    CHECK(worst_excess <= 0);
    gpt2_free(&model);
    gpt2_free(&merged);
}

TEST_CASE("safetensors: our writer's output parses with our reader, with PEFT's exact key names, shapes and values") {
    TempDir dir;
    GPT2<float> model;
    const int r = 4;
    build_adapted_tiny(&model, LORA_ALL_TARGETS, r, 941);
    REQUIRE(peft_export(dir.path.c_str(), &model, "gpt2") == "");
    SafeTensors st;
    REQUIRE(safetensors_read(dir.file("adapter_model.safetensors").c_str(), &st) == "");
    const int L = 2, C = 32;
    CHECK(st.tensors.size() == (size_t)2 * L * 4);
    REQUIRE(st.metadata.size() == 1);
    CHECK(st.metadata[0].first == "format");
    CHECK(st.metadata[0].second == "pt");
    // PEFT's names and nn.Linear shapes for GPT-2 (FORMATS.md): lora_A (r, in), lora_B (out, r)
    struct { const char* key; size_t rows, cols; } expected[] = {
        {"base_model.model.transformer.h.1.attn.c_attn.lora_A.weight", r, C},
        {"base_model.model.transformer.h.1.attn.c_attn.lora_B.weight", 3 * C, r},
        {"base_model.model.transformer.h.0.attn.c_proj.lora_A.weight", r, C},
        {"base_model.model.transformer.h.0.attn.c_proj.lora_B.weight", C, r},
        {"base_model.model.transformer.h.1.mlp.c_fc.lora_A.weight", r, C},
        {"base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight", 4 * C, r},
        {"base_model.model.transformer.h.0.mlp.c_proj.lora_A.weight", r, 4 * C},
        {"base_model.model.transformer.h.0.mlp.c_proj.lora_B.weight", C, r},
    };
    for (const auto& e : expected) {
        CAPTURE(e.key);
        const SafeTensor* t = st.find(e.key);
        REQUIRE(t != NULL);
        CHECK(t->shape == std::vector<size_t>{e.rows, e.cols});
    }
    // values: every tensor equals the adapter's, lora_B of layer l of target t at its flat offset
    for (const LoRATensor& t : lora_tensor_list(model.lora.config, L, C)) {
        const SafeTensor* s = st.find(lora_peft_key(t.layer, t.target, t.is_B));
        REQUIRE(s != NULL);
        CHECK(memcmp(st.values(s), model.lora.params_memory + t.offset, (size_t)t.rows * t.cols * sizeof(float)) == 0);
    }
    // header length is a multiple of 8, so the data buffer is 8-aligned
    std::vector<char> raw = read_all(dir.file("adapter_model.safetensors"));
    uint64_t N = 0;
    memcpy(&N, raw.data(), 8);
    CHECK(N % 8 == 0);
    CHECK(raw.size() == 8 + N + model.lora.num_parameters * sizeof(float));

    // adapter_config.json parses and says what PEFT needs
    std::string text;
    REQUIRE(read_text_file(dir.file("adapter_config.json").c_str(), "config", "", &text) == "");
    Json cfg;
    REQUIRE(json_parse(text.data(), text.size(), &cfg) == "");
    CHECK(cfg.get("peft_type")->str == "LORA");
    CHECK(cfg.get("task_type")->str == "CAUSAL_LM");
    CHECK(cfg.get("base_model_name_or_path")->str == "gpt2");
    CHECK(cfg.get("r")->str == "4");
    CHECK(cfg.get("lora_alpha")->str == "8");
    CHECK(cfg.get("fan_in_fan_out")->boolean);
    CHECK(cfg.get("bias")->str == "none");
    CHECK(!cfg.get("use_rslora")->boolean);
    const Json* tm = cfg.get("target_modules");
    REQUIRE(tm->items.size() == 4);
    CHECK(tm->items[0].str == "attn.c_attn");
    CHECK(tm->items[1].str == "attn.c_proj");
    CHECK(tm->items[2].str == "mlp.c_fc");
    CHECK(tm->items[3].str == "mlp.c_proj");
    // one projection only: the qualified name, never a bare "c_proj" that would also match the other
    GPT2<float> fcproj;
    build_adapted_tiny(&fcproj, 1u << LORA_FCPROJ, 2, 942);
    REQUIRE(peft_export(dir.path.c_str(), &fcproj, "gpt2") == "");
    REQUIRE(read_text_file(dir.file("adapter_config.json").c_str(), "config", "", &text) == "");
    CHECK(has(text, "\"target_modules\": [\"mlp.c_proj\"]"));
    gpt2_free(&model);
    gpt2_free(&fcproj);
}

TEST_CASE("safetensors reader: malformed files (length, JSON, dtype, shape, offsets, gaps, overlaps, trailing bytes) give clear errors") {
    TempDir dir;
    SafeTensors st;
    std::string path = dir.file("x.safetensors");
    auto check_error = [&](const std::string& header, size_t data_bytes, const char* expect, uint64_t N = UINT64_MAX) {
        write_safetensors_raw(path, header, data_bytes, N);
        std::string err = safetensors_read(path.c_str(), &st);
        CAPTURE(header);
        CAPTURE(err);
        CHECK(has(err, expect));
        CHECK(has(err, "x.safetensors"));
        CHECK(has(err, "HINT"));
    };
    const std::string one = "\"t\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]}";
    write_safetensors_raw(path, "{" + one + "}", 24);
    CHECK(safetensors_read(path.c_str(), &st) == "");
    CHECK(st.tensors.size() == 1);
    CHECK(st.data.size() == 6);

    write_bytes(path, "abc", 3);
    CHECK(has(safetensors_read(path.c_str(), &st), "too short"));
    check_error("{}", 0, "over the limit", 200000000);
    check_error("{}", 0, "truncated", 64);
    check_error("{\"t\": ", 0, "not valid JSON");
    check_error("{" + one + "} x", 24, "not valid JSON");
    check_error("[1, 2]", 0, "not an object");
    check_error("{\"t\":{\"dtype\":\"F16\",\"shape\":[2,3],\"data_offsets\":[0,12]}}", 12, "dtype F16");
    check_error("{\"t\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,20]}}", 20, "needs 24");
    check_error("{\"t\":{\"dtype\":\"F32\",\"shape\":[2,-3],\"data_offsets\":[0,24]}}", 24, "non-negative integers");
    check_error("{\"t\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24,4]}}", 24, "non-negative integers");
    check_error("{\"t\":{\"dtype\":\"F32\",\"shape\":[2,3]}}", 24, "data_offsets");
    check_error("{\"t\":{\"dtype\":\"F32\",\"shape\":[100],\"data_offsets\":[0,400]}}", 24, "out of range");
    check_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,24]}}", 24, "overlapping");
    check_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[16,24]}}", 24, "a gap");
    check_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 16, "8 trailing bytes");
    check_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", 16, "duplicate key");
    check_error("{\"\xff\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "invalid UTF-8");
    check_error("{\"__metadata__\":{\"format\":1}}", 0, "__metadata__");
}

TEST_CASE("JSON reader: escapes, unicode, numbers and nesting parse; malformed documents are rejected") {
    Json v;
    const char* good = " {\"a\": [1, -2.5e3, 0, true, false, null, {}], \"s\": \"q\\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9\\ud83d\\ude00\xc3\xa9\"} ";
    REQUIRE(json_parse(good, strlen(good), &v) == "");
    REQUIRE(v.kind == Json::OBJECT);
    const Json* a = v.get("a");
    REQUIRE(a != NULL);
    REQUIRE(a->items.size() == 7);
    CHECK(a->items[1].number == -2500.0);
    CHECK(a->items[3].boolean);
    CHECK(a->items[5].kind == Json::NUL);
    CHECK(a->items[6].kind == Json::OBJECT);
    CHECK(v.get("s")->str == "q\"\\/\b\f\n\r\t\xc3\xa9\xf0\x9f\x98\x80\xc3\xa9"); // é, U+1F600 from a surrogate pair, raw é
    uint64_t x = 0;
    CHECK(json_to_u64(&a->items[2], &x));
    CHECK(!json_to_u64(&a->items[1], &x)); // -2.5e3 is no count
    std::string deep(100, '[');
    for (const char* bad : {"", "{", "{\"a\":}", "[1,]", "{\"a\" 1}", "01", "1.", "-", "\"abc", "\"\\x\"", "\"\\ud800\"",
                            "\"\\udc00\"", "{\"a\":1,\"a\":2}", "[1] x", "tru", "\"\x01\"", "{1:2}", "[1 2]", deep.c_str()}) {
        CAPTURE(bad);
        CHECK(json_parse(bad, strlen(bad), &v) != "");
    }
}

TEST_CASE("PEFT export -> import round trip gives the same adapter; the importer rejects bad configs and keys") {
    TempDir dir;
    const char* d = dir.path.c_str();
    GPT2<float> model, loaded;
    build_adapted_tiny(&model, (1u << LORA_QKV) | (1u << LORA_FC), 4, 951);
    build_trainable_tiny(&loaded, 951);
    REQUIRE(peft_export(d, &model, "gpt2") == "");
    TrainState s;
    bool hs = true;
    REQUIRE(lora_file_load(d, &loaded, 0, &s, &hs) == ""); // a directory: PEFT (no base checksum in PEFT files)
    CHECK(!hs);
    CHECK(loaded.lora.config.r == 4);
    CHECK(loaded.lora.config.alpha == 8.0f);
    CHECK(loaded.lora.config.targets == model.lora.config.targets);
    REQUIRE(loaded.lora.num_parameters == model.lora.num_parameters);
    CHECK(memcmp(loaded.lora.params_memory, model.lora.params_memory, model.lora.num_parameters * sizeof(float)) == 0);

    std::string good_config;
    REQUIRE(read_text_file(dir.file("adapter_config.json").c_str(), "config", "", &good_config) == "");
    auto with_config = [&](const std::string& from, const std::string& to) {
        std::string c = good_config;
        size_t at = c.find(from);
        REQUIRE(at != std::string::npos);
        c.replace(at, from.size(), to);
        write_bytes(dir.file("adapter_config.json"), c.data(), c.size());
        return peft_import(d, &loaded);
    };
    // PEFT's own suffix matching: "c_fc" matches mlp.c_fc, and a full config written elsewhere loads
    CHECK(with_config("\"attn.c_attn\", \"mlp.c_fc\"", "\"c_attn\", \"c_fc\"") == "");
    CHECK(loaded.lora.config.targets == model.lora.config.targets);
    std::string err = with_config("\"LORA\"", "\"PREFIX_TUNING\"");
    CHECK(has(err, "peft_type"));
    CHECK(has(err, "adapter_config.json"));
    CHECK(has(err, "HINT"));
    CHECK(with_config("\"use_rslora\": false", "\"use_rslora\": true") == ""); // rsLoRA: PEFT's scale alpha / sqrt(r) is ours
    CHECK(loaded.lora.config.use_rslora);
    CHECK(loaded.lora.config.scale == 8.0f / 2.0f);
    CHECK(has(with_config("\"use_dora\": false", "\"use_dora\": true"), "use_dora")); // no magnitudes in these files
    CHECK(has(with_config("\"attn.c_attn\", \"mlp.c_fc\"", "\"attn.c_attn\", \"lm_head\""), "lm_head"));
    CHECK(has(with_config("\"attn.c_attn\", \"mlp.c_fc\"", "\"attn.c_attn\""), "not a lora_A/lora_B")); // fc keys unexpected
    CHECK(has(with_config("\"attn.c_attn\", \"mlp.c_fc\"", "\"c_attn\", \"c_proj\", \"c_fc\""), "has no tensor")); // c_proj keys missing
    err = with_config("\"r\": 4", "\"r\": 5");
    CHECK(has(err, "shape [4,32]"));
    CHECK(has(err, "expected [5,32]"));
    CHECK(has(with_config("\"r\": 4", "\"r\": 4,,"), "not valid JSON"));
    CHECK(has(with_config("\"target_modules\": [", "\"target_modules\": \"c_attn\", \"x\": ["), "regex"));
    remove(dir.file("adapter_config.json").c_str());
    CHECK(has(peft_import(d, &loaded), "adapter_config.json"));
    gpt2_free(&model);
    gpt2_free(&loaded);
}

// -- disk full and unwritable outputs: a clear error and nothing left behind

TEST_CASE("lora_dropout in the files: PEFT's config writes it as typed and reads it back, adapter.bin keeps it (older files read 0), bad values are refused") {
    TempDir dir;
    const char* d = dir.path.c_str();
    GPT2<float> model, loaded;
    build_adapted_tiny(&model, LORA_ALL_TARGETS, 4, 961);
    build_trainable_tiny(&loaded, 961);
    TrainState s;
    bool hs = true;
    for (float p : {0.0f, 0.1f, 0.05f, 0.123456789f}) {
        CAPTURE(p);
        model.lora.config.dropout = p;
        REQUIRE(peft_export(d, &model, "gpt2") == "");
        std::string config;
        REQUIRE(read_text_file(dir.file("adapter_config.json").c_str(), "config", "", &config) == "");
        // the shortest decimal that reads back as p: what a PEFT user would have typed
        if (p == 0.1f) CHECK(has(config, "\"lora_dropout\": 0.1,"));
        if (p == 0.0f) CHECK(has(config, "\"lora_dropout\": 0,"));
        REQUIRE(lora_file_load(d, &loaded, 0, &s, &hs) == "");
        CHECK(loaded.lora.config.dropout == p); // bit for bit
        REQUIRE(lora_file_write(dir.file("adapter.bin").c_str(), &model, 7, NULL) == "");
        loaded.lora.config.dropout = -1;
        REQUIRE(lora_file_read(dir.file("adapter.bin").c_str(), &loaded, 7, &s, &hs) == "");
        CHECK(loaded.lora.config.dropout == p);
    }
    // an adapter.bin from before lora_dropout had its slot (header[30] = 0): reads as 0, off
    std::vector<char> bytes = read_all(dir.file("adapter.bin"));
    int zero = 0;
    memcpy(bytes.data() + 30 * sizeof(int), &zero, sizeof(int));
    write_bytes(dir.file("old.bin"), bytes.data(), bytes.size());
    REQUIRE(lora_file_read(dir.file("old.bin").c_str(), &loaded, 7, &s, &hs) == "");
    CHECK(loaded.lora.config.dropout == 0.0f);
    // a value outside [0, 1) in adapter.bin is a corrupt header
    float one = 1.0f;
    memcpy(bytes.data() + 30 * sizeof(int), &one, sizeof(float));
    write_bytes(dir.file("bad.bin"), bytes.data(), bytes.size());
    std::string err = lora_file_read(dir.file("bad.bin").c_str(), &loaded, 7, &s, &hs);
    CHECK(has(err, "lora_dropout=1"));
    CHECK(has(err, "HINT"));
    // and in PEFT's config: a number in [0, 1), or null (PEFT's default 0.0)
    model.lora.config.dropout = 0.1f;
    REQUIRE(peft_export(d, &model, "gpt2") == "");
    std::string good;
    REQUIRE(read_text_file(dir.file("adapter_config.json").c_str(), "config", "", &good) == "");
    for (const char* bad : {"1.0", "-0.1", "\"0.1\"", "true"}) {
        CAPTURE(bad);
        std::string c = good;
        c.replace(c.find("0.1,"), 3, bad);
        write_bytes(dir.file("adapter_config.json"), c.data(), c.size());
        err = peft_import(d, &loaded);
        CHECK(has(err, "lora_dropout must be a number in [0, 1)"));
        CHECK(has(err, "-D"));
    }
    std::string c = good;
    c.replace(c.find("\"lora_dropout\": 0.1,"), 20, "");
    write_bytes(dir.file("adapter_config.json"), c.data(), c.size());
    REQUIRE(peft_import(d, &loaded) == ""); // absent: PEFT's default
    CHECK(loaded.lora.config.dropout == 0.0f);
    gpt2_free(&model);
    gpt2_free(&loaded);
}

TEST_CASE("a failed write leaves the existing files intact: adapter.bin, the PEFT files and the merged checkpoint") {
    TempDir dir;
    GPT2<float> model;
    build_adapted_tiny(&model, LORA_ALL_TARGETS, 2, 931);
    uint64_t sum = tiny_base_sum(&model);
    std::string path = dir.file("adapter.bin");
    REQUIRE(lora_file_write(path.c_str(), &model, sum, NULL) == "");
    REQUIRE(peft_export(dir.path.c_str(), &model, "gpt2") == "");
    REQUIRE(write_merged_checkpoint(&model, dir.file("merged.bin").c_str()) == "");
    std::vector<char> before = read_all(path), st_before = read_all(dir.file("adapter_model.safetensors"));
    std::vector<char> merged_before = read_all(dir.file("merged.bin"));
    for (size_t i = 0; i < model.lora.num_parameters; i++) model.lora.params_memory[i] += 1.0f; // new content
    // a directory squatting on each temporary name makes the write fail even for root
    for (const char* name : {"adapter.bin.tmp", "adapter_model.safetensors.tmp", "merged.bin.tmp"}) {
        REQUIRE(mkdir(dir.file(name).c_str(), 0755) == 0);
    }
    std::string err = lora_file_write(path.c_str(), &model, sum, NULL);
    CHECK(has(err, "adapter.bin"));
    CHECK(has(err, "HINT"));
    err = peft_export(dir.path.c_str(), &model, "gpt2");
    CHECK(has(err, "adapter_model.safetensors"));
    std::vector<float> base(model.params_memory, model.params_memory + model.num_parameters);
    err = write_merged_checkpoint(&model, dir.file("merged.bin").c_str());
    CHECK(has(err, "merged.bin"));
    CHECK(read_all(path) == before);
    CHECK(read_all(dir.file("adapter_model.safetensors")) == st_before);
    CHECK(read_all(dir.file("merged.bin")) == merged_before);
    // and nowhere to write at all
    err = lora_file_save_all(dir.file("no/such/dir").c_str(), &model, sum, TrainState(), "gpt2");
    CHECK(has(err, "no/such/dir"));
    gpt2_free(&model);
}

TEST_CASE("disk full and unwritable output: write_atomically gives a clear error and leaves no partial file") {
    TempDir dir;
    std::vector<char> big(1 << 20, 'x');
    std::string path = dir.file("out.bin");
    {
        FileSizeCap cap(4096);
        std::string err = write_atomically(path.c_str(), {{big.data(), big.size()}});
        CHECK(has(err, "failed writing"));
        CHECK(has(err, path.c_str()));
        CHECK(has(err, "HINT"));
    }
    CHECK(access(path.c_str(), F_OK) != 0);
    CHECK(tmp_files(dir.path).empty());
    // an old file under the name survives a failed overwrite unchanged
    write_bytes(path, "old", 3);
    {
        FileSizeCap cap(4096);
        CHECK(write_atomically(path.c_str(), {{big.data(), big.size()}}) != "");
    }
    CHECK(file_string(path) == "old");
    CHECK(tmp_files(dir.path).empty());
    // unwritable places (tests run as root, so permissions would not stop them): a path under a regular
    // file, a directory that does not exist, and sysfs, which refuses new files
    for (std::string bad : {dir.file("out.bin/adapter.bin"), dir.file("missing/adapter.bin"), std::string("/sys/adapter.bin"),
                            std::string("/proc/adapter.bin")}) {
        CAPTURE(bad);
        std::string err = write_atomically(bad.c_str(), {{big.data(), 16}});
        CHECK(has(err, "cannot write"));
        CHECK(has(err, bad.c_str()));
        CHECK(has(err, "HINT"));
        CHECK(access((bad + ".tmp").c_str(), F_OK) != 0);
    }
}

// -- fuzzed readers: mutants of every file format give a clean error or a clean success

TEST_CASE("fuzzed readers: llm.c checkpoint, token file and tokenizer file give clean errors on mutants") {
    TempDir dir;
    GPT2<float> base;
    build_fuzz_base(&base);
    REQUIRE(gpt2_write_checkpoint(&base, dir.file("model.bin").c_str()) == "");
    gpt2_free(&base);
    MutationPlan plan;
    plan.header_bytes = 1024;
    plan.int_fields = 8;
    mutate_reader("checkpoint", file_string(dir.file("model.bin")), plan, [](const std::string& path) {
        GPT2<float> model;
        memset(&model, 0, sizeof(model));
        std::string err = gpt2_read_checkpoint(&model, path.c_str());
        if (err.empty()) gpt2_free(&model);
        return err;
    });

    int header[256] = {0};
    header[0] = TOKENS_MAGIC; header[1] = 1; header[2] = 16;
    std::string tokens((const char*)header, sizeof(header));
    for (uint16_t id = 0; id < 16; id++) tokens.append((const char*)&id, 2);
    plan.int_fields = 3;
    mutate_reader("token file", tokens, plan, [](const std::string& path) {
        TokenFile tf;
        return tokens_read(&tf, path.c_str(), 61, "-i");
    });

    memset(header, 0, sizeof(header));
    header[0] = TOKENIZER_MAGIC; header[1] = 2; header[2] = 4; header[3] = 3;
    std::string tok((const char*)header, sizeof(header));
    tok += std::string("\x02hi\x01!\x03you\x05<eot>", 15);
    plan.int_fields = 4;
    mutate_reader("tokenizer file", tok, plan, [](const std::string& path) {
        Tokenizer t;
        std::string err = tokenizer_read(&t, path.c_str());
        // an accepted file's end-of-text id indexes its pieces (the trainer feeds it to the model); a version 1
        // file, which implies 50256, must hold GPT-2's 50257 pieces
        if (err.empty()) CHECK((t.eot_token >= 0 && t.eot_token < (int)t.pieces.size()));
        return err;
    });
}

TEST_CASE("fuzzed readers: the GPT-2 BPE files (encoder.json, vocab.bpe) give clean errors on mutants") {
    std::string js, vb;
    fuzz_synthetic_bpe(&js, &vb);
    MutationPlan plan;
    plan.text = true;
    plan.header_bytes = 64;
    plan.numbers_end = js.size();
    MemFile vocab(vb.data(), vb.size());
    mutate_reader("encoder.json", js, plan, [&](const std::string& path) {
        BPE bpe;
        bpe.print_errors = false;
        bpe_load(&bpe, path.c_str(), vocab.path.c_str());
        return bpe.error;
    });
    MemFile encoder(js.data(), js.size());
    plan.numbers_end = 0;
    plan.header_bytes = vb.size();
    mutate_reader("vocab.bpe", vb, plan, [&](const std::string& path) {
        BPE bpe;
        bpe.print_errors = false;
        bpe_load(&bpe, encoder.path.c_str(), path.c_str());
        if (bpe.error.empty()) { // an accepted pair still round-trips text
            const std::string text = "hello, hell of a hello\n";
            std::vector<int> ids;
            bpe_encode(&bpe, text.data(), text.size(), ids);
            CHECK(bpe_decode(&bpe, ids.data(), ids.size()) == text);
        }
        return bpe.error;
    });
}

TEST_CASE("fuzzed readers: adapter.bin, safetensors and the PEFT config give clean errors on mutants") {
    TempDir dir;
    GPT2<float> base;
    build_fuzz_base(&base);
    uint64_t base_sum = base_checksum(base.params_memory, base.num_parameters);
    gpt2_lora_attach(&base, lora_config(2, 4.0f, LORA_ALL_TARGETS), 2);
    TrainState state;
    state.step = 3;
    state.loader_B = 1;
    state.loader_T = 4;
    state.loader_position = 1;
    state.loader_order = {2, 0, 1};
    REQUIRE(lora_file_write(dir.file("adapter.bin").c_str(), &base, base_sum, &state) == "");
    REQUIRE(peft_export(dir.path.c_str(), &base, "gpt2") == "");
    lora_free(&base.lora);

    MutationPlan plan;
    plan.header_bytes = 1024;
    plan.int_fields = 28; // magic .. the u64 batch count of the training state
    mutate_reader("adapter file", file_string(dir.file("adapter.bin")), plan, [&](const std::string& path) {
        TrainState s;
        bool has_state = false;
        std::string err = lora_file_read(path.c_str(), &base, base_sum, &s, &has_state);
        if (err.empty()) {
            CHECK(base.lora.num_parameters == lora_count_parameters(base.lora.config, 1, 4));
            if (has_state) CHECK(s.loader_position <= s.loader_order.size());
        }
        if (base.lora.params_memory != NULL) lora_free(&base.lora);
        return err;
    });

    std::string st = file_string(dir.file(PEFT_WEIGHTS_FILE));
    uint64_t N = 0;
    memcpy(&N, st.data(), 8);
    plan = MutationPlan();
    plan.header_bytes = 8 + (size_t)N;
    plan.int_fields = 2; // the u64 header length
    plan.numbers_end = 8 + (size_t)N;
    mutate_reader("safetensors", st, plan, [](const std::string& path) {
        SafeTensors s;
        std::string err = safetensors_read(path.c_str(), &s);
        for (const SafeTensor& t : s.tensors) CHECK((t.begin <= t.end && t.end <= s.data.size() * sizeof(float)));
        return err;
    });

    std::string config = file_string(dir.file(PEFT_CONFIG_FILE));
    plan = MutationPlan();
    plan.text = true;
    plan.header_bytes = config.size();
    plan.numbers_end = config.size();
    plan.name = dir.file("");
    mutate_reader("PEFT adapter_config.json", config, plan, [&](const std::string& path) {
        std::string bytes = file_string(path);
        write_bytes(dir.file(PEFT_CONFIG_FILE), bytes.data(), bytes.size());
        std::string err = peft_import(dir.path.c_str(), &base);
        if (base.lora.params_memory != NULL) lora_free(&base.lora);
        return err;
    });
    gpt2_free(&base);
}

// -- GGUF (lib/gguf.h): a reader of our own for the tests, kept apart from the writer it checks

struct GGUFRead {
    std::map<std::string, std::string> strings;              // string metadata
    std::map<std::string, double> numbers;                   // u32 / i32 / f32 metadata
    std::map<std::string, std::vector<std::string>> arrays;  // string arrays
    std::map<std::string, std::pair<std::vector<uint64_t>, const float*>> tensors; // name -> ne, data
    std::string bytes;
};

static void gguf_read_for_test(const std::string& path, GGUFRead* g) {
    g->bytes = file_string(path);
    const std::string& b = g->bytes;
    size_t p = 0;
    auto u32 = [&]() { uint32_t v; REQUIRE(p + 4 <= b.size()); memcpy(&v, b.data() + p, 4); p += 4; return v; };
    auto u64 = [&]() { uint64_t v; REQUIRE(p + 8 <= b.size()); memcpy(&v, b.data() + p, 8); p += 8; return v; };
    auto str = [&]() { uint64_t n = u64(); REQUIRE(p + n <= b.size()); std::string s = b.substr(p, n); p += n; return s; };
    REQUIRE(b.substr(0, 4) == "GGUF");
    p = 4;
    REQUIRE(u32() == 3);
    uint64_t n_tensors = u64(), n_kv = u64();
    for (uint64_t k = 0; k < n_kv; k++) {
        std::string key = str();
        uint32_t type = u32();
        if (type == 4) g->numbers[key] = u32();
        else if (type == 5) g->numbers[key] = (int32_t)u32();
        else if (type == 6) { uint32_t v = u32(); float f; memcpy(&f, &v, 4); g->numbers[key] = f; }
        else if (type == 8) g->strings[key] = str();
        else {
            REQUIRE(type == 9);
            uint32_t sub = u32();
            uint64_t n = u64();
            for (uint64_t i = 0; i < n; i++) {
                if (sub == 8) g->arrays[key].push_back(str());
                else { REQUIRE(sub == 5); u32(); }
            }
        }
    }
    std::vector<std::pair<std::string, std::pair<std::vector<uint64_t>, uint64_t>>> infos;
    for (uint64_t k = 0; k < n_tensors; k++) {
        std::string name = str();
        std::vector<uint64_t> ne(u32());
        for (uint64_t& d : ne) d = u64();
        REQUIRE(u32() == 0); // F32
        infos.push_back({name, {ne, u64()}});
    }
    size_t data = (p + 31) / 32 * 32;
    for (const auto& t : infos) {
        uint64_t n = 1;
        for (uint64_t d : t.second.first) n *= d;
        CHECK(t.second.second % 32 == 0);                       // every tensor aligned
        REQUIRE(data + t.second.second + n * 4 <= b.size());
        g->tensors[t.first] = {t.second.first, (const float*)(b.data() + data + t.second.second)};
    }
}

// a BPE with one single-byte token per id, for exporting the tiny models (V = 61) whose ids are not GPT-2's
static void tiny_bpe(BPE* bpe, int V) {
    bpe->vocab_size = V;
    bpe->eot_token = V - 1;
    bpe->token_bytes.clear();
    for (int id = 0; id < V; id++) bpe->token_bytes.push_back(std::string(1, (char)('!' + id)));
    bpe->merges.clear();
}

TEST_CASE("GGUF writer: a small file is byte for byte the hand-built GGUF (header, metadata, tensor infos, alignment, data)") {
    TempDir dir;
    const float data[3] = {1.0f, -2.0f, 0.5f};
    GGUFWriter w;
    gguf_kv_u32(&w, "a.n", 7);
    gguf_kv_string(&w, "a.s", "xy");
    w.tensors.push_back({"t", {3, 1}, data});
    REQUIRE(gguf_write(&w, dir.file("small.gguf").c_str()) == "");
    // expected, spelled out: magic, version 3, 1 tensor, 2 metadata entries; key (u64 length + bytes), type
    // u32 4 + value; key, type 8 + (u64 length + bytes); tensor info: name, n_dims 2, ne 3 and 1, type 0 (F32),
    // offset 0; zero padding to a multiple of 32; the 12 data bytes and padding to the next multiple of 32
    std::string e;
    auto put = [&](const void* p, size_t n) { e.append((const char*)p, n); };
    auto u32 = [&](uint32_t v) { put(&v, 4); };
    auto u64 = [&](uint64_t v) { put(&v, 8); };
    put("GGUF", 4); u32(3); u64(1); u64(2);
    u64(3); put("a.n", 3); u32(4); u32(7);
    u64(3); put("a.s", 3); u32(8); u64(2); put("xy", 2);
    u64(1); put("t", 1); u32(2); u64(3); u64(1); u32(0); u64(0);
    e.append((32 - e.size() % 32) % 32, '\0');
    put(data, sizeof(data));
    e.append(32 - sizeof(data), '\0');
    std::string got = file_string(dir.file("small.gguf"));
    CHECK(got.size() == e.size());
    CHECK(got == e);
}

TEST_CASE("GGUF export: llama.cpp's GPT-2 names, ne = [in, out] with the model's bytes, V rows only; the adapter's lora_a / lora_b, rsLoRA's alpha, DoRA refused") {
    GPT2<float> model;
    build_trainable_tiny(&model, 91); // V = 61 padded to Vp = 64
    int L = model.config.num_layers, C = model.config.channels, V = model.config.vocab_size;
    gpt2_lora_attach(&model, lora_config_rslora(lora_config(4, 8.0f, LORA_ALL_TARGETS), true), 5);
    randomize_lora_B(&model.lora, L, C, 6, 0.1);
    BPE bpe;
    tiny_bpe(&bpe, V);
    TempDir dir;
    std::string written;
    REQUIRE(gguf_export(dir.path.c_str(), &model, &bpe, &written) == "");
    CHECK(has(written, "adapter.gguf"));
    // the base: every block matrix with ne = [in, out] holding llm.c's (out, in) bytes as they are
    GGUFRead g;
    gguf_read_for_test(dir.file("base.gguf"), &g);
    CHECK(g.strings["general.architecture"] == "gpt2");
    CHECK(g.numbers["gpt2.block_count"] == L);
    CHECK(g.numbers["gpt2.feed_forward_length"] == 4 * C);
    CHECK(g.arrays["tokenizer.ggml.tokens"].size() == (size_t)V);
    CHECK(g.tensors.size() == (size_t)(2 + 12 * L + 2));
    CHECK(g.tensors["token_embd.weight"].first == std::vector<uint64_t>{(uint64_t)C, (uint64_t)V}); // not Vp
    CHECK(memcmp(g.tensors["token_embd.weight"].second, model.params.wte, (size_t)V * C * 4) == 0);
    // the adapter: lora_a ne = [in, r] holding our lora_A (r, in), lora_b ne = [r, out] holding our lora_B (out, r)
    GGUFRead a;
    gguf_read_for_test(dir.file("adapter.gguf"), &a);
    CHECK(a.strings["general.type"] == "adapter");
    CHECK(a.strings["adapter.type"] == "lora");
    // rsLoRA: llama.cpp's alpha / r must be our alpha / sqrt(r), so alpha is written as 8 sqrt(4) = 16
    CHECK(a.numbers["adapter.lora.alpha"] / 4.0 == doctest::Approx(model.lora.config.scale).epsilon(1e-6));
    CHECK(a.tensors.size() == (size_t)(2 * LORA_NUM_TARGETS * L));
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        for (int l = 0; l < L; l++) {
            std::string name = gguf_block_matrix_name(t, l);
            int in = lora_target_in(t, C), out = lora_target_out(t, C);
            CAPTURE(name);
            REQUIRE(g.tensors.count(name) == 1);
            CHECK(g.tensors[name].first == std::vector<uint64_t>{(uint64_t)in, (uint64_t)out});
            CHECK(memcmp(g.tensors[name].second, gpt2_base_weight(&model, t, l), (size_t)in * out * 4) == 0);
            LoRALayer<float> v = lora_layer(&model.lora, t, l);
            REQUIRE(a.tensors.count(name + ".lora_a") == 1);
            REQUIRE(a.tensors.count(name + ".lora_b") == 1);
            CHECK(a.tensors[name + ".lora_a"].first == std::vector<uint64_t>{(uint64_t)in, 4});
            CHECK(a.tensors[name + ".lora_b"].first == std::vector<uint64_t>{4, (uint64_t)out});
            CHECK(memcmp(a.tensors[name + ".lora_a"].second, v.lora_A, (size_t)4 * in * 4) == 0);
            CHECK(memcmp(a.tensors[name + ".lora_b"].second, v.lora_B, (size_t)out * 4 * 4) == 0);
        }
    }
    // merged: W0 + scale lora_B lora_A, as lora_merge computes it
    GGUFRead m;
    gguf_read_for_test(dir.file("merged.gguf"), &m);
    std::vector<float> W(model.param_sizes[4] / L);
    memcpy(W.data(), model.params.qkvw, W.size() * 4);
    LoRALayer<float> v0 = lora_layer(&model.lora, LORA_QKV, 0);
    lora_merge(W.data(), v0.lora_A, v0.lora_B, model.lora.config.scale, C, 3 * C, 4, +1);
    // the same lora_merge, but inlined at another call site the compiler may fuse the last multiply-add
    // there and not here: allow two fp32 roundings of each weight (a wrong orientation or scale is O(|dW|))
    const float* merged = m.tensors[gguf_block_matrix_name(LORA_QKV, 0)].second;
    double worst = 0;
    for (size_t i = 0; i < W.size(); i++) {
        const double tol_merge_rounding = 2.0 * FLT_EPSILON * std::max(1.0, (double)std::fabs(W[i]));
        worst = std::max(worst, std::fabs((double)merged[i] - W[i]) / tol_merge_rounding);
    }
    CHECK(worst <= 1.0);
    gpt2_free(&model);

    // DoRA and PiSSA: no adapter.gguf (llama.cpp cannot apply them as they are), the merged model still written
    for (const char* variant : {"dora", "pissa"}) {
        CAPTURE(variant);
        GPT2<float> vmodel;
        build_trainable_tiny(&vmodel, 92);
        LoRAConfig cfg = lora_config(4, 8.0f, LORA_ALL_TARGETS);
        std::string err;
        REQUIRE(lora_parse_variants(variant, &cfg, &err));
        gpt2_lora_attach(&vmodel, cfg, 7);
        TempDir vdir;
        CHECK(has(gguf_write_adapter(vdir.file("adapter.gguf").c_str(), &vmodel.lora, "x"), strcmp(variant, "dora") == 0 ? "DoRA" : "PiSSA"));
        CHECK(access(vdir.file("adapter.gguf").c_str(), F_OK) != 0);
        REQUIRE(gguf_export(vdir.path.c_str(), &vmodel, &bpe, &written) == "");
        CHECK(has(written, "no adapter.gguf"));
        CHECK(access(vdir.file("merged.gguf").c_str(), F_OK) == 0);
        CHECK(access(vdir.file("adapter.gguf").c_str(), F_OK) != 0);
        gpt2_free(&vmodel);
    }
    // an unwritable output: a clear error naming the file, nothing left behind
    GPT2<float> m2;
    build_trainable_tiny(&m2, 93);
    gpt2_lora_attach(&m2, lora_config(4, 8.0f, LORA_ALL_TARGETS), 8);
    std::string err = gguf_export((dir.path + "/no/such/dir").c_str(), &m2, &bpe, &written);
    CHECK(has(err, "no/such/dir/base.gguf"));
    CHECK(has(err, "HINT"));
    gpt2_free(&m2);
}

// -- what a reader takes, and nothing a user trained is lost: regular files only, finite weights,
// linear parsing, clear errors for sizes no machine holds, output directories, save sets

TEST_CASE("readers take regular files only: a FIFO, a device and a directory give a clear error at once, naming the file") {
    TempDir dir;
    std::string fifo = dir.file("fifo");
    REQUIRE(mkfifo(fifo.c_str(), 0644) == 0); // nobody ever writes to it: a reader that opened it would block forever
    GPT2<float> model;
    TokenFile tf;
    SafeTensors st;
    std::string text;
    for (std::string path : {fifo, std::string("/dev/null"), dir.path}) {
        CAPTURE(path);
        const char* kind = path == fifo ? "FIFO" : path == dir.path ? "directory" : "device";
        std::string errs[4] = {gpt2_read_checkpoint(&model, path.c_str()), tokens_read(&tf, path.c_str(), 61, "-i"),
                               safetensors_read(path.c_str(), &st), read_text_file(path.c_str(), "PEFT config", "a hint", &text)};
        for (const std::string& err : errs) {
            CAPTURE(err);
            CHECK(has(err, path.c_str()));
            CHECK(has(err, kind));
            CHECK(has(err, "HINT"));
        }
    }
    // an adapter file and a PEFT config that are FIFOs: -A's paths, through the loader the trainer uses
    write_tiny_checkpoint(dir.file("tiny.bin"));
    REQUIRE(gpt2_read_checkpoint(&model, dir.file("tiny.bin").c_str()) == "");
    uint64_t sum = base_checksum(model.params_memory, model.num_parameters);
    TrainState state;
    bool has_state = false;
    CHECK(adapter_file_base_quant(fifo.c_str()) == LORA_QUANT_FP32); // read before the base: must not block either
    std::string err = lora_file_load(fifo.c_str(), &model, sum, &state, &has_state);
    CHECK(has(err, "FIFO"));
    REQUIRE(mkdir(dir.file("peft").c_str(), 0755) == 0);
    REQUIRE(mkfifo(dir.file("peft/" PEFT_CONFIG_FILE).c_str(), 0644) == 0);
    err = lora_file_load(dir.file("peft").c_str(), &model, sum, &state, &has_state);
    CHECK(has(err, PEFT_CONFIG_FILE));
    CHECK(has(err, "FIFO"));
    gpt2_free(&model);
}

TEST_CASE("non-finite weights are rejected on every load path (checkpoint, adapter.bin, PEFT) naming the file, the tensor and the index; no writer writes them") {
    TempDir dir;
    std::string ckpt = dir.file("tiny.bin");
    write_tiny_checkpoint(ckpt);
    GPT2<float> model;
    REQUIRE(gpt2_read_checkpoint(&model, ckpt.c_str()) == "");
    uint64_t sum = base_checksum(model.params_memory, model.num_parameters);
    // checkpoint: a NaN in the second tensor (wpe), index 5; and with -Q, where the block matrices stay on disk
    std::vector<char> bytes = read_all(ckpt);
    float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
    size_t wpe_at = 1024 + model.param_sizes[0] * sizeof(float) + 5 * sizeof(float);
    memcpy(bytes.data() + wpe_at, &nan, 4);
    write_bytes(dir.file("nan.bin"), bytes.data(), bytes.size());
    GPT2<float> bad;
    std::string err = gpt2_read_checkpoint(&bad, dir.file("nan.bin").c_str());
    CHECK(has(err, "nan.bin"));
    CHECK(has(err, "tensor wpe"));
    CHECK(has(err, "at index 5"));
    CHECK(has(err, "HINT"));
    err = gpt2_read_checkpoint(&bad, dir.file("nan.bin").c_str(), true);
    CHECK(has(err, "tensor wpe"));
    // adapter.bin: inf in the weights, then NaN in the AdamW v of a saved run
    gpt2_lora_attach(&model, lora_config(2, 4.0f, LORA_ALL_TARGETS), 5);
    for (size_t i = 0; i < model.lora.num_parameters; i++) model.lora.params_memory[i] = 0.01f * (float)(i % 7);
    std::vector<LoRATensor> list = lora_tensor_list(model.lora.config, model.lora.L, model.lora.C);
    const LoRATensor& t3 = list[3];
    float saved = model.lora.params_memory[t3.offset + 2];
    model.lora.params_memory[t3.offset + 2] = inf;
    REQUIRE(lora_file_write(dir.file("inf.bin").c_str(), &model, sum, NULL) == "");
    model.lora.params_memory[t3.offset + 2] = saved;
    TrainState state;
    state.loader_B = 1; state.loader_T = 1; state.loader_order = {0};
    model.lora.v_memory[1] = nan;
    REQUIRE(lora_file_write(dir.file("nan_v.bin").c_str(), &model, sum, &state) == "");
    model.lora.v_memory[1] = 0;
    GPT2<float> reader;
    REQUIRE(gpt2_read_checkpoint(&reader, ckpt.c_str()) == "");
    bool has_state = false;
    err = lora_file_read(dir.file("inf.bin").c_str(), &reader, sum, &state, &has_state);
    std::string where = strprintf("layer %d %s lora_%s, index 2", t3.layer, lora_target_names[t3.target], t3.is_B ? "B" : "A");
    CAPTURE(err);
    CHECK(has(err, "inf.bin"));
    CHECK(has(err, where.c_str()));
    CHECK(has(err, "(inf)"));
    CHECK(reader.lora.params_memory == NULL); // nothing half-loaded stays attached
    err = lora_file_read(dir.file("nan_v.bin").c_str(), &reader, sum, &state, &has_state);
    CHECK(has(err, "AdamW v"));
    CHECK(has(err, "index 1"));
    // PEFT: a NaN in one tensor of the safetensors
    REQUIRE(peft_export(dir.path.c_str(), &model, "gpt2") == "");
    SafeTensors st;
    REQUIRE(safetensors_read(dir.file(PEFT_WEIGHTS_FILE).c_str(), &st) == "");
    std::string key = lora_peft_key(t3.layer, t3.target, t3.is_B);
    size_t data_at = read_all(dir.file(PEFT_WEIGHTS_FILE)).size() - st.data.size() * sizeof(float);
    std::vector<char> stb = read_all(dir.file(PEFT_WEIGHTS_FILE));
    memcpy(stb.data() + data_at + st.find(key)->begin + 4 * sizeof(float), &nan, 4);
    write_bytes(dir.file(PEFT_WEIGHTS_FILE), stb.data(), stb.size());
    err = peft_import(dir.path.c_str(), &reader);
    CHECK(has(err, PEFT_WEIGHTS_FILE));
    CHECK(has(err, key.c_str()));
    CHECK(has(err, "at index 4"));
    // writers: a checkpoint (and so -M's merge) with a NaN is refused, and nothing is written
    model.lora.params_memory[list[0].offset] = nan; // lora_A of qkv, layer 0: the merge spreads it into qkvw
    // (0 * NaN is NaN: the whole first column of the merged qkvw becomes NaN)
    err = write_merged_checkpoint(&model, dir.file("merged.bin").c_str());
    CHECK(has(err, "merged.bin"));
    CHECK(has(err, "non-finite"));
    CHECK(has(err, "qkvw"));
    CHECK(access(dir.file("merged.bin").c_str(), F_OK) != 0);
    CHECK(tmp_files(dir.path).empty());
    gpt2_free(&reader);
    gpt2_free(&model);
}

// a safetensors file with n __metadata__ keys and n one-float tensors
static std::string many_keys_safetensors(size_t n) {
    std::string header = "{\"__metadata__\":{";
    for (size_t k = 0; k < n; k++) header += strprintf("%s\"key%zu\":\"value%zu\"", k ? "," : "", k, k);
    header += "}";
    for (size_t k = 0; k < n; k++) header += strprintf(",\"t%zu\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[%zu,%zu]}", k, 4 * k, 4 * k + 4);
    header += "}";
    uint64_t N = header.size();
    std::string file((const char*)&N, 8);
    file += header;
    file.append(4 * n, '\0');
    return file;
}

TEST_CASE("safetensors headers parse in time linear in their keys: doubling the __metadata__ keys and tensors doubles the counted work") {
    TempDir dir;
    size_t work[2] = {0, 0};
    const size_t n0 = 20000;
    for (int k = 0; k < 2; k++) {
        size_t n = n0 << k;
        std::string bytes = many_keys_safetensors(n);
        write_bytes(dir.file("many.safetensors"), bytes.data(), bytes.size());
        SafeTensors st;
        REQUIRE(safetensors_read(dir.file("many.safetensors").c_str(), &st) == "");
        CHECK(st.metadata.size() == n);
        for (size_t i = 0; i < n; i++) REQUIRE(st.find(strprintf("t%zu", i)) != NULL); // what peft_import does per tensor
        work[k] = st.work;
    }
    // linear: the ratio is 2 plus the few extra digits of the longer names (< 10%); a quadratic step
    // (a scan per key or per lookup) makes it about 4
    const double tol_ratio = 2.2;
    MESSAGE("safetensors work: " << work[0] << " for " << n0 << " keys, " << work[1] << " for " << 2 * n0);
    CHECK((double)work[1] / work[0] < tol_ratio);
}

TEST_CASE("sizes no machine holds are clear errors, not std::bad_alloc: a huge sparse adapter_config.json, a safetensors claiming a TiB") {
    TempDir dir;
    // a sparse 1 GiB config: over the limit for a text file, refused before any allocation
    std::string config = dir.file(PEFT_CONFIG_FILE);
    write_bytes(config, "{}", 2);
    REQUIRE(truncate(config.c_str(), 1ll << 30) == 0);
    std::string text;
    std::string err = read_text_file(config.c_str(), "PEFT config", "a hint", &text);
    CHECK(has(err, PEFT_CONFIG_FILE));
    CHECK(has(err, "MiB"));
    CHECK(has(err, "HINT"));
    // a sparse safetensors whose one tensor spans 1 TiB: a valid header, more data than memory
    size_t count = (size_t)1 << 38;
    std::string header = strprintf("{\"t\":{\"dtype\":\"F32\",\"shape\":[%zu],\"data_offsets\":[0,%zu]}}", count, 4 * count);
    while (header.size() % 8) header += ' ';
    uint64_t N = header.size();
    std::string path = dir.file("huge.safetensors");
    std::string head((const char*)&N, 8);
    head += header;
    write_bytes(path, head.data(), head.size());
    if (truncate(path.c_str(), (off_t)(8 + N + 4 * count)) != 0) {
        MESSAGE("skipped the 1 TiB sparse safetensors: this file system refuses a sparse file that large");
    } else {
        SafeTensors st;
        err = safetensors_read(path.c_str(), &st);
        CHECK(has(err, "huge.safetensors"));
        CHECK(has(err, "more than this machine can allocate"));
        CHECK(has(err, "HINT"));
    }
}

TEST_CASE("output directories: created like mkdir -p, locked against a second writer, probed for writability (an immutable directory, sysfs)") {
    TempDir dir;
    std::string nested = dir.file("a/b/c");
    CHECK(make_directories(nested.c_str()) == "");
    struct stat st;
    CHECK((stat(nested.c_str(), &st) == 0 && S_ISDIR(st.st_mode)));
    CHECK(make_directories(nested.c_str()) == ""); // existing: fine
    write_bytes(dir.file("file"), "x", 1);
    std::string err = make_directories(dir.file("file/sub").c_str());
    CHECK(has(err, "is not a directory"));
    CHECK(probe_writable_directory(nested.c_str()) == "");
    CHECK(tmp_files(nested).empty()); // the probe leaves nothing
    CHECK(probe_writable_directory("/sys") != ""); // sysfs refuses new files even to root
    // an immutable directory (chattr +i): root cannot create files in it either, where the file system allows the flag
    std::string imm = dir.file("immutable");
    REQUIRE(mkdir(imm.c_str(), 0755) == 0);
    if (system(("chattr +i '" + imm + "' 2>/dev/null").c_str()) == 0) {
        err = probe_writable_directory(imm.c_str());
        CHECK(has(err, imm.c_str()));
        CHECK(has(err, "cannot create files"));
        if (system(("chattr -i '" + imm + "'").c_str()) != 0) FAIL("could not clear the immutable flag of " << imm);
    } else {
        MESSAGE("skipped the immutable directory: chattr +i is not available here");
    }
    // the lock: a second holder (another open file description, as another process has) is refused
    long holder = 0;
    CHECK(lock_directory(nested.c_str(), &holder) == "");
    err = lock_directory(nested.c_str(), &holder);
    CHECK(has(err, "locked by another run"));
    CHECK(holder == (long)getpid());
}

TEST_CASE("save sets: the manifest is written last and lists each file; -A refuses a file from another save; what a directory holds decides what may replace it") {
    TempDir dir;
    std::string ckpt = dir.file("tiny.bin");
    write_tiny_checkpoint(ckpt);
    GPT2<float> model;
    REQUIRE(gpt2_read_checkpoint(&model, ckpt.c_str()) == "");
    uint64_t sum = base_checksum(model.params_memory, model.num_parameters);
    gpt2_lora_attach(&model, lora_config(2, 4.0f, LORA_ALL_TARGETS), 5);
    std::string out = dir.file("out");
    REQUIRE(mkdir(out.c_str(), 0755) == 0);
    TrainState state;
    state.step = 7; state.loader_B = 1; state.loader_T = 1; state.loader_order = {0};
    REQUIRE(save_set_write(out.c_str(), &model, sum, &state, 7, "gpt2") == "");
    std::string manifest = file_string(out + "/" SAVE_SET_FILE);
    for (const char* name : {"\"adapter.bin\"", "\"" PEFT_WEIGHTS_FILE "\"", "\"" PEFT_CONFIG_FILE "\"", "\"step\": 7", "\"optimizer_state\": true"}) {
        CHECK(has(manifest, name));
    }
    SaveSetInfo held = save_set_existing(out.c_str());
    CHECK(held.adapter);
    CHECK(held.has_state);
    CHECK(held.step == 7);
    GPT2<float> reader;
    REQUIRE(gpt2_read_checkpoint(&reader, ckpt.c_str()) == "");
    TrainState got;
    bool has_state = false;
    CHECK(lora_file_load((out + "/adapter.bin").c_str(), &reader, sum, &got, &has_state) == "");
    CHECK(lora_file_load(out.c_str(), &reader, sum, &got, &has_state) == "");
    // a save interrupted after its first file: adapter.bin from a later step beside the old set's manifest
    std::vector<char> old_manifest = read_all(out + "/" SAVE_SET_FILE);
    model.lora.params_memory[0] += 1.0f;
    state.step = 8;
    REQUIRE(save_set_write(out.c_str(), &model, sum, &state, 8, "gpt2") == "");
    write_bytes(out + "/" SAVE_SET_FILE, old_manifest.data(), old_manifest.size());
    std::string err = lora_file_load((out + "/adapter.bin").c_str(), &reader, sum, &got, &has_state);
    CHECK(has(err, "adapter.bin"));
    CHECK(has(err, SAVE_SET_FILE));
    CHECK(has(err, "another save"));
    CHECK(has(err, "HINT"));
    err = lora_file_load(out.c_str(), &reader, sum, &got, &has_state); // the PEFT pair: also from step 8
    CHECK(has(err, PEFT_WEIGHTS_FILE));
    // without a manifest (written by hand, by PEFT, by an older version) there is nothing to check
    REQUIRE(unlink((out + "/" SAVE_SET_FILE).c_str()) == 0);
    CHECK(lora_file_load((out + "/adapter.bin").c_str(), &reader, sum, &got, &has_state) == "");
    // what may replace what
    SaveSetInfo with_state, weights_only, empty;
    with_state.adapter = with_state.has_state = true;
    with_state.step = 40;
    weights_only.adapter = true;
    SaveSetInfo later = with_state, earlier = with_state;
    later.step = 50;
    earlier.step = 10;
    CHECK(save_set_loses(empty, weights_only) == "");
    CHECK(save_set_loses(with_state, later) == "");
    CHECK(save_set_loses(with_state, with_state) == ""); // the same step again: a rerun
    CHECK(has(save_set_loses(with_state, weights_only), "weights only"));
    CHECK(has(save_set_loses(with_state, earlier), "step 40"));
    CHECK(save_set_loses(weights_only, weights_only) == "");
    gpt2_free(&reader);
    gpt2_free(&model);
}

TEST_SUITE_END();

// ----------------------------------------------------------------------------
// generation: sampling, the adapter merged or not, the key/value cache

TEST_SUITE_BEGIN("generation");

TEST_CASE("sampling: top_k = 1 is the argmax; top-k never leaves the k largest and reaches each of them") {
    const int V = 10;
    float logits[V] = {0.1f, 2.0f, -1.0f, 1.9f, 0.5f, 1.8f, -3.0f, 0.0f, 1.0f, 0.2f};
    for (float coin : {0.0f, 0.5f, 0.999f}) CHECK(sample_top_k(logits, V, 1.0f, 1, coin) == 1);
    int counts[V] = {0};
    for (int i = 0; i < 200; i++) counts[sample_top_k(logits, V, 1.0f, 3, (i + 0.5f) / 200)]++;
    CHECK(counts[1] + counts[3] + counts[5] == 200);
    CHECK(counts[1] > 0);
    CHECK(counts[3] > 0);
    CHECK(counts[5] > 0);
    // a low temperature concentrates on the largest: 2.0 vs 1.9 at T = 0.01 is e^10 : 1
    int top = 0;
    for (int i = 0; i < 200; i++) top += sample_top_k(logits, V, 0.01f, 3, (i + 0.5f) / 200) == 1;
    CHECK(top >= 199);
}

TEST_CASE("inference: a prompt generates the same tokens with the adapter merged and unmerged (greedy and sampled)") {
    BPE bpe;
    bpe.print_errors = false;
    if (bpe_load_default(&bpe) != 0) {
        MESSAGE("skipped: no GPT-2 BPE files (make data fetches them): " << bpe.error);
        return;
    }
    // GPT-2's vocabulary on a tiny body, so that BPE ids fit
    GPT2Config cfg = tiny_config();
    cfg.vocab_size = 50257;
    cfg.padded_vocab_size = 50304;
    GPT2<float> model;
    gpt2_build_random(&model, cfg, 961);
    for (size_t i = 0; i < model.param_sizes[0]; i++) model.params.wte[i] *= 10;
    gpt2_lora_attach(&model, lora_config(4, 8.0f, LORA_ALL_TARGETS), 962);
    Rng rng;
    rng_seed(&rng, 963);
    for (size_t i = 0; i < model.lora.num_parameters; i++) model.lora.params_memory[i] = rng_uniform(&rng, -0.2f, 0.2f);
    gpt2_allocate(&model, 1, 16);
    // greedy (top_k = 1), and sampled at temperature 1 with the same coins: merged and unmerged logits
    // differ by ~1e-6 (see the merge test), far below the gaps that decide these draws
    std::string greedy[2], sampled[2];
    for (int merged = 0; merged < 2; merged++) {
        if (merged) {
            gpt2_lora_merge(&model, +1);
            lora_free(&model.lora); // from here on a plain GPT-2 with merged weights
        }
        Rng coins;
        rng_seed(&coins, 965);
        REQUIRE(generate_from_prompt(&model, &bpe, "Hello, world", 12, 1.0f, 1, &coins, &greedy[merged]) == "");
        rng_seed(&coins, 966);
        REQUIRE(generate_from_prompt(&model, &bpe, "Hello, world", 12, 1.0f, 0, &coins, &sampled[merged]) == "");
    }
    MESSAGE("greedy continuation: '" << greedy[1] << "'; sampled: '" << sampled[1] << "'");
    CHECK(!greedy[1].empty());
    CHECK(greedy[0] == greedy[1]);
    CHECK(sampled[0] == sampled[1]);
    gpt2_free(&model);
    // a base whose vocabulary is smaller than GPT-2's cannot take BPE ids
    GPT2<float> tiny;
    gpt2_build_random(&tiny, tiny_config(), 964);
    gpt2_allocate(&tiny, 1, 8);
    std::string text;
    std::string err = generate_from_prompt(&tiny, &bpe, "Hello", 2, 1.0f, 0, &rng, &text);
    CHECK(has(err, "V=61"));
    CHECK(has(err, "HINT"));
    gpt2_free(&tiny);
}

TEST_CASE("generation with the key/value cache: each new position's logits equal a forward over the whole context, and so do the tokens") {
    const int T = 12;           // the allocated context; sampling goes past it, where the window slides
    const float tol_kv = 1e-5f; // relative to the largest |logit|: the same kernels on the same rows, so only a
                                // summation order could differ; a wrong position or cache row is O(1)
    // plain LoRA, DoRA, Houlsby adapters, prefix tuning (its own attention kernel, with the same query offset)
    for (int kind = 0; kind < 4; kind++) {
        CAPTURE(kind);
        GPT2<float> model;
        build_trainable_tiny(&model, 1301);
        Rng rng;
        rng_seed(&rng, 1302);
        if (kind <= 1) {
            LoRAConfig cfg = lora_config(4, 8.0f, LORA_ALL_TARGETS);
            cfg.use_dora = kind == 1;
            gpt2_lora_attach(&model, cfg, 1303);
            for (size_t i = 0; i < model.lora.num_parameters; i++) model.lora.params_memory[i] += 0.05f * (2.0f * rng_f32(&rng) - 1.0f);
        } else if (kind == 2) {
            gpt2_adapters_attach(&model, 4, 1304);
            for (size_t i = 0; i < model.adapters.buf.n; i++) model.adapters.buf.params[i] += 0.05f * (2.0f * rng_f32(&rng) - 1.0f);
        } else {
            gpt2_prefix_attach(&model, 3, 1305);
            for (size_t i = 0; i < model.prefix.buf.n; i++) model.prefix.buf.params[i] += 0.5f * (2.0f * rng_f32(&rng) - 1.0f);
        }
        gpt2_allocate(&model, 1, T);
        int Vp = model.config.padded_vocab_size;
        std::vector<int> seq;
        random_tokens(&rng, &seq, T, model.config.vocab_size);
        {
            // position t through the cache, one token at a time, against one forward over positions 0..t
            gpt2_kv_start(&model);
            double maxdiff = 0, maxabs = 0;
            for (int t = 0; t < T; t++) {
                gpt2_forward(&model, &seq[t], (const int*)NULL, 1, 1);
                std::vector<float> cached(model.acts.logits, model.acts.logits + Vp);
                model.kv_on = false;
                gpt2_forward(&model, seq.data(), (const int*)NULL, 1, t + 1);
                model.kv_on = true;
                const float* full = model.acts.logits + (size_t)t * Vp;
                for (int v = 0; v < Vp; v++) {
                    maxdiff = std::max(maxdiff, (double)fabsf(cached[v] - full[v]));
                    maxabs = std::max(maxabs, (double)fabsf(full[v]));
                }
            }
            model.kv_on = false;
            CHECK(model.kv_len == T);
            MESSAGE("kind " << kind << ": cached vs full logits max |diff| " << maxdiff << " (max |logit| " << maxabs << ")");
            CHECK(maxdiff <= tol_kv * maxabs);
        }
        // sampling: the same tokens with and without the cache, for twice the allocated context
        Rng r1, r2;
        rng_seed(&r1, 7);
        rng_seed(&r2, 7);
        std::vector<int> prompt(seq.begin(), seq.begin() + 3);
        std::vector<int> with_cache = gpt2_generate(&model, prompt, 2 * T, &r1, 1.0f, 0, true);
        std::vector<int> without = gpt2_generate(&model, prompt, 2 * T, &r2, 1.0f, 0, false);
        CHECK(with_cache.size() == (size_t)(2 * T));
        CHECK(with_cache == without);
        gpt2_free(&model);
    }
}

TEST_CASE("streamed generation (-p): the callback sees each token as it is sampled, the same tokens gpt2_generate returns") {
    GPT2<float> model;
    build_trainable_tiny(&model, 81);
    gpt2_allocate(&model, 1, 16);
    struct Seen { std::vector<int> ids; };
    Seen seen;
    auto on_token = [](int id, void* ctx) { ((Seen*)ctx)->ids.push_back(id); };
    Rng rng;
    rng_seed(&rng, 3);
    std::vector<int> out = gpt2_generate(&model, std::vector<int>{1, 2, 3}, 20, &rng, 1.0f, 0, true, on_token, &seen);
    CHECK(out.size() == 20);
    CHECK(seen.ids == out);
    Rng again;
    rng_seed(&again, 3);
    CHECK(gpt2_generate(&model, std::vector<int>{1, 2, 3}, 20, &again) == out); // the callback changes nothing
    gpt2_free(&model);
}

TEST_SUITE_END();

// ----------------------------------------------------------------------------
// parity with the PyTorch twin, and with llm.c's debug state

// dev/train_gpt2_lora.py is the same GPT-2 + LoRA written with PyTorch autograd: a derivation of every
// gradient independent of the hand-written backward. It computes in float64 from the fp32 values it
// stores, so the differences measured below are the C++ fp32 error alone. Its output is committed under
// dev/fixtures/ (`make twin-fixture` regenerates it, bit-identically), so these tests need no Python:
//   tiny_model.bin           llm.c fp32 checkpoint, L=2 C=64 NH=4 V=500 (padded to Vp=512) maxT=32, random
//                            weights N(0, 0.02), layernorm weights 1 + N(0, 0.1), biases N(0, 0.02)
//   tiny_debug_state_*.bin   one batch B=2 T=16, AdamW lr 1e-2 wd 0.1, K=10 steps, and the adapters:
//     randB   r=4 alpha=6 (scale 1.5), all four targets, lora_B ~ N(0, 0.02): lora_A gets a gradient too
//     init    r=4 alpha=6, all four targets, the true init (lora_A kaiming-uniform, lora_B = 0)
//     subset  r=2 alpha=3, attproj and fc only: the flat layout must skip the disabled targets
//
// Twin debug-state format (our own; dev/train_gpt2_lora.py documents the same block). Little-endian.
// Header 256 int32, unused slots 0:
//   [0] 20261123 magic  [1] 1 version  [2] B  [3] T  [4] V  [5] Vp  [6] L  [7] C  [8] NH  [9] maxT
//   [10] r  [11] targets bitmask (qkv=1, attproj=2, fc=4, fcproj=8)  [12] K AdamW steps
//   [13] n_lora, floats in the flat adapter buffer  [14] 0: lora_B = 0 (true init), 1: lora_B random
//   [15] seed of the adapters' RNG
// then int32 inputs[B*T], int32 targets[B*T],
//      fp32 hparams[8] = alpha, lr, beta1, beta2, eps, weight_decay, lora_B_std, 0,
//      fp32 lora_params[n_lora] (flat, target-major: per enabled target lora_A (L,r,in) then lora_B (L,out,r)),
//      fp32 logits[B*T*V] (unpadded: the first V of each row of Vp), fp32 loss (mean over B*T),
//      fp32 grads[n_lora] (same flat layout), fp32 step_losses[K] (loss before each update, t = step+1).

#define TWIN_STATE_MAGIC 20261123
#define TWIN_STATE_VERSION 1

struct TwinState {
    int B, T, V, Vp, L, C, NH, maxT, r, K;
    unsigned targets;                 // bitmask over LoRATarget
    float alpha, lr, beta1, beta2, eps, weight_decay;
    std::vector<int> inputs;          // (B, T)
    std::vector<int> labels;          // (B, T) the targets of the batch
    std::vector<float> lora_params;   // (n_lora) flat adapter layout, initial values
    std::vector<float> logits;        // (B, T, V)
    float loss;
    std::vector<float> grads;         // (n_lora)
    std::vector<float> step_losses;   // (K)
};

// reads and validates a twin debug state; "" on success, else a message naming the file with a HINT
static std::string twin_state_read(TwinState* s, const char* path) {
    const char* hint = "regenerate the fixture with `make twin-fixture` (dev/train_gpt2_lora.py)";
    FILE* f = NULL;
    std::string err = open_for_reading(path, "twin debug state", hint, &f);
    if (!err.empty()) return err;
    long size = 0;
    err = file_size_of(f, path, &size);
    int h[256];
    if (err.empty() && (size < (long)sizeof(h) || fread(h, sizeof(h), 1, f) != 1)) {
        err = strprintf("twin debug state '%s' is truncated: %ld bytes, shorter than the 1024-byte header\n---> HINT: %s", path, size, hint);
    }
    if (err.empty() && h[0] != TWIN_STATE_MAGIC) {
        err = strprintf("twin debug state '%s' has magic %d, expected %d; it is %s\n---> HINT: %s", path, h[0],
                        TWIN_STATE_MAGIC, describe_magic(h[0]), hint);
    }
    if (err.empty() && h[1] != TWIN_STATE_VERSION) {
        err = strprintf("twin debug state '%s' has version %d, expected %d\n---> HINT: %s", path, h[1], TWIN_STATE_VERSION, hint);
    }
    size_t n_lora = 0;
    if (err.empty()) {
        s->B = h[2]; s->T = h[3]; s->V = h[4]; s->Vp = h[5]; s->L = h[6]; s->C = h[7]; s->NH = h[8]; s->maxT = h[9];
        s->r = h[10]; s->targets = (unsigned)h[11]; s->K = h[12];
        // every dimension bounded before anything is sized from it, so no product below can overflow
        const int lim = 1 << 20;
        bool ok = s->B > 0 && s->B <= 4096 && s->T > 0 && s->T <= s->maxT && s->maxT <= lim && s->V > 0 &&
                  s->V <= s->Vp && s->Vp <= lim && s->L > 0 && s->L <= 1024 && s->C > 0 && s->C <= 1 << 16 &&
                  s->NH > 0 && s->C % s->NH == 0 && s->r > 0 && s->r <= 4096 && h[11] > 0 &&
                  s->targets <= LORA_ALL_TARGETS && s->K > 0 && s->K <= lim && h[13] >= 0;
        if (!ok) {
            err = strprintf("twin debug state '%s' has impossible sizes: B=%d T=%d V=%d Vp=%d L=%d C=%d NH=%d maxT=%d r=%d targets=%d K=%d\n---> HINT: %s",
                            path, h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11], h[12], hint);
        } else {
            n_lora = lora_count_parameters(lora_config(s->r, 1.0f, s->targets), s->L, s->C);
            if ((size_t)h[13] != n_lora) {
                err = strprintf("twin debug state '%s' says n_lora=%d, but r=%d targets=%s L=%d C=%d need %zu\n---> HINT: %s",
                                path, h[13], s->r, lora_targets_string(s->targets).c_str(), s->L, s->C, n_lora, hint);
            }
        }
    }
    size_t BT = 0;
    if (err.empty()) {
        BT = (size_t)s->B * s->T;
        size_t expected = sizeof(h) + 2 * BT * sizeof(int) + (8 + 2 * n_lora + BT * s->V + 1 + (size_t)s->K) * sizeof(float);
        if ((size_t)size != expected) {
            err = strprintf("twin debug state '%s' is %ld bytes but its header needs %zu: %s\n---> HINT: %s", path, size,
                            expected, (size_t)size < expected ? "the file is truncated" : "there are trailing bytes", hint);
        }
    }
    if (err.empty()) {
        float hp[8];
        s->inputs.resize(BT);
        s->labels.resize(BT);
        s->lora_params.resize(n_lora);
        s->logits.resize(BT * s->V);
        s->grads.resize(n_lora);
        s->step_losses.resize(s->K);
        bool ok = fread(s->inputs.data(), sizeof(int), BT, f) == BT && fread(s->labels.data(), sizeof(int), BT, f) == BT &&
                  fread(hp, sizeof(float), 8, f) == 8 &&
                  fread(s->lora_params.data(), sizeof(float), n_lora, f) == n_lora &&
                  fread(s->logits.data(), sizeof(float), BT * s->V, f) == BT * s->V &&
                  fread(&s->loss, sizeof(float), 1, f) == 1 && fread(s->grads.data(), sizeof(float), n_lora, f) == n_lora &&
                  fread(s->step_losses.data(), sizeof(float), s->K, f) == (size_t)s->K;
        s->alpha = hp[0]; s->lr = hp[1]; s->beta1 = hp[2]; s->beta2 = hp[3]; s->eps = hp[4]; s->weight_decay = hp[5];
        if (!ok) err = strprintf("twin debug state '%s': read error\n---> HINT: %s", path, hint);
        for (size_t i = 0; ok && i < BT; i++) {
            if (s->inputs[i] < 0 || s->inputs[i] >= s->V || s->labels[i] < 0 || s->labels[i] >= s->V) {
                err = strprintf("twin debug state '%s': token id at position %zu is outside [0, V=%d)\n---> HINT: %s", path, i, s->V, hint);
                break;
            }
        }
    }
    fclose(f);
    return err;
}

// Max |got - ref| over n values; prints the label, the first pairs and the max diff next to its tolerance.
template <typename real>
static double twin_maxdiff(const std::string& label, const real* got, const float* ref, size_t n, double tol) {
    double maxdiff = 0, maxref = 0;
    for (size_t i = 0; i < n; i++) {
        maxdiff = std::max(maxdiff, std::fabs((double)got[i] - (double)ref[i]));
        maxref = std::max(maxref, std::fabs((double)ref[i]));
    }
    std::string pairs;
    for (size_t i = 0; i < std::min<size_t>(n, 3); i++) { pairs += strprintf(" %.7g/%.7g", (double)got[i], (double)ref[i]); }
    MESSAGE(strprintf("%-24s maxdiff %.3e (tol %.1e, max |ref| %.3e) c++/twin:%s", label.c_str(), maxdiff, tol, maxref, pairs.c_str()));
    return maxdiff;
}

// How close the C++ model must come to the float64 twin. Every tolerance is an absolute bound on
// max |c++ - twin| over a tensor; the grads one is relative to that tensor's largest reference value.
struct TwinTolerances {
    double logits;     // on raw logits
    double loss;       // on the step-0 loss
    double grads_rel;  // on each adapter gradient tensor, times max |ref| of that tensor
    double step_loss;  // on each of the K losses along the AdamW trajectory
};

// Loads the checkpoint, attaches LoRA with the state's config, installs its adapters, then runs K steps
// (forward, backward, AdamW with t = step + 1) on its batch, comparing logits, loss and every adapter
// gradient at step 0 and the loss before every step.
template <typename real>
static void twin_parity(const char* model_path, const char* state_path, const TwinTolerances& tol) {
    TwinState s;
    std::string err = twin_state_read(&s, state_path);
    REQUIRE_MESSAGE(err.empty(), err);
    GPT2<real> model;
    err = gpt2_read_checkpoint(&model, model_path);
    REQUIRE_MESSAGE(err.empty(), err);
    GPT2Config cfg = model.config;
    REQUIRE_MESSAGE((cfg.vocab_size == s.V && cfg.padded_vocab_size == s.Vp && cfg.num_layers == s.L &&
                     cfg.channels == s.C && cfg.num_heads == s.NH && cfg.max_seq_len == s.maxT),
                    (std::string(model_path) + " and " + state_path + " describe different models: regenerate both"));
    gpt2_lora_attach(&model, lora_config(s.r, s.alpha, s.targets), 1);
    REQUIRE(model.lora.num_parameters == s.lora_params.size());
    for (size_t i = 0; i < s.lora_params.size(); i++) { model.lora.params_memory[i] = (real)s.lora_params[i]; }
    MESSAGE(strprintf("%s: B=%d T=%d r=%d alpha=%g targets=%s n_lora=%zu K=%d", state_path, s.B, s.T, s.r,
                      (double)s.alpha, lora_targets_string(s.targets).c_str(), s.lora_params.size(), s.K));

    size_t BT = (size_t)s.B * s.T;
    std::vector<real> logits(BT * s.V), grads(s.lora_params.size()), losses(s.K);
    real padded_max = 0; // the logits of padded vocabulary rows: wte rows V..Vp-1 are zero, so exactly 0
    for (int step = 0; step < s.K; step++) {
        gpt2_forward(&model, s.inputs.data(), s.labels.data(), s.B, s.T);
        losses[step] = model.mean_loss;
        if (step == 0) {
            for (size_t bt = 0; bt < BT; bt++) {
                const real* row = model.acts.logits + bt * s.Vp;
                memcpy(&logits[bt * s.V], row, (size_t)s.V * sizeof(real));
                for (int v = s.V; v < s.Vp; v++) { padded_max = std::max(padded_max, (real)std::fabs(row[v])); }
            }
        }
        gpt2_zero_grad(&model);
        gpt2_backward(&model);
        if (step == 0) memcpy(grads.data(), model.lora.grads_memory, grads.size() * sizeof(real));
        gpt2_update(&model, s.lr, s.beta1, s.beta2, s.eps, s.weight_decay, step + 1);
    }

    CHECK(padded_max == 0);
    CHECK(twin_maxdiff("logits (B,T,V)", logits.data(), s.logits.data(), logits.size(), tol.logits) <= tol.logits);
    real loss0 = losses[0];
    CHECK(twin_maxdiff("loss", &loss0, &s.loss, 1, tol.loss) <= tol.loss);
    // each adapter gradient tensor at the offsets of the flat layout, which we compute here independently
    size_t off = 0;
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        if (!(s.targets & (1u << t))) continue;
        size_t in = lora_target_in(t, s.C), out = lora_target_out(t, s.C);
        size_t n[2] = {(size_t)s.L * s.r * in, (size_t)s.L * out * s.r};
        real* ptr[2] = {model.lora.dlora_A[t], model.lora.dlora_B[t]};
        const char* what[2] = {"dlora_A", "dlora_B"};
        for (int k = 0; k < 2; k++) {
            CHECK(ptr[k] == model.lora.grads_memory + off); // the model's views agree with the flat layout
            double maxref = 0;
            for (size_t i = 0; i < n[k]; i++) { maxref = std::max(maxref, std::fabs((double)s.grads[off + i])); }
            // relative to the tensor's scale; at the true init dlora_A is exactly 0 on both sides and
            // so is this bound: any nonzero dlora_A there fails
            double tol_t = tol.grads_rel * maxref;
            std::string label = strprintf("%s %s (%s)", what[k], lora_target_names[t], k == 0 ? "L,r,in" : "L,out,r");
            CHECK(twin_maxdiff(label, grads.data() + off, s.grads.data() + off, n[k], tol_t) <= tol_t);
            off += n[k];
        }
    }
    CHECK(off == grads.size());
    CHECK(twin_maxdiff(strprintf("losses of %d AdamW steps", s.K), losses.data(), s.step_losses.data(), s.K, tol.step_loss) <= tol.step_loss);
    gpt2_free(&model);
}

// The tiny fixture's tolerances, fp32 against the float64 twin. In this model every sum runs over at
// most 4C = 256 terms and |logits| < 1, so fp32 rounding (unit 6e-8) leaves errors near 1e-7 to 1e-6;
// each bound keeps about 10x headroom over what we measured (noted beside it), while a real mistake
// (a dropped LoRA scale of 1.5, a transposed index, a wrong layernorm eps) moves these by 1e-3 or more.
static const TwinTolerances tol_tiny_fp32 = {
    1e-5,  // logits: measured max 3.0e-7
    1e-5,  // loss ~6.2, fp32 spacing there 4.8e-7: measured 0 (identical float)
    1e-5,  // grads, relative to each tensor's max |ref|: measured max 7e-7 (dlora_B attproj, subset)
    2e-5,  // 10 AdamW step losses: measured max 9.5e-7; the trajectory may add up rounding over steps
};
// The same comparison with the model in double. The twin's float64 numbers were rounded to fp32 when
// stored, so this agreement is bounded by that rounding (half an fp32 ulp, 3e-8 relative): it shows
// the fp32 differences above are rounding, not a small modelling error hiding under the tolerance.
static const TwinTolerances tol_tiny_fp64 = {
    1e-7,  // logits |x| < 0.8: half ulp 3e-8; measured 3.0e-8
    1e-6,  // loss 6.2: half ulp 2.4e-7; measured 2.1e-7
    1e-7,  // grads relative: each stored value is within 6e-8 |ref_i| <= 6e-8 max |ref|; measured 4.3e-8
    1e-6,  // step losses: measured max 2.2e-7
};

static const char* const twin_tiny_model = "dev/fixtures/tiny_model.bin";
static const char* const twin_tiny_states[] = {"dev/fixtures/tiny_debug_state_randB.bin",
                                               "dev/fixtures/tiny_debug_state_init.bin",
                                               "dev/fixtures/tiny_debug_state_subset.bin"};

// GPT-2 124M-shaped random weights (L=12 C=768 NH=12 V=50257 Vp=50304), B=4 T=64, r=8 alpha=16 on all
// four targets, lora_B ~ N(0, 0.02), 5 AdamW steps at lr 1e-3. Not committed (~560 MB):
// `make twin-fixture124m` writes it. Sums now run over up to 4C = 3072 terms and the LM head over 768,
// so fp32 errors grow roughly with sqrt(terms) over the tiny model's; tolerances scale accordingly.
static const TwinTolerances tol_124m_fp32 = {
    1e-4,  // logits |x| < 3: measured max 6.0e-6
    1e-5,  // loss ~11, fp32 spacing there 9.5e-7: measured 0 (identical float)
    1e-4,  // grads relative to each tensor's max |ref|: measured max 6.7e-6 (dlora_A attproj)
    2e-5,  // 5 AdamW step losses: measured max 9.5e-7
};

// llm.c's starter pack: gpt2_124M.bin (real GPT-2 weights) and gpt2_124M_debug_state.bin, written by
// llm.c's train_gpt2.py from PyTorch: header [0]=20240327 [1]=2 [2]=B [3]=T, then int32 x[B*T],
// int32 y[B*T], fp32 logits[B*T*V] (unpadded), fp32 loss, fp32 grads of all parameters (not used here:
// with LoRA off the base has no gradient buffers in our trainer). Checked: base model, LoRA off.
struct LlmcDebugState {
    int B, T;
    std::vector<int> x, y;
    std::vector<float> logits;
    float loss;
};

static std::string llmc_debug_state_read(LlmcDebugState* s, const char* path, int V, size_t num_parameters) {
    const char* hint = "use gpt2_124M_debug_state.bin from llm.c's starter pack, next to gpt2_124M.bin";
    FILE* f = NULL;
    std::string err = open_for_reading(path, "llm.c debug state", hint, &f);
    if (!err.empty()) return err;
    long size = 0;
    err = file_size_of(f, path, &size);
    int h[256];
    if (err.empty() && (size < (long)sizeof(h) || fread(h, sizeof(h), 1, f) != 1)) {
        err = strprintf("llm.c debug state '%s' is truncated: %ld bytes\n---> HINT: %s", path, size, hint);
    }
    if (err.empty() && (h[0] != DEBUG_STATE_MAGIC || h[1] != 2)) {
        err = strprintf("llm.c debug state '%s' has magic %d version %d, expected %d version 2; it is %s\n---> HINT: %s",
                        path, h[0], h[1], DEBUG_STATE_MAGIC, describe_magic(h[0]), hint);
    }
    if (err.empty() && (h[2] <= 0 || h[2] > 4096 || h[3] <= 0 || h[3] > 1 << 20)) {
        err = strprintf("llm.c debug state '%s' has impossible B=%d T=%d\n---> HINT: %s", path, h[2], h[3], hint);
    }
    size_t BT = 0;
    if (err.empty()) {
        s->B = h[2];
        s->T = h[3];
        BT = (size_t)s->B * s->T;
        size_t expected = sizeof(h) + 2 * BT * sizeof(int) + (BT * V + 1 + num_parameters) * sizeof(float);
        if ((size_t)size != expected) {
            err = strprintf("llm.c debug state '%s' is %ld bytes, expected %zu for B=%d T=%d V=%d and %zu parameters\n---> HINT: %s",
                            path, size, expected, s->B, s->T, V, num_parameters, hint);
        }
    }
    if (err.empty()) {
        s->x.resize(BT);
        s->y.resize(BT);
        s->logits.resize(BT * V);
        bool ok = fread(s->x.data(), sizeof(int), BT, f) == BT && fread(s->y.data(), sizeof(int), BT, f) == BT &&
                  fread(s->logits.data(), sizeof(float), BT * V, f) == BT * V && fread(&s->loss, sizeof(float), 1, f) == 1;
        if (!ok) err = strprintf("llm.c debug state '%s': read error\n---> HINT: %s", path, hint);
    }
    fclose(f);
    return err;
}

// llm.c's own test_gpt2.c accepts logits within 1e-2 of PyTorch's: GPT-2's logits reach magnitudes of
// ~100, where fp32 spacing is 8e-6 and summation order alone moves them by ~1e-4..1e-3.
const double tol_llmc_logits = 1e-2;
const double tol_llmc_loss = 1e-3; // loss ~5: fp32 error of a mean of B*T log-sum-exps is ~1e-5

TEST_SUITE_BEGIN("parity");

TEST_CASE("twin parity, lora_B random: logits, loss, every adapter gradient and 10 AdamW step losses match PyTorch") {
    twin_parity<float>(twin_tiny_model, twin_tiny_states[0], tol_tiny_fp32);
}

TEST_CASE("twin parity, true init (lora_B = 0): logits, loss, adapter gradients (dlora_A = 0) and step losses match PyTorch") {
    twin_parity<float>(twin_tiny_model, twin_tiny_states[1], tol_tiny_fp32);
}

TEST_CASE("twin parity, targets attproj+fc at r=2: the flat layout skips disabled targets") {
    twin_parity<float>(twin_tiny_model, twin_tiny_states[2], tol_tiny_fp32);
}

TEST_CASE("twin parity in double: agreement down to the fixture's own fp32 rounding") {
    for (const char* state : twin_tiny_states) { twin_parity<double>(twin_tiny_model, state, tol_tiny_fp64); }
}

TEST_CASE("twin fixture: the batch is the first B*T+1 tokens of tiny_tokens.bin, as the data loader reads them") {
    TwinState s;
    std::string err = twin_state_read(&s, twin_tiny_states[0]);
    REQUIRE_MESSAGE(err.empty(), err);
    DataLoader loader;
    err = dataloader_init(&loader, "dev/fixtures/tiny_tokens.bin", s.B, s.T, s.V, false, 0, "-i");
    REQUIRE_MESSAGE(err.empty(), err);
    dataloader_next_batch(&loader);
    CHECK(loader.inputs == s.inputs);
    CHECK(loader.targets == s.labels);
}

TEST_CASE("twin debug-state reader: wrong magic, wrong version, bad sizes and truncation give a clear error") {
    TempDir dir;
    std::vector<char> good = read_all(twin_tiny_states[0]);
    REQUIRE(good.size() > 1024);
    TwinState s;
    struct { const char* name; int slot; int value; const char* expect; } cases[] = {
        {"magic.bin", 0, CHECKPOINT_MAGIC, "model checkpoint"},
        {"version.bin", 1, 2, "version 2"},
        {"rank.bin", 10, 0, "impossible sizes"},
        {"nlora.bin", 13, 7, "n_lora=7"},
        {"batch.bin", 2, 3, "needs"},  // B=3: the file is too short for that header
    };
    for (const auto& c : cases) {
        std::vector<char> bad = good;
        ((int*)bad.data())[c.slot] = c.value;
        write_bytes(dir.file(c.name), bad.data(), bad.size());
        std::string err = twin_state_read(&s, dir.file(c.name).c_str());
        CHECK_MESSAGE(has(err, c.expect), (std::string(c.name) + ": " + err));
        CHECK(has(err, c.name));
        CHECK(has(err, "HINT"));
    }
    write_bytes(dir.file("trunc.bin"), good.data(), good.size() - 4);
    CHECK(has(twin_state_read(&s, dir.file("trunc.bin").c_str()), "truncated"));
    write_bytes(dir.file("short.bin"), good.data(), 100);
    CHECK(has(twin_state_read(&s, dir.file("short.bin").c_str()), "truncated"));
    CHECK(has(twin_state_read(&s, dir.file("missing.bin").c_str()), "HINT"));
}

TEST_CASE("twin parity at GPT-2 124M shape (random weights), when data/ has the fixture") {
    const char* model_path = "data/gpt2_124M_random.bin";
    const char* state_path = "data/gpt2_124M_random_debug_state.bin";
    if (access(model_path, R_OK) != 0 || access(state_path, R_OK) != 0) {
        MESSAGE((std::string("SKIPPED: ") + model_path + " / " + state_path + " not found (make twin-fixture124m writes them)"));
        return;
    }
    twin_parity<float>(model_path, state_path, tol_124m_fp32);
}

TEST_CASE("base model (LoRA off) matches llm.c's starter-pack debug state, when present") {
    const char* dirs[] = {"", "data/", "dev/data/"};
    std::string model_path, state_path;
    for (const char* d : dirs) {
        std::string m = std::string(d) + "gpt2_124M.bin", s = std::string(d) + "gpt2_124M_debug_state.bin";
        if (access(m.c_str(), R_OK) == 0 && access(s.c_str(), R_OK) == 0) { model_path = m; state_path = s; break; }
    }
    if (model_path.empty()) {
        MESSAGE("SKIPPED: llm.c starter pack (gpt2_124M.bin + gpt2_124M_debug_state.bin) not found in ./, data/ or dev/data/");
        return;
    }
    GPT2<float> model;
    std::string err = gpt2_read_checkpoint(&model, model_path.c_str());
    REQUIRE_MESSAGE(err.empty(), err);
    int V = model.config.vocab_size, Vp = model.config.padded_vocab_size;
    LlmcDebugState s;
    err = llmc_debug_state_read(&s, state_path.c_str(), V, model.num_parameters);
    REQUIRE_MESSAGE(err.empty(), err);
    gpt2_forward(&model, s.x.data(), s.y.data(), s.B, s.T);
    size_t BT = (size_t)s.B * s.T;
    std::vector<float> logits(BT * V);
    for (size_t bt = 0; bt < BT; bt++) { memcpy(&logits[bt * V], model.acts.logits + bt * Vp, (size_t)V * sizeof(float)); }
    CHECK(twin_maxdiff("llm.c logits (B,T,V)", logits.data(), s.logits.data(), logits.size(), tol_llmc_logits) <= tol_llmc_logits);
    float loss = model.mean_loss;
    CHECK(twin_maxdiff("llm.c loss", &loss, &s.loss, 1, tol_llmc_loss) <= tol_llmc_loss);
    gpt2_free(&model);
}

TEST_SUITE_END();

// ----------------------------------------------------------------------------
// binary: tests that run the trainer binary ($TRAIN_BIN, set by make test)

// a learnable token stream: a fixed cycle through the tiny vocabulary (V=61), written as an llm.c token file
static void write_cycle_tokens(const std::string& path, size_t n) {
    std::vector<uint16_t> ids(n);
    for (size_t i = 0; i < n; i++) ids[i] = (uint16_t)((i * 7) % 61);
    write_tokens(path, ids);
}

// the trainer flags every binary test starts from: the tiny checkpoint, one token file for train and val
static std::string trainer_args(const std::string& ckpt, const std::string& tokens) {
    return "-e " + ckpt + " -i " + tokens + " -j " + tokens + " -b 2 -t 8 -v 0 -s 0";
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

// the "train loss" values of steps first..last in a trainer log, as printed
static std::vector<std::string> step_losses(const std::string& log, int first, int last, int steps) {
    std::vector<std::string> v;
    for (int k = first; k <= last; k++) {
        std::string key = strprintf("step %d/%d: train loss ", k, steps);
        size_t at = log.find(key);
        v.push_back(at == std::string::npos ? "missing" : log.substr(at + key.size(), 8));
    }
    return v;
}

// the tiny trainer setup of the binary tests: a checkpoint, a cyclic token stream, the common flags
struct TrainerFiles {
    TempDir dir;
    std::string ckpt, tokens, common;
    explicit TrainerFiles(float lnfw = 1.0f) {
        ckpt = dir.file("tiny.bin");
        tokens = dir.file("tokens.bin");
        GPT2<float> model;
        build_trainable_tiny(&model, 81);
        for (int c = 0; c < model.config.channels; c++) model.params.lnfw[c] = lnfw; // the final layernorm's gain
        REQUIRE(gpt2_write_checkpoint(&model, ckpt.c_str()) == "");
        gpt2_free(&model);
        write_cycle_tokens(tokens, 400);
        common = trainer_args(ckpt, tokens);
    }
    uint64_t base_sum() const {
        GPT2<float> model;
        REQUIRE(gpt2_read_checkpoint(&model, ckpt.c_str()) == "");
        uint64_t sum = base_checksum(model.params_memory, model.num_parameters);
        gpt2_free(&model);
        return sum;
    }
};

// -- what a run left behind: numbers in its log, the checkpoint and adapter it wrote, .tmp files

// every number that follows `prefix` in the log, in order
static std::vector<double> numbers_after(const std::string& log, const char* prefix) {
    std::vector<double> v;
    for (size_t p = log.find(prefix); p != std::string::npos; p = log.find(prefix, p + 1)) {
        v.push_back(strtod(log.c_str() + p + strlen(prefix), NULL));
    }
    return v;
}

static double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
    double m = 0;
    for (size_t i = 0; i < a.size() && i < b.size(); i++) m = std::max(m, fabs(a[i] - b[i]));
    return m;
}

static std::vector<float> checkpoint_params(const std::string& path) {
    GPT2<float> model;
    REQUIRE(gpt2_read_checkpoint(&model, path.c_str()) == "");
    std::vector<float> p(model.params_memory, model.params_memory + model.num_parameters);
    gpt2_free(&model);
    return p;
}

// the adapter weights in dir/adapter.bin, read for the base checkpoint it was trained on
static std::vector<float> adapter_params(const std::string& base, const std::string& dir) {
    GPT2<float> model;
    REQUIRE(gpt2_read_checkpoint(&model, base.c_str()) == "");
    TrainState state;
    bool has_state = false;
    std::string path = dir + "/adapter.bin";
    REQUIRE(lora_file_read(path.c_str(), &model, base_checksum(model.params_memory, model.num_parameters), &state, &has_state) == "");
    std::vector<float> p(model.lora.params_memory, model.lora.params_memory + model.lora.num_parameters);
    gpt2_free(&model);
    return p;
}

// |a - b| / |a - a0| in the 2-norm: how far two runs ended apart, relative to how far they moved from a0
static double relative_distance(const std::vector<float>& a, const std::vector<float>& b, const std::vector<float>& a0) {
    double d2 = 0, u2 = 0;
    for (size_t i = 0; i < a.size(); i++) {
        d2 += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        u2 += ((double)a[i] - a0[i]) * ((double)a[i] - a0[i]);
    }
    return sqrt(d2 / u2);
}

static bool dir_has_tmp_file(const std::string& dir) {
    std::string cmd = "ls '" + dir + "' | grep -q '\\.tmp$'";
    return system(cmd.c_str()) == 0;
}

TEST_SUITE_BEGIN("binary");

// -- flags and files: bad values exit non-zero naming the flag, good ones train

TEST_CASE("the trainer binary, -C: bad token specs name -C with a HINT; top:N trains N rows, saved with the adapter and loaded by -A") {
    TempDir dir;
    std::string ckpt = dir.file("tiny.bin"), tokens = dir.file("tokens.bin");
    write_tiny_checkpoint(ckpt);
    write_cycle_tokens(tokens, 400);
    std::string common = trainer_args(ckpt, tokens), out;
    for (const char* bad : {"-C 61", "-C 5,5", "-C 5,x", "-C top:0", "-C top:62", "-C 5 -f 1", "-C 5 -F 1", "-C 5 -B 1", "-C 5 -Q bf16"}) {
        CAPTURE(bad);
        CHECK(run_trainer(common + " -x 1 " + bad, &out) != 0);
        CHECK(has(out, "-C"));
        CHECK(has(out, "HINT"));
    }
    std::string save = dir.file("out");
    REQUIRE(run_trainer(common + " -x 3 -C top:4 -o " + save, &out) == 0);
    CHECK(has(out, strprintf("trainable_params: %zu", (size_t)2 * 8 * (32 + 96) + 2 * 8 * (32 + 32) + 2 * 8 * (32 + 128) + 2 * 8 * (128 + 32) + 4 * 32).c_str()));
    CHECK(has(file_string(save + "/adapter_config.json"), "\"trainable_token_indices\": ["));
    REQUIRE(run_trainer(common + " -x 0 -v 1 -A " + save + "/adapter.bin -M " + dir.file("merged.bin"), &out) == 0);
    CHECK(run_trainer(common + " -x 1 -C 5 -A " + save + "/adapter.bin", &out) != 0);
    CHECK(has(out, "-C"));
}


TEST_CASE("the trainer binary: bad inputs exit non-zero with a message naming the flag or file; good input trains") {
    TempDir dir;
    std::string ckpt = dir.file("tiny.bin"), tokens = dir.file("tokens.bin");
    write_tiny_checkpoint(ckpt);
    // a learnable stream: a fixed cycle through the vocabulary
    write_cycle_tokens(tokens, 400);
    std::string common = trainer_args(ckpt, tokens);
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
    CHECK(run_trainer(common + " -y -1", &out) != 0);
    CHECK(has(out, "-y"));
    CHECK(run_trainer(common + " -z 1.5", &out) != 0);
    CHECK(has(out, "-z"));
    CHECK(run_trainer(common + " -G -1", &out) != 0);
    CHECK(has(out, "-G"));
    CHECK(run_trainer(common + " -I 1", &out) != 0);
    CHECK(has(out, "unknown flag"));
    CHECK(run_trainer(common + " -b abc", &out) != 0);
    CHECK(has(out, "-b"));

    std::vector<uint16_t> bad_ids(400);
    for (size_t i = 0; i < bad_ids.size(); i++) bad_ids[i] = (uint16_t)((i * 7) % 61);
    bad_ids[17] = 61; // one id past the vocabulary
    write_tokens(dir.file("bad_tokens.bin"), bad_ids);
    CHECK(run_trainer("-e " + ckpt + " -i " + dir.file("bad_tokens.bin") + " -j " + tokens + " -b 2 -t 8", &out) != 0);
    CHECK(has(out, "-i"));
    CHECK(has(out, "id 61"));

    // and a good run trains: the loss falls
    CHECK(run_trainer(common + " -x 30 -l 0.01 -c " + dir.file("no_tokenizer.bin"), &out) != 0); // named but missing tokenizer
    CHECK(has(out, "-c"));
    int rc = run_trainer(common + " -x 40 -l 0.01", &out);
    CHECK(rc == 0);
    CHECK(has(out, "step 40/40"));
    float first = -1, last = -1;
    size_t p1 = out.find("first train loss: "), p2 = out.find("last train loss: ");
    REQUIRE(p1 != std::string::npos);
    REQUIRE(p2 != std::string::npos);
    first = strtof(out.c_str() + p1 + 18, NULL);
    last = strtof(out.c_str() + p2 + 17, NULL);
    MESSAGE("trainer binary, 40 LoRA steps on a cyclic stream: loss " << first << " -> " << last);
    CHECK(last < 0.5f * first);
}

TEST_CASE("the trainer binary: -V, -Q and -P refuse bad values naming the flag; the variants combined train") {
    TempDir dir;
    std::string ckpt = dir.file("tiny.bin"), tokens = dir.file("tokens.bin");
    write_tiny_checkpoint(ckpt);
    write_cycle_tokens(tokens, 400);
    std::string common = trainer_args(ckpt, tokens);
    std::string out;
    CHECK(run_trainer(common + " -V lorax", &out) != 0);
    CHECK(has(out, "-V"));
    CHECK(has(out, "HINT"));
    CHECK(run_trainer(common + " -Q int4", &out) != 0);
    CHECK(has(out, "-Q"));
    CHECK(run_trainer(common + " -P 0", &out) != 0);
    CHECK(has(out, "-P"));
    CHECK(run_trainer(common + " -f 1 -Q nf4", &out) != 0);
    CHECK(has(out, "-Q"));
    CHECK(run_trainer(common + " -x 10 -v 10 -l 0.01 -V rslora,dora,pissa -Q nf4 -P 4", &out) == 0);
    CHECK(has(out, "variant: rslora, dora, pissa init, base nf4, lora+ (lr_B = 4"));
    CHECK(has(out, "base_matrices_bytes: "));
    size_t p1 = out.find("\nval loss "), p2 = out.find("final val loss: ");
    REQUIRE(p1 != std::string::npos);
    REQUIRE(p2 != std::string::npos);
    float first = strtof(out.c_str() + p1 + 10, NULL), last = strtof(out.c_str() + p2 + 16, NULL);
    MESSAGE("trainer binary, -V rslora,dora,pissa -Q nf4 -P 4: val loss " << first << " -> " << last);
    CHECK(last < first);
}

TEST_CASE("the trainer binary: -F, -H, -X and -w train, and their bad values exit non-zero naming the flag") {
    TempDir dir;
    std::string ckpt = dir.file("tiny.bin"), tokens = dir.file("tokens.bin");
    write_tiny_checkpoint(ckpt);
    write_cycle_tokens(tokens, 400);
    std::string common = trainer_args(ckpt, tokens);
    std::string out;
    CHECK(run_trainer(common + " -F 99", &out) != 0); // the tiny model has 2 blocks
    CHECK(has(out, "-F"));
    CHECK(run_trainer(common + " -H -1", &out) != 0);
    CHECK(has(out, "-H"));
    CHECK(run_trainer(common + " -H 4 -X 2", &out) != 0);
    CHECK(has(out, "choose one method"));
    CHECK(run_trainer(common + " -w 0.1", &out) != 0); // L2-SP needs -f 1
    CHECK(has(out, "-w"));
    // each method trains: the validation loss (the same 5 batches before and after) falls on the cyclic stream
    for (std::string flags : {" -F 1 -l 0.01", " -H 4 -l 0.01", " -X 2 -l 0.2", " -f 1 -w 0.01 -l 0.01"}) {
        CAPTURE(flags);
        CHECK(run_trainer(common + " -x 20 -v 20" + flags, &out) == 0);
        size_t p1 = out.find("\nval loss "), p2 = out.find("final val loss: ");
        REQUIRE(p1 != std::string::npos);
        REQUIRE(p2 != std::string::npos);
        float first = strtof(out.c_str() + p1 + 10, NULL), last = strtof(out.c_str() + p2 + 16, NULL);
        MESSAGE("trainer binary" << flags << ": val loss " << first << " -> " << last);
        CHECK(last < first);
        CHECK(has(out, "bytes: params "));
    }
}

TEST_CASE("the trainer binary: -B 1 (BitFit) trains the biases and saves them small and merged; bad -B, -B with -Q or another method exit naming the flag") {
    TempDir dir;
    std::string ckpt = dir.file("tiny.bin"), tokens = dir.file("tokens.bin");
    write_tiny_checkpoint(ckpt);
    write_cycle_tokens(tokens, 400);
    std::string common = trainer_args(ckpt, tokens);
    std::string out;
    CHECK(run_trainer(common + " -B 2", &out) != 0);
    CHECK(has(out, "flag -B"));
    CHECK(run_trainer(common + " -B 1 -Q int8", &out) != 0);
    CHECK(has(out, "flag -Q"));
    CHECK(run_trainer(common + " -B 1 -H 4", &out) != 0);
    CHECK(has(out, "choose one method"));
    CHECK(run_trainer(common + " -x 20 -v 20 -B 1 -l 0.01 -o " + dir.path, &out) == 0);
    CHECK(has(out, "[BitFit]"));
    size_t p1 = out.find("\nval loss "), p2 = out.find("final val loss: ");
    REQUIRE(p1 != std::string::npos);
    REQUIRE(p2 != std::string::npos);
    float first = strtof(out.c_str() + p1 + 10, NULL), last = strtof(out.c_str() + p2 + 16, NULL);
    MESSAGE("trainer binary -B 1: val loss " << first << " -> " << last);
    CHECK(last < first);
    // method.bin holds the biases only (7 tensors); model.bin is the base with them merged
    std::string method = file_string(dir.file("method.bin"));
    GPT2<float> base, merged;
    REQUIRE(gpt2_read_checkpoint(&base, ckpt.c_str()) == "");
    REQUIRE(gpt2_read_checkpoint(&merged, dir.file("model.bin").c_str()) == "");
    int L = base.config.num_layers, C = base.config.channels;
    size_t n_biases = (size_t)L * 11 * C + C;
    REQUIRE(method.size() == 1024 + n_biases * 4);
    int header[7];
    memcpy(header, method.data(), sizeof(header));
    CHECK(header[2] == 3);
    CHECK(header[6] == (int)n_biases);
    size_t p = 0, k = 0, weights_differ = 0, biases_match = 0, biases_moved = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        for (size_t j = 0; j < base.param_sizes[i]; j++, p++) {
            if (!param_tensor_is_bias(i)) { weights_differ += merged.params_memory[p] != base.params_memory[p]; continue; }
            float saved;
            memcpy(&saved, method.data() + 1024 + 4 * k++, 4);
            biases_match += saved == merged.params_memory[p];
            biases_moved += saved != base.params_memory[p];
        }
    }
    CHECK(weights_differ == 0);
    CHECK(biases_match == n_biases);
    CHECK(biases_moved > n_biases / 2);
    gpt2_free(&base);
    gpt2_free(&merged);
}

// -- saving, resuming, merging, combining adapters and generating through the binary

TEST_CASE("the trainer binary: -D and -R train with every method, -A resumes a dropout run with the same losses and -D from adapter.bin; bad -D / -R exit naming the flag") {
    TempDir dir;
    std::string ckpt = dir.file("tiny.bin"), tokens = dir.file("tokens.bin");
    write_tiny_checkpoint(ckpt);
    write_cyclic_tokens(tokens, 400);
    std::string common = trainer_args(ckpt, tokens);
    std::string out;
    // outside [0, 1), or where it does not apply: the flag, what is wrong, a HINT
    for (std::string flags : {" -D 1", " -D -0.1", " -D 1.5", " -D nan", " -f 1 -D 0.1", " -H 4 -D 0.1", " -V dora -D 0.1", " -V adalora -r 4 -Z 2 -D 0.1"}) {
        CAPTURE(flags);
        CHECK(run_trainer(common + " -x 2" + flags, &out) != 0);
        CHECK(has(out, "flag -D"));
        CHECK(has(out, "HINT"));
    }
    for (std::string flags : {" -R 1", " -R -0.5", " -R 2"}) {
        CAPTURE(flags);
        CHECK(run_trainer(common + " -x 2" + flags, &out) != 0);
        CHECK(has(out, "flag -R"));
        CHECK(has(out, "HINT"));
    }
    CHECK(run_trainer(common + " -x 2 -D 1", &out) != 0);
    CHECK(has(out, "flag -D: LoRA dropout must be in [0, 1), got 1"));
    CHECK(run_trainer(common + " -x 2 -R 1", &out) != 0);
    CHECK(has(out, "flag -R: GPT-2's dropout must be in [0, 1), got 1"));
    // each method trains with GPT-2's dropouts, LoRA with its own too; the log names them
    for (std::string flags : {" -D 0.1", " -D 0.1 -R 0.1", " -f 1 -R 0.1", " -H 4 -R 0.1", " -X 2 -R 0.1", " -B 1 -R 0.1", " -V rslora,pissa -D 0.1 -Q int8"}) {
        CAPTURE(flags);
        CHECK(run_trainer(common + " -x 3 -l 0.01" + flags, &out) == 0);
        CHECK(has(out, "step 3/3: train loss "));
        CHECK(has(out, has(flags, "-R") ? "dropout: 0.1 (GPT-2's" : "dropout: 0 (GPT-2's"));
        if (has(flags, "-D")) CHECK(has(out, "lora_dropout: 0.1\n"));
    }
    // resume: -D comes back from adapter.bin (no -D given), -R is given again; the steps after the save
    // have the losses of the uninterrupted run, bit for bit (the masks are the step's, not the process's)
    std::string resume = common + " -j " + tokens + " -u 1 -l 0.01 -R 0.1";
    std::string out_a, out_c;
    REQUIRE(run_trainer(resume + " -D 0.1 -x 6 -o " + dir.file("a"), &out_a) == 0);
    REQUIRE(run_trainer(resume + " -D 0.1 -x 3 -o " + dir.file("b"), &out) == 0);
    REQUIRE(run_trainer(resume + " -x 6 -A " + dir.file("b/adapter.bin"), &out_c) == 0);
    CHECK(has(out_c, "lora_dropout: 0.1\n"));
    std::vector<std::string> la = step_losses(out_a, 4, 6, 6), lc = step_losses(out_c, 4, 6, 6);
    MESSAGE("dropout run, steps 4..6, uninterrupted: " << la[0] << " " << la[1] << " " << la[2] << "; resumed: " << lc[0] << " " << lc[1] << " " << lc[2]);
    CHECK(la[0] != "missing");
    CHECK(la == lc);
    // -D over the file's value: -D 0 resumes without the branch's dropout, and the losses part ways
    REQUIRE(run_trainer(resume + " -D 0 -x 6 -A " + dir.file("b/adapter.bin"), &out) == 0);
    CHECK(has(out, "lora_dropout: 0\n"));
    CHECK(step_losses(out, 4, 6, 6) != la);
    // the PEFT config carries it too
    CHECK(has(file_string(dir.file("a/adapter_config.json")), "\"lora_dropout\": 0.1,"));
}

TEST_CASE("the trainer binary: -o/-k save, -A resumes with the same losses, bad adapters fail cleanly, -M merges") {
    TempDir dir;
    std::string ckpt = dir.file("tiny.bin"), tokens = dir.file("tokens.bin");
    write_tiny_checkpoint(ckpt);
    write_cyclic_tokens(tokens, 400);
    std::string common = "-i " + tokens + " -j " + tokens + " -b 2 -t 8 -v 3 -s 0 -u 1 -l 0.01";
    std::string out, out_a, out_c;
    for (const char* sub : {"a", "b", "k"}) REQUIRE(mkdir(dir.file(sub).c_str(), 0755) == 0);

    REQUIRE(run_trainer("-e " + ckpt + " " + common + " -x 6 -o " + dir.file("a"), &out_a) == 0);
    REQUIRE(run_trainer("-e " + ckpt + " " + common + " -x 3 -o " + dir.file("b"), &out) == 0);
    CHECK(has(out, "saved adapter (step 3)"));
    int rc = run_trainer("-e " + ckpt + " " + common + " -x 6 -A " + dir.file("b/adapter.bin"), &out_c);
    CHECK(rc == 0);
    CHECK(has(out_c, "step 3, with optimizer state"));
    std::vector<std::string> la = step_losses(out_a, 4, 6, 6), lc = step_losses(out_c, 4, 6, 6);
    MESSAGE("steps 4..6, uninterrupted: " << la[0] << " " << la[1] << " " << la[2] << "; resumed: " << lc[0] << " " << lc[1] << " " << lc[2]);
    CHECK(la[0] != "missing");
    CHECK(la == lc);
    CHECK(!has(out_c, "step 3/6")); // the resumed run starts at step 4

    CHECK(run_trainer("-e " + ckpt + " " + common + " -x 4 -k 2 -o " + dir.file("k"), &out) == 0);
    CHECK(has(out, "saved adapter (step 2)"));
    CHECK(has(out, "saved adapter (step 4)"));
    CHECK(run_trainer("-e " + ckpt + " " + common + " -x 2 -A " + dir.file("b/adapter.bin"), &out) != 0); // already at step 3
    CHECK(has(out, "-x"));

    // corrupt and foreign adapters: non-zero exit, a message naming -A and the file, and the file untouched
    std::vector<char> good = read_all(dir.file("b/adapter.bin"));
    write_bytes(dir.file("trunc.bin"), good.data(), good.size() - 4);
    CHECK(run_trainer("-e " + ckpt + " " + common + " -x 4 -A " + dir.file("trunc.bin"), &out) != 0);
    CHECK(has(out, "-A"));
    CHECK(has(out, "trunc.bin"));
    CHECK(has(out, "truncated"));
    std::string other = dir.file("other.bin");
    {
        GPT2<float> m;
        build_trainable_tiny(&m, 82);
        REQUIRE(gpt2_write_checkpoint(&m, other.c_str()) == "");
        gpt2_free(&m);
    }
    CHECK(run_trainer("-e " + other + " " + common + " -x 4 -A " + dir.file("b/adapter.bin"), &out) != 0);
    CHECK(has(out, "belongs to another base"));
    CHECK(read_all(dir.file("b/adapter.bin")) == good);
    // an unwritable output keeps the old adapter
    REQUIRE(mkdir(dir.file("b/adapter.bin.tmp").c_str(), 0755) == 0);
    CHECK(run_trainer("-e " + ckpt + " " + common + " -x 1 -o " + dir.file("b"), &out) != 0);
    CHECK(has(out, "-o"));
    CHECK(read_all(dir.file("b/adapter.bin")) == good);

    // -M with -x 0 merges without training data; the merged checkpoint trains as a plain base
    std::string merged = dir.file("merged.bin");
    CHECK(run_trainer("-e " + ckpt + " -x 0 -A " + dir.file("a/adapter.bin") + " -M " + merged, &out) == 0);
    CHECK(has(out, "wrote merged checkpoint"));
    CHECK(run_trainer("-e " + merged + " " + common + " -x 1", &out) == 0);
    CHECK(run_trainer("-e " + ckpt + " -x 0 -A " + dir.file("a") + " -M " + merged, &out) == 0); // from the PEFT export
    // a malformed PEFT export: non-zero exit naming -A and the safetensors file
    REQUIRE(mkdir(dir.file("peft_bad").c_str(), 0755) == 0);
    std::vector<char> st = read_all(dir.file("a/adapter_model.safetensors")), config = read_all(dir.file("a/adapter_config.json"));
    write_bytes(dir.file("peft_bad/adapter_model.safetensors"), st.data(), st.size() - 4);
    write_bytes(dir.file("peft_bad/adapter_config.json"), config.data(), config.size());
    CHECK(run_trainer("-e " + ckpt + " -x 0 -A " + dir.file("peft_bad") + " -M " + merged, &out) != 0);
    CHECK(has(out, "-A"));
    CHECK(has(out, "peft_bad/adapter_model.safetensors"));
    CHECK(has(out, "HINT"));
    // bad flags
    CHECK(run_trainer("-e " + ckpt + " " + common + " -x 1 -k 2", &out) != 0);
    CHECK(has(out, "-k"));
    CHECK(run_trainer("-e " + ckpt + " " + common + " -x 1 -o " + dir.file("a") + " -N /abs/path", &out) != 0);
    CHECK(has(out, "-N"));
    CHECK(run_trainer("-e " + ckpt + " " + common + " -x 1 -f 1 -A " + dir.file("a/adapter.bin"), &out) != 0);
    CHECK(has(out, "-A"));
    CHECK(run_trainer("-e " + ckpt + " -p hello -E " + dir.file("no_bpe"), &out) != 0); // default -t 64 > maxT: clamped for -p
    CHECK(has(out, "-E"));
    CHECK(has(out, "no_bpe"));
    CHECK(run_trainer("-e " + ckpt + " -p hello -T 0", &out) != 0);
    CHECK(has(out, "-T"));
}

TEST_CASE("the trainer binary with -Q: smaller [Memory] parameters, -A resumes quantized with the same losses, -M writes the dequantized merge") {
    TempDir dir;
    std::string ckpt = dir.file("tiny.bin"), tokens = dir.file("tokens.bin");
    write_tiny_checkpoint(ckpt);
    write_cyclic_tokens(tokens, 400);
    std::string common = "-e " + ckpt + " -i " + tokens + " -j " + tokens + " -b 2 -t 8 -v 3 -s 0 -u 1 -l 0.01";
    for (const char* sub : {"a", "b"}) REQUIRE(mkdir(dir.file(sub).c_str(), 0755) == 0);
    std::string out_fp32, out_a, out_b, out_c, out;
    REQUIRE(run_trainer(common + " -x 6", &out_fp32) == 0);
    REQUIRE(run_trainer(common + " -x 6 -Q int8 -o " + dir.file("a"), &out_a) == 0);
    auto params_bytes = [](const std::string& log) {
        size_t at = log.find("bytes: params ");
        return at == std::string::npos ? 0ull : strtoull(log.c_str() + at + 14, NULL, 10);
    };
    MESSAGE("[Memory] params bytes: fp32 " << params_bytes(out_fp32) << ", int8 " << params_bytes(out_a));
    CHECK(params_bytes(out_a) > 0);
    CHECK(params_bytes(out_a) < params_bytes(out_fp32));
    CHECK(has(out_a, "quantized from"));
    REQUIRE(run_trainer(common + " -x 3 -Q int8 -o " + dir.file("b"), &out_b) == 0);
    // -A alone: the adapter says int8, the base file's checksum matches
    REQUIRE(run_trainer(common + " -x 6 -A " + dir.file("b/adapter.bin"), &out_c) == 0);
    CHECK(has(out_c, "base int8"));
    std::vector<std::string> la = step_losses(out_a, 4, 6, 6), lc = step_losses(out_c, 4, 6, 6);
    MESSAGE("-Q int8 steps 4..6, uninterrupted: " << la[0] << " " << la[1] << " " << la[2] << "; resumed: " << lc[0] << " " << lc[1] << " " << lc[2]);
    CHECK(la[0] != "missing");
    CHECK(la == lc);
    // -M from a quantized run: the dequantized base + adapters, which then loads as a plain base
    std::string merged = dir.file("merged.bin");
    CHECK(run_trainer("-e " + ckpt + " -x 0 -A " + dir.file("a/adapter.bin") + " -M " + merged, &out) == 0);
    CHECK(has(out, "wrote merged checkpoint"));
    CHECK(run_trainer("-e " + merged + " -i " + tokens + " -j " + tokens + " -b 2 -t 8 -v 0 -s 0 -x 1", &out) == 0);
    // -Q applies to LoRA only
    CHECK(run_trainer(common + " -x 1 -H 4 -Q nf4", &out) != 0);
    CHECK(has(out, "-Q"));
    CHECK(has(out, "HINT"));
}

TEST_CASE("the trainer binary: several -A with -S weights merge to sum_k w_k scale_k lora_B_k lora_A_k; bad combinations exit naming the flag") {
    TempDir dir;
    std::string ckpt = dir.file("tiny.bin"), tokens = dir.file("tokens.bin");
    write_tiny_checkpoint(ckpt);
    write_cyclic_tokens(tokens, 400);
    std::string common = "-i " + tokens + " -j " + tokens + " -b 2 -t 8 -v 0 -s 0 -l 0.01";
    std::string out;
    for (const char* sub : {"a", "b", "d"}) REQUIRE(mkdir(dir.file(sub).c_str(), 0755) == 0);
    // two different adapters: rank, alpha and targets differ, and b is read from its PEFT export
    REQUIRE(run_trainer("-e " + ckpt + " " + common + " -x 3 -o " + dir.file("a"), &out) == 0);
    REQUIRE(run_trainer("-e " + ckpt + " " + common + " -x 3 -r 2 -a 3 -q qkv,fc -V rslora -o " + dir.file("b"), &out) == 0);
    const std::string paths[2] = {dir.file("a/adapter.bin"), dir.file("b")};
    const float weights[2] = {0.5f, -1.5f};
    std::string merged = dir.file("merged.bin");
    REQUIRE(run_trainer("-e " + ckpt + " -x 0 -A " + paths[0] + " -A " + paths[1] + " -S 0.5,-1.5 -M " + merged, &out) == 0);
    CHECK(has(out, "combined: 0.5 x "));

    // the reference: each adapter merged into the base on its own, with weight * its own scale
    GPT2<float> ref;
    REQUIRE(gpt2_read_checkpoint(&ref, ckpt.c_str()) == "");
    uint64_t base_sum = base_checksum(ref.params_memory, ref.num_parameters);
    float* base[LORA_NUM_TARGETS];
    base_matrices(&ref, base);
    int L = ref.config.num_layers, C = ref.config.channels;
    for (int k = 0; k < 2; k++) {
        GPT2<float> holder;
        REQUIRE(gpt2_read_checkpoint(&holder, ckpt.c_str()) == "");
        TrainState state;
        bool has_state = false;
        REQUIRE(lora_file_load(paths[k].c_str(), &holder, base_sum, &state, &has_state) == "");
        const LoRA<float>& a = holder.lora;
        for (int t = 0; t < LORA_NUM_TARGETS; t++) {
            if (a.lora_A[t] == NULL) continue;
            int in = lora_target_in(t, C), OC = lora_target_out(t, C), r = a.config.r;
            for (int l = 0; l < L; l++) {
                lora_merge(base[t] + (size_t)l * OC * in, a.lora_A[t] + (size_t)l * r * in, a.lora_B[t] + (size_t)l * OC * r,
                           weights[k] * a.config.scale, in, OC, r, +1);
            }
        }
        gpt2_free(&holder);
    }
    std::vector<float> got = checkpoint_params(merged);
    REQUIRE(got.size() == ref.num_parameters);
    double maxdiff = 0, maxdelta = 0;
    std::vector<float> base0 = checkpoint_params(ckpt);
    for (size_t i = 0; i < got.size(); i++) {
        maxdiff = std::max(maxdiff, (double)fabsf(got[i] - ref.params_memory[i]));
        maxdelta = std::max(maxdelta, (double)fabsf(ref.params_memory[i] - base0[i]));
    }
    const double tol_combine_merge = 1e-6; // fp32: one merge of rank r_a + r_b against two merges, summed in another order
    MESSAGE("combined merge vs two weighted merges: max |diff| " << maxdiff << " (largest change to the base " << maxdelta << ")");
    CHECK(maxdelta > 100 * tol_combine_merge); // the adapters did change the base, so the comparison means something
    CHECK(maxdiff < tol_combine_merge);
    gpt2_free(&ref);

    // bad combinations: non-zero exit naming the flag, with a hint
    CHECK(run_trainer("-e " + ckpt + " -x 0 -S 1 -M " + merged, &out) != 0);       // weights without adapters
    CHECK(has(out, "-S"));
    CHECK(run_trainer("-e " + ckpt + " -x 0 -A " + paths[0] + " -S 1,2 -M " + merged, &out) != 0); // 2 weights, 1 adapter
    CHECK(has(out, "2 weights for 1 adapters"));
    CHECK(run_trainer("-e " + ckpt + " -x 0 -A " + paths[0] + " -S 0.5x -M " + merged, &out) != 0);
    CHECK(has(out, "-S"));
    CHECK(has(out, "HINT"));
    CHECK(run_trainer("-e " + ckpt + " " + common + " -x 2 -A " + paths[0] + " -A " + paths[1], &out) != 0); // no training on a combination
    CHECK(has(out, "-A"));
    CHECK(has(out, "HINT"));
    CHECK(run_trainer("-e " + ckpt + " -x 0 -A " + paths[0] + " -A " + paths[1] + " -Q int8 -M " + merged, &out) != 0);
    CHECK(has(out, "-Q"));
    REQUIRE(run_trainer("-e " + ckpt + " " + common + " -x 1 -V dora -o " + dir.file("d"), &out) == 0);
    CHECK(run_trainer("-e " + ckpt + " -x 0 -A " + paths[0] + " -A " + dir.file("d/adapter.bin") + " -M " + merged, &out) != 0);
    CHECK(has(out, "DoRA"));
    CHECK(has(out, "adapter 2 of 2"));
}

TEST_CASE("multi-adapter generation (-Y 1): each sequence of the batch generates what its adapter alone generates; bad -Y exits naming the flag") {
    const int T = 8, n = 2 * T; // past the allocated T, where the window slides
    GPT2<float> multi;
    build_trainable_tiny(&multi, 171);
    int L = multi.config.num_layers, C = multi.config.channels;
    LoRA<float> adapters[3];
    make_three_adapters(adapters, L, C);
    for (int k = 0; k < 3; k++) randomize_lora_B(&adapters[k], L, C, 180 + k, 3.0); // strong enough to change the greedy tokens
    const LoRA<float>* ptrs[3] = {&adapters[0], &adapters[1], &adapters[2]};
    const int index[3] = {0, 1, 2};
    lora_multi_set(&multi.lora, ptrs, index, T, L, C);
    gpt2_allocate(&multi, 3, T);
    const std::vector<int> prompt = {5, 17, 42};
    Rng rng;
    rng_seed(&rng, 172);
    // greedy (top-k 1), so the sampler's random numbers, consumed in another order, play no part
    std::vector<std::vector<int>> batch = gpt2_generate_multi(&multi, prompt, 3, n, &rng, 1.0f, 1);
    REQUIRE(batch.size() == 3);
    int differing = 0; // the adapters must matter, or the comparison shows nothing
    for (int k = 0; k < 3; k++) {
        CAPTURE(k);
        GPT2<float> single;
        build_trainable_tiny(&single, 171);
        gpt2_lora_attach(&single, adapters[k].config, 0);
        memcpy(single.lora.params_memory, adapters[k].params_memory, adapters[k].num_parameters * sizeof(float));
        gpt2_allocate(&single, 1, T);
        std::vector<int> alone = gpt2_generate(&single, prompt, n, &rng, 1.0f, 1);
        CHECK(batch[k] == alone);
        if (k > 0 && batch[k] != batch[0]) differing++;
        gpt2_free(&single);
    }
    CHECK(differing > 0);
    multi.lora.multi = NULL; // the holder owns nothing
    gpt2_free(&multi);
    for (int k = 0; k < 3; k++) lora_free(&adapters[k]);

    // the flag: -Y 1 needs -p and -A, and no -S / -M / -o; only 0 or 1
    TempDir dir;
    std::string ckpt = dir.file("tiny.bin"), out;
    write_tiny_checkpoint(ckpt);
    CHECK(run_trainer("-e " + ckpt + " -x 0 -Y 2 -p hi -A a", &out) != 0);
    CHECK(has(out, "-Y"));
    CHECK(run_trainer("-e " + ckpt + " -x 0 -Y 1 -A a -A b -M " + dir.file("m.bin"), &out) != 0); // no -p
    CHECK(has(out, "-Y"));
    CHECK(has(out, "HINT"));
    CHECK(run_trainer("-e " + ckpt + " -x 0 -Y 1 -p hi -A a -A b -S 0.5,0.5", &out) != 0);
    CHECK(has(out, "-Y"));
}

// -- reliability: the non-finite guard, an unwritable output, Ctrl-C (finish the step, save, exit 130)

TEST_CASE("the trainer binary: -Q bf16 trains and names its matmul path, reads llm.c's bf16 checkpoints, and refuses -f 1 and bad bf16 files") {
    TrainerFiles tf;
    std::string out;
    CHECK(run_trainer(tf.common + " -x 1 -Q bf16 -f 1", &out) != 0);
    CHECK(has(out, "-Q"));
    CHECK(has(out, "-f 1"));
    CHECK(has(out, "HINT"));
    CHECK(run_trainer(tf.common + " -x 1 -Q bf16 -F 1", &out) != 0); // freezing trains the top blocks' weights
    CHECK(has(out, "-Q"));
    REQUIRE(run_trainer(tf.common + " -x 10 -v 10 -l 0.01 -Q bf16", &out) == 0);
    CHECK(has(out, "variant: lora, base bf16"));
    CHECK(has(out, "bf16_matmul: "));
    CHECK(has(out, "quantized from"));
    size_t p1 = out.find("\nval loss "), p2 = out.find("final val loss: ");
    REQUIRE(p1 != std::string::npos);
    REQUIRE(p2 != std::string::npos);
    float first = strtof(out.c_str() + p1 + 10, NULL), last = strtof(out.c_str() + p2 + 16, NULL);
    MESSAGE("trainer binary, -Q bf16: val loss " << first << " -> " << last);
    CHECK(last < first);
    // llm.c's bf16 checkpoint: with -Q bf16, and without (widened to fp32)
    std::string v5 = tf.dir.file("bf16.bin");
    {
        GPT2<float> m;
        REQUIRE(gpt2_read_checkpoint(&m, tf.ckpt.c_str()) == "");
        write_bf16_checkpoint(&m, v5);
        gpt2_free(&m);
    }
    std::string v5_args = trainer_args(v5, tf.tokens);
    CHECK(run_trainer(v5_args + " -x 2 -Q bf16", &out) == 0);
    CHECK(run_trainer(v5_args + " -x 2", &out) == 0);
    // a truncated one, and one of another version: exit non-zero naming the flag and the file
    std::vector<char> bytes = read_all(v5);
    write_bytes(tf.dir.file("trunc.bin"), bytes.data(), bytes.size() - 2);
    CHECK(run_trainer(trainer_args(tf.dir.file("trunc.bin"), tf.tokens) + " -x 1 -Q bf16", &out) != 0);
    CHECK(has(out, "-e"));
    CHECK(has(out, "truncated"));
    ((int*)bytes.data())[1] = 4;
    write_bytes(tf.dir.file("v4.bin"), bytes.data(), bytes.size());
    CHECK(run_trainer(trainer_args(tf.dir.file("v4.bin"), tf.tokens) + " -x 1 -Q bf16", &out) != 0);
    CHECK(has(out, "version 4"));
    CHECK(has(out, "HINT"));
}

TEST_CASE("non-finite guard in the trainer: inf weights or a blown-up lr stop it, naming the step; the saved adapter stays the last good one") {
    // final layernorm gain 1e38: its outputs and the logits overflow to inf at the first forward, so the
    // loss is NaN at step 1 (scaling wte instead would not do: the layernorms renormalise it away)
    TrainerFiles inf_base(1e38f);
    std::string out;
    CHECK(run_trainer(inf_base.common + " -x 5", &out) != 0);
    CHECK(has(out, "at step 1"));
    CHECK(has(out, "stopping before the update"));
    CHECK(has(out, "HINT"));
    CHECK_FALSE(has(out, "step 1/5")); // the bad step never completed

    // lr 1e38: step 1 is finite but throws every adapter weight to ~1e38, so step 2's forward overflows.
    // With -k 1 the adapter after step 1 is saved; the guard must stop step 2 before anything else is saved.
    TrainerFiles files;
    std::string outdir = files.dir.file("out");
    REQUIRE(mkdir(outdir.c_str(), 0755) == 0);
    int rc = run_trainer(files.common + " -x 6 -k 1 -l 1e38 -o " + outdir, &out);
    CHECK(rc != 0);
    size_t at = out.find("at step ");
    REQUIRE(at != std::string::npos);
    int bad_step = atoi(out.c_str() + at + 8);
    MESSAGE("lr 1e38: stopped at step " << bad_step);
    CHECK(bad_step >= 2);
    CHECK(has(out, ("saved adapter (step " + std::to_string(bad_step - 1) + ")").c_str()));
    GPT2<float> model;
    REQUIRE(gpt2_read_checkpoint(&model, files.ckpt.c_str()) == "");
    TrainState state;
    bool has_state = false;
    REQUIRE(lora_file_read((outdir + "/adapter.bin").c_str(), &model, files.base_sum(), &state, &has_state) == "");
    CHECK(has_state);
    CHECK(state.step == bad_step - 1); // the last good step, not the bad one
    size_t nonfinite = 0;
    for (size_t i = 0; i < model.lora.num_parameters; i++) nonfinite += !std::isfinite(model.lora.params_memory[i]);
    CHECK(nonfinite == 0);
    CHECK(tmp_files(outdir).empty());
    gpt2_free(&model);
}

TEST_CASE("unwritable output in the trainer: saving the adapter fails with a clear error naming -o; nothing is left") {
    // (disk full is the write_atomically test above: an RLIMIT_FSIZE cap on the trainer would also hit
    // what an MPI build's runtime writes at startup, before any adapter)
    TrainerFiles files;
    std::string out;
    // an output directory on sysfs, which refuses new files even to root
    int rc = run_trainer(files.common + " -x 1 -o /sys", &out);
    CHECK(rc != 0);
    CHECK(has(out, "-o"));
    CHECK(has(out, "/sys/adapter.bin"));
    CHECK(access("/sys/adapter.bin.tmp", F_OK) != 0);
}

TEST_CASE("SIGINT during training: the step finishes, the adapter is saved complete (no .tmp), exit status 130") {
    TrainerFiles files;
    std::string outdir = files.dir.file("out"), log = files.dir.file("log.txt");
    REQUIRE(mkdir(outdir.c_str(), 0755) == 0);
    const char* bin = getenv("TRAIN_BIN");
    std::string args = std::string(bin ? bin : "./train_gpt2_lora") + " " + files.common + " -x 1000000 -o " + outdir;
    std::string shell_cmd = "exec " + args; // built before fork: the child only calls async-signal-safe functions
    pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        // the child: output to the log file, then become the trainer
        int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0 || dup2(fd, 1) < 0 || dup2(fd, 2) < 0) _exit(127);
        execl("/bin/sh", "sh", "-c", shell_cmd.c_str(), (char*)NULL);
        _exit(127);
    }
    // wait (up to 5 minutes, for slow sanitizer builds) until training is under way, then interrupt
    bool started = false;
    for (int i = 0; i < 3000 && !started; i++) {
        started = has(file_string(log), "step 3/");
        if (!started) usleep(100 * 1000);
    }
    CHECK(started);
    kill(pid, SIGINT);
    int status = 0;
    REQUIRE(waitpid(pid, &status, 0) == pid);
    std::string out = file_string(log);
    MESSAGE("trainer after SIGINT: exited " << (WIFEXITED(status) ? WEXITSTATUS(status) : -1));
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 128 + SIGINT);
    size_t at = out.find("interrupted by SIGINT (Ctrl-C) after step ");
    REQUIRE(at != std::string::npos);
    int step = atoi(out.c_str() + at + strlen("interrupted by SIGINT (Ctrl-C) after step "));
    CHECK(step >= 3);
    CHECK(has(out, ("saved adapter (step " + std::to_string(step) + ")").c_str()));
    CHECK(has(out, "[Summary]"));
    CHECK(tmp_files(outdir).empty());
    // the saved files are complete: adapter.bin loads with its training state, the PEFT pair imports
    GPT2<float> model;
    REQUIRE(gpt2_read_checkpoint(&model, files.ckpt.c_str()) == "");
    TrainState state;
    bool has_state = false;
    CHECK(lora_file_read((outdir + "/adapter.bin").c_str(), &model, files.base_sum(), &state, &has_state) == "");
    CHECK(has_state);
    CHECK(state.step == step);
    CHECK(peft_import(outdir.c_str(), &model) == "");
    gpt2_free(&model);
    // and the run resumes from it
    std::string resumed;
    CHECK(run_trainer(files.common + " -x " + std::to_string(step + 2) + " -A " + outdir + "/adapter.bin", &resumed) == 0);
    CHECK(has(resumed, ("step " + std::to_string(step + 2) + "/" + std::to_string(step + 2)).c_str()));
}

// -- nothing a user trained is lost: outputs checked before any work, never a worse save over a
// better one, one run per -o, whole save sets through signals

// starts the trainer with args in the background, its output to log; env: "NAME=value " prefixes or ""
static pid_t start_trainer(const std::string& args, const std::string& log, const std::string& env = "") {
    const char* bin = getenv("TRAIN_BIN");
    std::string shell_cmd = env + "exec " + std::string(bin ? bin : "./train_gpt2_lora") + " " + args; // built before fork
    pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0 || dup2(fd, 1) < 0 || dup2(fd, 2) < 0) _exit(127);
        execl("/bin/sh", "sh", "-c", shell_cmd.c_str(), (char*)NULL);
        _exit(127);
    }
    return pid;
}

// waits (up to 5 minutes, for slow sanitizer builds) until the log holds text; false if it never does
static bool wait_for_log(const std::string& log, const char* text) {
    for (int i = 0; i < 3000; i++) {
        if (has(file_string(log), text)) return true;
        usleep(100 * 1000);
    }
    return false;
}

TEST_CASE("outputs are checked before any work: -o is created (mkdir -p); an unwritable, immutable or impossible -o and a -M into a missing directory fail at startup") {
    TrainerFiles files;
    std::string out;
    // created when missing, several levels deep (llm.c's behaviour; the README's examples rely on it)
    std::string deep = files.dir.file("runs/a/b");
    CHECK(run_trainer(files.common + " -x 2 -o " + deep, &out) == 0);
    CHECK(access((deep + "/adapter.bin").c_str(), F_OK) == 0);
    CHECK(access((deep + "/" SAVE_SET_FILE).c_str(), F_OK) == 0);
    // each refused before the first step: the error names the flag, has a HINT, and no step ran
    std::vector<std::pair<std::string, const char*>> cases = {
        {" -o " + files.dir.file("tokens.bin") + "/out", "-o"},    // a path under a regular file
        {" -o /sys", "-o"},                                         // sysfs: no new files, even for root
        {" -M " + files.dir.file("missing/merged.bin"), "-M"},     // -M into a missing directory
        {" -M " + files.dir.path, "-M"},                            // -M naming a directory
    };
    std::string imm = files.dir.file("immutable");
    REQUIRE(mkdir(imm.c_str(), 0755) == 0);
    bool immutable = system(("chattr +i '" + imm + "' 2>/dev/null").c_str()) == 0;
    if (immutable) cases.push_back({" -o " + imm, "-o"});
    else MESSAGE("skipped the immutable -o: chattr +i is not available here");
    for (const auto& c : cases) {
        CAPTURE(c.first);
        CHECK(run_trainer(files.common + " -x 50" + c.first, &out) != 0);
        CHECK(has(out, c.second));
        CHECK(has(out, "HINT"));
        CHECK_FALSE(has(out, "step 1/50"));
    }
    if (immutable && system(("chattr -i '" + imm + "'").c_str()) != 0) FAIL("could not clear the immutable flag of " << imm);
}

TEST_CASE("never destroy a better save: a run that does not train, or trains less, does not replace an adapter with optimizer state or a later step unless -O 1") {
    TrainerFiles files;
    std::string out, d = files.dir.file("d");
    REQUIRE(run_trainer(files.common + " -x 4 -o " + d, &out) == 0);
    CHECK(has(out, ("save set: " + d + "/" SAVE_SET_FILE + " (step 4, with optimizer state: end of training)").c_str()));
    std::vector<char> trained = read_all(d + "/adapter.bin");
    std::string ad = " -A " + d + "/adapter.bin";
    // no training: -M with -x 0 (and -p, which the tiny base cannot encode, takes the same path) would write weights only
    CHECK(run_trainer("-e " + files.ckpt + " -x 0 -M " + files.dir.file("m.bin") + ad + " -o " + d, &out) != 0);
    CHECK(has(out, "-o"));
    CHECK(has(out, "optimizer state"));
    CHECK(has(out, "-O 1"));
    // no training and no adapter: nothing to save at all
    CHECK(run_trainer("-e " + files.ckpt + " -x 0 -M " + files.dir.file("m.bin") + " -o " + files.dir.file("e"), &out) != 0);
    CHECK(has(out, "nothing to save"));
    // training fewer steps from scratch: step 2 would replace step 4
    CHECK(run_trainer(files.common + " -x 2 -o " + d, &out) != 0);
    CHECK(has(out, "step 4"));
    CHECK_FALSE(has(out, "step 1/2"));
    CHECK(read_all(d + "/adapter.bin") == trained);
    // the same step count again is no loss; resuming to a later step neither
    CHECK(run_trainer(files.common + " -x 6" + ad + " -o " + d, &out) == 0);
    CHECK(has(out, "saved adapter (step 6)"));
    // -O 1 says so: the weights-only save replaces it, and the log says what was replaced
    CHECK(run_trainer("-e " + files.ckpt + " -x 0 -M " + files.dir.file("m.bin") + ad + " -o " + d + " -O 1", &out) == 0);
    CHECK(has(out, "-O 1: replacing the save in"));
    CHECK(has(out, "no training in this run"));
    CHECK(run_trainer(files.common + " -x 1 -o " + d + " -O 2", &out) != 0);
    CHECK(has(out, "-O"));
}

TEST_CASE("two runs on one -o: the second refuses at once naming the other run; the first's saves stay whole") {
    TrainerFiles files;
    std::string d = files.dir.file("d"), log = files.dir.file("first.txt");
    pid_t pid = start_trainer(files.common + " -x 1000000 -k 2 -o " + d, log);
    CHECK(wait_for_log(log, "step 3/"));
    std::string out;
    CHECK(run_trainer(files.common + " -x 5 -o " + d, &out) != 0);
    CHECK(has(out, "in use by another run"));
    CHECK(has(out, ("pid " + std::to_string(pid)).c_str()));
    CHECK(has(out, "HINT"));
    CHECK_FALSE(has(out, "step 1/5"));
    kill(pid, SIGINT);
    int status = 0;
    REQUIRE(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status));
    CHECK(tmp_files(d).empty());
    // what the first run left loads, checked against its manifest; and -o is free again
    std::string resumed;
    CHECK(run_trainer(files.common + " -x 0 -A " + d + "/adapter.bin", &resumed) == 0);
    CHECK(run_trainer(files.common + " -x 2 -o " + files.dir.file("d2"), &out) == 0);
}

TEST_CASE("a signal during a save (the save slowed down): the set is finished, no .tmp is left, the files match their manifest") {
    TrainerFiles files;
    std::string d = files.dir.file("d"), log = files.dir.file("log.txt");
    // each save pauses 2 s after each of its files (TRAIN_GPT2_LORA_SLOW_SAVE_MS, for tests only), so the
    // second Ctrl-C, sent once the save's first file is in place, arrives while the save is being written,
    // however loaded the machine (this run saves only at its end, so adapter.bin appears with that save)
    pid_t pid = start_trainer(files.common + " -x 1000000 -o " + d, log, "TRAIN_GPT2_LORA_SLOW_SAVE_MS=2000 ");
    CHECK(wait_for_log(log, "step 3/"));
    kill(pid, SIGINT);
    CHECK(wait_for_log(log, "interrupted by SIGINT"));
    bool save_began = false;
    for (int i = 0; i < 3000 && !save_began; i++) { // at most 30 s
        save_began = access((d + "/adapter.bin").c_str(), F_OK) == 0;
        if (!save_began) usleep(10 * 1000);
    }
    CHECK(save_began);
    kill(pid, SIGINT);
    int status = 0;
    REQUIRE(waitpid(pid, &status, 0) == pid);
    std::string out = file_string(log);
    bool finished_save = has(out, "SIGINT (Ctrl-C) again during the save: the save set is complete; stopping now");
    std::string how = finished_save ? "arrived during the save, which finished" : "arrived before the save began: killed at once";
    MESSAGE("second SIGINT " << how);
    CHECK(finished_save); // sent after the save's first file, within the 2 s pause that follows it
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 128 + SIGINT);
    CHECK(tmp_files(d).empty());
    GPT2<float> model;
    REQUIRE(gpt2_read_checkpoint(&model, files.ckpt.c_str()) == "");
    TrainState state;
    bool has_state = false;
    CHECK(lora_file_load((d + "/adapter.bin").c_str(), &model, files.base_sum(), &state, &has_state) == ""); // checked against save_set.json
    CHECK(has_state);
    CHECK(lora_file_load(d.c_str(), &model, files.base_sum(), &state, &has_state) == "");
    gpt2_free(&model);
}

TEST_CASE("the binary's papercuts: -h/--help exit 0, every bad flag has a HINT, -r/-a/-q with -A refused, -v 0 needs no -j, -x 0 -A evaluates the saved adapter") {
    TrainerFiles files;
    std::string out;
    CHECK(run_trainer("-h", &out) == 0);
    CHECK(has(out, "Usage:"));
    CHECK(run_trainer("--help", &out) == 0);
    CHECK(has(out, "-O <0|1>"));
    for (std::string flags : {" -b 0", " -t 0", " -a 0", " -f 2", " -u 2", " -l -1", " -y -1", " -G -1", " -F -1", " -H -1",
                              " -X -1", " -d -1", " -x -1", " -v -1", " -m 0", " -s -1", " -g 0", " -k -1", " -T 0", " -K -1",
                              " -W 2", " -Y 2", " -O 2", " -Z 1", " -b", " --bogus 1", " -b x", " -l x", " -H 4 -X 2"}) {
        CAPTURE(flags);
        CHECK(run_trainer(files.common + flags, &out) != 0);
        CHECK(has(out, "HINT"));
    }
    std::string d = files.dir.file("d");
    REQUIRE(run_trainer(files.common + " -x 3 -v 3 -o " + d, &out) == 0);
    std::vector<double> vals = numbers_after(out, "final val loss: ");
    REQUIRE(vals.size() == 1);
    for (const char* flag : {" -r 4", " -a 8", " -q qkv"}) {
        CAPTURE(flag);
        CHECK(run_trainer(files.common + " -x 5 -A " + d + "/adapter.bin" + flag, &out) != 0);
        CHECK(has(out, "would be ignored"));
    }
    // -v 0: no validation file needed (the default -j is not read, whether data/ has it or not)
    CHECK(run_trainer("-e " + files.ckpt + " -i " + files.tokens + " -b 2 -t 8 -v 0 -s 0 -x 2", &out) == 0);
    CHECK(has(out, "val: (none: -v 0"));
    // -x 0 with a trained adapter: its validation loss where it was saved, the same as at the end of its run
    CHECK(run_trainer(files.common + " -x 0 -v 3 -A " + d + "/adapter.bin", &out) == 0);
    CHECK(has(out, "evaluate only"));
    std::vector<double> again = numbers_after(out, "final val loss: ");
    REQUIRE(again.size() == 1);
    const double tol_val = 0; // the same weights on the same batches, one process: bit for bit
    CHECK(fabs(again[0] - vals[0]) <= tol_val);
    CHECK_FALSE(has(out, "saved adapter"));
}

TEST_CASE("NaN in each file kind through the binary: -e, -A adapter.bin and -A PEFT exit naming the flag, the file and the tensor") {
    TrainerFiles files;
    std::string out, d = files.dir.file("d");
    REQUIRE(run_trainer(files.common + " -x 2 -o " + d, &out) == 0);
    float nan = std::numeric_limits<float>::quiet_NaN();
    std::vector<char> ck = read_all(files.ckpt);
    memcpy(ck.data() + 1024 + 3 * sizeof(float), &nan, 4); // wte, index 3
    write_bytes(files.dir.file("nan.bin"), ck.data(), ck.size());
    CHECK(run_trainer("-e " + files.dir.file("nan.bin") + " -x 0 -A " + d + "/adapter.bin -M " + files.dir.file("m.bin"), &out) != 0);
    CHECK(has(out, "flag -e"));
    CHECK(has(out, "tensor wte"));
    CHECK(has(out, "index 3"));
    std::vector<char> ad = read_all(d + "/adapter.bin");
    memcpy(ad.data() + 1024, &nan, 4); // the first weight
    write_bytes(files.dir.file("nan_adapter.bin"), ad.data(), ad.size());
    CHECK(run_trainer("-e " + files.ckpt + " -x 0 -A " + files.dir.file("nan_adapter.bin") + " -M " + files.dir.file("m.bin"), &out) != 0);
    CHECK(has(out, "flag -A"));
    CHECK(has(out, "nan_adapter.bin"));
    CHECK(has(out, "index 0"));
    REQUIRE(mkdir(files.dir.file("peft").c_str(), 0755) == 0);
    std::vector<char> st = read_all(d + "/" PEFT_WEIGHTS_FILE), cfg = read_all(d + "/" PEFT_CONFIG_FILE);
    memcpy(st.data() + st.size() - 4, &nan, 4); // the last value of the last tensor
    write_bytes(files.dir.file("peft/" PEFT_WEIGHTS_FILE), st.data(), st.size());
    write_bytes(files.dir.file("peft/" PEFT_CONFIG_FILE), cfg.data(), cfg.size());
    CHECK(run_trainer("-e " + files.ckpt + " -x 0 -A " + files.dir.file("peft") + " -M " + files.dir.file("m.bin"), &out) != 0);
    CHECK(has(out, "flag -A"));
    CHECK(has(out, PEFT_WEIGHTS_FILE));
    CHECK(has(out, "non-finite"));
    CHECK(access(files.dir.file("m.bin").c_str(), F_OK) != 0);
}

TEST_CASE("out-of-memory HINTs name the real cause: -X, -H and -b each blamed for their own allocation, before any step") {
    TrainerFiles files;
    std::string out;
    // each allocation is larger than any machine's memory (2 TB and more), so malloc_check refuses it at once
    struct Case { const char* flags; const char* blamed; const char* not_blamed; };
    for (Case c : {Case{" -X 2000000000", "prefix length (-X)", "-H"}, Case{" -H 2000000000", "(-H)", "-X"},
                   Case{" -b 100000000", "batch size (-b)", "-X"}}) {
        CAPTURE(c.flags);
        CHECK(run_trainer(files.common + " -x 5" + c.flags, &out) != 0);
        CHECK(has(out, "out of memory"));
        CHECK(has(out, c.blamed));
        CHECK_FALSE(has(out, c.not_blamed));
        CHECK_FALSE(has(out, "step 1/5"));
    }
    CHECK_FALSE(has(oom_hint("parameters"), "-b"));       // the model itself: the checkpoint (-e) and the method
    CHECK(has(oom_hint("parameters"), "-e"));
    CHECK(has(oom_hint("the key/value cache"), "-t"));
}

TEST_CASE("-p streams its tokens into the same output as before: the prompt, then exactly the text generate_from_prompt returns") {
    BPE bpe;
    bpe.print_errors = false;
    if (bpe_load_default(&bpe) != 0) {
        MESSAGE("skipped: no GPT-2 BPE files (make data fetches them): " << bpe.error);
        return;
    }
    TempDir dir;
    GPT2Config cfg = tiny_config(); // GPT-2's vocabulary on a tiny body, so that BPE ids fit
    cfg.vocab_size = 50257;
    cfg.padded_vocab_size = 50304;
    GPT2<float> model;
    gpt2_build_random(&model, cfg, 961);
    for (size_t i = 0; i < model.param_sizes[0]; i++) model.params.wte[i] *= 10;
    std::string ckpt = dir.file("vocab_base.bin");
    REQUIRE(gpt2_write_checkpoint(&model, ckpt.c_str()) == "");
    // in process: greedy (-K 1), context 16 (-t is clamped to maxT), the binary's seed + 1; the binary's new
    // adapter has lora_B = 0, so its merged weights are the base's exactly
    gpt2_allocate(&model, 1, cfg.max_seq_len);
    Rng rng;
    rng_seed(&rng, 1337 + 1);
    std::string text;
    REQUIRE(generate_from_prompt(&model, &bpe, "The king", 12, 1.0f, 1, &rng, &text) == "");
    std::string out;
    CHECK(run_trainer("-e " + ckpt + " -p 'The king' -g 12 -K 1", &out) == 0);
    CHECK(has(out, ("context: 16\n---\nThe king" + text + "\n---\ngenerated 12 tokens").c_str()));
    gpt2_free(&model);
}

// -- data parallel (MPI): 2 ranks with batch B each train exactly like one process with batch 2B.
// Runs only when make built the trainer with MPI (it then sets MPIRUN); skipped with a message otherwise.

TEST_CASE("data parallel: mpirun -np 2 with batch B per rank equals one process with batch 2B") {
    const char* mpirun = getenv("MPIRUN");
    if (mpirun == NULL || mpirun[0] == '\0') {
        MESSAGE("skipped: the trainer was built without MPI (no mpicxx, or NO_MPI=1)");
        return;
    }
    TempDir dir;
    std::string ckpt = dir.file("tiny.bin"), tokens = dir.file("tokens.bin");
    write_tiny_checkpoint(ckpt);
    // a learnable but not trivial stream: a cycle with a random token every few positions
    Rng rng;
    rng_seed(&rng, 14);
    std::vector<uint16_t> ids(3000);
    for (size_t i = 0; i < ids.size(); i++) ids[i] = (uint16_t)(i % 5 == 4 ? rng_u32(&rng) % 61 : (i * 7) % 61);
    write_tokens(tokens, ids);
    // shuffled batches (-u 1), so the test also covers that every rank visits the same global order
    std::string common = "-e " + ckpt + " -i " + tokens + " -j " + tokens + " -t 8 -x 12 -v 4 -m 3 -s 0 -u 1 -l 0.01 -r 8 -a 16 -n 1337";
    // --oversubscribe: 2 ranks even on a 1-core runner; one OpenMP thread per rank
    std::string launch = std::string(mpirun) + " --allow-run-as-root --oversubscribe -np 2 -x OMP_NUM_THREADS=1 " +
                         (getenv("TRAIN_BIN") ? getenv("TRAIN_BIN") : "./train_gpt2_lora");
    // The losses and weights of the two runs differ only by fp32 summation order (2B*T terms in one sum versus
    // two sums of B*T averaged; thread splits of the matmuls), about 1e-7 relative per step, amplified a little by
    // 12 AdamW steps at lr 1e-2. Losses are ~4; 1e-4 leaves two orders of margin yet catches a wrong shard,
    // which changes the loss in the second decimal.
    const double tol_loss = 1e-4;
    // Adapters: the runs end ~3e-7 apart relative to how far the adapters moved (measured); 1e-4 leaves room
    // for other thread counts yet catches a wrong shard (measured: relative 0.8).
    const double tol_adapter = 1e-4;
    // Full fine-tuning (-f 1) has weights whose true gradient is exactly zero: the key biases (softmax is
    // shift invariant). Their fp32 gradient is rounding noise, which AdamW normalizes into steps of ~lr, so
    // those 64 weights may differ by up to lr per step between the runs (measured: 7e-4 max, 2e-4 relative
    // over all weights). So -f compares the 2-norm of the difference relative to the update, at 2e-3.
    const double tol_full = 2e-3;

    for (int full = 0; full <= 1; full++) {
        CAPTURE(full);
        std::string single_dir = dir.file(full ? "single_f" : "single"), dp_dir = dir.file(full ? "dp_f" : "dp");
        REQUIRE(mkdir(single_dir.c_str(), 0755) == 0);
        REQUIRE(mkdir(dp_dir.c_str(), 0755) == 0);
        std::string args = common + " -f " + std::to_string(full);
        std::string one, two;
        REQUIRE(run_trainer(args + " -b 4 -o " + single_dir, &one) == 0);
        // run_trainer prefixes TRAIN_BIN; here the launch line replaces it
        std::string cmd = launch + " " + args + " -b 2 -o " + dp_dir + " 2>&1";
        FILE* p = popen(cmd.c_str(), "r");
        REQUIRE(p != NULL);
        char buf[4096];
        size_t n;
        while ((n = fread(buf, 1, sizeof(buf), p)) > 0) two.append(buf, n);
        int status = pclose(p);
        INFO("mpirun output:\n" << two);
        REQUIRE((WIFEXITED(status) && WEXITSTATUS(status) == 0));
        CHECK(has(two, "ranks: 2 (global batch 4"));
        CHECK(has(two, "allreduce"));
        CHECK(numbers_after(two, "[Run]").size() == 1); // only rank 0 logs

        std::vector<double> loss1 = numbers_after(one, ": train loss "), loss2 = numbers_after(two, ": train loss ");
        std::vector<double> val1 = numbers_after(one, "val loss "), val2 = numbers_after(two, "val loss ");
        REQUIRE(loss1.size() == 12);
        REQUIRE(loss2.size() == 12);
        REQUIRE(val1.size() == 4); // steps 0, 4, 8 and the end
        REQUIRE(val2.size() == 4);
        MESSAGE("data parallel (-f " << full << "): train loss " << loss1.front() << " -> " << loss1.back()
                << ", max |diff| 1 process vs 2 ranks: train " << max_abs_diff(loss1, loss2) << ", val " << max_abs_diff(val1, val2));
        CHECK(loss1.back() < loss1.front()); // it trains, so the comparison is not between two idle runs
        CHECK(max_abs_diff(loss1, loss2) <= tol_loss);
        CHECK(max_abs_diff(val1, val2) <= tol_loss);
        // the trained weights themselves, written by rank 0 only, atomically
        std::vector<float> w1, w2, w0;
        if (full) {
            w1 = checkpoint_params(single_dir + "/model.bin");
            w2 = checkpoint_params(dp_dir + "/model.bin");
            w0 = checkpoint_params(ckpt);
        } else {
            w1 = adapter_params(ckpt, single_dir);
            w2 = adapter_params(ckpt, dp_dir);
            GPT2<float> init; // the same seeded init both runs started from (-n default)
            REQUIRE(gpt2_read_checkpoint(&init, ckpt.c_str()) == "");
            gpt2_lora_attach(&init, lora_config(8, 16.0f, LORA_ALL_TARGETS), 1337);
            w0.assign(init.lora.params_memory, init.lora.params_memory + init.lora.num_parameters);
            gpt2_free(&init);
        }
        REQUIRE(w1.size() == w0.size());
        REQUIRE(w2.size() == w0.size());
        double rel = relative_distance(w1, w2, w0);
        MESSAGE("data parallel -f " << full << ": |w(1 process) - w(2 ranks)| / |w - w_init| = " << rel << " over " << w1.size() << " weights");
        CHECK(rel <= (full ? tol_full : tol_adapter));
        CHECK_FALSE(dir_has_tmp_file(dp_dir));
    }
}

TEST_CASE("data parallel: when one rank is killed the job ends with an error instead of hanging, and the saved adapter is whole") {
    const char* mpirun = getenv("MPIRUN");
    if (mpirun == NULL || mpirun[0] == '\0' || system("command -v pgrep >/dev/null") != 0) {
        MESSAGE("skipped: needs an MPI build of the trainer and pgrep");
        return;
    }
    TempDir dir;
    std::string ckpt = dir.file("tiny.bin"), tokens = dir.file("tokens.bin"), out = dir.file("out"), log = dir.file("log.txt");
    write_tiny_checkpoint(ckpt);
    write_cycle_tokens(tokens, 3000);
    REQUIRE(mkdir(out.c_str(), 0755) == 0);
    // a run far too long to finish, saving every step; once step 3 is logged, kill -9 the last rank (a direct
    // child of mpirun), then wait up to 60 s for mpirun to end. Still running then: the other rank hangs, so
    // the script kills the job itself and exits 124, which the test rejects (as 3: killed nothing).
    std::string run = std::string(mpirun) + " --allow-run-as-root --oversubscribe -np 2 -x OMP_NUM_THREADS=1 " +
                      (getenv("TRAIN_BIN") ? getenv("TRAIN_BIN") : "./train_gpt2_lora") + " -e " + ckpt + " -i " + tokens +
                      " -j " + tokens + " -b 2 -t 8 -x 1000000 -v 0 -s 0 -k 1 -o " + out;
    std::string script = run + " > " + log + " 2>&1 &\nM=$!\nn=0\n" +
        "while ! grep -q 'step 3/' " + log + "; do n=$((n+1)); if [ $n -gt 600 ] || ! kill -0 $M 2>/dev/null; then pkill -9 -P $M; kill -9 $M; exit 3; fi; sleep 0.1; done\n" +
        "kill -9 $(pgrep -P $M | tail -n 1)\nn=0\n" +
        "while kill -0 $M 2>/dev/null; do n=$((n+1)); if [ $n -gt 600 ]; then pkill -9 -P $M; kill -9 $M; exit 124; fi; sleep 0.1; done\n" +
        "wait $M\n";
    std::string script_path = dir.file("kill_one_rank.sh");
    write_bytes(script_path, script.data(), script.size());
    int status = system(("sh " + script_path).c_str());
    std::string output;
    for (char c : read_all(log)) output.push_back(c);
    INFO("mpirun output:\n" << output);
    REQUIRE(WIFEXITED(status));
    int rc = WEXITSTATUS(status);
    MESSAGE("killed rank: mpirun exit code " << rc);
    CHECK(rc != 0);
    CHECK(rc != 124); // the surviving rank hung
    CHECK(rc != 3);   // the run ended or stalled before step 3: nothing was killed
    CHECK(has(output, "signal 9"));
    CHECK_FALSE(dir_has_tmp_file(out));
    // the last adapter rank 0 saved is complete: it reads back
    adapter_params(ckpt, out);
}

TEST_CASE("the trainer binary: -L refuses other methods, -Y, an unwritable directory and a base without GPT-2's vocabulary, naming the flag") {
    TrainerFiles tf;
    std::string out;
    // -f 1 trains the base: there is no adapter to export
    CHECK(run_trainer(tf.common + " -x 1 -f 1 -L " + tf.dir.path, &out) != 0);
    CHECK(has(out, "flag -L"));
    CHECK(has(out, "HINT"));
    // a directory that cannot be made (under a regular file) is refused before any work; a missing one is made
    CHECK(run_trainer(tf.common + " -x 1 -L " + tf.ckpt + "/gguf", &out) != 0);
    CHECK(has(out, "flag -L"));
    CHECK(has(out, "HINT"));
    // the tiny base has V = 61: llama.cpp needs GPT-2's tokenizer, so this is refused before any step
    CHECK(run_trainer(tf.common + " -x 3 -L " + tf.dir.path, &out) != 0);
    CHECK((has(out, "flag -L") || has(out, "flag -E")));
    CHECK(has(out, "HINT"));
    CHECK_FALSE(has(out, "step 1/3"));
    CHECK(access(tf.dir.file("base.gguf").c_str(), F_OK) != 0);
}

TEST_CASE("the trainer binary with -V adalora: bad -Z / -U / -J and variant mixes fail naming the flag; a run logs the final ranks, saves, and -A reloads it (ours and PEFT's)") {
    TempDir dir;
    std::string ckpt = dir.file("tiny.bin"), tokens = dir.file("tokens.bin");
    write_tiny_checkpoint(ckpt);
    write_cycle_tokens(tokens, 400);
    std::string common = trainer_args(ckpt, tokens) + " -x 12";
    std::string out;
    CHECK(run_trainer(common + " -V adalora -r 4 -Z 5", &out) != 0); // the target rank above the initial one
    CHECK(has(out, "-Z"));
    CHECK(has(out, "initial rank"));
    CHECK(has(out, "HINT"));
    CHECK(run_trainer(common + " -V adalora -r 4 -Z 0", &out) != 0);
    CHECK(has(out, "-Z"));
    CHECK(run_trainer(common + " -Z 2", &out) != 0); // without -V adalora
    CHECK(has(out, "-V adalora"));
    CHECK(run_trainer(common + " -V adalora -U 1,2", &out) != 0);
    CHECK(has(out, "-U"));
    CHECK(run_trainer(common + " -V adalora -U 1,2,0", &out) != 0);
    CHECK(has(out, "-U"));
    CHECK(run_trainer(common + " -V adalora -U 8,4,1", &out) != 0); // tinit >= total_step - tfinal
    CHECK(has(out, "-U"));
    CHECK(has(out, "total_step"));
    CHECK(run_trainer(common + " -V adalora -J -1", &out) != 0);
    CHECK(has(out, "-J"));
    CHECK(run_trainer(common + " -V adalora,dora", &out) != 0);
    CHECK(has(out, "-V"));
    CHECK(has(out, "HINT"));

    std::string save = dir.file("ada");
    int rc = run_trainer(common + " -V adalora -r 4 -Z 2 -U 2,3,1 -l 0.01 -v 12 -m 2 -o " + save, &out);
    REQUIRE(rc == 0);
    CHECK(has(out, "adalora orth penalty"));
    // the final ranks: one fixed-format line per layer, every matrix at rank <= 4, 2 on average
    int total = 0, lines = 0;
    for (size_t p = out.find("adalora ranks layer "); p != std::string::npos; p = out.find("adalora ranks layer ", p + 1)) {
        int layer, q, a, f, fp;
        REQUIRE(sscanf(out.c_str() + p, "adalora ranks layer %d: qkv %d attproj %d fc %d fcproj %d", &layer, &q, &a, &f, &fp) == 5);
        CHECK(layer == lines);
        for (int k : {q, a, f, fp}) CHECK((k >= 0 && k <= 4));
        total += q + a + f + fp;
        lines++;
    }
    CHECK(lines == tiny_config().num_layers);
    CHECK(total == 2 * 4 * lines);
    size_t pv = out.find("final val loss: ");
    REQUIRE(pv != std::string::npos);
    std::string val = out.substr(pv, out.find('\n', pv) - pv);
    for (const std::string& from : {save + "/adapter.bin", save}) { // ours, then PEFT's directory
        CAPTURE(from);
        CHECK(run_trainer(trainer_args(ckpt, tokens) + " -x 0 -v 1 -m 2 -A " + from, &out) == 0);
        CHECK(has(out, val.c_str())); // the same validation loss, to the printed digit
    }
}

TEST_SUITE_END();

// ----------------------------------------------------------------------------
// layout: the product is the trainer, lora.h and lib/; dev/ is scratch, tools and fixtures

TEST_SUITE_BEGIN("layout");

// the quoted includes of a source file, as written
static std::vector<std::string> quoted_includes(const std::string& path) {
    std::vector<std::string> out;
    std::string text;
    std::string err = read_text_file(path.c_str(), "source file", "run the tests from the repository root", &text);
    REQUIRE_MESSAGE(err.empty(), err);
    size_t pos = 0;
    while ((pos = text.find("#include \"", pos)) != std::string::npos) {
        size_t begin = pos + 10, end = text.find('"', begin);
        REQUIRE(end != std::string::npos);
        out.push_back(text.substr(begin, end - begin));
        pos = end;
    }
    return out;
}

// dir/name with "." and ".." resolved, relative to the repository root
static std::string join_normalized(const std::string& dir, const std::string& name) {
    std::vector<std::string> parts;
    std::string path = dir.empty() ? name : dir + "/" + name, part;
    for (size_t i = 0; i <= path.size(); i++) {
        if (i == path.size() || path[i] == '/') {
            if (part == "..") { if (!parts.empty()) parts.pop_back(); else parts.push_back(part); }
            else if (!part.empty() && part != ".") parts.push_back(part);
            part.clear();
        } else {
            part += path[i];
        }
    }
    std::string out;
    for (const std::string& p : parts) out += (out.empty() ? "" : "/") + p;
    return out;
}

TEST_CASE("the product's sources (the trainer, lora.h and every header they include) include nothing under dev/") {
    std::vector<std::string> todo = {"train_gpt2_lora.cpp", "lora.h"}, seen;
    while (!todo.empty()) {
        std::string file = todo.back();
        todo.pop_back();
        if (std::find(seen.begin(), seen.end(), file) != seen.end()) continue;
        seen.push_back(file);
        size_t slash = file.rfind('/');
        std::string dir = slash == std::string::npos ? "" : file.substr(0, slash);
        for (const std::string& inc : quoted_includes(file)) {
            std::string path = join_normalized(dir, inc);
            CHECK_MESSAGE(path.rfind("dev/", 0) != 0, file << " includes " << inc << ", which is under dev/");
            CHECK_MESSAGE(access(path.c_str(), R_OK) == 0, file << " includes " << inc << ", which is not at " << path);
            todo.push_back(path);
        }
    }
    // the walk reached the utility headers (so a broken scan cannot pass by finding nothing)
    CHECK(std::find(seen.begin(), seen.end(), "lib/utils.h") != seen.end());
    CHECK(std::find(seen.begin(), seen.end(), "lib/tokenizer.h") != seen.end());
    CHECK(seen.size() >= 10);
    MESSAGE("product sources scanned: " << seen.size());
}

TEST_SUITE_END();
