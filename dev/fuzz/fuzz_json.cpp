// libFuzzer target: json_parse on arbitrary bytes must return "" or an error, never crash or recurse
// without bound (nesting is capped at 64).
#define TESTING
#include "../../train_gpt2_lora.cpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    Json doc;
    std::string err = json_parse((const char*)data, size, &doc);
    if (err.empty() && doc.kind == Json::OBJECT) {
        uint64_t x;
        for (const auto& m : doc.members) json_to_u64(&m.second, &x);
    }
    return 0;
}
