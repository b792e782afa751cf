// lib/checkpoint.h: llm.c model checkpoints: gpt2_read_checkpoint (fp32, version 3, or bf16, version 5
// as llm.c's gpt2_124M_bf16.bin, widened to fp32; checked against the file size before anything is allocated), checkpoint_write / gpt2_write_checkpoint, and the
// quantized base's block matrices read one layer at a time from the file (gpt2_attach_layers_from_file).
// Not a standalone header: the trainer includes it after the model (GPT2, gpt2_init_empty).
#pragma once

#include "files.h" // read_llmc_header, write_atomically, CHECKPOINT_MAGIC

// reads an llm.c checkpoint into a fresh model: version 3 holds the parameters as fp32, version 5 as bf16
// (2 bytes each, the same order and header), which are widened exactly to fp32 here; -Q bf16 rounds them
// back to the same bits, so a bf16 base is then held exactly as the file has it.
// leave_block_matrices (a quantized base, -Q): qkvw, attprojw, fcw, fcprojw are skipped, the model holds
// the other 12 tensors only (those four pointers NULL) and remembers the file, from which
// gpt2_lora_attach reads them one layer at a time to quantize. So the fp32 block matrices are never all
// in memory, and the peak RSS of a quantized run is its quantized size, not the fp32 model's.
template <typename real>
std::string gpt2_read_checkpoint(GPT2<real>* model, const char* path, bool leave_block_matrices = false) {
    const char* hint = "pass an llm.c checkpoint (fp32 version 3 or bf16 version 5) with -e: data/gpt2_124M.bin is llm.c's starter pack (dev/download_starter_pack.sh, online); offline, `make run` pretrains data/brown_base.bin";
    FILE* f = NULL;
    long size = 0;
    int header[256];
    std::string err = read_llmc_header(path, "checkpoint", CHECKPOINT_MAGIC, hint, &f, &size, header);
    if (f == NULL) return err;
    if (err.empty() && header[1] != 3 && header[1] != 5) {
        err = strprintf("checkpoint '%s' has version %d, expected 3 (fp32) or 5 (bf16)\n---> HINT: export an llm.c checkpoint (llm.c's train_gpt2.py writes gpt2_124M.bin as version 3 and gpt2_124M_bf16.bin as version 5)",
                        path, header[1]);
    }
    size_t bytes_per_param = err.empty() && header[1] == 5 ? 2 : 4;
    GPT2Config cfg;
    if (err.empty()) {
        cfg.max_seq_len = header[2];
        cfg.vocab_size = header[3];
        cfg.num_layers = header[4];
        cfg.num_heads = header[5];
        cfg.channels = header[6];
        cfg.padded_vocab_size = header[7];
        bool ok = cfg.max_seq_len > 0 && cfg.max_seq_len <= 1 << 20 && cfg.vocab_size > 0 && cfg.vocab_size <= 1 << 24 &&
                  cfg.padded_vocab_size >= cfg.vocab_size && cfg.padded_vocab_size <= 1 << 24 && cfg.num_layers > 0 &&
                  cfg.num_layers <= 1024 && cfg.num_heads > 0 && cfg.channels > 0 && cfg.channels <= 1 << 16 &&
                  cfg.channels % cfg.num_heads == 0 && cfg.vocab_size <= 65536;
        if (!ok) {
            err = strprintf("checkpoint '%s' has impossible shapes: maxT=%d V=%d Vp=%d L=%d NH=%d C=%d (need positive sizes, Vp >= V, V <= 65536 for uint16 tokens, C divisible by NH)\n---> HINT: the file is corrupt or not an llm.c checkpoint; %s",
                            path, cfg.max_seq_len, cfg.vocab_size, cfg.padded_vocab_size, cfg.num_layers, cfg.num_heads, cfg.channels, hint);
        }
    }
    if (err.empty()) {
        size_t sizes[NUM_PARAMETER_TENSORS], n = 0;
        fill_in_parameter_sizes(sizes, cfg);
        for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) { n += sizes[i]; }
        size_t expected = sizeof(header) + n * bytes_per_param;
        if ((size_t)size != expected) {
            err = strprintf("checkpoint '%s' is %ld bytes but its header (version %d, %s; L=%d C=%d Vp=%d maxT=%d) needs %zu: %s\n---> HINT: %s",
                            path, size, header[1], bytes_per_param == 2 ? "bf16, 2 bytes a parameter" : "fp32, 4 bytes a parameter",
                            cfg.num_layers, cfg.channels, cfg.padded_vocab_size, cfg.max_seq_len, expected,
                            (size_t)size < expected ? "the file is truncated (re-download or re-export it)" : "there are trailing bytes", hint);
        }
    }
    if (err.empty()) {
        gpt2_init_empty(model, cfg, leave_block_matrices);
        // stream the fp32 (or bf16) blob tensor by tensor, converting to real when the model is not float
        real** ptrs[NUM_PARAMETER_TENSORS];
        parameter_pointers(&model->params, ptrs);
        std::vector<float> buf(1 << 16);
        std::vector<uint16_t> buf16(bytes_per_param == 2 ? buf.size() : 0);
        size_t done = 0; // parameters read (or skipped)
        for (int i = 0; i < NUM_PARAMETER_TENSORS && err.empty(); i++) {
            real* dst = *ptrs[i];
            size_t size = model->param_sizes[i];
            if (dst == NULL) { // a block matrix left on disk
                if (fseek(f, (long)(size * bytes_per_param), SEEK_CUR) != 0) {
                    err = strprintf("checkpoint '%s': seek error after %zu parameters\n---> HINT: %s", path, done, hint);
                }
                done += size;
                continue;
            }
            for (size_t at_i = 0; at_i < size;) {
                size_t n = std::min(buf.size(), size - at_i);
                bool ok = bytes_per_param == 4 ? fread(buf.data(), sizeof(float), n, f) == n : fread(buf16.data(), sizeof(uint16_t), n, f) == n;
                if (!ok) {
                    err = strprintf("checkpoint '%s': read error after %zu parameters\n---> HINT: %s", path, done + at_i, hint);
                    break;
                }
                if (bytes_per_param == 2) {
                    for (size_t k = 0; k < n; k++) { buf[k] = bf16_widen(buf16[k]); }
                }
                size_t bad = first_nonfinite(buf.data(), n);
                if (bad < n) {
                    err = strprintf("checkpoint '%s': tensor %s has a non-finite value (%g) at index %zu\n"
                                    "---> HINT: the file is corrupt, or it was saved by a run that diverged; use an earlier or a fresh checkpoint",
                                    path, param_tensor_names[i], buf[bad], at_i + bad);
                    break;
                }
                for (size_t k = 0; k < n; k++) { dst[at_i + k] = (real)buf[k]; }
                at_i += n;
            }
            done += size;
        }
        if (!err.empty()) {
            gpt2_free(model); // the caller gets no half-read model, and nothing leaks
        } else if (leave_block_matrices) {
            model->block_file = strdup(path);
            model->block_file_bf16 = bytes_per_param == 2;
        }
    }
    fclose(f);
    return err;
}

