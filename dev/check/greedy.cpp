// dev/check/greedy.cpp: our greedy continuation of given token ids, with the probability of each chosen
// token, in the same JSON as llamacpp_greedy.mjs, so that make check-llamacpp compares the two.
// Usage: greedy <checkpoint.bin> <adapter (adapter.bin or PEFT dir) or -> <merged|unmerged> <ids,ids,...> <n>
// Each token is a forward over the whole context (no cache: the plainest path), in float as the trainer runs.
#define TESTING
#include "../../train_gpt2_lora.cpp"

int main(int argc, char** argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s <checkpoint.bin> <adapter or -> <merged|unmerged> <ids,ids,...> <n>\n", argv[0]);
        return 2;
    }
    const char* adapter = argv[2];
    bool merged = strcmp(argv[3], "merged") == 0;
    int n = atoi(argv[5]);
    GPT2<float> model;
    std::string err = gpt2_read_checkpoint(&model, argv[1]);
    if (!err.empty()) die(err);
    if (strcmp(adapter, "-") != 0) {
        TrainState state;
        bool has_state = false;
        err = lora_file_load(adapter, &model, base_checksum(model.params_memory, model.num_parameters), &state, &has_state);
        if (!err.empty()) die(err);
        if (merged) gpt2_lora_merge(&model, +1), lora_free(&model.lora);
    }
    std::vector<int> tokens;
    for (const char* p = argv[4]; *p;) {
        tokens.push_back((int)strtol(p, (char**)&p, 10));
        if (*p == ',') p++;
    }
    int V = model.config.vocab_size, Vp = model.config.padded_vocab_size, T = model.config.max_seq_len;
    gpt2_allocate(&model, 1, T);
    printf("{\"ours\": \"train_gpt2_lora\", \"tokens\": [");
    std::string probs;
    for (int i = 0; i < n; i++) {
        int len = std::min((int)tokens.size(), T);
        gpt2_forward(&model, tokens.data() + tokens.size() - len, (const int*)NULL, 1, len);
        const float* logits = model.acts.logits + (size_t)(len - 1) * Vp;
        int best = 0;
        for (int v = 1; v < V; v++) { if (logits[v] > logits[best]) best = v; }
        double sum = 0;
        for (int v = 0; v < V; v++) sum += std::exp((double)logits[v] - logits[best]);
        tokens.push_back(best);
        printf("%s%d", i ? "," : "", best);
        probs += strprintf("%s%.9g", i ? "," : "", 1.0 / sum);
    }
    printf("], \"top1\": [%s]}\n", probs.c_str());
    gpt2_free(&model);
    return 0;
}
