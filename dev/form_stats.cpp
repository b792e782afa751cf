// dev/form_stats.cpp: what LoRA changed in the *form* of the text a model writes, measured. `make run`'s
// summary (dev/run.sh) runs it after the LoRA fine-tune. It generates n tokens from the base and n from
// the base + adapter (same seed, temperature 1, no top-k: each model's own distribution), takes the first
// n tokens of real text (tinyshakespeare's val split), and prints for the three
//   newlines per 100 tokens      '\n' characters in the decoded text per 100 tokens
//   mean line length             characters per non-empty line
//   speaker-tag lines            share of non-empty lines that look like "NAME:" (1 to 4 capitalized
//                                words of letters and apostrophes, then a colon, e.g. "First Citizen:")
//   tokens unseen in Brown       share of tokens that never occur in the Brown training tokens
//   P(line break) on real text   the mean probability each model gives "\n" or "\n\n" as the next token
//                                on the real text (for the real text: the share of those tokens in it)
// as one table, then the first lines of each sample with their line breaks, and the validation-loss
// curves of the logs it is given as text plots. <|endoftext|> tokens are not counted as tokens and
// decode to nothing (in tinyshakespeare each follows a blank line).
// A sample longer than the context is generated in windows: the key/value cache is filled with the
// last T/2 tokens, then T/2 tokens are sampled one position at a time, so no token sees fewer than T/2
// tokens of context (the trainer's -p slides the window a token at a time, a full forward per token).
// Usage: see usage() below. Python is not used anywhere in `make run`; this is plain C++ on the trainer's code.
#define TESTING
#include "../train_gpt2_lora.cpp" // the model, checkpoints, adapters, the sampler, the llm.c file readers

#include <regex>

static void usage() {
    fprintf(stderr,
            "usage: form_stats -e <base.bin> -A <adapter dir or adapter.bin> -r <real text tokens>\n"
            "                  [-w <Brown train tokens>] [-c <llm.c tokenizer>] [-n <tokens>] [-s <seed>] [-t <context T>] [-k <lines shown>]\n"
            "                  [-l <log with val losses>:<title>]...\n"
            "  -n  tokens per sample, >= 1 (default 2000); -s seed (default 1337); -t context, <= maxT (default maxT)\n"
            "  -c  default data/gpt2_tokenizer.bin; -k lines of each sample printed (default 8)\n"
            "  -w  without it (GPT-2 124M needs no Brown corpus), the row of tokens unseen in Brown is left out\n"
            "  -l  a trainer log: its \"val loss\" lines are plotted against the step, titled <title>\n");
    exit(1);
}

// ---------------------------------------------------------------------------- generating

// n tokens after <|endoftext|>, in windows of T/2 new tokens after T/2 of context (see the header)
static std::vector<int> sample_tokens(GPT2<float>* model, int n, uint64_t seed, int eot) {
    Rng rng;
    rng_seed(&rng, seed);
    int T = model->alloc_T, half = std::max(1, T / 2);
    std::vector<int> all = {eot};
    while ((int)all.size() - 1 < n) {
        size_t ctx = std::min<size_t>(all.size(), (size_t)(T - half));
        std::vector<int> prompt(all.end() - ctx, all.end());
        int want = std::min(n - ((int)all.size() - 1), T - (int)ctx); // prompt + new tokens fit in the cache
        std::vector<int> out = gpt2_generate(model, prompt, want, &rng, 1.0f, 0, true);
        all.insert(all.end(), out.begin(), out.end());
    }
    return std::vector<int>(all.begin() + 1, all.end());
}

// ---------------------------------------------------------------------------- measuring the form

struct Form {
    int tokens = 0;           // without <|endoftext|>
    double newlines_per_100 = 0, mean_line_chars = 0, tag_share = 0, unseen_share = 0;
    int lines = 0, tags = 0, unseen = 0;
    std::string text;         // decoded, <|endoftext|> as nothing
};

