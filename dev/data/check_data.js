// Dev check: our token files equal, token for token, what the reference GPT-2 encoder (npm
// gpt-3-encoder, run by node) gives for the same text and split. Prints the counts; exits 1 on any
// difference. Usage (from the repo root, after `make data`; `make check-data` does both):
//   node dev/data/check_data.js [brown_text_dir]
// tinyshakespeare is split independently of the C++ code, the way llm.c's dev/data/tinyshakespeare.py
// does it: "<|endoftext|>" + text with every "\n\n" replaced by "\n\n<|endoftext|>", then encoded with
// <|endoftext|> as the special token 50256. brown_text_dir holds the plain text of each Brown file
// and files.txt listing them in corpus order (`build/prepare_data -t DIR` writes them); the check
// encodes each document after an EOT and splits train/val by the same every-20th-file rule.
const fs = require('fs');
const path = require('path');
const { loadReferenceEncoder, ROOT } = require('./reference_encoder.js');

const EOT = 50256;
const EOT_STRING = '<|endoftext|>';
const enc = loadReferenceEncoder();

function readTokens(file) {
  const buf = fs.readFileSync(path.join(ROOT, file));
  const magic = buf.readInt32LE(0), version = buf.readInt32LE(4), count = buf.readInt32LE(8);
  if (magic !== 20240520 || version !== 1 || buf.length !== 1024 + 2 * count) throw new Error(`${file}: not an llm.c token file`);
  const out = new Array(count);
  for (let k = 0; k < count; k++) out[k] = buf.readUInt16LE(1024 + 2 * k);
  return out;
}

let failures = 0;
function compare(label, file, want) {
  const got = readTokens(file);
  let first = -1;
  const n = Math.min(got.length, want.length);
  for (let k = 0; k < n && first < 0; k++) if (got[k] !== want[k]) first = k;
  if (first < 0 && got.length !== want.length) first = n;
  const verdict = first < 0 ? 'EQUAL' : `DIFFERENT at token ${first}`;
  console.log(`[check] ${label}: ${file} ${got.length} tokens, reference ${want.length} tokens: ${verdict}`);
  if (first >= 0) failures++;
}

function encodeWithEot(text) { // text may contain EOT_STRING, which becomes the special token
  const out = [];
  text.split(EOT_STRING).forEach((part, i) => {
    if (i > 0) out.push(EOT);
    for (const id of enc.encode(part)) out.push(id);
  });
  return out;
}

// tinyshakespeare
const sources = [path.join(ROOT, '..', 'shared', 'data', 'tinyshakespeare', 'input.txt'),
                 path.join(ROOT, 'data', 'cache', 'tiny_shakespeare.txt')];
const src = sources.find((p) => fs.existsSync(p));
if (!src) { console.error('ERROR: tinyshakespeare input.txt not found\n---> HINT: run `make data` first'); process.exit(1); }
let t0 = Date.now();
const text = EOT_STRING + fs.readFileSync(src, 'utf8').split('\n\n').join('\n\n' + EOT_STRING);
const ts = encodeWithEot(text);
console.log(`[check] reference encoder: tinyshakespeare ${ts.length} tokens in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
compare('tinyshakespeare val', 'data/tiny_shakespeare_val.bin', ts.slice(0, 32768));
compare('tinyshakespeare train', 'data/tiny_shakespeare_train.bin', ts.slice(32768));

// Brown corpus, when its plain text was dumped
const brownDir = process.argv[2];
if (brownDir) {
  t0 = Date.now();
  const files = fs.readFileSync(path.join(brownDir, 'files.txt'), 'utf8').split('\n').filter((l) => l.length > 0);
  const train = [], val = [];
  files.forEach((name, k) => {
    const out = k % 20 === 19 ? val : train;
    out.push(EOT);
    for (const id of enc.encode(fs.readFileSync(path.join(brownDir, name + '.txt'), 'utf8'))) out.push(id);
  });
  console.log(`[check] reference encoder: brown ${files.length} documents, ${train.length + val.length} tokens in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  compare('brown val', 'data/brown_val.bin', val);
  compare('brown train', 'data/brown_train.bin', train);
}
if (failures > 0) { console.error(`[check] FAILED: ${failures} file(s) differ from the reference encoder`); process.exit(1); }
console.log('[check] all token files equal the reference encoder');
