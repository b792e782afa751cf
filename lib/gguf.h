// lib/gguf.h: GGUF (version 3) files for llama.cpp and the tools built on it (Ollama, LM Studio): a GPT-2
// model (the base, or base + adapter merged) and a GGUF LoRA adapter, written by -L.
// Not a standalone header: the trainer includes it after the model (GPT2, gpt2_base_weight).
//
// The format, little-endian: "GGUF", u32 version 3, u64 tensor count, u64 metadata count; the metadata
// as (key: u64 length + bytes, u32 value type, value); the tensor infos (name, u32 n_dims, u64 ne[n_dims]
// with ne[0] the fastest-varying dimension, u32 ggml type, u64 offset into the data section); padding to
// the alignment (32), then the data, each tensor's offset a multiple of 32.
// Orientation: llm.c's row-major (out, in) matrix is ggml's ne = [in, out], byte for byte; no transpose.
// llama.cpp names GPT-2's tensors token_embd, position_embd, blk.N.{attn_norm, attn_qkv, attn_output,
// ffn_norm, ffn_up, ffn_down}, output_norm; the LM head is tied to token_embd. Its vocabulary has exactly
// V = 50257 rows: llm.c's padding rows (Vp) are dropped.
// A LoRA adapter is general.type = "adapter", adapter.type = "lora", adapter.lora.alpha, and per adapted
// matrix "<base tensor>.lora_a" ne = [in, r] (our lora_A (r, in)) and ".lora_b" ne = [r, out] (our
// lora_B (out, r)). llama.cpp scales the branch by alpha / r, r read from lora_b.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>
#include "files.h"     // write_atomically
#include "tokenizer.h" // the GPT-2 vocabulary and merges for tokenizer.ggml.*

enum GGUFValueType { GGUF_U32 = 4, GGUF_I32 = 5, GGUF_F32 = 6, GGUF_STRING = 8, GGUF_ARRAY = 9 };
enum GGUFTensorType { GGUF_TENSOR_F32 = 0 };
#define GGUF_VERSION 3
#define GGUF_ALIGNMENT 32

// one tensor to write: its name, ne (fastest-varying first) and its float data, which must stay alive
// until gguf_write returns
struct GGUFTensor {
    std::string name;
    std::vector<uint64_t> ne;
    const float* data;
};

// a file being assembled: the metadata bytes as they will be written, and the tensors
struct GGUFWriter {
    std::string kv;      // the metadata entries, encoded
    uint64_t n_kv = 0;
    std::vector<GGUFTensor> tensors;
};

static inline void gguf_put_raw(std::string* out, const void* p, size_t n) { out->append((const char*)p, n); }
static inline void gguf_put_u32(std::string* out, uint32_t v) { gguf_put_raw(out, &v, 4); }
static inline void gguf_put_u64(std::string* out, uint64_t v) { gguf_put_raw(out, &v, 8); }
static inline void gguf_put_string(std::string* out, const std::string& s) {
    gguf_put_u64(out, s.size());
    out->append(s);
}

static inline void gguf_kv_u32(GGUFWriter* w, const char* key, uint32_t v) {
    gguf_put_string(&w->kv, key); gguf_put_u32(&w->kv, GGUF_U32); gguf_put_u32(&w->kv, v); w->n_kv++;
}
static inline void gguf_kv_f32(GGUFWriter* w, const char* key, float v) {
    gguf_put_string(&w->kv, key); gguf_put_u32(&w->kv, GGUF_F32); gguf_put_raw(&w->kv, &v, 4); w->n_kv++;
}
static inline void gguf_kv_string(GGUFWriter* w, const char* key, const std::string& v) {
    gguf_put_string(&w->kv, key); gguf_put_u32(&w->kv, GGUF_STRING); gguf_put_string(&w->kv, v); w->n_kv++;
}
static inline void gguf_kv_strings(GGUFWriter* w, const char* key, const std::vector<std::string>& v) {
    gguf_put_string(&w->kv, key); gguf_put_u32(&w->kv, GGUF_ARRAY); gguf_put_u32(&w->kv, GGUF_STRING);
    gguf_put_u64(&w->kv, v.size());
    for (const std::string& s : v) gguf_put_string(&w->kv, s);
    w->n_kv++;
}
static inline void gguf_kv_i32s(GGUFWriter* w, const char* key, const std::vector<int32_t>& v) {
    gguf_put_string(&w->kv, key); gguf_put_u32(&w->kv, GGUF_ARRAY); gguf_put_u32(&w->kv, GGUF_I32);
    gguf_put_u64(&w->kv, v.size());
    gguf_put_raw(&w->kv, v.data(), v.size() * sizeof(int32_t));
    w->n_kv++;
}

