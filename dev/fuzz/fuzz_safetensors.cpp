// libFuzzer target: safetensors_read on arbitrary bytes must return "" or a clean error; every tensor of
// an accepted file must lie inside the data it read.
#define TESTING
#include "../../train_gpt2_lora.cpp"
#include "fuzz_files.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    MemFile file(data, size);
    SafeTensors st;
    std::string err = safetensors_read(file.path.c_str(), &st);
    if (!err.empty() && err.find("HINT") == std::string::npos) abort();
    for (const SafeTensor& t : st.tensors) {
        if (t.begin > t.end || t.end > st.data.size() * sizeof(float)) abort();
    }
    return 0;
}