static std::string decode(const Tokenizer& tok, const std::vector<int>& ids) {
    std::string s;
    for (int id : ids) if (id != tok.eot_token && id >= 0 && id < (int)tok.pieces.size()) s += tok.pieces[id];
    return s;
}

static Form measure(const Tokenizer& tok, const std::vector<int>& ids, const std::vector<bool>& in_brown) {
    static const std::regex speaker_tag("[A-Z][A-Za-z']*( [A-Z][A-Za-z']*){0,3}:");
    Form f;
    f.text = decode(tok, ids);
    for (int id : ids) {
        if (id == tok.eot_token) continue;
        f.tokens++;
        if (id >= (int)in_brown.size() || !in_brown[id]) f.unseen++;
    }
    size_t newlines = 0, chars = 0;
    for (size_t p = 0; p <= f.text.size();) {
        size_t e = f.text.find('\n', p);
        if (e == std::string::npos) e = f.text.size();
        else newlines++;
        std::string line = f.text.substr(p, e - p);
        while (!line.empty() && (line.back() == ' ' || line.back() == '\r' || line.back() == '\t')) line.pop_back();
        size_t first = line.find_first_not_of(" \t");
        line = first == std::string::npos ? "" : line.substr(first);
        if (!line.empty()) {
            f.lines++;
            chars += line.size();
            if (std::regex_match(line, speaker_tag)) f.tags++;
        }
        p = e + 1;
    }
    f.newlines_per_100 = f.tokens > 0 ? 100.0 * newlines / f.tokens : 0;
    f.mean_line_chars = f.lines > 0 ? (double)chars / f.lines : 0;
    f.tag_share = f.lines > 0 ? 100.0 * f.tags / f.lines : 0;
    f.unseen_share = f.tokens > 0 ? 100.0 * f.unseen / f.tokens : 0;
    return f;
}

// the first k lines of a text, indented, each cut at 100 characters
static void print_lines(const std::string& text, int k) {
    int shown = 0;
    for (size_t p = 0; p < text.size() && shown < k; shown++) {
        size_t e = text.find('\n', p);
        if (e == std::string::npos) e = text.size();
        std::string line = text.substr(p, e - p);
        if (line.size() > 100) { line = line.substr(0, 100); while (!line.empty() && (line.back() & 0xC0) == 0x80) line.pop_back(); line += " ..."; }
        printf("    | %s\n", line.c_str());
        p = e + 1;
    }
}

// the mean probability a model gives "\n" (198) or "\n\n" (628) as the next token on real text, over
// windows of T tokens: how often it expects a line break where the text goes on (the text's own share
// of those tokens is the target a calibrated model hits)
static double newline_probability(GPT2<float>* model, const std::vector<int>& ids) {
    int T = model->alloc_T, V = model->config.vocab_size, Vp = model->config.padded_vocab_size;
    double sum = 0;
    size_t count = 0;
    for (size_t start = 0; start + 1 < ids.size(); start += T) {
        int len = (int)std::min<size_t>(T, ids.size() - start);
        gpt2_forward(model, ids.data() + start, (const int*)NULL, 1, len);
        for (int t = 0; t < len; t++) {
            const float* logits = model->acts.logits + (size_t)t * Vp;
            double mx = logits[0], z = 0;
            for (int v = 1; v < V; v++) mx = std::max(mx, (double)logits[v]);
            for (int v = 0; v < V; v++) z += std::exp((double)logits[v] - mx);
            sum += (std::exp((double)logits[198] - mx) + std::exp((double)logits[628] - mx)) / z;
            count++;
        }
    }
    return count > 0 ? 100.0 * sum / count : 0;
}

// ---------------------------------------------------------------------------- the val-loss curve

