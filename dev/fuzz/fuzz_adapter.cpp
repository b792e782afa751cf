// libFuzzer target: lora_file_read (our adapter.bin) on arbitrary bytes, for a fixed tiny base, must return
// "" or a clean error; an accepted file must leave a consistent adapter (and state) behind.
#define TESTING
#include "../../train_gpt2_lora.cpp"
#include "fuzz_files.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static GPT2<float> base;
    static uint64_t base_sum = 0;
    if (base.params_memory == NULL) {
        gpt2_build_random(&base, GPT2Config{4, 8, 8, 1, 1, 4}, 1); // the base fuzz_seeds.cpp wrote the seed for
        base_sum = base_checksum(base.params_memory, base.num_parameters);
    }
    MemFile file(data, size);
    TrainState state;
    bool has_state = false;
    std::string err = lora_file_read(file.path.c_str(), &base, base_sum, &state, &has_state);
    if (!err.empty() && err.find("HINT") == std::string::npos) abort();
    if (err.empty()) {
        if (base.lora.num_parameters != lora_count_parameters(base.lora.config, 1, 4)) abort();
        if (has_state && state.loader_position > state.loader_order.size()) abort();
    }
    if (base.lora.params_memory != NULL) lora_free(&base.lora);
    return 0;
}