template <typename real>
void gpt2_build_from_checkpoint(GPT2<real>* model, const char* path) {
    std::string err = gpt2_read_checkpoint(model, path);
    if (!err.empty()) die(err);
}

// writes an llm.c fp32 checkpoint (version 3) of the base weights, atomically
// an llm.c v3 checkpoint of the n = all parameters in checkpoint order
static std::string checkpoint_write(const char* path, const GPT2Config& cfg, const float* params, size_t n) {
    size_t bad = first_nonfinite(params, n);
    if (bad < n) {
        size_t sizes[NUM_PARAMETER_TENSORS], at = 0;
        fill_in_parameter_sizes(sizes, cfg);
        int i = 0;
        while (i < NUM_PARAMETER_TENSORS - 1 && bad >= at + sizes[i]) at += sizes[i++];
        return strprintf("refusing to write '%s': tensor %s has a non-finite value (%g) at index %zu\n"
                         "---> HINT: the weights (or the adapter merged into them) hold NaN or inf; train with a lower learning rate (-l), or merge an adapter that loads cleanly",
                         path, param_tensor_names[i], params[bad], bad - at);
    }
    int header[256] = {0};
    header[0] = CHECKPOINT_MAGIC;
    header[1] = 3;
    header[2] = cfg.max_seq_len;
    header[3] = cfg.vocab_size;
    header[4] = cfg.num_layers;
    header[5] = cfg.num_heads;
    header[6] = cfg.channels;
    header[7] = cfg.padded_vocab_size;
    return write_atomically(path, {{header, sizeof(header)}, {params, n * sizeof(float)}});
}
static std::string gpt2_write_checkpoint(const GPT2<float>* model, const char* path) {
    if (model->num_params_stored != model->num_parameters) {
        return strprintf("cannot write '%s': the base is quantized (-Q) and holds no fp32 block matrices\n"
                         "---> HINT: write_merged_checkpoint (-M) writes the dequantized base + adapters", path);
    }
    return checkpoint_write(path, model->config, model->params_memory, model->num_parameters);
}