// (step, val loss) from a trainer log: "val loss X" is printed before the line of step s + 1, so it
// belongs to the step of the last "step N/M" line before it (0 at the start)
static std::vector<std::pair<int, double>> read_val_losses(const char* path) {
    std::vector<std::pair<int, double>> out;
    FILE* f = fopen(path, "r");
    if (f == NULL) return out;
    char line[4096];
    int step = 0;
    while (fgets(line, sizeof(line), f)) {
        int s, m;
        double v;
        if (sscanf(line, "step %d/%d:", &s, &m) == 2) step = s;
        else if (sscanf(line, "val loss %lf", &v) == 1) out.push_back({step, v});
    }
    fclose(f);
    return out;
}

// a text plot: one column per evaluation (placed by its step), rows from the highest loss to the lowest
static void plot(const std::vector<std::pair<int, double>>& pts, const std::string& title) {
    const int H = 10, W = 60;
    if (pts.size() < 2) { printf("%s: fewer than two val losses in the log, no plot\n", title.c_str()); return; }
    double lo = pts[0].second, hi = pts[0].second;
    for (auto& p : pts) { lo = std::min(lo, p.second); hi = std::max(hi, p.second); }
    if (hi - lo < 1e-9) hi = lo + 1;
    int last = std::max(1, pts.back().first);
    std::vector<std::string> rows(H, std::string(W + 1, ' '));
    for (auto& p : pts) {
        int x = (int)std::lround((double)p.first / last * W);
        int y = (int)std::lround((hi - p.second) / (hi - lo) * (H - 1));
        rows[y][x] = '*';
    }
    printf("%s\n", title.c_str());
    for (int y = 0; y < H; y++) {
        double level = hi - (hi - lo) * y / (H - 1);
        printf("  %7.3f |%s\n", level, rows[y].c_str());
    }
    printf("          +%s\n", std::string(W + 1, '-').c_str());
    printf("           step 0%*s%d\n", W - 5, "", last);
}

// ---------------------------------------------------------------------------- main

