// lib/peft.h: Hugging Face PEFT's LoRA adapter directory (adapter_model.safetensors +
// adapter_config.json): peft_export and peft_import, and the loaders main uses for any -A (adapter.bin
// or a PEFT directory, one or several).
// Not a standalone header: the trainer includes it after the model.
#pragma once

#include "adapter_files.h" // lora_file_read
#include "safetensors.h"   // the tensors
#include "json.h"          // the config
#include "save_set.h"      // the manifest of a save in -o, checked on load

// PEFT: adapter_model.safetensors + adapter_config.json, as Hugging Face PEFT saves a LoRA for GPT-2.
// Orientation, checked in PEFT's source (peft/tuners/lora/layer.py): for a transformers Conv1D base layer
// (GPT-2's c_attn, c_proj, c_fc, whose weight is stored (in, out)) PEFT takes in_features, out_features =
// weight.shape and still builds lora_A = nn.Linear(in, r) and lora_B = nn.Linear(r, out), so the saved
// lora_A.weight is (r, in) and lora_B.weight (out, r). fan_in_fan_out = True only makes get_delta_weight
// transpose lora_B @ lora_A into Conv1D's (in, out) layout when merging. llm.c stores weights (out, in),
// so our lora_A (r, in) and lora_B (out, r) are PEFT's tensors as they are: no transpose either way.
// Target matching (peft/tuners/tuners_utils.py): a module matches when its full name equals a listed
// name or ends with "." + name; "c_proj" would match both projections, so we write qualified names.

#define PEFT_WEIGHTS_FILE "adapter_model.safetensors"
#define PEFT_CONFIG_FILE "adapter_config.json"

// the module names Hugging Face PEFT uses for our four LoRA targets (LoRATarget order) in GPT-2
static const char* const lora_peft_names[LORA_NUM_TARGETS] = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"};

// Hugging Face PEFT's key for one tensor of a GPT-2 adapter, e.g.
// "base_model.model.transformer.h.3.mlp.c_fc.lora_B.weight". PEFT's lora_A / lora_B are nn.Linear
// modules, so their weights are (r, in) and (out, r) whatever the base layer is: exactly our layout.
static inline std::string lora_peft_key(int layer, int target, bool is_B) {
    return "base_model.model.transformer.h." + std::to_string(layer) + "." + lora_peft_names[target] +
           (is_B ? ".lora_B.weight" : ".lora_A.weight");
}

// -C's trainable token rows (n, C), as PEFT saves a LoraConfig's trainable_token_indices on GPT-2: the input
// embedding wte is wrapped (TrainableTokensWrapper, its layer under "token_adapter") and the tied LM head
// shares it, saving nothing of its own (tied_adapter). The tensor holds the rows' new values, not
// differences, in the order of the config's trainable_token_indices list.
static const char* const token_rows_peft_key = "base_model.model.transformer.wte.token_adapter.trainable_tokens_delta";

// DoRA's magnitude (out) of one module, as PEFT saves it: "<module>.lora_magnitude_vector" (no ".weight")
static inline std::string lora_peft_magnitude_key(int layer, int target) {
    return "base_model.model.transformer.h." + std::to_string(layer) + "." + lora_peft_names[target] + ".lora_magnitude_vector";
}

// the shortest decimal that reads back as exactly x (0.1f is written 0.1, as a PEFT user would)
static inline std::string json_float_shortest(float x) {
    for (int digits = 1; digits < 9; digits++) {
        std::string s = strprintf("%.*g", digits, x);
        if (strtof(s.c_str(), NULL) == x) return s;
    }
    return strprintf("%.9g", x);
}

// ---- AdaLoRA in PEFT's layout (peft/tuners/adalora): lora_A, lora_E, lora_B are bare parameters, saved as
// "<module>.lora_A" (k, in), "<module>.lora_E" (k, 1) and "<module>.lora_B" (out, k) without ".weight", where
// k is the module's kept rank: get_peft_model_state_dict keeps only the triplets its rank_pattern marks
// true. adapter_config.json has "peft_type": "ADALORA", init_r, target_r, the schedule and rank_pattern,
// {"transformer.h.<l>.<module>.lora_E": [init_r booleans]}; loading rebuilds each module at rank k and
// keeps ranknum = init_r, so the scale stays lora_alpha / (init_r + 1e-5).
static inline std::string adalora_peft_key(int layer, int target, const char* tensor) {
    return "base_model.model.transformer.h." + std::to_string(layer) + "." + lora_peft_names[target] + "." + tensor;
}
static inline std::string adalora_rank_pattern_key(int layer, int target) {
    return "transformer.h." + std::to_string(layer) + "." + lora_peft_names[target] + ".lora_E";
}