// the bytes of an F32 tensor
static inline uint64_t gguf_tensor_bytes(const GGUFTensor& t) {
    uint64_t n = 1;
    for (uint64_t d : t.ne) n *= d;
    return n * sizeof(float);
}

// the whole file, written atomically: the header, metadata and tensor infos are built in memory; the
// tensor data is written straight from the model's buffers, with zero padding between them
static std::string gguf_write(const GGUFWriter* w, const char* path) {
    std::string head;
    gguf_put_raw(&head, "GGUF", 4);
    gguf_put_u32(&head, GGUF_VERSION);
    gguf_put_u64(&head, w->tensors.size());
    gguf_put_u64(&head, w->n_kv);
    head += w->kv;
    uint64_t offset = 0; // into the data section
    for (const GGUFTensor& t : w->tensors) {
        gguf_put_string(&head, t.name);
        gguf_put_u32(&head, (uint32_t)t.ne.size());
        for (uint64_t d : t.ne) gguf_put_u64(&head, d);
        gguf_put_u32(&head, GGUF_TENSOR_F32);
        gguf_put_u64(&head, offset);
        offset += (gguf_tensor_bytes(t) + GGUF_ALIGNMENT - 1) / GGUF_ALIGNMENT * GGUF_ALIGNMENT;
    }
    static const char zeros[GGUF_ALIGNMENT] = {0};
    head.append((GGUF_ALIGNMENT - head.size() % GGUF_ALIGNMENT) % GGUF_ALIGNMENT, '\0');
    std::vector<std::pair<const void*, size_t>> parts = {{head.data(), head.size()}};
    for (const GGUFTensor& t : w->tensors) {
        uint64_t n = gguf_tensor_bytes(t);
        parts.push_back({t.data, (size_t)n});
        parts.push_back({zeros, (size_t)((GGUF_ALIGNMENT - n % GGUF_ALIGNMENT) % GGUF_ALIGNMENT)});
    }
    return write_atomically(path, parts);
}

// ----------------------------------------------------------------------------
// GPT-2 in llama.cpp's names

// llama.cpp's name of block matrix t (a LoRATarget) at layer l
static inline std::string gguf_block_matrix_name(int t, int l) {
    static const char* const names[LORA_NUM_TARGETS] = {"attn_qkv", "attn_output", "ffn_up", "ffn_down"};
    return "blk." + std::to_string(l) + "." + names[t] + ".weight";
}

