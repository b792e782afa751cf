// lib/adapter_files.h: our adapter file, adapter.bin (weights, and for an exact resume the AdamW moments,
// step, data-loader and sampler state), the base checksum stamped into it, and -M's merged checkpoint.
// Not a standalone header: the trainer includes it after the model.
#pragma once

#include "checkpoint.h" // checkpoint_write, gpt2_write_checkpoint
#include "dataloader.h" // DataLoader (the resume state)

// ----------------------------------------------------------------------------
// adapter files: our own format (exact resume), PEFT's safetensors + adapter_config.json (export and
// import), and merging an adapter into the base for inference or for a merged llm.c checkpoint.
//
// adapter.bin, little-endian like every llm.c file: a header of 256 int32 (unused slots 0)
//   [0] magic 20240801  [1] version 1  [2] r  [3] alpha (fp32 bits)  [4] targets bitmask (1 qkv, 2 attproj,
//   4 fc, 8 fcproj)  [5] L  [6] C  [7] V  [8] Vp  [9] maxT  [10] NH  [11..12] base checksum (u64, low word first)
//   [13..14] n = adapter parameter count (u64)  [15] has_state (0/1)  and, when has_state = 1:
//   [16] steps completed  [17..18] sampler RNG state  [19..20] train loader RNG state  [21] loader B
//   [22] loader T  [23] loader shuffle  [24..25] loader position  [26..27] loader batch count nb
//   [28] variant bits, whatever has_state: 1 = rsLoRA (scale = alpha / sqrt(r) instead of alpha / r)
//   [29] the base storage the adapter trained on: 0 fp32, 1 int8, 2 nf4, 3 int2 (-Q; -A uses it unless -Q is given)
//   [30] lora_dropout (fp32 bits, in [0, 1); -A uses it unless -D is given; files from before it hold 0 = off)
//   variant bit 8 = AdaLoRA, and then [31] target_r [32] tinit [33] tfinal [34] deltaT [35] total_step
//   [36] orth_reg_weight (fp32 bits)
//   [37] n_tok = trainable token rows (-C; 0 = none, as in every file from before them)
// then n fp32 adapter parameters in lora.h's flat layout (lora_tensor_list order, then DoRA's magnitudes or
// AdaLoRA's lora_E); for AdaLoRA its masks (L * r fp32 0/1 per target, target-major); when has_state = 1
// the AdamW m (n fp32), v (n fp32) and the loader's batch order (nb u64), and for AdaLoRA then its
// importance state: the averages of |w grad w| (n fp32) and of their deviation (n fp32).
// Last, when n_tok > 0: the token ids (n_tok int32), their trained rows of wte (n_tok * C fp32), and when
// has_state = 1 the rows' AdamW m and v (n_tok * C fp32 each).
// The base checksum is FNV-1a 64 over the fp32 base parameters taken as 32-bit words (one xor and one
// multiply per float: h = (h ^ word) * 0x100000001b3, from h = 0xcbf29ce484222325), in checkpoint order.
// It is always the checksum of the fp32 base file, never of a quantized copy: with -Q main streams it from
// the file (checkpoint_checksum), so an adapter trained on a quantized base checks against the same
// checkpoint as an fp32 one (and -A can load it quantized or, with -Q fp32, on the fp32 base).

#define ADAPTER_VERSION 1

// FNV-1a 64 over n fp32 values as 32-bit words: one serial xor + multiply per float, about a second for
// GPT-2 124M on a busy 2-core machine; computed once per run, and only when -A or -o is given
static uint64_t base_checksum(const float* params, size_t n, uint64_t h = 0xcbf29ce484222325ull) {
    for (size_t i = 0; i < n; i++) {
        uint32_t word;
        memcpy(&word, params + i, sizeof(word));
        h = (h ^ word) * 0x100000001b3ull;
    }
    return h;
}

