// lib/dataloader.h: llm.c token files (tokens_read: every id checked against V; write_token_file) and the data loader
// (batches of B*T+1 consecutive tokens, optionally shuffled per epoch, sliced per data-parallel rank).
#pragma once

#include <cstdint>
#include <string>
#include <vector>
#include "files.h" // read_llmc_header, TOKENS_MAGIC
#include "rng.h"   // the seeded shuffle

// An llm.c token file, validated: every id must be < V of the model it will feed.
struct TokenFile {
    std::vector<uint16_t> tokens;
};

static std::string tokens_read(TokenFile* tf, const char* path, int V, const char* flag) {
    std::string hint = strprintf("pass an llm.c token file with %s (make data writes data/tiny_shakespeare_train.bin and _val.bin)", flag);
    FILE* f = NULL;
    long size = 0;
    int header[256];
    std::string err = read_llmc_header(path, "token file", TOKENS_MAGIC, hint.c_str(), &f, &size, header);
    if (f == NULL) return err;
    if (err.empty() && header[1] != 1) {
        err = strprintf("token file '%s' has version %d, expected 1\n---> HINT: %s", path, header[1], hint.c_str());
    }
    if (err.empty() && (header[2] < 0 || (size_t)size != sizeof(header) + 2 * (size_t)header[2])) {
        err = strprintf("token file '%s' claims %d tokens (%zu bytes with the header) but is %ld bytes: truncated or corrupt\n---> HINT: regenerate it (make data)",
                        path, header[2], sizeof(header) + 2 * (size_t)(header[2] < 0 ? 0 : header[2]), size);
    }
    if (err.empty()) {
        tf->tokens.resize((size_t)header[2]);
        if (!tf->tokens.empty() && fread(tf->tokens.data(), 2, tf->tokens.size(), f) != tf->tokens.size()) {
            err = strprintf("token file '%s': read error\n---> HINT: %s", path, hint.c_str());
        }
    }
    fclose(f);
    if (err.empty()) {
        for (size_t i = 0; i < tf->tokens.size(); i++) {
            if (tf->tokens[i] >= V) {
                err = strprintf("token file '%s': token %zu has id %d, but the model's vocabulary has V=%d ids\n---> HINT: the tokens were made with another tokenizer; re-tokenize the text for this model",
                                path, i, tf->tokens[i], V);
                break;
            }
        }
    }
    return err;
}


// writes an llm.c token file, for make data: [0]=20240520, [1]=1, [2]=count; then count uint16 tokens.
// 0 on success, non-zero after a message on stderr.
static inline int write_token_file(const char* path, const std::vector<int>& tokens) {
    if (tokens.size() > (size_t)INT32_MAX) { fprintf(stderr, "ERROR: %s: %zu tokens do not fit the int32 count\n---> HINT: split the data into several files\n", path, tokens.size()); return 1; }
    int32_t header[256] = {0};
    header[0] = TOKENS_MAGIC; header[1] = 1; header[2] = (int32_t)tokens.size();
    std::vector<uint16_t> u16(tokens.size());
    for (size_t k = 0; k < tokens.size(); k++) {
        if (tokens[k] < 0 || tokens[k] > 65535) { fprintf(stderr, "ERROR: %s: token %d does not fit uint16\n---> HINT: llm.c token files hold ids 0..65535 (GPT-2's are < 50257)\n", path, tokens[k]); return 1; }
        u16[k] = (uint16_t)tokens[k];
    }
    std::string err = write_atomically(path, {{header, sizeof(header)}, {u16.data(), u16.size() * sizeof(uint16_t)}});
    if (!err.empty()) { fprintf(stderr, "ERROR: %s\n", err.c_str()); return 1; }
    return 0;
}

// ----------------------------------------------------------------------------
// data loader: batches of B*T+1 consecutive tokens (inputs, and targets shifted by one),
// advancing by B*T; optionally visiting the batches of each epoch in a seeded random order.
// Data parallel (world > 1 ranks): a global batch is B*world*T+1 tokens, visited in the same seeded
// order on every rank, and rank k reads its k-th slice of B*T+1, so the ranks together see exactly
// what one process with batch B*world sees.

struct DataLoader {
    TokenFile file;
    int B, T;
    size_t num_batches;
    size_t position;            // index into order
    std::vector<size_t> order;  // batch visiting order for this epoch
    bool shuffle;
    Rng rng;
    std::vector<int> inputs, targets; // (B, T)
    int rank, world;            // this rank's slice of each global batch, and the number of ranks
};

static std::string dataloader_init(DataLoader* loader, const char* path, int B, int T, int V, bool shuffle,
                                   uint64_t seed, const char* flag, int rank = 0, int world = 1) {
    std::string err = tokens_read(&loader->file, path, V, flag);
    if (!err.empty()) return err;
    size_t need = (size_t)B * world * T + 1;
    if (loader->file.tokens.size() < need) {
        return strprintf("token file '%s' has %zu tokens, fewer than one batch needs (B*T%s+1 = %zu)\n---> HINT: lower -b or -t, or use a larger token file",
                         path, loader->file.tokens.size(), world > 1 ? "*ranks" : "", need);
    }
    loader->B = B;
    loader->T = T;
    loader->rank = rank;
    loader->world = world;
    loader->num_batches = (loader->file.tokens.size() - 1) / ((size_t)B * world * T);
    loader->shuffle = shuffle;
    rng_seed(&loader->rng, seed);
    loader->order.resize(loader->num_batches);
    loader->inputs.resize((size_t)B * T);
    loader->targets.resize((size_t)B * T);
    for (size_t i = 0; i < loader->num_batches; i++) { loader->order[i] = i; }
    loader->position = 0;
    return "";
}

static void dataloader_reset(DataLoader* loader) {
    loader->position = 0;
    for (size_t i = 0; i < loader->num_batches; i++) { loader->order[i] = i; }
}

static void dataloader_next_batch(DataLoader* loader) {
    if (loader->position == loader->num_batches) loader->position = 0; // next epoch
    if (loader->position == 0 && loader->shuffle) {
        // Fisher-Yates over batch indices
        for (size_t i = loader->num_batches - 1; i > 0; i--) {
            size_t j = rng_u32(&loader->rng) % (i + 1);
            std::swap(loader->order[i], loader->order[j]);
        }
    }
    size_t BT = (size_t)loader->B * loader->T;
    // global batch number order[position] starts at order[position] * world * BT; this rank's slice at rank * BT
    const uint16_t* chunk = loader->file.tokens.data() + (loader->order[loader->position] * loader->world + loader->rank) * BT;
    for (size_t i = 0; i < BT; i++) {
        loader->inputs[i] = chunk[i];
        loader->targets[i] = chunk[i + 1];
    }
    loader->position++;
}
