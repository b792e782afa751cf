// dev/delta_w.cpp: how a trained LoRA update dW relates to the frozen W (the LoRA paper's section 7.3).
// For each adapted matrix at one layer, with dW = scale * lora_B lora_A (OC, C) and U (OC, r), V (r, C) the
// top-r singular vectors of dW: ||U^T W V^T||_F (W projected on dW's subspace), the same with W's own top-r
// singular vectors and with random orthonormal ones, ||W||_F, ||dW||_F and the amplification factor
// ||dW||_F / ||U^T W V^T||_F. A large factor means dW amplifies directions that W already has but does not
// emphasize. The SVD is the project's own (lib/svd.h, as PiSSA uses it), in double.
// Usage: delta_w <base checkpoint> <adapter.bin or PEFT dir> [layer (default: the last)]
// Prints one markdown table; make compare puts it into dev/results/compare.md.
#define TESTING
#include "../train_gpt2_lora.cpp"

// ||U^T W Vt^T||_F for U (OC, k), W (OC, C), Vt (k, C), all row-major, in double
static double projected_norm(const double* U, const float* W, const double* Vt, int OC, int C, int k) {
    std::vector<double> UtW((size_t)k * C, 0.0); // (k, C)
    for (int o = 0; o < OC; o++) {
        for (int i = 0; i < k; i++) {
            double u = U[(size_t)o * k + i];
            for (int c = 0; c < C; c++) UtW[(size_t)i * C + c] += u * W[(size_t)o * C + c];
        }
    }
    double sum = 0;
    for (int i = 0; i < k; i++) {
        for (int j = 0; j < k; j++) {
            double x = 0;
            for (int c = 0; c < C; c++) x += UtW[(size_t)i * C + c] * Vt[(size_t)j * C + c];
            sum += x * x;
        }
    }
    return std::sqrt(sum);
}

static double frobenius(const float* W, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += (double)W[i] * W[i];
    return std::sqrt(s);
}

int main(int argc, char** argv) {
    if (argc < 3 || argc > 4) {
        fprintf(stderr, "usage: %s <base checkpoint> <adapter.bin or PEFT dir> [layer]\n", argv[0]);
        return 2;
    }
    GPT2<float> model;
    std::string err = gpt2_read_checkpoint(&model, argv[1]);
    if (!err.empty()) die(err);
    TrainState state;
    bool has_state = false;
    err = lora_file_load(argv[2], &model, base_checksum(model.params_memory, model.num_parameters), &state, &has_state);
    if (!err.empty()) die(err);
    const LoRA<float>* lora = &model.lora;
    int L = model.config.num_layers, C = model.config.channels, r = lora->config.r;
    int l = argc == 4 ? atoi(argv[3]) : L - 1;
    if (l < 0 || l >= L) die(strprintf("layer %d: the base has layers 0..%d\n---> HINT: give a layer in range", l, L - 1));
    printf("| matrix (layer %d, r = %d) | ||W||_F | ||dW||_F | ||U^T W V^T||_F, U V of dW | of W | random | amplification ||dW||_F / ||U^T W V^T||_F |\n", l, r);
    printf("|---|---|---|---|---|---|---|\n");
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        if (lora->lora_A[t] == NULL) continue;
        LoRALayer<float> a = lora_layer(lora, t, l);
        int OC = a.OC, in = a.C;
        const float* W = gpt2_base_weight(&model, t, l);
        std::vector<float> dW((size_t)OC * in, 0.0f); // scale * lora_B lora_A, formed for this analysis only
        lora_merge(dW.data(), a.lora_A, a.lora_B, (float)lora->config.scale, in, OC, r, +1);
        std::vector<double> U((size_t)OC * r), S(r), Vt((size_t)r * in);
        svd_top_forward(U.data(), S.data(), Vt.data(), dW.data(), OC, in, r, LORA_PISSA_ITERS, 11);
        double on_dW = projected_norm(U.data(), W, Vt.data(), OC, in, r);
        svd_top_forward(U.data(), S.data(), Vt.data(), W, OC, in, r, LORA_PISSA_ITERS, 12);
        double on_W = projected_norm(U.data(), W, Vt.data(), OC, in, r);
        Rng rng; // random orthonormal U, V: Gaussian columns, orthonormalised
        rng_seed(&rng, 13);
        std::vector<double> Ur((size_t)OC * r), Vr((size_t)in * r), Vrt((size_t)r * in);
        for (double& x : Ur) x = rng_normal(&rng);
        for (double& x : Vr) x = rng_normal(&rng);
        qr_orthonormalize(Ur.data(), OC, r);
        qr_orthonormalize(Vr.data(), in, r);
        for (int c = 0; c < in; c++) for (int i = 0; i < r; i++) Vrt[(size_t)i * in + c] = Vr[(size_t)c * r + i];
        double on_random = projected_norm(Ur.data(), W, Vrt.data(), OC, in, r);
        double nW = frobenius(W, (size_t)OC * in), ndW = frobenius(dW.data(), dW.size());
        printf("| %s (%d x %d) | %.2f | %.3f | %.3f | %.2f | %.3f | %.1f |\n", lora_target_names[t], OC, in, nW, ndW,
               on_dW, on_W, on_random, ndW / on_dW);
    }
    gpt2_free(&model);
    return 0;
}