// the AdaLoRA part of adapter_config.json: the schedule (total_step at least what PEFT's check wants) and rank_pattern
static std::string adalora_config_json(const LoRA<float>* lora) {
    const LoRAConfig& c = lora->config;
    int total_step = std::max(c.adalora_total_step, c.adalora_tinit + c.adalora_tfinal + 1); // PEFT: tinit < total_step - tfinal
    std::string s = strprintf("  \"init_r\": %d,\n  \"target_r\": %d,\n  \"tinit\": %d,\n  \"tfinal\": %d,\n  \"deltaT\": %d,\n"
                              "  \"beta1\": %.2f,\n  \"beta2\": %.2f,\n  \"orth_reg_weight\": %.9g,\n  \"total_step\": %d,\n  \"rank_pattern\": {",
                              c.r, c.adalora_target_r, c.adalora_tinit, c.adalora_tfinal, c.adalora_deltaT, ADALORA_BETA1, ADALORA_BETA2,
                              c.adalora_orth_reg, total_step);
    bool first = true;
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        for (int l = 0; l < lora->L && lora->lora_E[t] != NULL; l++) {
            LoRALayer<float> a = lora_layer(lora, t, l);
            s += std::string(first ? "\n" : ",\n") + "    " + json_quote(adalora_rank_pattern_key(l, t).c_str()) + ": [";
            for (int i = 0; i < a.r; i++) s += std::string(i ? ", " : "") + (a.mask[i] != 0 ? "true" : "false");
            s += "]";
            first = false;
        }
    }
    return s + "\n  },\n";
}

// the kept triplets of every module as PEFT saves them; the tensors point into *storage
static void adalora_peft_tensors(const LoRA<float>* lora, std::vector<SafeTensorOut>* tensors, std::vector<std::vector<float>>* storage) {
    storage->reserve(3 * LORA_NUM_TARGETS * lora->L); // no reallocation: the tensors keep pointers
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        for (int l = 0; l < lora->L && lora->lora_E[t] != NULL; l++) {
            LoRALayer<float> a = lora_layer(lora, t, l);
            std::vector<int> kept;
            for (int i = 0; i < a.r; i++) { if (a.mask[i] != 0) kept.push_back(i); }
            size_t k = kept.size();
            std::vector<float> A(k * a.C), E(k), B((size_t)a.OC * k);
            for (size_t j = 0; j < k; j++) {
                memcpy(&A[j * a.C], a.lora_A + (size_t)kept[j] * a.C, a.C * sizeof(float));
                E[j] = a.lora_E[kept[j]];
                for (int o = 0; o < a.OC; o++) B[(size_t)o * k + j] = a.lora_B[(size_t)o * a.r + kept[j]];
            }
            storage->push_back(std::move(A));
            tensors->push_back({adalora_peft_key(l, t, "lora_A"), {k, (size_t)a.C}, storage->back().data()});
            storage->push_back(std::move(E));
            tensors->push_back({adalora_peft_key(l, t, "lora_E"), {k, 1}, storage->back().data()});
            storage->push_back(std::move(B));
            tensors->push_back({adalora_peft_key(l, t, "lora_B"), {(size_t)a.OC, k}, storage->back().data()});
        }
    }
}

// reads PEFT's AdaLoRA tensors for cfg (rank_pattern: each module's kept triplets, in module order of
// adalora_rank_pattern_key; empty: all kept) from st and attaches them: the kept triplets go back to
// their positions, the others stay masked with lora_E = 0
static std::string adalora_peft_read(const char* weights_path, const SafeTensors& st, LoRAConfig cfg,
                                     const std::vector<std::vector<bool>>& rank_pattern, GPT2<float>* model) {
    int L = model->config.num_layers, C = model->config.channels;
    size_t expected = 0;
    for (int pass = 0; pass < 2; pass++) { // pass 0 checks every tensor, pass 1 attaches and copies
        if (pass == 1) {
            if (model->lora.params_memory != NULL) lora_free(&model->lora);
            gpt2_lora_attach(model, cfg, 0);
        }
        size_t m = 0;
        for (int t = 0; t < LORA_NUM_TARGETS; t++) {
            if (!(cfg.targets & (1u << t))) continue;
            int in = lora_target_in(t, C), out = lora_target_out(t, C);
            for (int l = 0; l < L; l++, m++) {
                std::vector<bool> keep = rank_pattern.empty() ? std::vector<bool>(cfg.r, true) : rank_pattern[m];
                size_t k = (size_t)std::count(keep.begin(), keep.end(), true);
                const char* names[3] = {"lora_A", "lora_E", "lora_B"};
                size_t shapes[3][2] = {{k, (size_t)in}, {k, 1}, {(size_t)out, k}};
                const SafeTensor* s[3];
                for (int j = 0; j < 3; j++) {
                    std::string key = adalora_peft_key(l, t, names[j]);
                    s[j] = st.find(key);
                    if (s[j] == NULL) return strprintf("PEFT AdaLoRA adapter '%s' has no tensor '%s', which its config needs\n---> HINT: the adapter was made for another model or config", weights_path, key.c_str());
                    bool shape_ok = s[j]->shape.size() == 2 && s[j]->shape[0] == shapes[j][0] && s[j]->shape[1] == shapes[j][1];
                    if (!shape_ok) return strprintf("PEFT AdaLoRA adapter '%s': tensor '%s' must have shape [%zu,%zu] (rank %zu kept of init_r %d in rank_pattern)\n---> HINT: the adapter was made for another base (-e), or its rank_pattern does not belong to it",
                                                    weights_path, key.c_str(), shapes[j][0], shapes[j][1], k, cfg.r);
                    size_t count = shapes[j][0] * shapes[j][1], bad = first_nonfinite(st.values(s[j]), count);
                    if (bad < count) return strprintf("PEFT AdaLoRA adapter '%s': tensor '%s' has a non-finite value at index %zu\n---> HINT: the file is corrupt, or it was saved by a run that diverged", weights_path, key.c_str(), bad);
                }
                if (pass == 0) { expected += 3; continue; }
                LoRALayer<float> a = lora_layer(&model->lora, t, l);
                memset(a.lora_A, 0, (size_t)a.r * in * sizeof(float)); // masked rows: zeros (they do not act: lora_E = 0)
                memset(a.lora_B, 0, (size_t)out * a.r * sizeof(float));
                size_t j = 0;
                for (int i = 0; i < a.r; i++) {
                    a.mask[i] = keep[i] ? 1.0f : 0.0f;
                    a.lora_E[i] = 0;
                    if (!keep[i]) continue;
                    memcpy(a.lora_A + (size_t)i * in, st.values(s[0]) + j * in, in * sizeof(float));
                    a.lora_E[i] = st.values(s[1])[j];
                    for (int o = 0; o < out; o++) a.lora_B[(size_t)o * a.r + i] = st.values(s[2])[(size_t)o * k + j];
                    j++;
                }
            }
        }
        if (pass == 0 && st.tensors.size() != expected) {
            return strprintf("PEFT AdaLoRA adapter '%s' holds %zu tensors, but its config's targets (%s) on an L=%d base need %zu (lora_A, lora_E, lora_B per module)\n---> HINT: check target_modules in its adapter_config.json",
                             weights_path, st.tensors.size(), lora_targets_string(cfg.targets).c_str(), L, expected);
        }
    }
    return "";
}

