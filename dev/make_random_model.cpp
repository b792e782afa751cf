// dev/make_random_model.cpp: writes a randomly initialized GPT-2 as an llm.c fp32 checkpoint
// (version 3), the starting point for pretraining a small base with `train_gpt2_lora -f 1`.
// It reuses the trainer's own gpt2_build_random (GPT-2 init: N(0, 0.02), residual projections
// scaled by 1/sqrt(2L)) and gpt2_write_checkpoint (atomic), so the file is exactly what -e reads.
// The vocabulary is always GPT-2's (V = 50257, padded to Vp = 50304) so the GPT-2 tokenizer and the
// token files of `make data` fit it; depth, width, heads and context length are flags.
//
//   ./build/make_random_model -o data/brown_base_init.bin -l 4 -c 128 -n 4 -t 256
#define TESTING
#include "../train_gpt2_lora.cpp"

static void usage() {
    fprintf(stderr,
        "Usage:   ./build/make_random_model -o <file> [options]\n"
        "Options:\n"
        "  -o <file>  output checkpoint (required; written to <file>.tmp, then renamed)\n"
        "  -l <int>   layers L, >= 1 (default 4)\n"
        "  -c <int>   channels C, >= 1, a multiple of the heads (default 128)\n"
        "  -n <int>   attention heads NH, >= 1 (default 4)\n"
        "  -t <int>   max sequence length maxT, >= 1 (default 256)\n"
        "  -s <int>   random seed (default 1337)\n");
    exit(EXIT_FAILURE);
}

static int flag_int(const char* flag, const char* s, int min) {
    char* end = NULL;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || v < min || v > (1 << 20)) {
        fprintf(stderr, "Error: flag %s expects an integer in [%d, %d], got '%s'\n", flag, min, 1 << 20, s);
        usage();
    }
    return (int)v;
}

int main(int argc, char** argv) {
    const char* out_path = NULL; // -o
    GPT2Config cfg;
    cfg.num_layers = 4;          // -l
    cfg.channels = 128;          // -c
    cfg.num_heads = 4;           // -n
    cfg.max_seq_len = 256;       // -t
    cfg.vocab_size = 50257;      // GPT-2's BPE vocabulary
    cfg.padded_vocab_size = 50304; // padded to a multiple of 128, as llm.c does
    int seed = 1337;             // -s
    for (int i = 1; i < argc; i += 2) {
        if (argv[i][0] != '-' || strlen(argv[i]) != 2 || i + 1 >= argc) usage();
        const char* v = argv[i + 1];
        switch (argv[i][1]) {
            case 'o': out_path = v; break;
            case 'l': cfg.num_layers = flag_int(argv[i], v, 1); break;
            case 'c': cfg.channels = flag_int(argv[i], v, 1); break;
            case 'n': cfg.num_heads = flag_int(argv[i], v, 1); break;
            case 't': cfg.max_seq_len = flag_int(argv[i], v, 1); break;
            case 's': seed = flag_int(argv[i], v, 0); break;
            default: usage();
        }
    }
    if (out_path == NULL) {
        fprintf(stderr, "Error: no output file\n---> HINT: pass -o data/brown_base_init.bin\n");
        usage();
    }
    if (cfg.channels % cfg.num_heads != 0) {
        fprintf(stderr, "Error: flag -c: channels %d is not a multiple of the heads %d\n---> HINT: e.g. -c 128 -n 4\n", cfg.channels, cfg.num_heads);
        exit(EXIT_FAILURE);
    }
    GPT2<float> model;
    gpt2_build_random(&model, cfg, (uint64_t)seed);
    std::string err = gpt2_write_checkpoint(&model, out_path);
    if (!err.empty()) die(err);
    printf("wrote %s: random GPT-2 L=%d C=%d NH=%d maxT=%d V=%d Vp=%d, %zu parameters (%.1f MiB), seed %d\n", out_path,
           cfg.num_layers, cfg.channels, cfg.num_heads, cfg.max_seq_len, cfg.vocab_size, cfg.padded_vocab_size,
           model.num_parameters, mib(model.num_parameters * sizeof(float)), seed);
    gpt2_free(&model);
    return 0;
}