// A GPT-2 model as llama.cpp loads it: the base as the matmuls see it (dequantized with -Q; with the
// adapter merged in when the caller merged it first). The vocabulary comes from the GPT-2 BPE files,
// which must match the model's V. full (num_parameters floats) holds the parameters in checkpoint order.
static std::string gguf_write_model(const char* path, const GPT2<float>* model, const float* full, const BPE* bpe,
                                    const char* name) {
    const GPT2Config& cfg = model->config;
    int V = cfg.vocab_size, C = cfg.channels, L = cfg.num_layers, maxT = cfg.max_seq_len;
    if (bpe->vocab_size != V) {
        return strprintf("cannot write '%s': the model has V=%d tokens but the GPT-2 BPE files have %d\n"
                         "---> HINT: llama.cpp needs the model's own tokenizer: export a model with GPT-2's vocabulary (V=50257)", path, V, bpe->vocab_size);
    }
    GGUFWriter w;
    gguf_kv_string(&w, "general.architecture", "gpt2");
    gguf_kv_string(&w, "general.name", name);
    gguf_kv_u32(&w, "general.alignment", GGUF_ALIGNMENT);
    gguf_kv_u32(&w, "gpt2.context_length", (uint32_t)maxT);
    gguf_kv_u32(&w, "gpt2.embedding_length", (uint32_t)C);
    gguf_kv_u32(&w, "gpt2.feed_forward_length", (uint32_t)(4 * C));
    gguf_kv_u32(&w, "gpt2.block_count", (uint32_t)L);
    gguf_kv_u32(&w, "gpt2.attention.head_count", (uint32_t)cfg.num_heads);
    gguf_kv_f32(&w, "gpt2.attention.layer_norm_epsilon", 1e-5f);
    gguf_kv_string(&w, "tokenizer.ggml.model", "gpt2");
    gguf_kv_string(&w, "tokenizer.ggml.pre", "gpt-2");
    std::vector<std::string> tokens((size_t)V);
    std::vector<int32_t> types((size_t)V, 1); // 1 normal, 3 control (<|endoftext|>)
    for (int id = 0; id < V; id++) tokens[(size_t)id] = bpe_token_string(bpe, id);
    types[(size_t)bpe->eot_token] = 3;
    gguf_kv_strings(&w, "tokenizer.ggml.tokens", tokens);
    gguf_kv_i32s(&w, "tokenizer.ggml.token_type", types);
    gguf_kv_strings(&w, "tokenizer.ggml.merges", bpe_merge_strings(bpe));
    gguf_kv_u32(&w, "tokenizer.ggml.bos_token_id", (uint32_t)bpe->eot_token);
    gguf_kv_u32(&w, "tokenizer.ggml.eos_token_id", (uint32_t)bpe->eot_token);

    ParameterTensors<float> p; // the parameters of `full`, in checkpoint order
    point_parameters(&p, model->param_sizes, (float*)full);
    uint64_t c = C;
    auto vec = [&](const std::string& n, const float* d) { w.tensors.push_back({n, {c}, d}); };
    w.tensors.push_back({"token_embd.weight", {c, (uint64_t)V}, p.wte}); // the first V rows of (Vp, C)
    w.tensors.push_back({"position_embd.weight", {c, (uint64_t)maxT}, p.wpe});
    for (int l = 0; l < L; l++) {
        std::string b = "blk." + std::to_string(l) + ".";
        LayerParams<float> lp = layer_params(p, l, C);
        vec(b + "attn_norm.weight", lp.ln1w);
        vec(b + "attn_norm.bias", lp.ln1b);
        w.tensors.push_back({gguf_block_matrix_name(LORA_QKV, l), {c, 3 * c}, lp.qkvw});
        w.tensors.push_back({b + "attn_qkv.bias", {3 * c}, lp.qkvb});
        w.tensors.push_back({gguf_block_matrix_name(LORA_ATTPROJ, l), {c, c}, lp.attprojw});
        vec(b + "attn_output.bias", lp.attprojb);
        vec(b + "ffn_norm.weight", lp.ln2w);
        vec(b + "ffn_norm.bias", lp.ln2b);
        w.tensors.push_back({gguf_block_matrix_name(LORA_FC, l), {c, 4 * c}, lp.fcw});
        w.tensors.push_back({b + "ffn_up.bias", {4 * c}, lp.fcb});
        w.tensors.push_back({gguf_block_matrix_name(LORA_FCPROJ, l), {4 * c, c}, lp.fcprojw});
        vec(b + "ffn_down.bias", lp.fcprojb);
    }
    vec("output_norm.weight", p.lnfw);
    vec("output_norm.bias", p.lnfb);
    return gguf_write(&w, path);
}

// "" when llama.cpp can apply this adapter as it is, else why not: llama.cpp's LoRA is plain
// scale * lora_B lora_A on the original base (rsLoRA is only another alpha)
static inline std::string gguf_adapter_refusal(const LoRAConfig& cfg) {
    if (cfg.use_dora) return "DoRA rescales each output row by m / ||W0 + scale lora_B lora_A||, which llama.cpp's LoRA cannot express";
    if (cfg.use_adalora) return "an AdaLoRA adapter has lora_E between lora_A and lora_B, which llama.cpp's LoRA does not read (merge it with -M instead)";
    if (cfg.init_pissa) return "a PiSSA adapter applies to the residual base W0 - scale lora_B0 lora_A0, not to the base llama.cpp would load";
    return "";
}

