// libFuzzer target: gpt2_read_checkpoint on arbitrary bytes must return "" or a clean error.
// Build and run with `make fuzz` (dev/fuzz.mk); seeds are written by the target itself (-seed_dir).
#define TESTING
#include "../../train_gpt2_lora.cpp"
#include "fuzz_files.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    MemFile file(data, size);
    GPT2<float> model;
    memset(&model, 0, sizeof(model));
    std::string err = gpt2_read_checkpoint(&model, file.path.c_str());
    if (err.empty()) gpt2_free(&model);
    else if (err.find("HINT") == std::string::npos) abort(); // every error must carry a HINT
    return 0;
}
