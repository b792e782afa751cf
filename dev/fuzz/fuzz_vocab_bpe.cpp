// libFuzzer target: bpe_load with an arbitrary vocab.bpe (and the synthetic encoder.json) must return 0
// or a clean error; a file it accepts must encode and decode text round trip.
#include "fuzz_files.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static std::string js, vb;
    if (js.empty()) fuzz_synthetic_bpe(&js, &vb);
    MemFile enc(js.data(), js.size()), voc(data, size);
    BPE bpe;
    bpe.print_errors = false;
    if (bpe_load(&bpe, enc.path.c_str(), voc.path.c_str()) != 0) {
        if (bpe.error.find("HINT") == std::string::npos) abort();
        return 0;
    }
    const char text[] = "hello, hell of a hello\n";
    std::vector<int> ids;
    bpe_encode(&bpe, text, sizeof(text) - 1, ids);
    if (bpe_decode(&bpe, ids.data(), ids.size()) != text) abort();
    return 0;
}
