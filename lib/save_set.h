// lib/save_set.h: the files of one save in -o are one set. Its manifest, save_set.json, is written
// last, after adapter.bin, adapter_model.safetensors and adapter_config.json; it lists each file's size and
// checksum and the step they hold. A reader (-A) checks the files it loads against it, so it never takes
// files from two saves (one interrupted by a crash, or still in progress) as one adapter. What a
// directory already holds (save_set_existing) decides whether a save may replace it (save_set_loses).
// Needs only lib/files.h and lib/json.h: lib/peft.h writes the sets and checks them when it loads.
#pragma once

#include <cstdint>
#include <string>
#include <vector>
#include "files.h" // open_for_reading, write_atomically, ADAPTER_MAGIC
#include "json.h"  // the manifest

// save_set.json, e.g.
//   {"format": "train_gpt2_lora save set", "version": 1, "step": 40, "optimizer_state": true,
//    "files": [{"name": "adapter.bin", "bytes": 5350400, "fnv1a64": "8f0c..."}, ...]}
// fnv1a64: FNV-1a 64 over the file's bytes (h = (h ^ byte) * 0x100000001b3 from 0xcbf29ce484222325), in hex.
#define SAVE_SET_FILE "save_set.json"

// FNV-1a 64 over a file's bytes, and its size
static std::string file_checksum(const char* path, uint64_t* sum, uint64_t* bytes) {
    FILE* f = NULL;
    std::string err = open_for_reading(path, "file", "check that the save set's files are in place", &f);
    if (!err.empty()) return err;
    uint64_t h = 0xcbf29ce484222325ull, n = 0;
    std::vector<unsigned char> buf(1 << 16);
    size_t got;
    while ((got = fread(buf.data(), 1, buf.size(), f)) > 0) {
        for (size_t i = 0; i < got; i++) h = (h ^ buf[i]) * 0x100000001b3ull;
        n += got;
    }
    bool ok = !ferror(f);
    fclose(f);
    if (!ok) return strprintf("'%s': read error\n---> HINT: check the disk", path);
    *sum = h;
    *bytes = n;
    return "";
}

// the manifest of the files names[] in dir (all written already), written last and atomically
static std::string save_set_write_manifest(const char* dir, const std::vector<std::string>& names, int step, bool has_state) {
    std::string text = strprintf("{\n  \"format\": \"train_gpt2_lora save set\",\n  \"version\": 1,\n  \"step\": %d,\n  \"optimizer_state\": %s,\n  \"files\": [",
                                 step, has_state ? "true" : "false");
    for (size_t k = 0; k < names.size(); k++) {
        uint64_t sum = 0, bytes = 0;
        std::string err = file_checksum((std::string(dir) + "/" + names[k]).c_str(), &sum, &bytes);
        if (!err.empty()) return err;
        text += strprintf("%s\n    {\"name\": %s, \"bytes\": %llu, \"fnv1a64\": \"%016llx\"}", k ? "," : "", json_quote(names[k]).c_str(),
                          (unsigned long long)bytes, (unsigned long long)sum);
    }
    text += "\n  ]\n}\n";
    return write_atomically((std::string(dir) + "/" SAVE_SET_FILE).c_str(), {{text.data(), text.size()}});
}

