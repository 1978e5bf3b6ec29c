// llama.cpp as the CPU speed anchor of `tools/bench.sh`: the same GGUF file, thread count and
// token ids as `softprompt bench --batch-out FILE` wrote, through npm's node-llama-cpp (pinned;
// its prebuilt CPU library, nothing compiled). Prints one JSON object:
//   eval_examples_per_second / prompt_tokens_per_second: each eval row evaluated without
//     generating (prompt processing), one sequence at a time, with NUM_VIRTUAL_TOKENS stand-in
//     tokens before it so that the token count is softprompt's (virtual tokens + row);
//   generate_tokens_per_second: the first train row (with the stand-ins) then exactly GEN_TOKENS
//     greedy tokens, timed from the first evaluated token as `softprompt bench` times it.
// Medians over REPEATS runs after WARMUP, as in the bench. Run by tools/bench.sh from the folder it
// installs node-llama-cpp into:
//   node llama_anchor.mjs MODEL.gguf BATCH.json
import fs from "node:fs";
import os from "node:os";
import { getLlama, LlamaLogLevel } from "node-llama-cpp";

const [modelPath, batchPath] = process.argv.slice(2);
if (!modelPath || !batchPath) {
  console.error("usage: node llama_anchor.mjs MODEL.gguf BATCH.json");
  process.exit(2);
}
const spec = JSON.parse(fs.readFileSync(batchPath, "utf8"));
const threads = spec.threads || os.cpus().length;
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const now = () => Number(process.hrtime.bigint()) / 1e9;

// prebuilt binaries only (the CPU one here): a missing one is an error, never a compile
const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error });
const model = await llama.loadModel({ modelPath, gpuLayers: 0 });
const rows = spec.eval.flat().map((r) => r.ids);
const longest = Math.max(...rows.map((r) => r.length), spec.train[0].ids.length);
const stand = new Array(spec.num_virtual_tokens).fill(spec.train[0].ids[0]);
const context = await model.createContext({
  contextSize: stand.length + longest + spec.gen_tokens + 16,
  batchSize: 512,
  threads: { ideal: threads, min: threads },
  sequences: 1,
});
const seq = context.getSequence();

const evalTimes = [];
let tokens = 0;
for (let i = 0; i < spec.warmup + spec.repeats; i++) {
  const t0 = now();
  tokens = 0;
  for (const ids of rows) {
    await seq.clearHistory();
    await seq.evaluateWithoutGeneratingNewTokens([...stand, ...ids]);
    tokens += stand.length + ids.length;
  }
  if (i >= spec.warmup) evalTimes.push(now() - t0);
}

const genTimes = [];
const first = [...stand, ...spec.train[0].ids];
for (let i = 0; i < spec.warmup + spec.repeats && spec.gen_tokens > 0; i++) {
  await seq.clearHistory();
  const t0 = now();
  let n = 0;
  for await (const _token of seq.evaluate(first, { temperature: 0 })) {
    if (++n >= spec.gen_tokens) break;
  }
  if (n !== spec.gen_tokens) throw new Error(`generation stopped after ${n} tokens`);
  if (i >= spec.warmup) genTimes.push(now() - t0);
}

const evalS = median(evalTimes);
console.log(
  JSON.stringify({
    backend: "llama.cpp",
    runtime: "node-llama-cpp (prebuilt CPU library)",
    threads,
    eval_seconds: evalS,
    eval_examples_per_second: rows.length / evalS,
    prompt_tokens_per_second: tokens / evalS,
    generate_tokens_per_second: spec.gen_tokens > 0 ? spec.gen_tokens / median(genTimes) : null,
    peak_rss_mib: process.resourceUsage().maxRSS / 1024,
  }),
);
await context.dispose();
await model.dispose();
