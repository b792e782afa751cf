// libFuzzer target: peft_import with an arbitrary adapter_config.json (next to a valid r=2 safetensors
// file for the tiny base) must return "" or a clean error.
#define TESTING
#include "../../train_gpt2_lora.cpp"
#include "fuzz_files.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static GPT2<float> base;
    static std::string dir;
    if (dir.empty()) {
        gpt2_build_random(&base, GPT2Config{4, 8, 8, 1, 1, 4}, 1);
        char tmpl[] = "/dev/shm/fuzz_peft_XXXXXX";
        if (mkdtemp(tmpl) == NULL) abort();
        dir = tmpl;
        gpt2_lora_attach(&base, lora_config(2, 4.0f, LORA_ALL_TARGETS), 2);
        if (!peft_export(dir.c_str(), &base, "gpt2").empty()) abort();
        lora_free(&base.lora);
        atexit([] { // leave nothing in /dev/shm
            remove((dir + "/" PEFT_CONFIG_FILE).c_str());
            remove((dir + "/" PEFT_WEIGHTS_FILE).c_str());
            rmdir(dir.c_str());
        });
    }
    std::string config = dir + "/" PEFT_CONFIG_FILE;
    FILE* f = fopen(config.c_str(), "wb");
    if (f == NULL || (size > 0 && fwrite(data, 1, size, f) != size) || fclose(f) != 0) abort();
    std::string err = peft_import(dir.c_str(), &base);
    if (!err.empty() && err.find("HINT") == std::string::npos) abort();
    if (base.lora.params_memory != NULL) lora_free(&base.lora);
    return 0;
}
