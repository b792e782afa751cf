// lib/safetensors.h: the safetensors format, F32 only: safetensors_write and a strict safetensors_read.
#pragma once

#include <cstdint>
#include <new>    // std::bad_alloc
#include <string>
#include <unordered_map>
#include <vector>
#include "files.h" // open_for_reading, file_size_of, write_atomically
#include "json.h"  // the header

// safetensors: u64 LE header length N, N bytes of JSON header (padded with spaces to a multiple of
// 8), then the data buffer. Header: {"__metadata__": {"format": "pt"}, name: {"dtype": "F32", "shape":
// [...], "data_offsets": [begin, end]}, ...} with offsets relative to the data buffer. We write and
// read F32 only; the tensors tile the buffer exactly (no gaps, no overlaps, nothing after the last).

#define SAFETENSORS_MAX_HEADER 100000000ull

struct SafeTensorOut {
    std::string name;
    std::vector<size_t> shape;
    const float* data;
};

static std::string safetensors_write(const char* path, const std::vector<SafeTensorOut>& tensors) {
    std::string header = "{\"__metadata__\":{\"format\":\"pt\"}";
    size_t offset = 0;
    for (const SafeTensorOut& t : tensors) {
        size_t count = 1;
        std::string shape;
        for (size_t d : t.shape) { count *= d; shape += (shape.empty() ? "" : ",") + std::to_string(d); }
        header += "," + json_quote(t.name) + ":{\"dtype\":\"F32\",\"shape\":[" + shape + "],\"data_offsets\":[" +
                  std::to_string(offset) + "," + std::to_string(offset + count * sizeof(float)) + "]}";
        offset += count * sizeof(float);
    }
    header += "}";
    while (header.size() % 8 != 0) header += ' '; // so that the data buffer starts 8-aligned
    uint64_t N = header.size();
    std::vector<std::pair<const void*, size_t>> parts = {{&N, sizeof(N)}, {header.data(), header.size()}};
    for (const SafeTensorOut& t : tensors) {
        size_t count = 1;
        for (size_t d : t.shape) count *= d;
        parts.push_back({t.data, count * sizeof(float)});
    }
    return write_atomically(path, parts);
}

struct SafeTensor {
    std::string name;
    std::vector<size_t> shape;
    size_t begin, end; // byte offsets into the data buffer
};

struct SafeTensors {
    std::vector<SafeTensor> tensors;                              // in header order
    std::vector<std::pair<std::string, std::string>> metadata;    // __metadata__, if any
    std::vector<float> data;                                      // the whole data buffer
    std::unordered_map<std::string, size_t> index;                // name -> position in tensors
    // the reader's work, counted (not timed): header bytes parsed, entries visited, one per lookup.
    // Linear in the file: the tests check that doubling the keys doubles it, no more
    mutable size_t work = 0;
    const SafeTensor* find(const std::string& name) const {
        work++;
        auto it = index.find(name);
        return it == index.end() ? NULL : &tensors[it->second];
    }
    const float* values(const SafeTensor* t) const { return data.data() + t->begin / sizeof(float); }
};

