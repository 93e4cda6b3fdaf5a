// Loads a full-size SD 1.5 fp16 optimum export through the built page (headless Chromium,
// SwiftShader) from a local server, then generates one 64x64 step; prints what happened.
import { chromium } from "playwright-core";
import fs from "node:fs"; import path from "node:path";
import { serve } from "./serve.mjs";
const site = path.resolve("dist"), model = process.argv[2];
const server = await serve((p) => p.startsWith("/model/") ? path.join(model, p.slice(7)) : path.join(site, p));
const base = server.base;
// A persistent profile on disk, as a user's browser has: Cache Storage and large Blobs are
// kept on disk (a fresh incognito-like context keeps both in memory).
const profile = fs.mkdtempSync("/tmp/websd-profile-");
const browser = await chromium.launchPersistentContext(profile, { executablePath: "/usr/bin/chromium", headless: true, args: ["--no-sandbox", "--enable-unsafe-webgpu"] });
const page = await browser.newPage();
page.on("console", (m) => { if (m.type() === "error") console.log("console:", m.text().slice(0, 300)); });
page.on("pageerror", (e) => console.log("pageerror:", e.message.slice(0, 300)));
import { execSync } from "node:child_process";
// Resident memory of every Chromium process (renderer, GPU process with SwiftShader's
// buffers, browser), sampled every second; the peak is printed with each milestone.
const rssMiB = () => { try { return execSync("ps -C chromium -o rss=").toString().split("\n").filter(Boolean).reduce((a, b) => a + Number(b), 0) / 1024; } catch { return 0; } };
let peakRss = 0; const sampler = setInterval(() => { peakRss = Math.max(peakRss, rssMiB()); }, 1000);
const mem = () => `chromium RSS now ${rssMiB().toFixed(0)} MiB, peak ${peakRss.toFixed(0)} MiB`;
const t0 = Date.now();
const stamp = () => `${((Date.now() - t0) / 1000).toFixed(0)} s`;
await page.goto(base + "/");
await page.locator("#model-status", { hasText: /^Loaded / }).waitFor({ timeout: 120_000 });
await page.check("input[value=url]");
await page.fill("#model-url", base + "/model/");
await page.click("#load-model");
const watch = setInterval(async () => {
  try { console.log(stamp(), "status:", (await page.locator("#model-status").innerText()).slice(0, 200), "| message:", (await page.locator("#message").innerText()).slice(0, 400), "| files:", (await page.locator("#file-progress").innerText()).replace(/\n/g, "; ").slice(0, 600), "|", mem()); } catch {}
}, 20_000);
try {
  await page.locator("#model-status", { hasText: /^Loaded .*model/ }).waitFor({ timeout: 900_000 });
  console.log(stamp(), "loaded:", await page.locator("#model-status").innerText());
  console.log(stamp(), mem());
  await page.fill("#width", "64"); await page.fill("#height", "64"); await page.fill("#steps", "1");
  await page.click("#generate");
  await page.waitForFunction(() => /Done:/.test(document.querySelector("#step-status").textContent) || !document.querySelector("#message").hidden, null, { timeout: 1_200_000 });
  console.log(stamp(), "status:", await page.locator("#step-status").innerText(), "| message:", await page.locator("#message").innerText(), "| timings:", (await page.locator("#timings").innerText()).replace(/\n/g, " "));
  console.log(stamp(), mem());
} catch (e) {
  console.log(stamp(), "failed:", e.message.split("\n")[0], "| status:", await page.locator("#model-status").innerText(), "| message:", await page.locator("#message").innerText());
}
clearInterval(sampler); clearInterval(watch); await browser.close(); server.close();
fs.rmSync(profile, { recursive: true, force: true });