int main(int argc, char** argv) {
    const char *base_path = NULL, *adapter_path = NULL, *real_path = NULL, *brown_path = NULL, *tok_path = "data/gpt2_tokenizer.bin";
    int n = 2000, T = 0, show = 8;
    uint64_t seed = 1337;
    std::vector<std::pair<std::string, std::string>> logs; // path, title
    for (int i = 1; i < argc; i += 2) {
        if (i + 1 >= argc || argv[i][0] != '-' || strlen(argv[i]) != 2) usage();
        const char* v = argv[i + 1];
        switch (argv[i][1]) {
            case 'e': base_path = v; break;
            case 'A': adapter_path = v; break;
            case 'r': real_path = v; break;
            case 'w': brown_path = v; break;
            case 'c': tok_path = v; break;
            case 'n': n = atoi(v); break;
            case 's': seed = strtoull(v, NULL, 10); break;
            case 't': T = atoi(v); break;
            case 'k': show = atoi(v); break;
            case 'l': {
                std::string s = v;
                size_t colon = s.find(':');
                logs.push_back({s.substr(0, colon), colon == std::string::npos ? s : s.substr(colon + 1)});
                break;
            }
            default: usage();
        }
    }
    if (base_path == NULL || adapter_path == NULL || real_path == NULL) usage();
    if (n < 1) die(strprintf("form_stats: -n %d: the samples need at least one token\n---> HINT: pass -n 2000", n));

    Tokenizer tok;
    std::string err = tokenizer_read(&tok, tok_path);
    if (!err.empty()) die(err);
    TokenFile real, brown;
    if (!(err = tokens_read(&real, real_path, (int)tok.pieces.size(), "-r")).empty()) die(err);
    if (brown_path != NULL && !(err = tokens_read(&brown, brown_path, (int)tok.pieces.size(), "-w")).empty()) die(err);
    if ((int)real.tokens.size() < n) die(strprintf("form_stats: %s has %zu tokens, fewer than -n %d\n---> HINT: pass a smaller -n", real_path, real.tokens.size(), n));
    std::vector<bool> in_brown(tok.pieces.size(), false);
    for (uint16_t id : brown.tokens) in_brown[id] = true;

    // the same base twice: as it is, and with the adapter merged into its weights (an adapter trained with -C
    // brings its token rows too: the load writes them into wte, where they stay after the merge)
    GPT2<float> base, lora;
    if (!(err = gpt2_read_checkpoint(&base, base_path)).empty()) die(err);
    if (!(err = gpt2_read_checkpoint(&lora, base_path)).empty()) die(err);
    if (base.config.vocab_size != (int)tok.pieces.size()) {
        die(strprintf("form_stats: %s has V=%d but the tokenizer %s has %zu tokens\n---> HINT: pass the base's own tokenizer with -c",
                      base_path, base.config.vocab_size, tok_path, tok.pieces.size()));
    }
    TrainState state;
    bool has_state = false;
    if (!(err = lora_file_load(adapter_path, &lora, base_checksum(lora.params_memory, lora.num_parameters), &state, &has_state)).empty()) die(err);
    gpt2_lora_merge(&lora, +1);
    lora_free(&lora.lora);
    if (T <= 0 || T > base.config.max_seq_len) T = base.config.max_seq_len;
    gpt2_allocate(&base, 1, T);
    gpt2_allocate(&lora, 1, T);

    double t0 = now_seconds();
    Form fb = measure(tok, sample_tokens(&base, n, seed, tok.eot_token), in_brown);
    Form fl = measure(tok, sample_tokens(&lora, n, seed, tok.eot_token), in_brown);
    double secs = now_seconds() - t0;
    std::vector<int> real_ids(real.tokens.begin(), real.tokens.begin() + n);
    Form fr = measure(tok, real_ids, in_brown);
    double pb = newline_probability(&base, real_ids), pl = newline_probability(&lora, real_ids), share = 0;
    for (int id : real_ids) share += (id == 198 || id == 628);
    share = 100.0 * share / n;

    printf("form of %d tokens (sampled: seed %llu, temperature 1, context %d; %.1f s)\n", n, (unsigned long long)seed, T, secs);
    printf("  %-28s %10s %10s %16s\n", "", "base", "LoRA", "tinyshakespeare");
    printf("  %-28s %10.2f %10.2f %16.2f\n", "newlines per 100 tokens", fb.newlines_per_100, fl.newlines_per_100, fr.newlines_per_100);
    printf("  %-28s %10.1f %10.1f %16.1f\n", "mean line length (chars)", fb.mean_line_chars, fl.mean_line_chars, fr.mean_line_chars);
    printf("  %-28s %9.1f%% %9.1f%% %15.1f%%\n", "speaker-tag lines (NAME:)", fb.tag_share, fl.tag_share, fr.tag_share);
    if (brown_path != NULL) printf("  %-28s %9.1f%% %9.1f%% %15.1f%%\n", "tokens unseen in Brown", fb.unseen_share, fl.unseen_share, fr.unseen_share);
    printf("  %-28s %9.1f%% %9.1f%% %15.1f%%\n", "P(line break) on real text", pb, pl, share);
    double gap = fr.newlines_per_100 - fb.newlines_per_100;
    if (std::fabs(gap) > 1e-9) {
        printf("  LoRA's newlines per 100 tokens moved %.0f%% of the way from the base's to tinyshakespeare's\n",
               100.0 * (fl.newlines_per_100 - fb.newlines_per_100) / gap);
    }
    printf("sample of the base (first %d lines):\n", show);
    print_lines(fb.text, show);
    printf("sample after LoRA (first %d lines):\n", show);
    print_lines(fl.text, show);
    for (auto& lg : logs) plot(read_val_losses(lg.first.c_str()), lg.second + " (" + lg.first + ")");
    gpt2_free(&base);
    gpt2_free(&lora);
    return 0;
}
