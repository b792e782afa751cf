// dev/check/compare_greedy.mjs: compares two greedy runs (JSON lines from greedy.cpp and llamacpp_greedy.mjs).
// Passes when every greedy token is the same and each token's probability agrees within tol_top1.
// Usage: node compare_greedy.mjs <label> <ours.json> <theirs.json>
import {readFileSync} from "node:fs";

// llama.cpp and we sum in different orders in fp32: the probabilities agree to ~1e-5; 1e-3 still tells a
// wrong orientation, a missing adapter or a wrong scale (each moves them by far more)
const tol_top1 = 1e-3;
const [label, oursPath, theirsPath] = process.argv.slice(2);
const ours = JSON.parse(readFileSync(oursPath, "utf8")), theirs = JSON.parse(readFileSync(theirsPath, "utf8"));
let same = 0;
while (same < ours.tokens.length && ours.tokens[same] === theirs.tokens[same]) same++;
let worst = 0;
for (let i = 0; i < Math.min(same, theirs.top1.length); i++) worst = Math.max(worst, Math.abs(ours.top1[i] - theirs.top1[i]));
const ok = same === ours.tokens.length && ours.tokens.length === theirs.tokens.length && worst <= tol_top1;
console.log(`${ok ? "PASS" : "FAIL"} ${label}: ${same}/${ours.tokens.length} greedy tokens identical, ` +
            `max |top-1 probability difference| ${worst.toExponential(2)} (tolerance ${tol_top1})`);
if (!ok) {
    console.log(`  ours:      ${JSON.stringify(ours.tokens)}`);
    console.log(`  llama.cpp: ${JSON.stringify(theirs.tokens)}`);
    process.exit(1);
}
