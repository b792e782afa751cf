// lib/utils.h: errors that name what went wrong and end in a HINT (die, strprintf), checked allocation
// (malloc_check, calloc_real), a monotonic clock, MiB and the resident set size for the logs.
// Part of train_gpt2_lora (see doc/reading.md); every file under lib/ is included by the trainer.
#pragma once

#include <cmath>   // std::isfinite
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <time.h>
#include <unistd.h>

// every failure names the file or flag, says what was wrong and ends in a HINT

[[noreturn]] static void die(const std::string& msg) {
    fprintf(stderr, "Error: %s\n", msg.c_str());
    exit(EXIT_FAILURE);
}

static std::string strprintf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
static std::string strprintf(const char* fmt, ...) {
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    return std::string(buf);
}

// what to change when an allocation fails, from what it was for: the batch's activations scale with
// -b and -t, the model's parameters and optimizer state with the checkpoint (-e), the others with their flag
static const char* oom_hint(const char* what) {
    if (strstr(what, "activation") || strstr(what, "losses") || strstr(what, "log-sum-exp") || strstr(what, "inputs") ||
        strstr(what, "targets") || strstr(what, "adapter inputs") || strstr(what, "bottleneck") || strstr(what, "adapter scratch")) {
        return "lower the batch size (-b) or sequence length (-t)";
    }
    if (strstr(what, "prefix")) return "lower the prefix length (-X), the batch size (-b) or the sequence length (-t)";
    if (strstr(what, "key/value cache")) return "lower the context (-t) used by -p";
    if (strcmp(what, "adapters") == 0) return "lower the Houlsby adapters' bottleneck width (-H)";
    if (strstr(what, "LoRA") || strstr(what, "adapter")) return "lower the LoRA rank (-r) or adapt fewer matrices (-q)";
    if (strstr(what, "quantized") || strstr(what, "dequantization")) return "the base checkpoint (-e) is too large for this machine's memory";
    if (strstr(what, "W0")) return "L2-SP (-w) keeps a second copy of the weights: drop -w, or use LoRA (no -f 1)";
    return "the base checkpoint (-e) and its training state (-f 1 or -F keep gradients and AdamW moments for every weight) "
           "are too large for this machine's memory: use LoRA (no -f 1 / -F) or quantize the base with -Q nf4";
}

// the machine's physical memory in bytes (SIZE_MAX where unknown): no allocation larger can be used
static size_t physical_memory_bytes() {
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    return pages > 0 && page > 0 ? (size_t)pages * (size_t)page : SIZE_MAX;
}

static void* malloc_check(size_t size, const char* what) {
    // larger than the machine: fail now (overcommit could grant it and the OOM killer end the run later)
    void* p = size <= physical_memory_bytes() ? malloc(size > 0 ? size : 1) : NULL;
    if (p == NULL) {
        die(strprintf("out of memory allocating %zu bytes for %s\n---> HINT: %s", size, what, oom_hint(what)));
    }
    return p;
}

template <typename real> static real* calloc_real(size_t n, const char* what) {
    real* p = (real*)malloc_check(n * sizeof(real), what);
    memset(p, 0, n * sizeof(real));
    return p;
}

// the index of the first value of x[0..n) that is NaN or infinite, or n when every value is finite
template <typename real> static size_t first_nonfinite(const real* x, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (!std::isfinite(x[i])) return i;
    }
    return n;
}

static double now_seconds() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double mib(size_t bytes) { return bytes / (1024.0 * 1024.0); }

// RSS now (not the peak), from /proc/self/statm; 0 where that is unavailable
static double rss_now_mib() {
    long pages_total = 0, pages_resident = 0;
    FILE* f = fopen("/proc/self/statm", "r");
    if (f == NULL) return 0;
    if (fscanf(f, "%ld %ld", &pages_total, &pages_resident) != 2) pages_resident = 0;
    fclose(f);
    return pages_resident * (double)sysconf(_SC_PAGESIZE) / (1024.0 * 1024.0);
}
