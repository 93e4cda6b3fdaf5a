// Runs one ONNX graph through the built page in headless Chromium (SwiftShader here) on
// given .npy inputs, as `websd run` does natively, and writes its outputs as OUT/NAME.npy.
// Prints one JSON line: build and run times, the session's GPU memory, the page's
// WebAssembly memory and the peak resident memory of all Chromium processes. Run from the
// repository root after `trunk build --release`; check_sd_checkpoints.py --page calls it:
//
//   node scripts/page_graph.mjs MODEL.onnx OUT --input sample=sample.npy [--input ...]
//
// The graph's external data files are fetched from next to it, as the page fetches a
// model folder's.
import { chromium } from "playwright-core";
import { execSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { serve } from "./serve.mjs";

const [modelPath, outDir, ...rest] = process.argv.slice(2);
const routes = {}; // URL path -> file
const graphDir = path.dirname(path.resolve(modelPath));
const inputs = {};
for (let i = 0; i < rest.length; i += 2) {
  if (rest[i] !== "--input") throw new Error(`unknown argument ${rest[i]}`);
  const [name, file] = rest[i + 1].split("=");
  routes[`/inputs/${name}.npy`] = path.resolve(file);
  inputs[name] = `/inputs/${name}.npy`;
}
const server = await serve((p) => routes[p] ?? (p.startsWith("/graph/") ? path.join(graphDir, p.slice(7)) : path.join("dist", p)));
const base = server.base;
// Resident memory of every Chromium process (SwiftShader keeps the GPU's buffers in the
// GPU process), sampled every second.
const rssMiB = () => { try { return execSync("ps -C chromium -o rss=").toString().split("\n").filter(Boolean).reduce((a, b) => a + Number(b), 0) / 1024; } catch { return 0; } };
let peakRss = 0;
const sampler = setInterval(() => { peakRss = Math.max(peakRss, rssMiB()); }, 1000);
// A persistent profile on disk, as a user's browser has: large Blobs (a 3.3 GB fp32 UNet's
// external data) are then kept on disk, where a fresh incognito-like context holds them in
// memory and refuses past about 2 GB.
const profile = fs.mkdtempSync("/tmp/websd-profile-");
const browser = await chromium.launchPersistentContext(profile, { executablePath: "/usr/bin/chromium", headless: true, args: ["--no-sandbox", "--enable-unsafe-webgpu"] });
let failed = false;
try {
  const page = await browser.newPage();
  page.on("pageerror", (e) => console.error("pageerror:", e.message.slice(0, 300)));
  await page.goto(base + "/");
  await page.waitForFunction(() => window.wasmBindings?.App, null, { timeout: 120_000 });
  page.setDefaultTimeout(0);
  const result = await page.evaluate(async ({ url, inputs }) => {
    const app = new window.wasmBindings.App();
    await app.initGpu();
    const r = await app.runGraph(url, inputs);
    // Byte arrays do not cross to node as they are: send each as an array of numbers.
    const outputs = Object.fromEntries(Object.entries(r.outputs).map(([name, bytes]) => [name, Array.from(bytes)]));
    return { ...r, outputs };
  }, { url: `/graph/${path.basename(modelPath)}`, inputs });
  fs.mkdirSync(outDir, { recursive: true });
  for (const [name, bytes] of Object.entries(result.outputs)) fs.writeFileSync(path.join(outDir, `${name}.npy`), Buffer.from(bytes));
  console.log(JSON.stringify({
    build_s: +(result.buildMs / 1000).toFixed(2), run_s: +(result.runMs / 1000).toFixed(2),
    gpu_mib: Math.round(result.gpuMemoryBytes / 2 ** 20), wasm_mib: Math.round(result.wasmMemoryBytes / 2 ** 20),
    chromium_rss_peak_mib: Math.round(Math.max(peakRss, rssMiB())), outputs: Object.keys(result.outputs),
  }));
} catch (e) {
  console.error("failed:", e.message.split("\n")[0]);
  failed = true;
}
clearInterval(sampler);
await browser.close();
server.close();
fs.rmSync(profile, { recursive: true, force: true });
process.exit(failed ? 1 : 0);