static std::string peft_config_json(LoRAConfig cfg, const char* base_name, const std::string& adalora_part = "", const std::string& token_part = "") {
    std::string targets;
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        if (cfg.targets & (1u << t)) targets += (targets.empty() ? "" : ", ") + json_quote(lora_peft_names[t]);
    }
    // lora_alpha is an int in PEFT's LoraConfig; write a fraction only when alpha has one
    std::string alpha = cfg.alpha == std::floor(cfg.alpha) && std::fabs(cfg.alpha) < 1e9f ? strprintf("%d", (int)cfg.alpha) : strprintf("%.9g", cfg.alpha);
    return "{\n"
           "  \"peft_type\": " + std::string(cfg.use_adalora ? "\"ADALORA\"" : "\"LORA\"") + ",\n" + adalora_part +
           "  \"task_type\": \"CAUSAL_LM\",\n"
           "  \"base_model_name_or_path\": " + json_quote(base_name) + ",\n"
           "  \"r\": " + std::to_string(cfg.r) + ",\n"
           "  \"lora_alpha\": " + alpha + ",\n"
           "  \"target_modules\": [" + targets + "],\n"
           "  \"fan_in_fan_out\": true,\n"
           "  \"bias\": \"none\",\n"
           "  \"lora_dropout\": " + json_float_shortest(cfg.dropout) + ",\n"
           "  \"use_rslora\": " + std::string(cfg.use_rslora ? "true" : "false") + ",\n"
           "  \"use_dora\": " + std::string(cfg.use_dora ? "true" : "false") + ",\n"
           "  \"init_lora_weights\": " + std::string(cfg.init_pissa ? "\"pissa\"" : "true") + ",\n" + token_part +
           "  \"inference_mode\": true\n"
           "}\n";
}

// writes <dir>/adapter_model.safetensors and <dir>/adapter_config.json; base_name is a hub id like "gpt2"
static std::string peft_export(const char* dir, const GPT2<float>* model, const char* base_name) {
    const LoRA<float>* lora = &model->lora;
    std::vector<SafeTensorOut> tensors;
    std::vector<std::vector<float>> adalora_storage; // AdaLoRA: the kept triplets, copied out
    if (lora->config.use_adalora) adalora_peft_tensors(lora, &tensors, &adalora_storage);
    for (const LoRATensor& t : lora_tensor_list(lora->config, lora->L, lora->C)) {
        if (lora->config.use_adalora) break;
        tensors.push_back({lora_peft_key(t.layer, t.target, t.is_B), {(size_t)t.rows, (size_t)t.cols}, lora->params_memory + t.offset});
    }
    // DoRA: one magnitude vector (out) per module
    for (int t = 0; t < LORA_NUM_TARGETS; t++) {
        if (lora->dora_m[t] == NULL) continue;
        for (int l = 0; l < lora->L; l++) {
            LoRALayer<float> a = lora_layer(lora, t, l);
            tensors.push_back({lora_peft_magnitude_key(l, t), {(size_t)a.OC}, a.dora_m});
        }
    }
    // -C: the token rows under PEFT's key, their ids in the config (a list: PEFT applies it to the input embedding)
    const TokenRows<float>* tr = &model->tokens;
    std::string token_part;
    if (tr->n > 0) {
        tensors.push_back({token_rows_peft_key, {(size_t)tr->n, (size_t)tr->C}, tr->rows});
        token_part = "  \"trainable_token_indices\": [";
        for (int s = 0; s < tr->n; s++) token_part += (s ? ", " : "") + std::to_string(tr->ids[s]);
        token_part += "],\n";
    }
    std::string err = safetensors_write((std::string(dir) + "/" PEFT_WEIGHTS_FILE).c_str(), tensors);
    if (!err.empty()) return err;
    std::string config = peft_config_json(lora->config, base_name, lora->config.use_adalora ? adalora_config_json(lora) : "", token_part);
    return write_atomically((std::string(dir) + "/" PEFT_CONFIG_FILE).c_str(), {{config.data(), config.size()}});
}

