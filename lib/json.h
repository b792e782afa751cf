// lib/json.h: a minimal JSON reader (RFC 8259) for safetensors headers and adapter_config.json, and
// json_quote for writing strings.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>
#include "utils.h" // strprintf

// A minimal JSON reader (RFC 8259): objects, arrays, strings with escapes, numbers, literals.
// Enough for safetensors headers and adapter_config.json; it rejects anything malformed.

struct Json {
    enum Kind { NUL, BOOL, NUMBER, STRING, ARRAY, OBJECT } kind = NUL;
    bool boolean = false;
    double number = 0;
    std::string str;                                   // STRING: decoded text; NUMBER: the literal as written
    std::vector<Json> items;                           // ARRAY
    std::vector<std::pair<std::string, Json>> members; // OBJECT, in document order, keys unique
    const Json* get(const char* key) const {
        for (const auto& m : members) { if (m.first == key) return &m.second; }
        return NULL;
    }
};

struct JsonParser {
    const unsigned char* s;
    size_t n, i;
    int depth;
    std::string err;
};

static bool json_fail(JsonParser* p, const char* what) {
    if (p->err.empty()) p->err = strprintf("%s at byte %zu", what, p->i);
    return false;
}
static void json_skip_space(JsonParser* p) {
    while (p->i < p->n && (p->s[p->i] == ' ' || p->s[p->i] == '\t' || p->s[p->i] == '\n' || p->s[p->i] == '\r')) p->i++;
}
static int json_hex4(JsonParser* p) {
    if (p->i + 4 > p->n) return -1;
    int v = 0;
    for (int k = 0; k < 4; k++) {
        int c = p->s[p->i + k], d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    p->i += 4;
    return v;
}
static void json_put_utf8(std::string* out, uint32_t cp) {
    if (cp < 0x80) { *out += (char)cp; }
    else if (cp < 0x800) { *out += (char)(0xC0 | cp >> 6); *out += (char)(0x80 | (cp & 63)); }
    else if (cp < 0x10000) { *out += (char)(0xE0 | cp >> 12); *out += (char)(0x80 | ((cp >> 6) & 63)); *out += (char)(0x80 | (cp & 63)); }
    else { *out += (char)(0xF0 | cp >> 18); *out += (char)(0x80 | ((cp >> 12) & 63)); *out += (char)(0x80 | ((cp >> 6) & 63)); *out += (char)(0x80 | (cp & 63)); }
}
// the length of the valid UTF-8 sequence at s[i], or 0 (overlong forms, surrogates and > U+10FFFF are invalid)
static size_t utf8_sequence_length(const unsigned char* s, size_t n, size_t i) {
    unsigned char c = s[i];
    if (c < 0x80) return 1;
    size_t len = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 ? 2 : 0;
    if (len == 0 || c > 0xF4 || i + len > n) return 0;
    uint32_t cp = c & (0x7F >> len);
    for (size_t k = 1; k < len; k++) {
        if ((s[i + k] & 0xC0) != 0x80) return 0;
        cp = cp << 6 | (s[i + k] & 63);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return len;
}

static bool json_parse_string(JsonParser* p, std::string* out) {
    p->i++; // the opening quote
    out->clear();
    while (p->i < p->n) {
        unsigned char c = p->s[p->i];
        if (c == '"') { p->i++; return true; }
        if (c < 0x20) return json_fail(p, "control character inside a string");
        if (c != '\\') {
            size_t len = utf8_sequence_length(p->s, p->n, p->i);
            if (len == 0) return json_fail(p, "invalid UTF-8 inside a string");
            out->append((const char*)p->s + p->i, len);
            p->i += len;
            continue;
        }
        if (++p->i >= p->n) break;
        char e = (char)p->s[p->i++];
        switch (e) {
            case '"': *out += '"'; break;
            case '\\': *out += '\\'; break;
            case '/': *out += '/'; break;
            case 'b': *out += '\b'; break;
            case 'f': *out += '\f'; break;
            case 'n': *out += '\n'; break;
            case 'r': *out += '\r'; break;
            case 't': *out += '\t'; break;
            case 'u': {
                int cp = json_hex4(p);
                if (cp < 0) return json_fail(p, "bad \\u escape (need 4 hex digits)");
                if (cp >= 0xDC00 && cp <= 0xDFFF) return json_fail(p, "lone low surrogate in \\u escape");
                if (cp >= 0xD800 && cp <= 0xDBFF) { // a high surrogate must be followed by \uDC00..\uDFFF
                    if (p->i + 2 > p->n || p->s[p->i] != '\\' || p->s[p->i + 1] != 'u') return json_fail(p, "lone high surrogate in \\u escape");
                    p->i += 2;
                    int lo = json_hex4(p);
                    if (lo < 0xDC00 || lo > 0xDFFF) return json_fail(p, "bad low surrogate in \\u escape");
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                }
                json_put_utf8(out, (uint32_t)cp);
                break;
            }
            default: p->i--; return json_fail(p, "unknown escape in a string");
        }
    }
    return json_fail(p, "unterminated string");
}

static bool json_parse_value(JsonParser* p, Json* out);

static bool json_parse_number(JsonParser* p, Json* out) {
    size_t start = p->i;
    auto digits = [&]() { size_t k = p->i; while (p->i < p->n && p->s[p->i] >= '0' && p->s[p->i] <= '9') p->i++; return p->i - k; };
    if (p->s[p->i] == '-') p->i++;
    if (p->i < p->n && p->s[p->i] == '0') { p->i++; }
    else if (digits() == 0) return json_fail(p, "bad number");
    if (p->i < p->n && p->s[p->i] == '.') { p->i++; if (digits() == 0) return json_fail(p, "bad number: no digits after '.'"); }
    if (p->i < p->n && (p->s[p->i] == 'e' || p->s[p->i] == 'E')) {
        p->i++;
        if (p->i < p->n && (p->s[p->i] == '+' || p->s[p->i] == '-')) p->i++;
        if (digits() == 0) return json_fail(p, "bad number: no digits in the exponent");
    }
    out->kind = Json::NUMBER;
    out->str.assign((const char*)p->s + start, p->i - start);
    out->number = strtod(out->str.c_str(), NULL);
    return true;
}

static bool json_parse_value(JsonParser* p, Json* out) {
    json_skip_space(p);
    if (p->i >= p->n) return json_fail(p, "unexpected end of JSON");
    if (++p->depth > 64) return json_fail(p, "nesting deeper than 64");
    unsigned char c = p->s[p->i];
    bool ok = true;
    if (c == '{') {
        out->kind = Json::OBJECT;
        std::unordered_set<std::string> seen; // the keys so far: a duplicate is found in O(1), not by a scan
        p->i++;
        json_skip_space(p);
        if (p->i < p->n && p->s[p->i] == '}') { p->i++; }
        else {
            while (ok) {
                json_skip_space(p);
                if (p->i >= p->n || p->s[p->i] != '"') { ok = json_fail(p, "expected a string key"); break; }
                std::string key;
                if (!(ok = json_parse_string(p, &key))) break;
                if (!seen.insert(key).second) { ok = json_fail(p, ("duplicate key \"" + key + "\"").c_str()); break; }
                json_skip_space(p);
                if (p->i >= p->n || p->s[p->i] != ':') { ok = json_fail(p, "expected ':' after a key"); break; }
                p->i++;
                out->members.push_back({key, Json()});
                if (!(ok = json_parse_value(p, &out->members.back().second))) break;
                json_skip_space(p);
                if (p->i < p->n && p->s[p->i] == ',') { p->i++; continue; }
                if (p->i < p->n && p->s[p->i] == '}') { p->i++; break; }
                ok = json_fail(p, "expected ',' or '}' in an object");
            }
        }
    } else if (c == '[') {
        out->kind = Json::ARRAY;
        p->i++;
        json_skip_space(p);
        if (p->i < p->n && p->s[p->i] == ']') { p->i++; }
        else {
            while (ok) {
                out->items.push_back(Json());
                if (!(ok = json_parse_value(p, &out->items.back()))) break;
                json_skip_space(p);
                if (p->i < p->n && p->s[p->i] == ',') { p->i++; continue; }
                if (p->i < p->n && p->s[p->i] == ']') { p->i++; break; }
                ok = json_fail(p, "expected ',' or ']' in an array");
            }
        }
    } else if (c == '"') {
        out->kind = Json::STRING;
        ok = json_parse_string(p, &out->str);
    } else if (c == '-' || (c >= '0' && c <= '9')) {
        ok = json_parse_number(p, out);
    } else {
        static const char* const words[3] = {"true", "false", "null"};
        int w = -1;
        for (int k = 0; k < 3; k++) {
            size_t len = strlen(words[k]);
            if (p->i + len <= p->n && memcmp(p->s + p->i, words[k], len) == 0) { w = k; p->i += len; }
        }
        if (w < 0) ok = json_fail(p, "unexpected character");
        else if (w == 2) out->kind = Json::NUL;
        else { out->kind = Json::BOOL; out->boolean = w == 0; }
    }
    p->depth--;
    return ok;
}

// parses one JSON document (surrounding whitespace allowed); "" or "what, at byte k"
static std::string json_parse(const char* text, size_t n, Json* out) {
    JsonParser p = {(const unsigned char*)text, n, 0, 0, ""};
    *out = Json();
    if (!json_parse_value(&p, out)) return p.err;
    json_skip_space(&p);
    if (p.i != n) return strprintf("trailing characters after the JSON value at byte %zu", p.i);
    return "";
}

// a JSON number that is a non-negative integer without fraction or exponent, as a u64
static bool json_to_u64(const Json* v, uint64_t* out) {
    if (v == NULL || v->kind != Json::NUMBER || v->str.empty() || v->str.size() > 19) return false;
    uint64_t x = 0;
    for (char c : v->str) {
        if (c < '0' || c > '9') return false;
        x = x * 10 + (uint64_t)(c - '0');
    }
    *out = x;
    return true;
}

static std::string json_quote(const std::string& s) {
    std::string out = "\"";
    for (unsigned char c : s) {
        if (c == '"' || c == '\\') { out += '\\'; out += (char)c; }
        else if (c < 0x20) { out += strprintf("\\u%04x", c); }
        else { out += (char)c; }
    }
    return out + "\"";
}