// the same checksum streamed from a checkpoint file (read with -Q, the model never holds all of it)
static std::string checkpoint_checksum(const char* path, uint64_t* sum) {
    FILE* f = fopen(path, "rb");
    if (f == NULL) return strprintf("checkpoint '%s' can no longer be opened for its checksum\n---> HINT: keep the -e file in place while the trainer starts", path);
    std::vector<float> buf(1 << 16);
    std::vector<uint16_t> buf16(buf.size());
    uint64_t h = 0xcbf29ce484222325ull;
    int header[2] = {0, 0};
    bool ok = fread(header, sizeof(header), 1, f) == 1 && fseek(f, 256 * sizeof(int), SEEK_SET) == 0;
    size_t n;
    if (header[1] == 5) { // llm.c's bf16 checkpoint: the checksum of its values widened to fp32, as read whole
        while (ok && (n = fread(buf16.data(), sizeof(uint16_t), buf16.size(), f)) > 0) {
            for (size_t k = 0; k < n; k++) { buf[k] = bf16_widen(buf16[k]); }
            h = base_checksum(buf.data(), n, h);
        }
    }
    while (ok && header[1] != 5 && (n = fread(buf.data(), sizeof(float), buf.size(), f)) > 0) { h = base_checksum(buf.data(), n, h); }
    ok = ok && !ferror(f);
    fclose(f);
    if (!ok) return strprintf("checkpoint '%s': read error while taking its checksum\n---> HINT: the file changed since it was loaded; load it again", path);
    *sum = h;
    return "";
}

static void header_put_u64(int* header, int i, uint64_t v) {
    uint32_t lo = (uint32_t)v, hi = (uint32_t)(v >> 32);
    memcpy(&header[i], &lo, 4);
    memcpy(&header[i + 1], &hi, 4);
}
static uint64_t header_get_u64(const int* header, int i) {
    uint32_t lo, hi;
    memcpy(&lo, &header[i], 4);
    memcpy(&hi, &header[i + 1], 4);
    return (uint64_t)hi << 32 | lo;
}

// What an exact resume needs besides the weights and the AdamW moments (those live in model->lora)
struct TrainState {
    int step = 0;                     // optimizer steps completed; AdamW's t of the next step is step + 1
    Rng sample_rng = {0};             // the sampler's stream
    int loader_B = 0, loader_T = 0;
    bool loader_shuffle = false;
    Rng loader_rng = {0};
    size_t loader_position = 0;
    std::vector<size_t> loader_order; // (nb) batch visiting order of the current epoch
};

static TrainState train_state_capture(int step, const DataLoader* loader, const Rng* sample_rng) {
    TrainState s;
    s.step = step;
    s.sample_rng = *sample_rng;
    s.loader_B = loader->B;
    s.loader_T = loader->T;
    s.loader_shuffle = loader->shuffle;
    s.loader_rng = loader->rng;
    s.loader_position = loader->position;
    s.loader_order = loader->order;
    return s;
}

// puts a freshly initialised loader where the saved run's loader was; it must read the same batches
static std::string train_state_restore(const TrainState& s, DataLoader* loader, const char* path) {
    if (s.loader_B != loader->B || s.loader_T != loader->T || s.loader_shuffle != loader->shuffle ||
        s.loader_order.size() != loader->num_batches) {
        return strprintf("adapter file '%s' was saved by a run with B=%d T=%d shuffle=%d and %zu training batches, "
                         "but this run has B=%d T=%d shuffle=%d and %zu batches\n"
                         "---> HINT: resume with the same -b, -t, -u and -i as the run that saved it",
                         path, s.loader_B, s.loader_T, (int)s.loader_shuffle, s.loader_order.size(), loader->B,
                         loader->T, (int)loader->shuffle, loader->num_batches);
    }
    loader->rng = s.loader_rng;
    loader->position = s.loader_position;
    loader->order = s.loader_order;
    return "";
}

