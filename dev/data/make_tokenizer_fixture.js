// Writes dev/fixtures/tokenizer_cases.txt: tricky strings with the token ids and pre-token pieces that
// the reference GPT-2 encoder (npm gpt-3-encoder) gives. dev/test_tokenizer.cpp checks our encoder
// against it. Run once with `make tokenizer-fixture` (needs node + npm); the output is committed.
// Format, one case per line: <hex of the UTF-8 text> TAB <ids, space-separated> TAB <hex of each piece, space-separated>
const fs = require('fs');
const path = require('path');
const { loadReferenceEncoder, GPT2_PATTERN, ROOT } = require('./reference_encoder.js');

const enc = loadReferenceEncoder();

const cases = [
  // whitespace runs: "\s+(?!\S)" leaves the last space of a run to the next word
  '', ' ', '   ', 'Hello world', ' Hello', 'Hello  world', 'a   b', 'a\n\nb', 'a \n b', '\n\n\n', '\t\tx', 'x \t',
  'end   ', ' \n', '\r\n', 'a\r\n\r\nb', '\f\v', 'tab\tseparated\tvalues', '    indented code();',
  // contractions: case-sensitive, only without a leading space
  "I'm", "you're", "they've", "we'll", "he'd", "it's", "don't", "I'M", "YOU'RE", "'s'", "''s", " 's", "'sam",
  "rock'n'roll", "O'Neill", "'ll've", "can't won't shan't", "the dogs' bones", "'", "''", "' '",
  // digits
  '12345678901234567890', '3.14159', '1,000,000', ' 42', 'x2y3', '\u0663\u0664\u0665', '\u00bd \u00b2', '\u216b',
  '2024-11-23', '0x1F600', '1e-08',
  // punctuation and symbols
  '!!!???...', '---', '()[]{}<>', 'a, b; c: d.', '<|endoftext|>', 'x<|endoftext|>y', 'http://example.com/a?b=c&d=e',
  'email@example.com', 'C++ & C#', '$100.00', '#hashtag @user', '"quoted" \'single\'', '``Brown\'\' quotes',
  '\\backslash\\', '~`^|_', '...', ' ...', '?!', 'a-b_c.d',
  // Unicode letters, marks, numbers and spaces beyond ASCII
  'na\u00efve caf\u00e9 r\u00e9sum\u00e9', '\u00dcn\u00efc\u00f6d\u00e9', 'Stra\u00dfe', '\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac',
  '\u0420\u0443\u0441\u0441\u043a\u0438\u0439 \u0442\u0435\u043a\u0441\u0442', '\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8',
  '\u4e2d\u6587\u5b57\u7b26', '\ud55c\uad6d\uc5b4', '\u05e2\u05d1\u05e8\u05d9\u05ea', '\u0627\u0644\u0639\u0631\u0628\u064a\u0629',
  '\u0939\u093f\u0928\u094d\u0926\u0940', '\u0e44\u0e17\u0e22', 'e\u0301', ' e\u0301\u0301x', '\u00a0nbsp', 'a\u3000b',
  'a\u2028b', '\ufeffBOM', 'a\u0085b', 'x\u200by', '\ufb01 ligature', '\u00aa\u00ba\u00b5', '\u00d7\u00f7',
  '\u00a1Hola!', '\u00bfQu\u00e9?', '\u00ab guillemets \u00bb', '\u2014em dash\u2014', '\u201csmart quotes\u201d',
  '\u2018single\u2019s', '\u20ac5 \u00a35 \u00a55', '\u00a9\u00ae\u2122', 'd\u00e9j\u00e0 vu',
  // beyond the BMP: emoji (with skin tone and joiners), flags, math letters and digits
  '\ud83d\ude42', '\ud83d\udc4d\ud83c\udffd', '\ud83d\udc68\u200d\ud83d\udc69\u200d\ud83d\udc67\u200d\ud83d\udc66',
  '\ud83c\uddfa\ud83c\uddf8', ' \ud83d\ude00\ud83d\ude00!', '\ud835\udd73\ud835\udd8a\ud835\udd91\ud835\udd91\ud835\udd94',
  '\ud835\udfd8\ud835\udfd9', '\ud800\udf00\ud800\udf01', '\u{20000}\u{20001}',
  // control characters
  '\u0000\u0001\u007f', 'a\u0000b', '\u001c\u001d\u001e\u001f',
  // long words and runs
  'a'.repeat(200), 'antidisestablishmentarianism', 'Supercalifragilisticexpialidocious', ' ' + 'ab'.repeat(60),
  '!'.repeat(100), ' '.repeat(50) + 'x', '9'.repeat(77),
  // prose
  'First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n',
  'The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX!',
];

// seeded random strings from a pool that mixes every class (mulberry32 PRNG, fixed seed)
let seed = 1337;
const rand = () => {
  seed |= 0; seed = (seed + 0x6D2B79F5) | 0;
  let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
  t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
};
const pool = [
  ...'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ', ...'0123456789', ' ', ' ', ' ', ' ', '\n', '\n', '\t', '\r',
  ...'.!?-"\'()[]/:;&*#%$@', "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", 'the', ' and', 'ing',
  ...'\u00e9\u00fc\u00df\u00f1\u00e7\u00a0\u00b2\u00bd\u00a7\u00b6', ...'\u03b1\u03b2\u0416\u0436\u05d0\u0628\u0915\u093e',
  ...'\u4e00\u4e8c\u3042\u30a2\uac00\u3000\u2028\u0085\ufeff\u0301\u0663\u2160\u2014\u2019',
  '\ud83d\ude00', '\ud83d\udc4d', '\ud83c\udffd', '\u200d', '\ud835\udfd8', '\u{20000}',
];
for (let c = 0; c < 200; c++) {
  const len = 1 + Math.floor(rand() * 30);
  let s = '';
  for (let k = 0; k < len; k++) s += pool[Math.floor(rand() * pool.length)];
  cases.push(s);
}

const hex = (s) => Buffer.from(s, 'utf8').toString('hex');
const lines = cases.map((s) => {
  const ids = enc.encode(s);
  const pieces = Array.from(s.matchAll(GPT2_PATTERN), (m) => hex(m[0]));
  return `${hex(s)}\t${ids.join(' ')}\t${pieces.join(' ')}`;
});
const out = path.join(ROOT, 'dev', 'fixtures', 'tokenizer_cases.txt');
fs.mkdirSync(path.dirname(out), { recursive: true });
fs.writeFileSync(out + '.tmp', lines.join('\n') + '\n');
fs.renameSync(out + '.tmp', out);
console.log(`wrote ${cases.length} cases to ${path.relative(ROOT, out)}`);
