// websd and onnxruntime-web's WebGPU provider on the same ONNX graph, in the same page of
// headless Chromium (SwiftShader here): builds websd's session and times its best run,
// then does the same with onnxruntime-web on inputs of the shapes websd's session took,
// and prints both times and their ratio. Too slow for CI; run from the repository root
// after `trunk build --release` and `npm install --no-save onnxruntime-web@1.30.0`:
//
//   node scripts/side_by_side.mjs MODEL.onnx --dim batch_size=2 --dim height=12 \
//     --dim width=20 --dim sequence_length=16 [--runs 5]
//
// websd reads the graph's external data from next to it; onnxruntime-web is given the
// .onnx file and, if there is one, optimum's `<name>_data` file beside it (the tiny SD UNet
// in tests/fixtures/tiny-sd/unet holds its weights inline). Inputs are fed in the types
// the graph declares (float32, float16, int64). Both times leave outputs where the runtime puts them by
// default: on the GPU for websd, read back for onnxruntime-web (a few KiB for that UNet).
import { chromium } from "playwright-core";
import fs from "node:fs";
import path from "node:path";
import { serve } from "./serve.mjs";

const args = process.argv.slice(2);
const modelPath = args[0];
const dims = {};
let runs = 5;
for (let i = 1; i < args.length; i += 2) {
  if (args[i] === "--dim") {
    const [name, value] = args[i + 1].split("=");
    dims[name] = Number(value);
  } else if (args[i] === "--runs") runs = Number(args[i + 1]);
}
const graphDir = path.dirname(path.resolve(modelPath));
const graphUrl = `/graph/${path.basename(modelPath)}`;
const dataName = `${path.basename(modelPath)}_data`;
const externalData = fs.existsSync(path.join(graphDir, dataName)) ? [{ path: dataName, data: `/graph/${dataName}` }] : undefined;
const ortDir = path.resolve("node_modules/onnxruntime-web/dist");
if (!fs.existsSync(ortDir)) {
  console.error("onnxruntime-web is missing: npm install --no-save onnxruntime-web@1.30.0");
  process.exit(1);
}
const server = await serve((p) => p.startsWith("/graph/") ? path.join(graphDir, p.slice(7))
  : p.startsWith("/ort/") ? path.join(ortDir, p.slice(5)) : path.join("dist", p));
const base = server.base;
// A profile on disk, as a user's browser has: large Blobs (websd's fetch of a 3.3 GB
// external data file) are kept on disk there, in memory in an incognito-like context.
const profile = fs.mkdtempSync("/tmp/websd-profile-");
const browser = await chromium.launchPersistentContext(profile, { executablePath: "/usr/bin/chromium", headless: true, args: ["--no-sandbox", "--enable-unsafe-webgpu"] });
const page = await browser.newPage();
page.on("pageerror", (e) => console.log("pageerror:", e.message.slice(0, 300)));
await page.goto(base + "/");
await page.waitForFunction(() => window.wasmBindings?.App, null, { timeout: 120_000 });

const result = await page.evaluate(async ({ dims, runs, graphUrl, externalData }) => {
  const app = new window.wasmBindings.App();
  await app.initGpu();
  const websd = await app.timeGraph(graphUrl, dims, runs);

  const ort = await import("/ort/ort.webgpu.min.mjs");
  ort.env.wasm.wasmPaths = "/ort/";
  const started = performance.now();
  let session;
  try {
    session = await ort.InferenceSession.create(graphUrl, { executionProviders: ["webgpu"], externalData });
  } catch (e) {
    // e.g. an fp16 graph on a device without shader-f16, which onnxruntime-web requires.
    return { websd, ort: { error: String(e.message ?? e).split("\n")[0] } };
  }
  const declared = Object.fromEntries(session.inputMetadata.map((m) => [m.name, m.type]));
  const feeds = {};
  let seed = 1;
  const random = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648) * 2 - 1;
  // f16 bits of a value in [-1, 1] (rounded toward zero; subnormals flushed).
  const halfBits = (v) => {
    const f = new Float32Array([v]), bits = new Uint32Array(f.buffer)[0];
    const exponent = ((bits >> 23) & 0xff) - 127 + 15;
    return exponent <= 0 ? 0 : ((bits >> 16) & 0x8000) | (exponent << 10) | ((bits >> 13) & 0x3ff);
  };
  for (const input of websd.inputs) {
    const n = input.shape.reduce((a, b) => a * b, 1);
    const type = declared[input.name];
    feeds[input.name] = type === "float32" ? new ort.Tensor("float32", Float32Array.from({ length: n }, random), input.shape)
      : type === "float16" ? new ort.Tensor("float16", Uint16Array.from({ length: n }, () => halfBits(random())), input.shape)
      : new ort.Tensor(type, type === "int64" ? new BigInt64Array(n).fill(1n) : new Int32Array(n).fill(1), input.shape);
  }
  await session.run(feeds);
  const firstMs = performance.now() - started;
  let bestMs = Infinity;
  for (let i = 0; i < runs; i++) {
    const t0 = performance.now();
    await session.run(feeds);
    bestMs = Math.min(bestMs, performance.now() - t0);
  }
  return { websd, ort: { firstMs, bestMs } };
}, { dims, runs, graphUrl, externalData });

const adapter = await page.evaluate(async () => {
  const a = await navigator.gpu.requestAdapter();
  return a?.info ? `${a.info.vendor} ${a.info.architecture} ${a.info.description}`.trim() : "unknown";
});
// First step: the session built (its pipelines compiled) and run once, as a page's first
// denoising step; onnxruntime-web's first also counts creating its session.
const websd = { websd_build_ms: Math.round(result.websd.buildMs),
  websd_first_ms: Math.round(result.websd.buildMs + result.websd.firstMs), websd_best_ms: Math.round(result.websd.bestMs),
  websd_gpu_mib: Math.round(result.websd.gpuMemoryBytes / 2 ** 20) };
const ortWeb = result.ort.error ? { ort_web_error: result.ort.error } : {
  ort_web_first_ms: Math.round(result.ort.firstMs), ort_web_best_ms: Math.round(result.ort.bestMs),
  ort_over_websd: +(result.ort.bestMs / result.websd.bestMs).toFixed(2),
};
console.log(JSON.stringify({ model: modelPath, dims, runs, adapter, ...websd, ...ortWeb }));
await browser.close();
fs.rmSync(profile, { recursive: true, force: true });
server.close();
