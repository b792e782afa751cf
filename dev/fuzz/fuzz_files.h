// dev/fuzz/fuzz_files.h: what the libFuzzer targets (dev/fuzz/fuzz_*.cpp) and the reader mutation
// tests (test_lora.cpp, "reliability: fuzzed readers") share: bytes as a readable path, and small
// synthetic GPT-2 BPE files (encoder.json + vocab.bpe) that bpe_load accepts. Needs lib/tokenizer.h.
#pragma once
#include <stdint.h>
#include <string>
#include <sys/mman.h>
#include <unistd.h>
#include "../../lib/tokenizer.h"

// the bytes as an anonymous in-memory file, readable by path through /proc/self/fd: no disk I/O,
// nothing left behind, and the readers see a regular seekable file
struct MemFile {
    int fd = -1;
    std::string path;
    MemFile(const void* data, size_t n) {
        fd = memfd_create("fuzz_input", 0);
        if (fd < 0) { perror("memfd_create"); abort(); }
        const char* p = (const char*)data;
        size_t done = 0;
        while (done < n) {
            ssize_t w = write(fd, p + done, n - done);
            if (w <= 0) { perror("write memfd"); abort(); }
            done += (size_t)w;
        }
        path = "/proc/self/fd/" + std::to_string(fd);
    }
    ~MemFile() { if (fd >= 0) close(fd); }
    MemFile(const MemFile&) = delete;
    MemFile& operator=(const MemFile&) = delete;
};

// the GPT-2 spelling of one raw byte as a UTF-8 string (visible bytes stand for themselves, the
// other 68 map in order to U+0100.. ; see lib/tokenizer.h)
static inline std::string fuzz_gpt2_char(int b) {
    std::string s;
    int n = 0;
    for (int k = 0; k < 256; k++) {
        if (bpe_byte_is_visible_(k)) { if (k == b) json_put_utf8(&s, (uint32_t)k); }
        else { if (k == b) json_put_utf8(&s, 256u + n); n++; }
    }
    return s;
}

static inline std::string fuzz_json_key(const std::string& s) {
    std::string out = "\"";
    for (char c : s) {
        if (c == '"' || c == '\\') out += '\\';
        out += c;
    }
    return out + "\"";
}

// A 256 + 4 + 1 token vocabulary: every byte, the merges "h e", "l l", "he ll", "hell o" (so "hello"
// is one token) and <|endoftext|> last, like GPT-2's. The vocab.bpe merges are listed in rank order.
static inline void fuzz_synthetic_bpe(std::string* encoder_json, std::string* vocab_bpe) {
    const char* merges[][2] = {{"h", "e"}, {"l", "l"}, {"he", "ll"}, {"hell", "o"}};
    std::string js = "{";
    int id = 0;
    for (int b = 0; b < 256; b++) {
        js += (b ? ", " : "") + fuzz_json_key(fuzz_gpt2_char(b)) + ": " + std::to_string(id++);
    }
    std::string vb = "#version: 0.2\n";
    for (auto& m : merges) {
        js += ", " + fuzz_json_key(std::string(m[0]) + m[1]) + ": " + std::to_string(id++);
        vb += std::string(m[0]) + " " + m[1] + "\n";
    }
    js += ", " + fuzz_json_key(BPE_EOT_STRING) + ": " + std::to_string(id++) + "}\n";
    *encoder_json = js;
    *vocab_bpe = vb;
}
