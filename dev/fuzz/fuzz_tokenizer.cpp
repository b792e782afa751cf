// libFuzzer target: tokenizer_read (llm.c tokenizer file) on arbitrary bytes must return "" or a clean error,
// and a file it accepts must have an end-of-text id that indexes its pieces.
#define TESTING
#include "../../train_gpt2_lora.cpp"
#include "fuzz_files.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    MemFile file(data, size);
    Tokenizer tok;
    std::string err = tokenizer_read(&tok, file.path.c_str());
    if (!err.empty() && err.find("HINT") == std::string::npos) abort();
    if (err.empty() && (tok.eot_token < 0 || tok.eot_token >= (int)tok.pieces.size())) abort();
    return 0;
}