// the name of the tensor that holds element i of an adapter's flat buffer (lora_tensor_list order, then
// DoRA's magnitudes), and the index within it, for errors about one bad value
static std::string lora_flat_element_name(const LoRA<float>* lora, size_t i) {
    for (const LoRATensor& t : lora_tensor_list(lora->config, lora->L, lora->C)) {
        size_t n = (size_t)t.rows * t.cols;
        if (i >= t.offset && i < t.offset + n) {
            return strprintf("layer %d %s lora_%s, index %zu", t.layer, lora_target_names[t.target], t.is_B ? "B" : "A", i - t.offset);
        }
    }
    return strprintf("the %s, flat index %zu", lora->config.use_adalora ? "AdaLoRA lora_E" : "DoRA magnitudes", i);
}

// writes the adapters of model (and, when state != NULL, the AdamW moments and the training state)
static std::string lora_file_write(const char* path, const GPT2<float>* model, uint64_t base_sum, const TrainState* state) {
    const LoRA<float>* lora = &model->lora;
    const GPT2Config& cfg = model->config;
    int header[256] = {0};
    header[0] = ADAPTER_MAGIC;
    header[1] = ADAPTER_VERSION;
    header[2] = lora->config.r;
    memcpy(&header[3], &lora->config.alpha, 4);
    header[4] = (int)lora->config.targets;
    header[5] = cfg.num_layers;
    header[6] = cfg.channels;
    header[7] = cfg.vocab_size;
    header[8] = cfg.padded_vocab_size;
    header[9] = cfg.max_seq_len;
    header[10] = cfg.num_heads;
    header_put_u64(header, 11, base_sum);
    header_put_u64(header, 13, lora->num_parameters);
    const LoRAConfig& lc = lora->config;
    header[28] = (lc.use_rslora ? 1 : 0) | (lc.use_dora ? 2 : 0) | (lc.init_pissa ? 4 : 0) | (lc.use_adalora ? 8 : 0); // variant bits
    header[29] = lc.base_quant;
    memcpy(&header[30], &lc.dropout, 4);
    size_t n = lora->num_parameters, n_mask = adalora_mask_count(lc, cfg.num_layers);
    if (lc.use_adalora) {
        header[31] = lc.adalora_target_r;
        header[32] = lc.adalora_tinit;
        header[33] = lc.adalora_tfinal;
        header[34] = lc.adalora_deltaT;
        header[35] = lc.adalora_total_step;
        memcpy(&header[36], &lc.adalora_orth_reg, 4);
    }
    const TokenRows<float>* tr = &model->tokens;
    size_t n_tok_values = token_rows_count(tr);
    header[37] = tr->n;
    std::vector<std::pair<const void*, size_t>> parts = {{header, sizeof(header)}, {lora->params_memory, n * sizeof(float)}};
    if (n_mask > 0) parts.push_back({lora->adalora_mask_memory, n_mask * sizeof(float)});
    std::vector<uint64_t> order;
    if (state != NULL) {
        header[15] = 1;
        header[16] = state->step;
        header_put_u64(header, 17, state->sample_rng.state);
        header_put_u64(header, 19, state->loader_rng.state);
        header[21] = state->loader_B;
        header[22] = state->loader_T;
        header[23] = state->loader_shuffle ? 1 : 0;
        header_put_u64(header, 24, state->loader_position);
        header_put_u64(header, 26, state->loader_order.size());
        order.assign(state->loader_order.begin(), state->loader_order.end());
        parts.push_back({lora->m_memory, n * sizeof(float)});
        parts.push_back({lora->v_memory, n * sizeof(float)});
        parts.push_back({order.data(), order.size() * sizeof(uint64_t)});
        if (lc.use_adalora) {
            parts.push_back({lora->adalora_avg, n * sizeof(float)});
            parts.push_back({lora->adalora_unc, n * sizeof(float)});
        }
    }
    if (tr->n > 0) { // -C: the token rows, last
        parts.push_back({tr->ids, (size_t)tr->n * sizeof(int)});
        parts.push_back({tr->rows, n_tok_values * sizeof(float)});
        if (state != NULL) {
            parts.push_back({tr->m, n_tok_values * sizeof(float)});
            parts.push_back({tr->v, n_tok_values * sizeof(float)});
        }
    }
    return write_atomically(path, parts);
}