// Reads a PEFT LoRA adapter directory (made by PEFT or by peft_export) and attaches it to the base in
// model. The config decides r, alpha and the targets; every adapted target needs both tensors for every
// layer, with the exact shapes; any other key is an error (PEFT itself would ignore a misspelled key).
// base_quant: how to store the base's block matrices (LoRAQuant; PEFT files do not say: fp32 by default)
static std::string peft_import(const char* dir, GPT2<float>* model, int base_quant = LORA_QUANT_FP32) {
    const char* hint = "pass a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors, as save_pretrained writes them) with -A";
    std::string config_path = std::string(dir) + "/" PEFT_CONFIG_FILE, weights_path = std::string(dir) + "/" PEFT_WEIGHTS_FILE;
    const char* cpath = config_path.c_str();
    std::string text;
    std::string err = read_text_file(cpath, "PEFT config", hint, &text);
    if (!err.empty()) return err;
    Json doc;
    std::string jerr = json_parse(text.data(), text.size(), &doc);
    if (!jerr.empty()) return strprintf("PEFT config '%s' is not valid JSON: %s\n---> HINT: %s", cpath, jerr.c_str(), hint);
    if (doc.kind != Json::OBJECT) return strprintf("PEFT config '%s' is not a JSON object\n---> HINT: %s", cpath, hint);
    auto bad = [&](const std::string& what, const char* fix) { return strprintf("PEFT config '%s': %s\n---> HINT: %s", cpath, what.c_str(), fix); };
    const Json* v = doc.get("peft_type");
    if (v == NULL || v->kind != Json::STRING || (v->str != "LORA" && v->str != "ADALORA")) return bad("peft_type must be \"LORA\" or \"ADALORA\"", hint);
    bool adalora = v->str == "ADALORA";
    uint64_t r = 0;
    if (adalora) { // AdaLoRA's rank is init_r (PEFT ignores r)
        r = 12; // PEFT's default init_r
        if (doc.get("init_r") != NULL && (!json_to_u64(doc.get("init_r"), &r) || r < 1 || r > 65536)) return bad("init_r must be an integer >= 1", hint);
    } else if (!json_to_u64(doc.get("r"), &r) || r < 1 || r > 65536) {
        return bad("r must be an integer >= 1", hint);
    }
    float alpha = 8.0f; // PEFT's default lora_alpha
    v = doc.get("lora_alpha");
    if (v != NULL && (v->kind != Json::NUMBER || !(v->number > 0) || !std::isfinite(v->number))) return bad("lora_alpha must be a number > 0", hint);
    if (v != NULL) alpha = (float)v->number;
    v = doc.get("use_rslora");
    if (v != NULL && v->kind != Json::BOOL) return bad("use_rslora must be true or false", hint);
    bool use_rslora = v != NULL && v->boolean; // PEFT's scale is then alpha / sqrt(r), as ours
    v = doc.get("use_dora");
    if (v != NULL && v->kind != Json::BOOL && v->kind != Json::NUL) return bad("use_dora must be true or false", hint);
    bool use_dora = v != NULL && v->kind == Json::BOOL && v->boolean; // then one lora_magnitude_vector per module
    v = doc.get("init_lora_weights");
    if (v != NULL && v->kind == Json::STRING && v->str.compare(0, 5, "pissa") == 0) {
        // PiSSA changes the base too (W0 -> W0 - scale lora_B0 lora_A0 at init), and that residual base is
        // not in the adapter files: on the original base this adapter would give a different model
        return bad("init_lora_weights is \"" + v->str + "\": a PiSSA adapter needs the residual base it was trained on, which PEFT does not save with it",
                   "in PEFT, save it converted to a plain LoRA (save_pretrained(..., path_initial_model_for_weight_conversion=...)); ours: load adapter.bin, which redoes the PiSSA split of the base");
    }
    // lora_dropout: the -D a training run on this adapter uses unless -D is given (PEFT's default 0.0)
    float dropout = 0.0f;
    v = doc.get("lora_dropout");
    if (v != NULL && v->kind != Json::NUL && (v->kind != Json::NUMBER || !(v->number >= 0 && v->number < 1))) {
        return bad("lora_dropout must be a number in [0, 1)", "fix lora_dropout in the config (0.0 = off), or override it with -D");
    }
    if (v != NULL && v->kind == Json::NUMBER) dropout = (float)v->number;
    v = doc.get("bias");
    if (v != NULL && !(v->kind == Json::STRING && v->str == "none")) return bad("bias must be \"none\" (bias training is not supported)", "train with bias=\"none\"");
    v = doc.get("layers_to_transform");
    if (v != NULL && v->kind != Json::NUL && !(v->kind == Json::ARRAY && v->items.empty())) return bad("layers_to_transform is set; only adapters on every layer are supported", hint);
    // trainable_token_indices (-C): a list (the input embedding, tied to the LM head on GPT-2), or an object
    // naming the embedding module ("wte", "transformer.wte") with its list
    std::vector<int> token_ids;
    v = doc.get("trainable_token_indices");
    if (v != NULL && v->kind == Json::OBJECT) {
        if (v->members.size() != 1 || (v->members[0].first != "wte" && v->members[0].first != "transformer.wte")) {
            return bad("trainable_token_indices names modules other than the token embedding wte; only GPT-2's wte (tied to the LM head) can train rows", hint);
        }
        v = &v->members[0].second;
    }
    if (v != NULL && v->kind != Json::NUL) {
        if (v->kind != Json::ARRAY) return bad("trainable_token_indices must be a list of token ids (or {\"wte\": [...]})", hint);
        for (const Json& id : v->items) {
            uint64_t u = 0;
            if (!json_to_u64(&id, &u) || u >= (uint64_t)model->config.vocab_size) {
                return bad(strprintf("trainable_token_indices holds a value that is not a token id below V = %d", model->config.vocab_size), "the adapter was made for another base (-e)");
            }
            token_ids.push_back((int)u);
        }
        std::string terr = token_rows_check_ids(token_ids, model->config.vocab_size);
        if (!terr.empty()) return bad("trainable_token_indices: " + terr, hint);
    }
    for (const char* key : {"rank_pattern", "alpha_pattern"}) {
        if (adalora && std::string(key) == "rank_pattern") continue; // AdaLoRA's own, read below
        v = doc.get(key);
        if (v != NULL && v->kind != Json::NUL && !(v->kind == Json::OBJECT && v->members.empty())) return bad(std::string(key) + " is set; one r and alpha for every layer are supported", hint);
    }
    // target_modules: a list of names matched like PEFT does; missing means PEFT's default for GPT-2, c_attn
    unsigned targets = 0;
    v = doc.get("target_modules");
    if (v == NULL || v->kind == Json::NUL) {
        targets = 1u << LORA_QKV;
    } else if (v->kind != Json::ARRAY) {
        return bad("target_modules must be a list of module names (a regex string is not supported)", "list the modules, e.g. [\"c_attn\", \"c_proj\", \"c_fc\"]");
    } else {
        for (const Json& name : v->items) {
            if (name.kind != Json::STRING) return bad("target_modules must hold strings", hint);
            unsigned matched = 0;
            for (int t = 0; t < LORA_NUM_TARGETS; t++) {
                std::string module = std::string("transformer.h.0.") + lora_peft_names[t];
                bool hit = module == name.str || (module.size() > name.str.size() &&
                           module.compare(module.size() - name.str.size() - 1, std::string::npos, "." + name.str) == 0);
                if (hit) matched |= 1u << t;
            }
            if (matched == 0) return bad("target module \"" + name.str + "\" is none of GPT-2's adaptable matmuls", "use c_attn, c_proj (or attn.c_proj / mlp.c_proj), c_fc");
            targets |= matched;
        }
    }
    if (targets == 0) return bad("target_modules is empty", hint);
    LoRAConfig cfg = lora_config_rslora(lora_config((int)r, alpha, targets), use_rslora);
    cfg.use_dora = use_dora;
    cfg.base_quant = base_quant;
    cfg.dropout = dropout;
    std::vector<std::vector<bool>> rank_pattern; // AdaLoRA: per module (target-major, then layer), the kept triplets
    if (adalora) {
        if (use_rslora || use_dora) return bad("an AdaLoRA config with use_rslora or use_dora (PEFT's AdaLoRA supports neither)", hint);
        cfg.use_adalora = true;
        struct { const char* key; int* to; uint64_t lo; } ints[] = {{"target_r", &cfg.adalora_target_r, 1}, {"tinit", &cfg.adalora_tinit, 0},
            {"tfinal", &cfg.adalora_tfinal, 0}, {"deltaT", &cfg.adalora_deltaT, 1}, {"total_step", &cfg.adalora_total_step, 0}};
        for (auto& x : ints) {
            uint64_t u = 0;
            v = doc.get(x.key);
            if (v == NULL || v->kind == Json::NUL) continue; // PEFT's default (lora_config's)
            if (!json_to_u64(v, &u) || u < x.lo || u > (1u << 30)) return bad(strprintf("%s must be an integer >= %d", x.key, (int)x.lo), hint);
            *x.to = (int)u;
        }
        if (cfg.adalora_target_r > cfg.r) cfg.adalora_target_r = cfg.r; // only the budget of further training; the file's ranks are rank_pattern's
        v = doc.get("orth_reg_weight");
        if (v != NULL && v->kind == Json::NUMBER && v->number >= 0 && std::isfinite(v->number)) cfg.adalora_orth_reg = (float)v->number;
        cfg.scale = lora_scale_of(cfg);
        v = doc.get("rank_pattern");
        if (v != NULL && v->kind == Json::OBJECT && !v->members.empty()) {
            for (int t = 0; t < LORA_NUM_TARGETS; t++) {
                for (int l = 0; (targets & (1u << t)) && l < model->config.num_layers; l++) {
                    std::string key = adalora_rank_pattern_key(l, t);
                    const Json* p = v->get(key.c_str());
                    if (p == NULL || p->kind != Json::ARRAY || p->items.size() != r) return bad("rank_pattern needs \"" + key + "\": a list of init_r = " + std::to_string(r) + " booleans", hint);
                    std::vector<bool> keep;
                    for (const Json& b : p->items) {
                        if (b.kind != Json::BOOL) return bad("rank_pattern \"" + key + "\" must hold booleans", hint);
                        keep.push_back(b.boolean);
                    }
                    rank_pattern.push_back(keep);
                }
            }
            if (v->members.size() != rank_pattern.size()) return bad("rank_pattern has entries for modules that are not targets of this config on this base", hint);
        } else if (v != NULL && v->kind != Json::NUL && v->kind != Json::OBJECT) {
            return bad("rank_pattern must be an object or null", hint);
        }
    }

    SafeTensors st;
    err = safetensors_read(weights_path.c_str(), &st);
    if (!err.empty()) return err;
    if (adalora) {
        if (model->block_file != NULL && cfg.base_quant == LORA_QUANT_FP32) {
            return strprintf("PEFT adapter '%s': the base was read for a quantized attach (block matrices left on disk) but -Q is fp32\n---> HINT: pass -Q int8, -Q nf4 or -Q int2 with -A", dir);
        }
        if (!token_ids.empty()) return bad("trainable_token_indices with AdaLoRA is not supported here", hint);
        return adalora_peft_read(weights_path.c_str(), st, cfg, rank_pattern, model);
    }
    const SafeTensor* token_rows = NULL;
    if (!token_ids.empty()) {
        token_rows = st.find(token_rows_peft_key);
        size_t nt = token_ids.size() * (size_t)model->config.channels;
        if (token_rows == NULL || token_rows->shape.size() != 2 || token_rows->shape[0] != token_ids.size() || token_rows->shape[1] != (size_t)model->config.channels) {
            return strprintf("PEFT adapter '%s' needs tensor '%s' of shape [%zu,%d] for its config's %zu trainable_token_indices\n---> HINT: the adapter was made for another base (-e), or saved without its token rows; %s",
                             weights_path.c_str(), token_rows_peft_key, token_ids.size(), model->config.channels, token_ids.size(), hint);
        }
        size_t bad_at = first_nonfinite(st.values(token_rows), nt);
        if (bad_at < nt) return strprintf("PEFT adapter '%s': tensor '%s' has a non-finite value at index %zu\n---> HINT: the file is corrupt, or it was saved by a run that diverged", weights_path.c_str(), token_rows_peft_key, bad_at);
    }
    int L = model->config.num_layers, C = model->config.channels;
    std::vector<LoRATensor> list = lora_tensor_list(cfg, L, C);
    for (const LoRATensor& t : list) {
        std::string key = lora_peft_key(t.layer, t.target, t.is_B);
        const SafeTensor* s = st.find(key);
        if (s == NULL) {
            return strprintf("PEFT adapter '%s' has no tensor '%s', which its config (r=%d, targets %s) needs\n---> HINT: the adapter was made for another model or config; %s",
                             weights_path.c_str(), key.c_str(), cfg.r, lora_targets_string(cfg.targets).c_str(), hint);
        }
        if (s->shape.size() != 2 || s->shape[0] != (size_t)t.rows || s->shape[1] != (size_t)t.cols) {
            std::string shape;
            for (size_t d : s->shape) shape += (shape.empty() ? "" : ",") + std::to_string(d);
            return strprintf("PEFT adapter '%s': tensor '%s' has shape [%s], expected [%d,%d] (r=%d on a base with C=%d)\n---> HINT: the adapter was made for another base (-e) or its config's r is wrong",
                             weights_path.c_str(), key.c_str(), shape.c_str(), t.rows, t.cols, cfg.r, C);
        }
    }
    for (const LoRATensor& t : list) { // NaN or inf would only show up as garbage output later
        const SafeTensor* s = st.find(lora_peft_key(t.layer, t.target, t.is_B));
        size_t count = (size_t)t.rows * t.cols, bad = first_nonfinite(st.values(s), count);
        if (bad < count) {
            return strprintf("PEFT adapter '%s': tensor '%s' has a non-finite value (%g) at index %zu\n"
                             "---> HINT: the file is corrupt, or it was saved by a run that diverged; use an earlier save",
                             weights_path.c_str(), s->name.c_str(), st.values(s)[bad], bad);
        }
    }
    // DoRA: one magnitude vector (out) per adapted module
    struct Magnitude { std::string key; int target, layer; };
    std::vector<Magnitude> magnitudes;
    for (int t = 0; use_dora && t < LORA_NUM_TARGETS; t++) {
        if (!(cfg.targets & (1u << t))) continue;
        int out = lora_target_out(t, C);
        for (int l = 0; l < L; l++) {
            std::string key = lora_peft_magnitude_key(l, t);
            const SafeTensor* s = st.find(key);
            if (s == NULL) {
                return strprintf("PEFT adapter '%s' has no tensor '%s', which its config (use_dora) needs\n---> HINT: %s", weights_path.c_str(), key.c_str(), hint);
            }
            if (s->shape.size() != 1 || s->shape[0] != (size_t)out) {
                return strprintf("PEFT adapter '%s': DoRA magnitude '%s' must have shape [%d] (the module's outputs)\n---> HINT: the adapter was made for another base (-e)",
                                 weights_path.c_str(), key.c_str(), out);
            }
            size_t bad = first_nonfinite(st.values(s), (size_t)out);
            if (bad < (size_t)out) {
                return strprintf("PEFT adapter '%s': tensor '%s' has a non-finite value (%g) at index %zu\n"
                                 "---> HINT: the file is corrupt, or it was saved by a run that diverged; use an earlier save",
                                 weights_path.c_str(), key.c_str(), st.values(s)[bad], bad);
            }
            magnitudes.push_back({key, t, l});
        }
    }
    if (st.tensors.size() != list.size() + magnitudes.size() + (token_rows != NULL)) {
        std::unordered_set<std::string> wanted; // one lookup per tensor: linear in the file, whatever it holds
        for (const LoRATensor& t : list) wanted.insert(lora_peft_key(t.layer, t.target, t.is_B));
        for (const Magnitude& m : magnitudes) wanted.insert(m.key);
        if (token_rows != NULL) wanted.insert(token_rows_peft_key);
        for (const SafeTensor& s : st.tensors) {
            bool expected = wanted.count(s.name) > 0;
            if (!expected) {
                return strprintf("PEFT adapter '%s' has tensor '%s', which is not a lora_A/lora_B of a target in its config (%s) on an L=%d base\n---> HINT: check target_modules in '%s'; %s",
                                 weights_path.c_str(), s.name.c_str(), lora_targets_string(cfg.targets).c_str(), L, cpath, hint);
            }
        }
    }
    if (model->block_file != NULL && cfg.base_quant == LORA_QUANT_FP32) {
        return strprintf("PEFT adapter '%s': the base was read for a quantized attach (block matrices left on disk) but -Q is fp32\n---> HINT: pass -Q int8, -Q nf4 or -Q int2 with -A", dir);
    }
    if (model->lora.params_memory != NULL) lora_free(&model->lora);
    gpt2_token_rows_detach(model); // rows of an adapter attached before: wte holds the base's again
    gpt2_lora_attach(model, cfg, 0); // the init is overwritten here
    if (token_rows != NULL) {
        std::string terr = gpt2_token_rows_attach(model, token_ids);
        if (!terr.empty()) return strprintf("PEFT adapter '%s' has trainable_token_indices, but: %s", dir, terr.c_str());
        memcpy(model->tokens.rows, st.values(token_rows), token_rows_count(&model->tokens) * sizeof(float));
        token_rows_write(&model->tokens, model->params.wte);
    }
    for (const LoRATensor& t : list) {
        const SafeTensor* s = st.find(lora_peft_key(t.layer, t.target, t.is_B));
        memcpy(model->lora.params_memory + t.offset, st.values(s), (size_t)t.rows * t.cols * sizeof(float));
    }
    for (const Magnitude& m : magnitudes) { // the trained magnitudes replace the ||W0||_row that attach started from
        LoRALayer<float> a = lora_layer(&model->lora, m.target, m.layer);
        memcpy(a.dora_m, st.values(st.find(m.key)), (size_t)a.OC * sizeof(float));
    }
    return "";
}

