// lib/utils.h: errors that name what went wrong and end in a HINT (die, strprintf), checked allocation
// (malloc_check, calloc_real), a monotonic clock, MiB and the resident set size for the logs.
// Part of train_gpt2_lora (see doc/reading.md); every file under lib/ is included by the trainer.
#pragma once

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

static void* malloc_check(size_t size, const char* what) {
    void* p = malloc(size > 0 ? size : 1);
    if (p == NULL) {
        die(strprintf("out of memory allocating %zu bytes for %s\n---> HINT: lower the batch size (-b) or sequence length (-t)", size, what));
    }
    return p;
}

template <typename real> static real* calloc_real(size_t n, const char* what) {
    real* p = (real*)malloc_check(n * sizeof(real), what);
    memset(p, 0, n * sizeof(real));
    return p;
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