// Reads an adapter for the base already in model (its checksum is base_sum) and attaches it, replacing
// any adapter attached before. The AdamW moments go to model->lora; *has_state says whether the file had
// them, and then *state holds the step and the loader/sampler state.
// base_quant: how to store the base's block matrices (LoRAQuant), or -1 (default): as the file says.
static std::string lora_file_read(const char* path, GPT2<float>* model, uint64_t base_sum, TrainState* state, bool* has_state,
                                  int base_quant = -1) {
    const char* hint = "pass an adapter.bin written by train_gpt2_lora -o (or a PEFT adapter directory) with -A";
    *has_state = false;
    FILE* f = NULL;
    long size = 0;
    int header[256];
    std::string err = read_llmc_header(path, "adapter file", ADAPTER_MAGIC, hint, &f, &size, header);
    if (f == NULL) return err;
    if (err.empty() && header[1] != ADAPTER_VERSION) {
        err = strprintf("adapter file '%s' has version %d, expected %d\n---> HINT: re-save it with this train_gpt2_lora", path, header[1], ADAPTER_VERSION);
    }
    LoRAConfig lcfg = {}; // all zero
    if (err.empty()) {
        float alpha, dropout;
        memcpy(&alpha, &header[3], 4);
        memcpy(&dropout, &header[30], 4);
        if (header[2] < 1 || header[2] > 65536 || !std::isfinite(alpha) || !(alpha > 0) || header[4] <= 0 || header[4] > (int)LORA_ALL_TARGETS ||
            (header[28] & ~15) != 0 || header[29] < 0 || header[29] >= LORA_NUM_QUANTS || !(dropout >= 0 && dropout < 1)) {
            err = strprintf("adapter file '%s' has an impossible config: r=%d alpha=%g targets=%d variant bits=%d base storage=%d lora_dropout=%g (need r >= 1, alpha > 0, targets 1..15, variant bits 0..15, base storage 0..2, lora_dropout in [0, 1))\n---> HINT: the file is corrupt; %s",
                            path, header[2], alpha, header[4], header[28], header[29], dropout, hint);
        } else {
            lcfg = lora_config_rslora(lora_config(header[2], alpha, (unsigned)header[4]), (header[28] & 1) != 0);
            // DoRA: the magnitudes follow in the flat buffer; PiSSA: attaching recomputes the same residual base
            // (the SVD is seeded), and the file's lora_A / lora_B then replace the initial ones
            lcfg.use_dora = (header[28] & 2) != 0;
            lcfg.init_pissa = (header[28] & 4) != 0;
            lcfg.base_quant = base_quant >= 0 ? base_quant : header[29];
            lcfg.dropout = dropout;
            if ((header[28] & 8) != 0) { // AdaLoRA and its schedule
                lcfg.use_adalora = true;
                lcfg.adalora_target_r = header[31];
                lcfg.adalora_tinit = header[32];
                lcfg.adalora_tfinal = header[33];
                lcfg.adalora_deltaT = header[34];
                lcfg.adalora_total_step = header[35];
                memcpy(&lcfg.adalora_orth_reg, &header[36], 4);
                lcfg.scale = lora_scale_of(lcfg);
                if ((header[28] & 7) != 0 || lcfg.adalora_target_r < 1 || lcfg.adalora_target_r > lcfg.r || lcfg.adalora_tinit < 0 ||
                    lcfg.adalora_tfinal < 0 || lcfg.adalora_deltaT < 1 || lcfg.adalora_total_step < 0 || !(lcfg.adalora_orth_reg >= 0)) {
                    err = strprintf("adapter file '%s' has an impossible AdaLoRA config: variant bits %d, target_r %d (r %d), tinit %d, tfinal %d, deltaT %d, total_step %d, orth_reg %g\n---> HINT: the file is corrupt; %s",
                                    path, header[28], lcfg.adalora_target_r, lcfg.r, lcfg.adalora_tinit, lcfg.adalora_tfinal, lcfg.adalora_deltaT,
                                    lcfg.adalora_total_step, lcfg.adalora_orth_reg, hint);
                }
            }
        }
    }
    const GPT2Config& cfg = model->config;
    if (err.empty() && (header[5] != cfg.num_layers || header[6] != cfg.channels || header[7] != cfg.vocab_size ||
                        header[8] != cfg.padded_vocab_size || header[9] != cfg.max_seq_len || header[10] != cfg.num_heads)) {
        err = strprintf("adapter file '%s' has shapes for a base with L=%d C=%d V=%d Vp=%d maxT=%d NH=%d, but the base (-e) has L=%d C=%d V=%d Vp=%d maxT=%d NH=%d\n"
                        "---> HINT: load the base checkpoint the adapter was trained on with -e",
                        path, header[5], header[6], header[7], header[8], header[9], header[10], cfg.num_layers, cfg.channels,
                        cfg.vocab_size, cfg.padded_vocab_size, cfg.max_seq_len, cfg.num_heads);
    }
    size_t n = 0, nb = 0;
    if (err.empty()) {
        n = lora_count_parameters(lcfg, cfg.num_layers, cfg.channels);
        if (header_get_u64(header, 13) != n) {
            err = strprintf("adapter file '%s' says it holds %llu parameters, but r=%d and targets %s on this base need %zu\n---> HINT: the file is corrupt; %s",
                            path, (unsigned long long)header_get_u64(header, 13), lcfg.r, lora_targets_string(lcfg.targets).c_str(), n, hint);
        } else if (header[15] != 0 && header[15] != 1) {
            err = strprintf("adapter file '%s' has has_state=%d, expected 0 or 1\n---> HINT: the file is corrupt; %s", path, header[15], hint);
        }
    }
    if (err.empty() && header_get_u64(header, 11) != base_sum) {
        err = strprintf("adapter file '%s' belongs to another base: it was trained on base weights with checksum %016llx, "
                        "but the base loaded with -e has checksum %016llx\n"
                        "---> HINT: load the exact base checkpoint the adapter was trained on with -e (a merged checkpoint is a different base)",
                        path, (unsigned long long)header_get_u64(header, 11), (unsigned long long)base_sum);
    }
    if (err.empty()) {
        // expected size, computed only from values already bounded by the file size
        size_t expected = sizeof(header) + (n + adalora_mask_count(lcfg, cfg.num_layers)) * sizeof(float);
        if (header[15] == 1) {
            uint64_t nb64 = header_get_u64(header, 26);
            nb = nb64 <= (uint64_t)size / sizeof(uint64_t) ? (size_t)nb64 : (size_t)size; // larger than possible: size check fails
            expected += 2 * n * sizeof(float) + nb * sizeof(uint64_t);
            if (lcfg.use_adalora) expected += 2 * n * sizeof(float); // the importance state
        }
        if (header[37] < 0 || header[37] > cfg.vocab_size) {
            err = strprintf("adapter file '%s' says it holds %d trainable token rows, but the base has V=%d tokens\n---> HINT: the file is corrupt; %s", path, header[37], cfg.vocab_size, hint);
        }
        expected += (size_t)(header[37] > 0 ? header[37] : 0) * (sizeof(int) + (header[15] == 1 ? 3 : 1) * (size_t)cfg.channels * sizeof(float));
        if (err.empty() && (size_t)size != expected) {
            err = strprintf("adapter file '%s' is %ld bytes but its header (r=%d, targets %s, %s) needs %zu: %s\n---> HINT: %s",
                            path, size, lcfg.r, lora_targets_string(lcfg.targets).c_str(),
                            header[15] == 1 ? "with optimizer state" : "weights only", expected,
                            (size_t)size < expected ? "the file is truncated" : "there are trailing bytes", hint);
        }
    }
    if (err.empty() && model->block_file != NULL && lcfg.base_quant == LORA_QUANT_FP32) {
        err = strprintf("adapter file '%s' is for an fp32 base, but the base was read for a quantized one (block matrices left on disk)\n"
                        "---> HINT: pass the -Q the adapter was trained with, or -Q fp32", path);
    }
    std::vector<uint64_t> order;
    if (err.empty()) {
        if (model->lora.params_memory != NULL) lora_free(&model->lora);
        gpt2_token_rows_detach(model);     // rows of an adapter attached before: wte holds the base's again
        gpt2_lora_attach(model, lcfg, 0); // the init is overwritten below
        LoRA<float>* lora = &model->lora;
        bool ok = fread(lora->params_memory, sizeof(float), n, f) == n;
        size_t n_mask = adalora_mask_count(lcfg, cfg.num_layers);
        if (ok && n_mask > 0) ok = fread(lora->adalora_mask_memory, sizeof(float), n_mask, f) == n_mask;
        if (ok && header[15] == 1) {
            order.resize(nb);
            ok = fread(lora->m_memory, sizeof(float), n, f) == n && fread(lora->v_memory, sizeof(float), n, f) == n &&
                 fread(order.data(), sizeof(uint64_t), nb, f) == nb;
            if (ok && lcfg.use_adalora) ok = fread(lora->adalora_avg, sizeof(float), n, f) == n && fread(lora->adalora_unc, sizeof(float), n, f) == n;
        }
        if (ok && header[37] > 0) { // -C's token rows, last
            std::vector<int> ids(header[37]);
            ok = fread(ids.data(), sizeof(int), ids.size(), f) == ids.size();
            if (ok) {
                std::string terr = gpt2_token_rows_attach(model, ids);
                if (!terr.empty()) err = strprintf("adapter file '%s' holds trainable token rows, but: %s", path, terr.c_str());
            }
            if (ok && err.empty()) {
                TokenRows<float>* tr = &model->tokens;
                size_t nt = token_rows_count(tr);
                ok = fread(tr->rows, sizeof(float), nt, f) == nt;
                if (ok && header[15] == 1) ok = fread(tr->m, sizeof(float), nt, f) == nt && fread(tr->v, sizeof(float), nt, f) == nt;
                size_t bad = first_nonfinite(tr->rows, nt);
                if (ok && bad < nt) err = strprintf("adapter file '%s': trainable token row of id %d holds a non-finite value (%g)\n---> HINT: the file is corrupt, or it was saved by a run that diverged; use an earlier save", path, tr->ids[bad / tr->C], tr->rows[bad]);
                token_rows_write(tr, model->params.wte);
            }
        }
        if (!ok && err.empty()) err = strprintf("adapter file '%s': read error\n---> HINT: %s", path, hint);
        for (size_t k = 0; k < n_mask && err.empty(); k++) {
            float m = lora->adalora_mask_memory[k];
            if (m != 0.0f && m != 1.0f) err = strprintf("adapter file '%s': AdaLoRA mask value %g at index %zu is neither 0 nor 1\n---> HINT: the file is corrupt; %s", path, m, k, hint);
        }
        // NaN or inf in the weights (or the AdamW moments) would only show up as garbage or a NaN loss later
        const float* parts[3] = {lora->params_memory, lora->m_memory, lora->v_memory};
        const char* part_names[3] = {"weights", "AdamW m", "AdamW v"};
        for (int k = 0; k < (header[15] == 1 ? 3 : 1) && err.empty(); k++) {
            size_t bad = first_nonfinite(parts[k], n);
            if (bad < n) {
                err = strprintf("adapter file '%s': the %s hold a non-finite value (%g) at %s\n"
                                "---> HINT: the file is corrupt, or it was saved by a run that diverged; use an earlier save",
                                path, part_names[k], parts[k][bad], lora_flat_element_name(lora, bad).c_str());
            }
        }
    }
    fclose(f);
    if (err.empty() && header[15] == 1) {
        uint64_t position = header_get_u64(header, 24);
        std::vector<bool> seen(nb, false);
        bool ok = header[16] >= 0 && position <= nb && header[21] > 0 && header[22] > 0;
        for (size_t i = 0; i < nb && ok; i++) {
            ok = order[i] < nb && !seen[order[i]];
            if (ok) seen[order[i]] = true;
        }
        if (!ok) {
            err = strprintf("adapter file '%s' has an impossible training state (step %d, loader position %llu of %zu batches, or a batch order that is not a permutation)\n---> HINT: the file is corrupt; %s",
                            path, header[16], (unsigned long long)position, nb, hint);
        } else {
            *has_state = true;
            state->step = header[16];
            state->sample_rng.state = header_get_u64(header, 17);
            state->loader_rng.state = header_get_u64(header, 19);
            state->loader_B = header[21];
            state->loader_T = header[22];
            state->loader_shuffle = header[23] != 0;
            state->loader_position = (size_t)position;
            state->loader_order.assign(order.begin(), order.end());
        }
    }
    if (!err.empty() && model->lora.params_memory != NULL) lora_free(&model->lora);
    if (!err.empty()) gpt2_token_rows_detach(model);
    return err;
}