// The adapter as a GGUF LoRA adapter. rsLoRA's scale alpha / sqrt(r) is written as alpha' = alpha sqrt(r),
// so that llama.cpp's alpha' / r gives the same scale.
static std::string gguf_write_adapter(const char* path, const LoRA<float>* lora, const char* name) {
    std::string why = gguf_adapter_refusal(lora->config);
    if (!why.empty()) return strprintf("cannot write '%s' as a GGUF adapter: %s\n---> HINT: use plain LoRA or rsLoRA (-V lora / rslora), or export the merged model instead", path, why.c_str());
    GGUFWriter w;
    gguf_kv_string(&w, "general.architecture", "gpt2");
    gguf_kv_string(&w, "general.type", "adapter");
    gguf_kv_string(&w, "general.name", name);
    gguf_kv_u32(&w, "general.alignment", GGUF_ALIGNMENT);
    gguf_kv_string(&w, "adapter.type", "lora");
    const LoRAConfig& cfg = lora->config; // alpha' / r must be our scale: alpha / r, or rsLoRA's alpha / sqrt(r)
    gguf_kv_f32(&w, "adapter.lora.alpha", cfg.use_rslora ? cfg.alpha * std::sqrt((float)cfg.r) : cfg.alpha);
    for (int l = 0; l < lora->L; l++) {
        for (int t = 0; t < LORA_NUM_TARGETS; t++) {
            if (lora->lora_A[t] == NULL) continue;
            LoRALayer<float> a = lora_layer(lora, t, l);
            std::string base = gguf_block_matrix_name(t, l);
            w.tensors.push_back({base + ".lora_a", {(uint64_t)a.C, (uint64_t)a.r}, a.lora_A});
            w.tensors.push_back({base + ".lora_b", {(uint64_t)a.r, (uint64_t)a.OC}, a.lora_B});
        }
    }
    return gguf_write(&w, path);
}

// -L: <dir>/merged.gguf (base + adapter merged, any variant), and when llama.cpp can apply the adapter as it
// is, <dir>/base.gguf (the base as the matmuls see it: dequantized with -Q) and <dir>/adapter.gguf.
// *written lists what was written, for the log.
static std::string gguf_export(const char* dir, GPT2<float>* model, const BPE* bpe, std::string* written) {
    std::string d(dir), err;
    std::vector<float> full(model->num_parameters);
    gpt2_expand_params(model, full.data());
    std::string why = gguf_adapter_refusal(model->lora.config);
    // -C: llama.cpp's LoRA adapter holds lora_a / lora_b only, so trained token rows go into merged.gguf alone
    if (why.empty() && model->tokens.n > 0) why = "it has trainable token rows (-C), which a llama.cpp LoRA adapter cannot carry";
    if (why.empty()) {
        err = gguf_write_model((d + "/base.gguf").c_str(), model, full.data(), bpe, "train_gpt2_lora base");
        if (err.empty()) err = gguf_write_adapter((d + "/adapter.gguf").c_str(), &model->lora, "train_gpt2_lora adapter");
        if (!err.empty()) return err;
        *written = d + "/base.gguf, " + d + "/adapter.gguf, ";
    }
    ParameterTensors<float> p; // the copy, with the adapters folded in
    point_parameters(&p, model->param_sizes, full.data());
    float* base[LORA_NUM_TARGETS] = {p.qkvw, p.attprojw, p.fcw, p.fcprojw};
    lora_merge_all(&model->lora, base, +1);
    err = gguf_write_model((d + "/merged.gguf").c_str(), model, full.data(), bpe, "train_gpt2_lora merged");
    if (!err.empty()) return err;
    *written += d + "/merged.gguf" + (why.empty() ? "" : " (no adapter.gguf: " + why + ")");
    return "";
}
