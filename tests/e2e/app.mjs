// End-to-end test of the built site (dist/) in Debian's Chromium, driven by playwright-core:
// served from a sub-path on 127.0.0.1, generate with the bundled model, check the step
// previews, the download and the console; reload to use the cache; and check the message
// shown when WebGPU is unavailable. Run by .ci/test after `trunk build --release`.
import { chromium } from "playwright-core";
import http from "node:http";
import fs from "node:fs";
import path from "node:path";
import assert from "node:assert/strict";

const root = path.resolve(process.argv[2] ?? "dist");
const outDir = path.resolve(process.argv[3] ?? "target/e2e");
const fixtures = path.resolve("tests/fixtures");
const MIME = { ".html": "text/html", ".js": "text/javascript", ".wasm": "application/wasm", ".css": "text/css",
  ".json": "application/json", ".png": "image/png", ".txt": "text/plain" };
const PREFIX = "/some/sub/path/";

const server = http.createServer((req, res) => {
  const url = new URL(req.url, "http://x");
  if (!url.pathname.startsWith(PREFIX)) { res.writeHead(404).end(); return; }
  // The site, and test fixtures under fixtures/ for the single-graph calls.
  const rel = decodeURIComponent(url.pathname.slice(PREFIX.length));
  const dir = rel.startsWith("fixtures/") ? fixtures : root;
  let file = path.join(dir, rel.startsWith("fixtures/") ? rel.slice("fixtures/".length) : rel);
  if (!file.startsWith(dir)) { res.writeHead(403).end(); return; }
  if (fs.existsSync(file) && fs.statSync(file).isDirectory()) file = path.join(file, "index.html");
  if (!fs.existsSync(file)) { res.writeHead(404).end(); return; }
  const body = fs.readFileSync(file);
  res.writeHead(200, { "content-type": MIME[path.extname(file)] ?? "application/octet-stream", "content-length": body.length });
  res.end(body);
});
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
const site = `http://127.0.0.1:${server.address().port}${PREFIX}`;

const baseArgs = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--no-first-run", "--disable-sync"];
fs.mkdirSync(outDir, { recursive: true });

async function withPage(args, body) {
  const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", headless: true, args: [...baseArgs, ...args] });
  try {
    const context = await browser.newContext({ acceptDownloads: true });
    const page = await context.newPage();
    const problems = [];
    page.on("console", (m) => { if (m.type() === "error") problems.push(`console: ${m.text()}`); });
    page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
    await body(page, problems);
  } finally {
    await browser.close();
  }
}

let failed = false;
// E2E_ONLY=TEXT runs only the steps whose names contain TEXT.
const only = process.env.E2E_ONLY;
async function step(name, fn) {
  if (only && !name.includes(only)) return;
  try { await fn(); console.log(`ok   ${name}`); }
  catch (e) { failed = true; console.log(`FAIL ${name}\n${e.stack ?? e}`); }
}