// the base storage an adapter.bin says it trained on (header[29]), read before the base is loaded;
// fp32 for anything else (a PEFT directory, an unreadable or invalid file: lora_file_read reports those)
static int adapter_file_base_quant(const char* path) {
    int header[256];
    FILE* f = NULL;
    if (!open_for_reading(path, "adapter file", "", &f).empty()) return LORA_QUANT_FP32; // a FIFO, a directory: lora_file_load says so
    bool ok = fread(header, sizeof(header), 1, f) == 1 && header[0] == ADAPTER_MAGIC;
    fclose(f);
    return ok && header[29] > 0 && header[29] < LORA_NUM_QUANTS ? header[29] : LORA_QUANT_FP32;
}

// -A: a directory is a PEFT adapter, a file is our adapter.bin. base_quant: -Q when given, else -1 (the
// adapter.bin's own base storage; fp32 for PEFT)
static std::string lora_file_load(const char* path, GPT2<float>* model, uint64_t base_sum, TrainState* state, bool* has_state,
                                  int base_quant = -1) {
    struct stat st;
    *has_state = false;
    bool is_dir = stat(path, &st) == 0 && S_ISDIR(st.st_mode);
    // files from one save only: checked against the directory's save_set.json, when it has one
    std::string err = is_dir ? save_set_verify(path, {PEFT_WEIGHTS_FILE, PEFT_CONFIG_FILE}) : save_set_verify(path_dirname(path).c_str(), {path_basename(path)});
    if (!err.empty()) return err;
    if (is_dir) return peft_import(path, model, base_quant >= 0 ? base_quant : LORA_QUANT_FP32);
    return lora_file_read(path, model, base_sum, state, has_state, base_quant);
}

