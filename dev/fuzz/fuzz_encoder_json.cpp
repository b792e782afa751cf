// libFuzzer target: bpe_load with an arbitrary encoder.json (and the synthetic vocab.bpe) must return 0
// or a clean error; this drives the JSON parser.
#include "fuzz_files.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static std::string js, vb;
    if (vb.empty()) fuzz_synthetic_bpe(&js, &vb);
    MemFile enc(data, size), voc(vb.data(), vb.size());
    BPE bpe;
    bpe.print_errors = false;
    if (bpe_load(&bpe, enc.path.c_str(), voc.path.c_str()) != 0 && bpe.error.find("HINT") == std::string::npos) abort();
    return 0;
}
