// libFuzzer target: tokens_read (llm.c token file) on arbitrary bytes must return "" or a clean error.
#define TESTING
#include "../../train_gpt2_lora.cpp"
#include "fuzz_files.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    MemFile file(data, size);
    TokenFile tf;
    std::string err = tokens_read(&tf, file.path.c_str(), 50257, "-i");
    if (!err.empty() && err.find("HINT") == std::string::npos) abort();
    return 0;
}