// the whole base in checkpoint order, num_parameters floats, into full, exactly as the matmuls see it:
// with a quantized base the four block matrices dequantized
template <typename real>
void gpt2_expand_params(GPT2<real>* model, real* full) {
    const GPT2Config& cfg = model->config;
    ParameterTensors<real> p = model->params;
    const real* stored[NUM_PARAMETER_TENSORS] = {p.wte, p.wpe, p.ln1w, p.ln1b, p.qkvw, p.qkvb, p.attprojw, p.attprojb,
                                                 p.ln2w, p.ln2b, p.fcw, p.fcb, p.fcprojw, p.fcprojb, p.lnfw, p.lnfb};
    size_t off = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        size_t n = model->param_sizes[i];
        if (stored[i] == NULL && i == 0) { // -Q bf16 read from a file: wte is held in bf16 only
            for (size_t k = 0; k < n; k++) { full[off + k] = (real)bf16_widen(model->wte_bf16[k]); }
        } else if (!param_tensor_is_block_matrix(i)) {
            memcpy(full + off, stored[i], n * sizeof(real));
        } else {
            int t = block_matrix_target(i);
            size_t per_layer = n / cfg.num_layers;
            for (int l = 0; l < cfg.num_layers; l++) {
                memcpy(full + off + (size_t)l * per_layer, gpt2_base_weight(model, t, l), per_layer * sizeof(real));
            }
        }
        off += n;
    }
}

// -M: writes base + scale * lora_B lora_A as an llm.c checkpoint (atomically), which any llm.c reader
// loads as a plain GPT-2. The model is unmerged again afterwards: its base equals the original within
// fp32 rounding (see the unmerge test), and its adapters stay attached.
// With a quantized base (-Q) the merge goes into a dequantized fp32 copy of the whole base, built for the
// write and freed after it: the file is the model that was trained (dequantized base + adapters), not the
// original fp32 base + adapters, which this process no longer holds.
static std::string write_merged_checkpoint(GPT2<float>* model, const char* path) {
    if (model->quant_q[0] != NULL) {
        std::vector<float> full(model->num_parameters);
        gpt2_expand_params(model, full.data());
        ParameterTensors<float> p;
        point_parameters(&p, model->param_sizes, full.data());
        float* base[LORA_NUM_TARGETS] = {p.qkvw, p.attprojw, p.fcw, p.fcprojw};
        lora_merge_all(&model->lora, base, +1);
        return checkpoint_write(path, model->config, full.data(), model->num_parameters);
    }
    gpt2_lora_merge(model, +1);
    std::string err = gpt2_write_checkpoint(model, path);
    gpt2_lora_merge(model, -1);
    return err;
}