// -Q with the block matrices left on disk: each layer of each is read from the checkpoint into one
// (4C, C) scratch and handed to lora_attach_layer (PiSSA, then quantize), so at most one fp32 layer of
// them is ever in memory. The file was validated when the model was read from it.
template <typename real>
void gpt2_attach_layers_from_file(GPT2<real>* model) {
    const char* path = model->block_file;
    FILE* f = fopen(path, "rb");
    if (f == NULL) die(strprintf("checkpoint '%s' can no longer be opened to quantize its block matrices\n---> HINT: keep the -e file in place while the trainer starts", path));
    int L = model->config.num_layers, C = model->config.channels;
    std::vector<float> buf((size_t)4 * C * C);
    std::vector<uint16_t> buf16(model->block_file_bf16 ? buf.size() : 0);
    std::vector<real> W_l(buf.size());
    size_t offset = 256 * sizeof(int), bytes_per_param = model->block_file_bf16 ? 2 : 4; // past the header; version 5: bf16
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) {
        size_t n = model->param_sizes[i] / L; // one layer
        for (int l = 0; l < L && param_tensor_is_block_matrix(i); l++) {
            bool ok = fseek(f, (long)(offset + (size_t)l * n * bytes_per_param), SEEK_SET) == 0;
            ok = ok && (bytes_per_param == 4 ? fread(buf.data(), sizeof(float), n, f) == n : fread(buf16.data(), sizeof(uint16_t), n, f) == n);
            if (!ok) die(strprintf("checkpoint '%s': read error in %s, layer %d\n---> HINT: the file changed since it was loaded; load it again", path, param_tensor_names[i], l));
            if (bytes_per_param == 2) {
                for (size_t k = 0; k < n; k++) { buf[k] = bf16_widen(buf16[k]); }
            }
            size_t bad = first_nonfinite(buf.data(), n);
            if (bad < n) {
                die(strprintf("flag -e: checkpoint '%s': tensor %s has a non-finite value (%g) at index %zu\n"
                              "---> HINT: the file is corrupt, or it was saved by a run that diverged; use an earlier or a fresh checkpoint",
                              path, param_tensor_names[i], buf[bad], (size_t)l * n + bad));
            }
            for (size_t k = 0; k < n; k++) { W_l[k] = (real)buf[k]; }
            gpt2_attach_layer(model, block_matrix_target(i), l, W_l.data());
        }
        offset += model->param_sizes[i] * bytes_per_param;
    }
    fclose(f);
}
