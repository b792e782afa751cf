// dev/check/llamacpp_greedy.mjs: llama.cpp's greedy continuation of given token ids, through the prebuilt
// llama.cpp in the npm package node-llama-cpp (CPU, offline). Prints one JSON line:
//   {"llama_cpp": "<version>", "tokens": [...], "top1": [...]}
// with the first n greedy tokens after the prompt and the probability llama.cpp gives each.
// Usage: node llamacpp_greedy.mjs <model.gguf> <adapter.gguf or -> <comma-separated prompt ids> <n>
import {getLlama} from "node-llama-cpp";

const [modelPath, adapterPath, promptIds, nArg] = process.argv.slice(2);
if (!modelPath || !adapterPath || !promptIds || !nArg) {
    console.error("usage: node llamacpp_greedy.mjs <model.gguf> <adapter.gguf|-> <ids,ids,...> <n>");
    process.exit(2);
}
const n = parseInt(nArg, 10);
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath, gpuLayers: 0});
const lora = adapterPath === "-" ? undefined : {adapters: [{filePath: adapterPath, scale: 1}]};
const context = await model.createContext({contextSize: 128, batchSize: 128, threads: 2, lora});
const sequence = context.getSequence();
const prompt = promptIds.split(",").map((s) => parseInt(s, 10));
const tokens = [], top1 = [];
for await (const out of sequence.evaluateWithMetadata(prompt, {confidence: true}, {temperature: 0, yieldEogToken: true})) {
    tokens.push(out.token);
    top1.push(out.confidence);
    if (tokens.length >= n) break;
}
console.log(JSON.stringify({llama_cpp: llama.llamaCppRelease ? llama.llamaCppRelease.release : "unknown", tokens, top1}));
await context.dispose();
await model.dispose();