// Checks the files names[] of dir against dir's manifest, when there is one: "" when there is none, or
// it lists none of them, or they match; else an error naming the file that does not belong to the set.
static std::string save_set_verify(const char* dir, const std::vector<std::string>& names) {
    std::string mpath = std::string(dir) + "/" SAVE_SET_FILE;
    struct stat st;
    if (stat(mpath.c_str(), &st) != 0) return ""; // no manifest: files written by hand, by PEFT, or by an older version
    const char* hint = "the save set's manifest lists each file's size and checksum; a file that does not match it comes from another save";
    std::string text;
    std::string err = read_text_file(mpath.c_str(), "save set manifest", hint, &text, 1u << 20);
    if (!err.empty()) return err;
    Json doc;
    std::string jerr = json_parse(text.data(), text.size(), &doc);
    const Json* files = jerr.empty() && doc.kind == Json::OBJECT ? doc.get("files") : NULL;
    const Json* step = jerr.empty() && doc.kind == Json::OBJECT ? doc.get("step") : NULL;
    if (files == NULL || files->kind != Json::ARRAY || step == NULL || step->kind != Json::NUMBER) {
        return strprintf("save set manifest '%s' is not valid (%s)\n---> HINT: it was damaged; delete it to load the files without the check",
                         mpath.c_str(), jerr.empty() ? "no \"files\" list or \"step\"" : jerr.c_str());
    }
    for (const Json& entry : files->items) {
        const Json* name = entry.kind == Json::OBJECT ? entry.get("name") : NULL;
        const Json* want_sum = entry.kind == Json::OBJECT ? entry.get("fnv1a64") : NULL;
        uint64_t want_bytes = 0;
        if (name == NULL || name->kind != Json::STRING || want_sum == NULL || want_sum->kind != Json::STRING ||
            !json_to_u64(entry.get("bytes"), &want_bytes)) {
            return strprintf("save set manifest '%s' has an entry without name, bytes and fnv1a64\n---> HINT: it was damaged; delete it to load the files without the check", mpath.c_str());
        }
        bool loaded = false;
        for (const std::string& n : names) loaded = loaded || n == name->str;
        if (!loaded) continue;
        std::string path = std::string(dir) + "/" + name->str;
        uint64_t sum = 0, bytes = 0;
        err = file_checksum(path.c_str(), &sum, &bytes);
        if (!err.empty()) return err;
        if (bytes != want_bytes || strprintf("%016llx", (unsigned long long)sum) != want_sum->str) {
            return strprintf("'%s' is not the file its save set '%s' lists for step %s (%llu bytes, checksum %s; it has %llu bytes, checksum %016llx): "
                             "it comes from another save, one that was interrupted or is still being written\n"
                             "---> HINT: if a run is writing to '%s', wait for it to finish; if the file was changed on purpose, delete '%s'",
                             path.c_str(), mpath.c_str(), step->str.c_str(), (unsigned long long)want_bytes, want_sum->str.c_str(),
                             (unsigned long long)bytes, (unsigned long long)sum, dir, mpath.c_str());
        }
    }
    return "";
}

// the directory of a file path ("." for a bare name) and its last component
static std::string path_dirname(const std::string& path) {
    size_t at = path.find_last_of('/');
    return at == std::string::npos ? "." : at == 0 ? "/" : path.substr(0, at);
}
static std::string path_basename(const std::string& path) {
    size_t at = path.find_last_of('/');
    return at == std::string::npos ? path : path.substr(at + 1);
}

// What an output directory already holds, from its adapter.bin's header (or a PEFT export alone)
struct SaveSetInfo {
    bool adapter = false;   // an adapter is there
    int step = 0;           // the step it was saved at (0 when it does not say)
    bool has_state = false; // with the AdamW moments and the loader state (an exact resume)
};

static SaveSetInfo save_set_existing(const char* dir) {
    SaveSetInfo info;
    std::string bin = std::string(dir) + "/adapter.bin";
    FILE* f = NULL;
    if (open_for_reading(bin.c_str(), "adapter file", "", &f).empty()) {
        int header[256];
        if (fread(header, sizeof(header), 1, f) == 1 && header[0] == ADAPTER_MAGIC) {
            info.adapter = true;
            info.has_state = header[15] == 1;
            info.step = info.has_state ? header[16] : 0;
        }
        fclose(f);
    }
    struct stat st;
    if (!info.adapter && stat((std::string(dir) + "/adapter_model.safetensors").c_str(), &st) == 0) info.adapter = true;
    return info;
}

// "" when a save `next` may replace what dir holds (`existing`), else what it would lose
static std::string save_set_loses(const SaveSetInfo& existing, const SaveSetInfo& next) {
    if (!existing.adapter) return "";
    if (existing.has_state && !next.has_state) {
        return strprintf("it holds an adapter with optimizer state (step %d, an exact resume), which this run would replace with weights only", existing.step);
    }
    if (existing.step > next.step) {
        return strprintf("it holds an adapter saved at step %d, which this run would replace with one from step %d", existing.step, next.step);
    }
    return "";
}

// For the tests only: TRAIN_GPT2_LORA_SLOW_SAVE_MS=n sleeps n ms after each file of a save set, so that a
// test can send a signal while a save is under way. Unset (always, outside the tests): no pause.
static void save_set_test_pause() {
    const char* ms = getenv("TRAIN_GPT2_LORA_SLOW_SAVE_MS");
    if (ms != NULL && atoi(ms) > 0) usleep((useconds_t)atoi(ms) * 1000);
}