await step("generates with the bundled model, previews, download, cache", () => withPage(["--enable-unsafe-webgpu"], async (page, problems) => {
  await page.goto(site);
  await page.locator("#model-status", { hasText: /^Loaded / }).waitFor({ timeout: 120_000 });
  assert.match(await page.locator("#adapter").innerText(), /GPU:/);
  await page.selectOption("#scheduler", "euler");
  await page.fill("#steps", "6");
  await page.fill("#preview-every", "2");
  await page.keyboard.press("Tab");
  await page.click("#generate");
  await page.locator("#result").waitFor({ state: "visible", timeout: 180_000 });
  const previews = await page.locator("#strip canvas").count();
  assert.ok(previews >= 3, `expected step previews, got ${previews}`);
  assert.match(await page.locator("#step-status").innerText(), /Done: seed 9000/);
  assert.match(await page.locator("#timings").innerText(), /UNet steps\s+6 ×/);
  assert.match(await page.locator("#timings").innerText(), /GPU memory\s+[1-9]\d* MiB/);
  assert.match(await page.locator("#timings").innerText(), /WebAssembly memory\s+[1-9]\d* MiB/);
  const [download] = await Promise.all([page.waitForEvent("download"), page.click("#download")]);
  const file = path.join(outDir, "download.png");
  await download.saveAs(file);
  const png = fs.readFileSync(file);
  assert.equal(png.subarray(1, 4).toString(), "PNG");
  for (const key of ["prompt", "seed", "steps", "scheduler", "guidance_scale", "model"]) {
    assert.ok(png.includes(Buffer.from(key + "\0")), `PNG lacks the ${key} text chunk`);
  }
  await page.screenshot({ path: path.join(outDir, "app.png"), fullPage: true });
  // A reload takes the model from the cache.
  await page.reload();
  await page.locator("#file-progress", { hasText: "text_encoder/model.onnx: from cache" }).waitFor({ timeout: 120_000 });
  await page.locator("#model-status", { hasText: /^Loaded / }).waitFor({ timeout: 120_000 });
  // Cancel leaves the page usable.
  await page.fill("#steps", "200");
  await page.click("#generate");
  await page.locator("#step-status", { hasText: "Step 2" }).waitFor({ timeout: 60_000 });
  await page.click("#cancel");
  await page.locator("#message", { hasText: "cancelled" }).waitFor({ timeout: 60_000 });
  assert.equal(await page.locator("#generate").isDisabled(), false);
  // A size no GPU buffer holds is refused at once, with the size that would fit.
  await page.fill("#width", "65536");
  await page.fill("#height", "65536");
  await page.click("#generate");
  await page.locator("#message", { hasText: /too large for this GPU.*largest size that fits is about \d+x\d+/ }).waitFor({ timeout: 60_000 });
  assert.equal(await page.locator("#generate").isDisabled(), false);
  await page.fill("#width", "32");
  await page.fill("#height", "32");
  // A prompt outside Latin-1: the download carries it in a UTF-8 iTXt chunk.
  const unicodePrompt = "東京の夜景 🌃, ночь";
  await page.fill("#prompt", unicodePrompt);
  await page.fill("#steps", "2");
  await page.click("#generate");
  await page.locator("#step-status", { hasText: /^Done:/ }).waitFor({ timeout: 120_000 });
  const [unicodeDownload] = await Promise.all([page.waitForEvent("download"), page.click("#download")]);
  const unicodeFile = path.join(outDir, "download-unicode.png");
  await unicodeDownload.saveAs(unicodeFile);
  const unicodePng = fs.readFileSync(unicodeFile);
  assert.ok(unicodePng.includes(Buffer.concat([Buffer.from("iTXtprompt\0\0\0\0\0"), Buffer.from(unicodePrompt)])),
    "the PNG lacks the prompt's iTXt chunk");
  // img2img: a strength that leaves no steps is explained; a usable one generates.
  await page.fill("#steps", "4");
  await page.selectOption("#scheduler", "euler");
  await page.setInputFiles("#init-image", path.resolve("tests/fixtures/pipeline/init.png"));
  await page.locator("#strength").fill("0");
  await page.click("#generate");
  await page.locator("#message", { hasText: "leaves no steps" }).waitFor({ timeout: 60_000 });
  await page.locator("#strength").fill("0.5");
  // A prompt past the model's context: the result says which words were ignored.
  await page.fill("#prompt", `a red 7 on a blue background${", sharp".repeat(40)}, clean edges`);
  await page.click("#generate");
  await page.locator("#step-status", { hasText: /^Done:/ }).waitFor({ timeout: 120_000 });
  assert.match(await page.locator("#step-status").innerText(), /Note: the prompt is longer than the model's \d+ tokens; ignored: ".*sharp, clean edges"/);
  assert.equal(await page.locator("#message").isVisible(), false);
  // A LoRA made for another model (the tiny SD's, 16 channels wide) is refused by name; once
  // removed, the page generates again.
  await page.setInputFiles("#lora", path.resolve("tests/fixtures/grads/tiny_unet_lora/initial.safetensors"));
  await page.click("#generate");
  await page.locator("#message", { hasText: "LoRA A of shape" }).waitFor({ timeout: 60_000 });
  await page.setInputFiles("#lora", []);
  await page.click("#generate");
  await page.locator("#step-status", { hasText: /^Done:/ }).waitFor({ timeout: 120_000 });
  assert.deepEqual(problems, []);
}));

await step("edits a picture (Imagic): optimize, cancel, eta strip, edit file", () => withPage(["--enable-unsafe-webgpu"], async (page, problems) => {
  await page.goto(site);
  await page.locator("#model-status", { hasText: /^Loaded / }).waitFor({ timeout: 120_000 });
  await page.fill("#steps", "2");
  await page.fill("#width", "32");
  await page.fill("#height", "32");
  await page.fill("#prompt", "a green 7 on a blue background");
  // Optimize without a picture is explained.
  await page.click("#optimize");
  await page.locator("#message", { hasText: "Pick a picture" }).waitFor({ timeout: 10_000 });
  await page.setInputFiles("#edit-image", path.resolve("tests/fixtures/imagic/source.png"));
  // Cancelling an optimisation leaves the page usable.
  await page.fill("#edit-embed-steps", "500");
  await page.click("#optimize");
  await page.locator("#edit-status", { hasText: /embedding step 2 \/ 500: loss \d/ }).waitFor({ timeout: 120_000 });
  await page.click("#cancel");
  await page.locator("#message", { hasText: "cancelled" }).waitFor({ timeout: 60_000 });
  assert.equal(await page.locator("#optimize").isDisabled(), false);
  // A short edit of every layer: both stages report their loss, then the edit is drawn.
  await page.fill("#edit-embed-steps", "3");
  await page.fill("#edit-tune-steps", "2");
  await page.selectOption("#edit-tune-layers", "all");
  const stages = new Map();
  const watch = setInterval(async () => {
    const text = await page.locator("#edit-status").innerText().catch(() => "");
    const match = text.match(/^(embedding|fine-tuning) step .*\((\d+) ms\)/);
    if (match) stages.set(match[1], match[2]);
  }, 50);
  await page.click("#optimize");
  await page.locator("#edit-status", { hasText: /^Edit ready: "a green 7 on a blue background"/ }).waitFor({ timeout: 240_000 });
  await page.locator("#step-status", { hasText: /^Done: edit at eta 0.7,/ }).waitFor({ timeout: 120_000 });
  clearInterval(watch);
  assert.ok(stages.has("fine-tuning"), `progress showed ${[...stages.keys()]}`);
  console.log(`     a training step in this browser: ${[...stages].map(([stage, ms]) => `${stage} ${ms} ms`).join(", ")}`);
  const [editDownload] = await Promise.all([page.waitForEvent("download"), page.click("#edit-download")]);
  const editFile = path.join(outDir, "edit.safetensors");
  await editDownload.saveAs(editFile);
  const edit = fs.readFileSync(editFile);
  for (const key of ["imagic.target_embedding", "imagic.optimized_embedding", "lora_A.weight", "lora_adapter_metadata", "unet.conv_in.lora_A.weight"]) {
    assert.ok(edit.includes(Buffer.from(key)), `the edit file lacks ${key}`);
  }
  // Letting go of the slider redraws; the strip shows the edit across eta.
  await page.locator("#edit-eta").fill("1");
  await page.locator("#edit-eta").dispatchEvent("change");
  await page.locator("#step-status", { hasText: /^Done: edit at eta 1,/ }).waitFor({ timeout: 120_000 });
  // Starting from the picture: the strength slider redraws from it.
  await page.locator("#edit-strength").fill("0.5");
  await page.locator("#edit-strength").dispatchEvent("change");
  await page.locator("#step-status", { hasText: /^Done: edit at eta 1 from the picture at strength 0.5,/ }).waitFor({ timeout: 120_000 });
  await page.locator("#edit-strength").fill("1");
  await page.locator("#edit-strength").dispatchEvent("change");
  await page.locator("#step-status", { hasText: /^Done: edit at eta 1,/ }).waitFor({ timeout: 120_000 });
  await page.click("#edit-strip");
  await page.locator("#step-status", { hasText: /^Done: the edit from eta 0/ }).waitFor({ timeout: 240_000 });
  assert.equal(await page.locator("#strip canvas").count(), 7);
  // The file loads back; a file that is no edit is refused by name.
  await page.setInputFiles("#edit-file", path.resolve("tests/fixtures/grads/tiny_unet_lora/initial.safetensors"));
  await page.locator("#message", { hasText: "not an edit file" }).waitFor({ timeout: 10_000 });
  await page.setInputFiles("#edit-file", editFile);
  await page.locator("#edit-status", { hasText: /^Edit ready/ }).waitFor({ timeout: 10_000 });
  await page.click("#generate");
  await page.locator("#step-status", { hasText: /^Done: edit at eta 1,/ }).waitFor({ timeout: 120_000 });
  await page.screenshot({ path: path.join(outDir, "edit.png"), fullPage: true });
  assert.deepEqual(problems, []);
}));

await step("loads uncached when the cache refuses a file", () => withPage(["--enable-unsafe-webgpu"], async (page, problems) => {
  await page.addInitScript(() => {
    Cache.prototype.put = () => Promise.reject(new DOMException("Failed to execute 'put' on 'Cache'", "UnknownError"));
  });
  await page.goto(site);
  await page.locator("#model-status", { hasText: /^Loaded / }).waitFor({ timeout: 120_000 });
  assert.match(await page.locator("#file-progress").innerText(), /unet\/model\.onnx: .*not cached \(.*UnknownError/);
  assert.deepEqual(problems, []);
}));

/// A little-endian float32 .npy file's values.
function npyFloats(bytes) {
  const headerLength = bytes.readUInt16LE(8);
  assert.match(bytes.toString("latin1", 10, 10 + headerLength), /'descr': '<f4'/);
  const data = bytes.subarray(10 + headerLength);
  return new Float32Array(data.buffer.slice(data.byteOffset, data.byteOffset + data.length));
}

await step("runs one graph with external data on given inputs (runGraph), as onnxruntime", () => withPage(["--enable-unsafe-webgpu"], async (page, problems) => {
  await page.goto(site);
  await page.waitForFunction(() => window.wasmBindings?.App, null, { timeout: 120_000 });
  const result = await page.evaluate(async () => {
    const app = new window.wasmBindings.App();
    await app.initGpu();
    const graph = "fixtures/graphs/constant_external_data/";
    const r = await app.runGraph(graph + "model.onnx", { x: graph + "in_x.npy" });
    return { y: Array.from(r.outputs.y), runMs: r.runMs };
  });
  const actual = npyFloats(Buffer.from(result.y));
  const expected = npyFloats(fs.readFileSync(path.join(fixtures, "graphs/constant_external_data/out_y.npy")));
  assert.equal(actual.length, expected.length);
  const scale = Math.max(...expected.map(Math.abs));
  const worst = Math.max(...actual.map((v, i) => Math.abs(v - expected[i])));
  assert.ok(worst <= 1e-5 * scale, `largest difference ${worst} of ${scale}`);
  const missing = await page.evaluate(async () => {
    try { await new window.wasmBindings.App().runGraph("fixtures/graphs/nothing/model.onnx", {}); return null; }
    catch (e) { return String(e.message ?? e); }
  });
  assert.match(missing, /nothing\/model\.onnx: HTTP 404/);
  assert.deepEqual(problems.filter((p) => !/404/.test(p)), []);
}));

await step("explains a missing WebGPU", () => withPage(["--disable-features=WebGPU"], async (page) => {
  await page.goto(site);
  await page.locator("#message", { hasText: "WebGPU" }).waitFor({ timeout: 60_000 });
  assert.equal(await page.locator("#generate").isDisabled(), true);
  await page.screenshot({ path: path.join(outDir, "no-webgpu.png") });
}));

server.close();
process.exit(failed ? 1 : 0);