// Several adapters (-A given more than once) on one base: each is loaded onto the base in turn and moved
// aside into parts[k]. Only plain (and rsLoRA) adapters on the fp32 base qualify: the change of DoRA (a
// row norm) and of PiSSA (a changed base) is not scale * lora_B lora_A on the shared base. The caller
// frees the parts (lora_free), also after an error.
static std::string lora_files_load_all(const std::vector<const char*>& paths, GPT2<float>* model, uint64_t base_sum,
                                       std::vector<LoRA<float>>* parts) {
    parts->assign(paths.size(), LoRA<float>());
    for (size_t k = 0; k < paths.size(); k++) {
        TrainState unused;
        bool has_state = false;
        std::string err = lora_file_load(paths[k], model, base_sum, &unused, &has_state, LORA_QUANT_FP32);
        const LoRAConfig& c = model->lora.config;
        if (err.empty() && (c.use_dora || c.init_pissa || c.use_adalora)) {
            err = strprintf("adapter '%s' is %s: its change to the base is not scale * lora_B lora_A, so it cannot share the base with others\n"
                            "---> HINT: use it alone (one -A, no -S or -Y), e.g. -A %s -M merged.bin -x 0",
                            paths[k], c.use_dora ? "DoRA" : c.init_pissa ? "PiSSA" : "AdaLoRA", paths[k]);
        }
        if (err.empty() && model->tokens.n > 0) { // -C's rows replace rows of wte: they do not add like low-rank updates
            gpt2_token_rows_detach(model);
            err = strprintf("adapter '%s' has trainable token rows (-C), which replace rows of the shared wte, so it cannot share the base with others\n"
                            "---> HINT: use it alone (one -A, no -S or -Y), e.g. -A %s -M merged.bin -x 0", paths[k], paths[k]);
        }
        if (!err.empty()) return paths.size() > 1 ? strprintf("adapter %zu of %zu: ", k + 1, paths.size()) + err : err;
        (*parts)[k] = model->lora; // moved aside
        memset(&model->lora, 0, sizeof(model->lora));
    }
    return "";
}