static std::string safetensors_read(const char* path, SafeTensors* st) {
    const char* hint = "pass a safetensors file of F32 tensors, e.g. the adapter_model.safetensors PEFT's save_pretrained writes";
    *st = SafeTensors();
    FILE* f = NULL;
    std::string err = open_for_reading(path, "safetensors file", hint, &f);
    if (!err.empty()) return err;
    long size = 0;
    err = file_size_of(f, path, &size);
    uint64_t N = 0;
    if (err.empty() && (size < 8 || fread(&N, 8, 1, f) != 1)) {
        err = strprintf("safetensors file '%s' is %ld bytes, too short for the 8-byte header length\n---> HINT: %s", path, size, hint);
    }
    if (err.empty() && N > SAFETENSORS_MAX_HEADER) {
        err = strprintf("safetensors file '%s' has a header length of %llu bytes, over the limit of %llu\n---> HINT: the file is corrupt or not safetensors; %s",
                        path, (unsigned long long)N, SAFETENSORS_MAX_HEADER, hint);
    }
    if (err.empty() && N > (uint64_t)size - 8) {
        err = strprintf("safetensors file '%s' has a header length of %llu bytes, but only %ld bytes follow the length: the file is truncated\n---> HINT: %s",
                        path, (unsigned long long)N, size - 8, hint);
    }
    std::string header;
    if (err.empty()) {
        header.resize((size_t)N);
        if (N > 0 && fread(&header[0], 1, (size_t)N, f) != (size_t)N) err = strprintf("safetensors file '%s': read error\n---> HINT: %s", path, hint);
    }
    Json doc;
    if (err.empty()) {
        std::string jerr = json_parse(header.data(), header.size(), &doc);
        if (!jerr.empty()) {
            err = strprintf("safetensors file '%s': the header is not valid JSON: %s\n---> HINT: the file is corrupt; %s", path, jerr.c_str(), hint);
        } else if (doc.kind != Json::OBJECT) {
            err = strprintf("safetensors file '%s': the header is JSON but not an object\n---> HINT: %s", path, hint);
        }
    }
    size_t data_bytes = err.empty() ? (size_t)size - 8 - (size_t)N : 0;
    st->work += header.size();
    for (size_t k = 0; err.empty() && k < doc.members.size(); k++) {
        st->work++;
        const std::string& name = doc.members[k].first;
        const Json& v = doc.members[k].second;
        if (name == "__metadata__") {
            bool ok = v.kind == Json::OBJECT;
            for (size_t j = 0; ok && j < v.members.size(); j++) {
                st->work++;
                ok = v.members[j].second.kind == Json::STRING;
                if (ok) st->metadata.push_back({v.members[j].first, v.members[j].second.str});
            }
            if (!ok) err = strprintf("safetensors file '%s': __metadata__ must map strings to strings\n---> HINT: %s", path, hint);
            continue;
        }
        const Json* dtype = v.get("dtype");
        const Json* shape = v.get("shape");
        const Json* offsets = v.get("data_offsets");
        if (v.kind != Json::OBJECT || dtype == NULL || dtype->kind != Json::STRING || shape == NULL || shape->kind != Json::ARRAY ||
            offsets == NULL || offsets->kind != Json::ARRAY) {
            err = strprintf("safetensors file '%s': tensor '%s' needs \"dtype\" (string), \"shape\" (array) and \"data_offsets\" (array)\n---> HINT: %s", path, name.c_str(), hint);
            break;
        }
        if (dtype->str != "F32") {
            err = strprintf("safetensors file '%s': tensor '%s' has dtype %s; only F32 is read\n---> HINT: save the adapter from a float32 model (model.float() before save_pretrained)",
                            path, name.c_str(), dtype->str.c_str());
            break;
        }
        SafeTensor t;
        t.name = name;
        size_t count = 1;
        bool ok = true;
        for (const Json& d : shape->items) {
            uint64_t x = 0;
            ok = ok && json_to_u64(&d, &x) && x <= (1ull << 40) && !__builtin_mul_overflow(count, (size_t)x, &count);
            t.shape.push_back((size_t)x);
        }
        uint64_t begin = 0, end = 0;
        ok = ok && offsets->items.size() == 2 && json_to_u64(&offsets->items[0], &begin) && json_to_u64(&offsets->items[1], &end);
        if (!ok) {
            err = strprintf("safetensors file '%s': tensor '%s' has a shape or data_offsets that are not non-negative integers ([begin, end] for the offsets)\n---> HINT: %s", path, name.c_str(), hint);
            break;
        }
        if (begin > end || end > data_bytes) {
            err = strprintf("safetensors file '%s': tensor '%s' has data_offsets [%llu, %llu] out of range of the %zu-byte data buffer\n---> HINT: the file is truncated or corrupt; %s",
                            path, name.c_str(), (unsigned long long)begin, (unsigned long long)end, data_bytes, hint);
            break;
        }
        if (count > SIZE_MAX / sizeof(float) || end - begin != count * sizeof(float)) {
            err = strprintf("safetensors file '%s': tensor '%s' spans %llu bytes, but its shape of %zu F32 values needs %zu\n---> HINT: the file is corrupt; %s",
                            path, name.c_str(), (unsigned long long)(end - begin), count, count * sizeof(float), hint);
            break;
        }
        t.begin = (size_t)begin;
        t.end = (size_t)end;
        st->index[t.name] = st->tensors.size();
        st->tensors.push_back(t);
    }
    if (err.empty()) {
        // the tensors, sorted by offset, must tile [0, data_bytes) exactly
        std::vector<const SafeTensor*> sorted;
        for (const SafeTensor& t : st->tensors) sorted.push_back(&t);
        std::sort(sorted.begin(), sorted.end(), [](const SafeTensor* a, const SafeTensor* b) { return a->begin != b->begin ? a->begin < b->begin : a->end < b->end; });
        size_t at = 0;
        for (const SafeTensor* t : sorted) {
            if (t->begin != at) {
                err = strprintf("safetensors file '%s': tensor '%s' starts at byte %zu of the data buffer, but the previous tensor ends at %zu: %s\n---> HINT: the file is corrupt; %s",
                                path, t->name.c_str(), t->begin, at, t->begin > at ? "a gap" : "overlapping tensors", hint);
                break;
            }
            at = t->end;
        }
        if (err.empty() && at != data_bytes) {
            err = strprintf("safetensors file '%s' has %zu trailing bytes after the last tensor\n---> HINT: the file is corrupt; %s", path, data_bytes - at, hint);
        }
    }
    if (err.empty()) {
        try {
            if (data_bytes > physical_memory_bytes()) throw std::bad_alloc(); // more than the machine holds
            st->data.resize(data_bytes / sizeof(float));
        } catch (const std::bad_alloc&) {
            err = strprintf("safetensors file '%s' holds %zu bytes of tensor data, more than this machine can allocate\n---> HINT: the file is corrupt or too large; %s",
                            path, data_bytes, hint);
        }
    }
    if (err.empty()) {
        if (!st->data.empty() && fread(st->data.data(), sizeof(float), st->data.size(), f) != st->data.size()) {
            err = strprintf("safetensors file '%s': read error\n---> HINT: %s", path, hint);
        }
    }
    fclose(f);
    if (!err.empty()) *st = SafeTensors();
    return err;
}
