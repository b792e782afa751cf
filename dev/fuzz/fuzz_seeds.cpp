// Writes one valid seed file per libFuzzer target into <dir>/<target>/seed, so the fuzzers start from
// files the readers accept and mutate from there (the magic numbers alone would take a while to guess).
// Usage: fuzz_seeds <dir>   (dev/fuzz.mk runs it before the fuzzers)
#define TESTING
#include "../../train_gpt2_lora.cpp"
#include "fuzz_files.h"
#include <sys/stat.h>

static void put(const std::string& dir, const char* target, const void* data, size_t n) {
    std::string d = dir + "/" + target;
    mkdir(d.c_str(), 0755);
    std::string path = d + "/seed";
    std::string err = write_atomically(path.c_str(), {{data, n}});
    if (!err.empty()) die(err);
}

int main(int argc, char** argv) {
    if (argc != 2) die("usage: fuzz_seeds <dir>\n---> HINT: run it through make fuzz");
    std::string dir = argv[1];
    mkdir(dir.c_str(), 0755);
    // the smallest sensible GPT-2: V=8 (Vp=8), maxT=4, L=1, NH=1, C=4 -> a 2224-byte checkpoint
    GPT2Config cfg = {4, 8, 8, 1, 1, 4};
    GPT2<float> model;
    gpt2_build_random(&model, cfg, 1);
    std::string ckpt = dir + "/model.bin";
    std::string err = gpt2_write_checkpoint(&model, ckpt.c_str());
    if (!err.empty()) die(err);
    // an r=2 adapter on every target: adapter.bin with training state (fuzz_adapter), and the PEFT pair
    // (fuzz_safetensors, fuzz_peft_config, fuzz_json)
    gpt2_lora_attach(&model, lora_config(2, 4.0f, LORA_ALL_TARGETS), 2);
    TrainState state;
    state.step = 3;
    state.loader_B = 1;
    state.loader_T = 4;
    state.loader_position = 1;
    state.loader_order = {2, 0, 1};
    std::string adir = dir + "/adapter";
    mkdir(adir.c_str(), 0755);
    err = lora_file_write((adir + "/seed").c_str(), &model, base_checksum(model.params_memory, model.num_parameters), &state);
    if (!err.empty()) die(err);
    std::string pdir = dir + "/peft";
    mkdir(pdir.c_str(), 0755);
    err = peft_export(pdir.c_str(), &model, "gpt2");
    if (!err.empty()) die(err);
    std::string config;
    err = read_text_file((pdir + "/" PEFT_CONFIG_FILE).c_str(), "PEFT config", "check " PEFT_CONFIG_FILE, &config);
    if (!err.empty()) die(err);
    put(dir, "peft_config", config.data(), config.size());
    put(dir, "json", config.data(), config.size());
    mkdir((dir + "/safetensors").c_str(), 0755);
    if (rename((pdir + "/" PEFT_WEIGHTS_FILE).c_str(), (dir + "/safetensors/seed").c_str()) != 0 ||
        remove((pdir + "/" PEFT_CONFIG_FILE).c_str()) != 0) {
        die("cannot move the PEFT seeds\n---> HINT: check " + dir);
    }
    rmdir(pdir.c_str());
    gpt2_free(&model);
    std::string d = dir + "/checkpoint";
    mkdir(d.c_str(), 0755);
    if (rename(ckpt.c_str(), (d + "/seed").c_str()) != 0) die("cannot move the checkpoint seed\n---> HINT: check " + dir);

    int header[256] = {0};
    header[0] = TOKENS_MAGIC; header[1] = 1; header[2] = 16;
    std::vector<uint16_t> ids = {0, 1, 2, 3, 4, 5, 6, 7, 50256, 1, 2, 3, 4, 5, 6, 7};
    std::string tokens((const char*)header, sizeof(header));
    tokens.append((const char*)ids.data(), ids.size() * 2);
    put(dir, "tokens", tokens.data(), tokens.size());

    memset(header, 0, sizeof(header));
    header[0] = TOKENIZER_MAGIC; header[1] = 2; header[2] = 4; header[3] = 3;
    std::string tok((const char*)header, sizeof(header));
    tok += std::string("\x02hi\x01!\x03you\x05<eot>", 15);
    put(dir, "tokenizer", tok.data(), tok.size());

    std::string js, vb;
    fuzz_synthetic_bpe(&js, &vb);
    put(dir, "encoder_json", js.data(), js.size());
    put(dir, "vocab_bpe", vb.data(), vb.size());
    return 0;
}