// -A given more than once, or with -S weights: the adapters folded into one by lora_combine, attached as
// the model's adapter, which -p, -M and -o then use like any other
static std::string lora_files_combine(const std::vector<const char*>& paths, const std::vector<float>& weights,
                                      GPT2<float>* model, uint64_t base_sum) {
    std::vector<LoRA<float>> parts;
    std::string err = lora_files_load_all(paths, model, base_sum, &parts);
    if (err.empty()) {
        std::vector<const LoRA<float>*> ptrs;
        for (const LoRA<float>& part : parts) ptrs.push_back(&part);
        LoRA<float> mix;
        lora_combine(&mix, ptrs.data(), weights.data(), (int)parts.size());
        gpt2_lora_attach(model, mix.config, 0);
        memcpy(model->lora.params_memory, mix.params_memory, mix.num_parameters * sizeof(float));
        lora_free(&mix);
    }
    for (LoRA<float>& part : parts) { if (part.params_memory != NULL) lora_free(&part); }
    return err;
}

// One save set into dir: adapter.bin (with the AdamW moments and the loader state when state != NULL),
// the PEFT pair, then save_set.json listing them (lib/save_set.h). Each file is written atomically and
// the manifest last: while a save is under way (or after a crash in one) the old manifest no longer
// matches the new files, so a reader refuses the mix instead of loading it. step: what the manifest
// says the weights are (state->step when there is a state).
static std::string save_set_write(const char* dir, const GPT2<float>* model, uint64_t base_sum, const TrainState* state, int step,
                                  const char* base_name) {
    std::string err = lora_file_write((std::string(dir) + "/adapter.bin").c_str(), model, base_sum, state);
    save_set_test_pause();
    if (err.empty()) err = peft_export(dir, model, base_name);
    save_set_test_pause();
    if (err.empty()) err = save_set_write_manifest(dir, {"adapter.bin", PEFT_WEIGHTS_FILE, PEFT_CONFIG_FILE}, state ? state->step : step, state != NULL);
    return err;
}

// everything -o gets for an adapter: <dir>/adapter.bin (with the state for exact resume), the PEFT export
// and the manifest, as one save set
static std::string lora_file_save_all(const char* dir, const GPT2<float>* model, uint64_t base_sum, const TrainState& state, const char* base_name) {
    return save_set_write(dir, model, base_sum, &state, state.step, base_name);
}
