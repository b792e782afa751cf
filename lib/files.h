// lib/files.h: checked file I/O shared by every reader and writer: the llm.c magic numbers (and what a
// wrong one means), opening a regular file for reading, its size, a whole text file, and
// write_atomically (temporary name, fsync, rename), which every file the trainer writes goes through;
// and the output directories: created (mkdir -p), locked against a second run, probed for writability.
#pragma once

#include <cerrno>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>
#include <fcntl.h>    // open, O_NONBLOCK
#include <new>        // std::bad_alloc
#include <sys/file.h> // flock
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

// Opens a regular file for reading, and nothing else: a FIFO would block the open (or the read) forever,
// and a device or a directory is never one of our files. The open does not block (O_NONBLOCK), the kind
// is taken from the opened file itself (fstat), so nothing can swap the path in between.
static std::string open_for_reading(const char* path, const char* what, const char* hint, FILE** f) {
    *f = NULL;
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return strprintf("cannot open %s '%s': %s\n---> HINT: %s", what, path, strerror(errno), hint);
    struct stat st = {};
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        bool is_dir = S_ISDIR(st.st_mode);
        const char* kind = is_dir ? "a directory" : S_ISFIFO(st.st_mode) ? "a FIFO (named pipe)" : S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode) ? "a device"
                         : S_ISSOCK(st.st_mode) ? "a socket" : "not a regular file";
        close(fd);
        if (is_dir) return strprintf("%s '%s' is a directory\n---> HINT: %s", what, path, hint);
        return strprintf("%s '%s' is %s, not a regular file (reading it could block forever or never end)\n---> HINT: %s", what, path, kind, hint);
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    *f = fdopen(fd, "rb");
    if (*f == NULL) {
        int e = errno;
        close(fd);
        return strprintf("cannot open %s '%s': %s\n---> HINT: %s", what, path, strerror(e), hint);
    }
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

// Opens an llm.c-style file (what: "checkpoint", "token file", ...), whose first 1024 bytes are a header
// of 256 int32 (header[0] the magic, header[1] the version, then the format's own fields), and checks what
// every such reader checks: a regular file, at least a header long, with the expected magic (a wrong one is
// named: another llm.c file, or a safetensors file, whose JSON header starts at byte 8). On success *f is
// open just past the header and *size is the file's size; the version and the rest are the caller's to
// check. On an error *f may still be open: the caller closes it, as after its own checks.
static std::string read_llmc_header(const char* path, const char* what, int magic, const char* hint, FILE** f, long* size, int header[256]) {
    std::string err = open_for_reading(path, what, hint, f);
    if (!err.empty()) return err;
    err = file_size_of(*f, path, size);
    if (!err.empty()) return err;
    const size_t header_bytes = 256 * sizeof(int);
    if (*size < (long)header_bytes || fread(header, header_bytes, 1, *f) != 1) {
        return strprintf("%s '%s' is truncated: %ld bytes, shorter than the 1024-byte header\n---> HINT: %s", what, path, *size, hint);
    }
    if (header[0] != magic) {
        bool json_at_8 = ((const char*)header)[8] == '{';
        return strprintf("%s '%s' has magic %d, expected %d; it is %s\n---> HINT: %s", what, path, header[0], magic,
                         json_at_8 ? "probably a safetensors file (a PEFT adapter's directory is passed to -A)" : describe_magic(header[0]), hint);
    }
    return "";
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

// a text file (a JSON config, the BPE files) whole into *out; max_bytes bounds it before anything is
// allocated (a huge or sparse file is an error, not an allocation failure)
static std::string read_text_file(const char* path, const char* what, const char* hint, std::string* out,
                                  size_t max_bytes = 256u << 20) {
    FILE* f = NULL;
    std::string err = open_for_reading(path, what, hint, &f);
    if (!err.empty()) return err;
    long size = 0;
    err = file_size_of(f, path, &size);
    if (err.empty() && (size_t)size > max_bytes) {
        err = strprintf("%s '%s' is %ld bytes, more than the %zu MiB such a file can be\n---> HINT: the file is corrupt, or not a %s; %s",
                        what, path, size, max_bytes >> 20, what, hint);
    }
    if (err.empty()) {
        try {
            out->resize((size_t)size);
        } catch (const std::bad_alloc&) {
            err = strprintf("%s '%s': out of memory reading its %ld bytes\n---> HINT: the file is too large for this machine's memory; %s", what, path, size, hint);
        }
        if (err.empty() && size > 0 && fread(&(*out)[0], 1, (size_t)size, f) != (size_t)size) err = strprintf("%s '%s': read error\n---> HINT: %s", what, path, hint);
    }
    fclose(f);
    return err;
}

// ----------------------------------------------------------------------------
// output directories: created (mkdir -p), locked against a second run, and tested for writability
// before any work, so that an unwritable -o is found at startup, not after training

// mkdir -p: every missing component of dir is created; "" or an error naming the component in the way
static std::string make_directories(const char* dir) {
    std::string path = dir;
    for (size_t at = 1; at <= path.size(); at++) {
        if (at < path.size() && path[at] != '/') continue;
        std::string part = path.substr(0, at);
        struct stat st;
        if (stat(part.c_str(), &st) == 0) {
            if (!S_ISDIR(st.st_mode)) return strprintf("cannot create directory '%s': '%s' exists and is not a directory", dir, part.c_str());
            continue;
        }
        if (mkdir(part.c_str(), 0755) != 0 && errno != EEXIST) return strprintf("cannot create directory '%s': %s: %s", dir, part.c_str(), strerror(errno));
    }
    return "";
}

// whether a new file can be made in dir (and removed again): what write_atomically's .tmp and rename need.
// Root ignores permission bits, but not a read-only mount, an immutable directory (chattr +i) or sysfs.
static std::string probe_writable_directory(const char* dir) {
    std::string probe = strprintf("%s/.write_probe_%ld.tmp", dir, (long)getpid());
    int fd = open(probe.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return strprintf("cannot create files in '%s': %s", dir, strerror(errno));
    close(fd);
    if (unlink(probe.c_str()) != 0) return strprintf("cannot remove files in '%s': %s", dir, strerror(errno));
    return "";
}

// An exclusive lock on dir for the life of the process (flock on dir/.train_gpt2_lora.lock, released by
// the kernel when the process ends, however it ends): two runs never write into one directory at once.
// Returns "" (the lock is held), or why not; *holder gets the pid written by the run that holds it.
#define DIR_LOCK_FILE ".train_gpt2_lora.lock"
static std::string lock_directory(const char* dir, long* holder) {
    *holder = 0;
    std::string path = std::string(dir) + "/" DIR_LOCK_FILE;
    int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return strprintf("cannot create the lock file '%s': %s", path.c_str(), strerror(errno));
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        char buf[32] = {0};
        if (pread(fd, buf, sizeof(buf) - 1, 0) > 0) *holder = atol(buf);
        close(fd);
        return strprintf("'%s' is locked by another run", dir);
    }
    std::string pid = std::to_string((long)getpid()) + "\n";
    if (ftruncate(fd, 0) != 0 || pwrite(fd, pid.data(), pid.size(), 0) != (ssize_t)pid.size()) { /* the pid is only for the message */ }
    return ""; // fd stays open: the lock lasts until the process exits
}
