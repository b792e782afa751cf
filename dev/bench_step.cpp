// dev/bench_step.cpp: times whole training steps (forward + zero_grad + backward + AdamW) of the
// trainer's own code, for LoRA or full fine-tuning, and prints one grep-able line. Run it once per
// mode: peak RSS (getrusage ru_maxrss) is per process. `make bench` (dev/bench.mk) drives it.
//
//   ./build/bench_step gen  <ckpt> <L> <C> <NH> <maxT>      random-init GPT-2 checkpoint (GPT-2 vocab)
//   ./build/bench_step lora <ckpt> <B> <T> <steps> [r]       LoRA, all four targets, alpha = 2r
//   ./build/bench_step bf16 <ckpt> <B> <T> <steps> [r]       the same LoRA on a bf16 base (-Q bf16), read as the trainer reads it
//   ./build/bench_step full <ckpt> <B> <T> <steps>           full fine-tuning (-f 1)
//   ./build/bench_step path                                  prints the bf16 matmul path of this build
//
// Output: bench <mode> L <L> C <C> B <B> T <T> ms/step <x> tok/s <x> GFLOP/s <x> matmul% <x> peak_rss_MiB <x> (phases)
// GFLOP/s counts the base matmuls only (what matmul_stats records: 2*BT*C*OC per product done);
// matmul% is their share of the step time.
#define TESTING
#include "../train_gpt2_lora.cpp"
#include <chrono>

static double bench_now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

static int arg_int(const char* s, const char* what) {
    char* end = NULL;
    long v = strtol(s, &end, 10);
    if (end == s || *end != '\0' || v < 1 || v > (1 << 20)) {
        fprintf(stderr, "Error: bench_step: %s must be an integer in [1, %d], got '%s'\n---> HINT: see the usage in dev/bench_step.cpp\n", what, 1 << 20, s);
        exit(EXIT_FAILURE);
    }
    return (int)v;
}

int main(int argc, char** argv) {
    if (argc == 2 && strcmp(argv[1], "path") == 0) { // which bf16 matmul this build runs
        printf("%s\n", matmul_bf16_path());
        return 0;
    }
    if (argc >= 7 && strcmp(argv[1], "gen") == 0) {
        GPT2Config cfg;
        cfg.num_layers = arg_int(argv[3], "L");
        cfg.channels = arg_int(argv[4], "C");
        cfg.num_heads = arg_int(argv[5], "NH");
        cfg.max_seq_len = arg_int(argv[6], "maxT");
        cfg.vocab_size = 50257;
        cfg.padded_vocab_size = 50304;
        GPT2<float> model;
        gpt2_build_random(&model, cfg, 1337);
        std::string err = gpt2_write_checkpoint(&model, argv[2]);
        if (!err.empty()) { fprintf(stderr, "Error: bench_step gen: %s\n", err.c_str()); return EXIT_FAILURE; }
        gpt2_free(&model);
        return 0;
    }
    bool full = argc >= 6 && strcmp(argv[1], "full") == 0;
    bool bf16 = argc >= 6 && strcmp(argv[1], "bf16") == 0;
    if (argc < 6 || (!full && !bf16 && strcmp(argv[1], "lora") != 0)) {
        fprintf(stderr, "Usage: bench_step gen <ckpt> <L> <C> <NH> <maxT> | lora|bf16 <ckpt> <B> <T> <steps> [r] | full <ckpt> <B> <T> <steps>\n"
                        "---> HINT: see the header of dev/bench_step.cpp\n");
        return EXIT_FAILURE;
    }
    const char* path = argv[2];
    int B = arg_int(argv[3], "B"), T = arg_int(argv[4], "T"), steps = arg_int(argv[5], "steps");
    int r = argc >= 7 ? arg_int(argv[6], "r") : 8;

    GPT2<float> model;
    std::string err = gpt2_read_checkpoint(&model, path, bf16); // bf16: the block matrices left on disk, as the trainer does
    if (!err.empty()) { fprintf(stderr, "Error: bench_step: %s\n---> HINT: make bench generates it\n", err.c_str()); return EXIT_FAILURE; }
    if (full) {
        gpt2_enable_full_training(&model);
    } else {
        LoRAConfig cfg = lora_config(r, 2.0f * r, LORA_ALL_TARGETS);
        if (bf16) cfg.base_quant = LORA_QUANT_BF16;
        gpt2_lora_attach(&model, cfg, 1337);
    }
    gpt2_allocate(&model, B, T);

    // random tokens (the step's cost does not depend on them)
    std::vector<int> tokens((size_t)B * T + 1);
    uint64_t s = 42;
    for (int& t : tokens) { s = s * 6364136223846793005ULL + 1442695040888963407ULL; t = (int)((s >> 33) % model.config.vocab_size); }

    double total = 0, mm_seconds = 0, mm_flops = 0, t_fwd = 0, t_bwd = 0, t_upd = 0;
    for (int step = 0; step <= steps; step++) { // step 0 warms up (first touch of buffers), not timed
        matmul_stats = MatmulStats{0.0, 0.0};
        double t0 = bench_now();
        gpt2_forward(&model, tokens.data(), tokens.data() + 1, B, T);
        double t1 = bench_now();
        gpt2_zero_grad(&model);
        gpt2_backward(&model);
        double t2 = bench_now();
        gpt2_update(&model, 1e-4f, 0.9f, 0.999f, 1e-8f, 0.0f, step + 1);
        double t3 = bench_now();
        if (step == 0) continue;
        total += t3 - t0;
        t_fwd += t1 - t0; t_bwd += t2 - t1; t_upd += t3 - t2;
        mm_seconds += matmul_stats.seconds;
        mm_flops += matmul_stats.flops;
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double ms = 1000.0 * total / steps;
    printf("bench %s L %d C %d B %d T %d ms/step %.1f tok/s %.0f GFLOP/s %.1f matmul%% %.0f peak_rss_MiB %.0f "
           "(forward %.1f, zero_grad+backward %.1f, update %.1f ms)\n",
           argv[1], model.config.num_layers, model.config.channels, B, T, ms, (double)B * T * steps / total,
           mm_flops / total * 1e-9, 100.0 * mm_seconds / total, ru.ru_maxrss / 1024.0,
           1000.0 * t_fwd / steps, 1000.0 * t_bwd / steps, 1000.0 * t_upd / steps);
    gpt2_free(&model);
    return 0;
}
