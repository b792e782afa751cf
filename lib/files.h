// lib/files.h: checked file I/O shared by every reader and writer: the llm.c magic numbers (and what a
// wrong one means), opening a regular file for reading, its size, a whole text file, and
// write_atomically (temporary name, fsync, rename), which every file the trainer writes goes through.
#pragma once

#include <cerrno>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>
#include <sys/stat.h>
#include <unistd.h>
#include "utils.h" // strprintf

// Readers return "" on success or a message naming the file, what was wrong and a HINT;
// nothing is allocated from a header value before that value has been checked against the file size.

#define CHECKPOINT_MAGIC 20240326
#define TOKENS_MAGIC 20240520
#define TOKENIZER_MAGIC 20240328
#define DEBUG_STATE_MAGIC 20240327
#define ADAPTER_MAGIC 20240801 // our LoRA adapter files (lib/adapter_files.h)

static std::string file_size_of(FILE* f, const char* path, long* size) {
    if (fseek(f, 0, SEEK_END) != 0 || (*size = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        return strprintf("cannot determine the size of '%s'\n---> HINT: pass a regular file, not a pipe or directory", path);
    }
    return "";
}

static std::string open_for_reading(const char* path, const char* what, const char* hint, FILE** f) {
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
        return strprintf("%s '%s' is a directory\n---> HINT: %s", what, path, hint);
    }
    *f = fopen(path, "rb");
    if (*f == NULL) return strprintf("cannot open %s '%s': %s\n---> HINT: %s", what, path, strerror(errno), hint);
    return "";
}

// names a file by its magic number, to explain "wrong magic" errors
static const char* describe_magic(int magic) {
    switch (magic) {
        case CHECKPOINT_MAGIC: return "an llm.c model checkpoint";
        case TOKENS_MAGIC: return "an llm.c token file";
        case TOKENIZER_MAGIC: return "an llm.c tokenizer file";
        case DEBUG_STATE_MAGIC: return "an llm.c debug state";
        case ADAPTER_MAGIC: return "a train_gpt2_lora adapter file (pass it with -A)";
        default: return "not an llm.c file";
    }
}

// writes to path.tmp, then renames: a crash never leaves a half-written file under the real name
static std::string write_atomically(const char* path, const std::vector<std::pair<const void*, size_t>>& parts) {
    std::string tmp = std::string(path) + ".tmp";
    FILE* f = fopen(tmp.c_str(), "wb");
    if (f == NULL) {
        return strprintf("cannot write '%s': %s\n---> HINT: check that the output directory (-o) exists and is writable", tmp.c_str(), strerror(errno));
    }
    bool ok = true;
    for (const auto& part : parts) {
        if (part.second > 0 && fwrite(part.first, 1, part.second, f) != part.second) { ok = false; break; }
    }
    if (fflush(f) != 0 || fsync(fileno(f)) != 0) ok = false;
    if (fclose(f) != 0) ok = false;
    if (!ok) {
        int e = errno;
        remove(tmp.c_str());
        return strprintf("failed writing '%s': %s\n---> HINT: check free disk space; nothing was left behind", path, strerror(e));
    }
    if (rename(tmp.c_str(), path) != 0) {
        int e = errno;
        remove(tmp.c_str());
        return strprintf("cannot rename '%s' to '%s': %s\n---> HINT: check permissions of the output directory", tmp.c_str(), path, strerror(e));
    }
    return "";
}

static std::string read_text_file(const char* path, const char* what, const char* hint, std::string* out) {
    FILE* f = NULL;
    std::string err = open_for_reading(path, what, hint, &f);
    if (!err.empty()) return err;
    long size = 0;
    err = file_size_of(f, path, &size);
    if (err.empty()) {
        out->resize((size_t)size);
        if (size > 0 && fread(&(*out)[0], 1, (size_t)size, f) != (size_t)size) err = strprintf("%s '%s': read error\n---> HINT: %s", what, path, hint);
    }
    fclose(f);
    return err;
}
