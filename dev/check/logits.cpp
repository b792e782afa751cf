// dev/check/logits.cpp: our logits for given token ids, for make check-peft to compare with PEFT's.
// Usage: logits <checkpoint.bin> <adapter (adapter.bin or PEFT dir) or -> <ids,ids,...> <out.f32>
// Writes T x V float32 logits (the padded vocabulary rows dropped), one forward in float, the adapter
// unmerged as the trainer runs it.
#define TESTING
#include "../../train_gpt2_lora.cpp"

int main(int argc, char** argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s <checkpoint.bin> <adapter or -> <ids,ids,...> <out.f32>\n", argv[0]);
        return 2;
    }
    GPT2<float> model;
    std::string err = gpt2_read_checkpoint(&model, argv[1]);
    if (!err.empty()) die(err);
    if (strcmp(argv[2], "-") != 0) {
        TrainState state;
        bool has_state = false;
        err = lora_file_load(argv[2], &model, base_checksum(model.params_memory, model.num_parameters), &state, &has_state);
        if (!err.empty()) die(err);
    }
    std::vector<int> tokens;
    for (const char* p = argv[3]; *p;) {
        tokens.push_back((int)strtol(p, (char**)&p, 10));
        if (*p == ',') p++;
    }
    int T = (int)tokens.size(), V = model.config.vocab_size, Vp = model.config.padded_vocab_size;
    gpt2_allocate(&model, 1, T);
    gpt2_forward(&model, tokens.data(), (const int*)NULL, 1, T);
    std::vector<float> out((size_t)T * V);
    for (int t = 0; t < T; t++) memcpy(out.data() + (size_t)t * V, model.acts.logits + (size_t)t * Vp, V * sizeof(float));
    err = write_atomically(argv[4], {{out.data(), out.size() * sizeof(float)}});
    if (!err.empty()) die(err);
    gpt2_free(&model);
    return 0;
}
