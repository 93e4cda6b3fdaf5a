// The page's wiring: DOM events in, drawing out. Every decision (what to fetch, caching,
// validation, generation) is made by the Rust `App` (src/web.rs).

const $ = (id) => document.getElementById(id);
const BUNDLED = new URL("onnx/", document.baseURI).href;
let app = null;
let running = false;

function showMessage(error) {
  const box = $("message");
  if (!error) { box.hidden = true; box.textContent = ""; return; }
  box.textContent = error instanceof Error ? error.message : String(error);
  box.hidden = false;
}

function setBusy(busy) {
  running = busy;
  const info = busy ? null : app?.modelInfo();
  $("generate").disabled = busy || !info;
  $("optimize").disabled = busy || !info?.hasEncoder;
  $("edit-strip").disabled = busy;
  $("cancel").disabled = !busy;
  $("load-model").disabled = busy;
}

function drawImage(canvas, image) {
  canvas.width = image.width;
  canvas.height = image.height;
  canvas.getContext("2d").putImageData(new ImageData(image.rgba, image.width, image.height), 0, 0);
}

function showModel(info) {
  const select = $("scheduler");
  select.replaceChildren(...info.schedulers.map((name) => new Option(name, name, false, name === info.scheduler)));
  for (const id of ["width", "height"]) {
    $(id).value = info.defaultSize;
    $(id).step = info.sizeStep;
    $(id).min = info.sizeStep;
  }
  $("init-image").disabled = !info.hasEncoder;
  $("edit-image").disabled = !info.hasEncoder;
  $("model-status").textContent = `Loaded ${info.name} (native size ${info.defaultSize}px, scheduler ${info.scheduler}).`;
  setBusy(false);
}

function onProgress(event) {
  const list = $("file-progress");
  let item = list.querySelector(`[data-file="${CSS.escape(event.file)}"]`);
  if (!item) {
    item = document.createElement("li");
    item.dataset.file = event.file;
    list.append(item);
  }
  const mb = (n) => (n / 1048576).toFixed(1);
  item.textContent = event.cached ? `${event.file}: from cache (${mb(event.loaded)} MB)`
    : `${event.file}: ${mb(event.loaded)}${event.total ? " / " + mb(event.total) : ""} MB`;
  if (event.note) item.textContent += `, ${event.note}`;
  const bar = $("total-progress");
  bar.hidden = false;
  bar.max = event.fileCount;
  bar.value = event.fileIndex + (event.total ? event.loaded / event.total : 0.5);
}

async function loadModel() {
  showMessage(null);
  $("file-progress").replaceChildren();
  $("generate").disabled = true;
  $("model-status").textContent = "Loading…";
  const source = document.querySelector("input[name=source]:checked").value;
  try {
    if (source === "bundled") await loadBundled();
    else if (source === "url") await app.loadUrl($("model-url").value.trim(), onProgress);
    else return pickFolder();
    $("total-progress").hidden = true;
    showModel(app.modelInfo());
  } catch (error) {
    $("model-status").textContent = "No model loaded.";
    showMessage(error);
  }
}

// onnx/models.json lists the bundled folders with the settings each was made for.
let bundled = [];
async function listBundled() {
  try {
    const response = await fetch(new URL("models.json", BUNDLED));
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    bundled = await response.json();
  } catch (error) {
    showMessage(`Cannot list the bundled models (onnx/models.json): ${error.message}`);
  }
  $("bundled-model").replaceChildren(...bundled.map((m, i) => new Option(m.name, i)));
}

async function loadBundled() {
  const model = bundled[Number($("bundled-model").value)];
  if (!model) throw new Error("No bundled model to load.");
  await app.loadUrl(new URL(`${model.folder}/`, BUNDLED).href, onProgress);
  $("steps").value = model.steps;
  $("guidance").value = model.guidance;
}

// A folder from disk: the directory picker where the browser has one, else <input webkitdirectory>.
async function pickFolder() {
  if (!window.showDirectoryPicker) { $("folder-input").click(); return; }
  try {
    const root = await window.showDirectoryPicker();
    const files = new Map();
    async function walk(handle, prefix) {
      for await (const [name, entry] of handle.entries()) {
        if (entry.kind === "directory") await walk(entry, `${prefix}${name}/`);
        else files.set(`${prefix}${name}`, await entry.getFile());
      }
    }
    await walk(root, "");
    await app.loadFiles(root.name, files);
    showModel(app.modelInfo());
  } catch (error) {
    if (error.name !== "AbortError") showMessage(error);
  }
}

async function loadFolderInput(event) {
  const files = new Map();
  let name = "folder";
  for (const file of event.target.files) {
    const [top, ...rest] = file.webkitRelativePath.split("/");
    name = top;
    files.set(rest.join("/"), file);
  }
  try {
    await app.loadFiles(name, files);
    showModel(app.modelInfo());
  } catch (error) {
    showMessage(error);
  }
}

// What the form asks for; `eta` draws the kept edit (when "Generate draws the edit" is on),
// from the edited picture when the edit's strength is below 1.
async function formParams() {
  const drawEdit = !$("edit-draw").hidden && $("use-edit").checked;
  const editStrength = Number($("edit-strength").value);
  const initFile = drawEdit ? (editStrength < 1 ? $("edit-image").files[0] : null) : $("init-image").files[0];
  const loraFile = $("lora").files[0];
  return {
    prompt: $("prompt").value,
    negativePrompt: $("negative-prompt").value,
    steps: Number($("steps").value),
    guidanceScale: Number($("guidance").value),
    seed: Number($("seed").value),
    scheduler: $("scheduler").value,
    width: Number($("width").value),
    height: Number($("height").value),
    previewEvery: Number($("preview-every").value),
    lowMemory: $("low-memory").checked,
    initImage: initFile ? new Uint8Array(await initFile.arrayBuffer()) : null,
    strength: drawEdit ? editStrength : Number($("strength").value),
    lora: loraFile ? new Uint8Array(await loraFile.arrayBuffer()) : null,
    loraScale: Number($("lora-scale").value),
    eta: drawEdit ? Number($("edit-eta").value) : null,
  };
}

async function generate(event) {
  event?.preventDefault();
  if (running) return;
  showMessage(null);
  setBusy(true);
  $("strip").replaceChildren();
  $("result").hidden = true;
  $("live").hidden = false;
  $("timings").replaceChildren();
  const params = await formParams();
  try {
    const result = await app.generate(params, (step) => {
      if (step.live) drawImage($("live"), step.live);
      if (step.preview) {
        const canvas = document.createElement("canvas");
        canvas.title = `after step ${step.step}`;
        drawImage(canvas, step.preview);
        $("strip").append(canvas);
        drawImage($("live"), step.preview);
      }
      $("step-status").textContent = `Step ${step.step} / ${step.total} (${step.stepMs.toFixed(0)} ms)`;
    });
    showResult(result, params.eta, params.strength);
  } catch (error) {
    $("step-status").textContent = "";
    showMessage(error);
  } finally {
    setBusy(false);
  }
}

function showResult(result, eta, strength) {
  const url = URL.createObjectURL(new Blob([result.png], { type: "image/png" }));
  $("result-image").src = url;
  $("download").href = url;
  $("download").download = eta == null ? `websd-${result.seed}.png` : `websd-edit-${result.seed}-eta${eta}.png`;
  $("live").hidden = true;
  $("result").hidden = false;
  const t = result.timings;
  const steps = Array.from(t.unetStepMs);
  const rows = [
    ["Adapter", $("adapter").textContent],
    ["Text encoder", `${t.textEncoderMs.toFixed(0)} ms`],
    ["UNet steps", `${steps.length} × ${(steps.reduce((a, b) => a + b, 0) / Math.max(1, steps.length)).toFixed(0)} ms`],
    ["VAE decode", `${t.vaeDecoderMs.toFixed(0)} ms`],
    ["Total", `${t.totalMs.toFixed(0)} ms`],
    ["GPU memory", `${(t.gpuMemoryBytes / 1048576).toFixed(0)} MiB`],
    ["WebAssembly memory", `${(t.wasmMemoryBytes / 1048576).toFixed(0)} MiB`],
  ];
  if (t.vaeEncoderMs > 0) rows.splice(2, 0, ["VAE encode", `${t.vaeEncoderMs.toFixed(0)} ms`]);
  $("timings").replaceChildren(...rows.flatMap(([k, v]) => [Object.assign(document.createElement("dt"), { textContent: k }),
    Object.assign(document.createElement("dd"), { textContent: v })]));
  const notes = Array.from(result.warnings, (warning) => ` Note: ${warning}.`).join("");
  const start = strength < 1 ? ` from the picture at strength ${strength}` : "";
  const what = eta == null ? "" : ` edit at eta ${eta}${start},`;
  $("step-status").textContent = `Done:${what} seed ${result.seed}, ${result.scheduler}.${notes}`;
}

// Imagic: optimise an edit of the picture towards the prompt, then draw it.
async function optimize() {
  const file = $("edit-image").files[0];
  if (running) return;
  if (!file) { showMessage("Pick a picture to edit first."); return; }
  showMessage(null);
  setBusy(true);
  const embedSteps = Number($("edit-embed-steps").value);
  const tuneSteps = Number($("edit-tune-steps").value);
  const bar = $("edit-progress");
  bar.hidden = false;
  bar.max = embedSteps + tuneSteps;
  bar.value = 0;
  let edit = null;
  try {
    edit = await app.optimizeEdit({
      image: new Uint8Array(await file.arrayBuffer()),
      prompt: $("prompt").value,
      seed: Number($("seed").value),
      embedSteps,
      tuneSteps,
      tuneLayers: $("edit-tune-layers").value,
    }, (p) => {
      bar.value = (p.stage === "embedding" ? 0 : embedSteps) + p.step;
      $("edit-status").textContent = `${p.stage} step ${p.step} / ${p.total}: loss ${p.loss.toFixed(4)} (${p.stepMs.toFixed(0)} ms)`;
    });
  } catch (error) {
    $("edit-status").textContent = "";
    showMessage(error);
  } finally {
    bar.hidden = true;
    setBusy(false);
  }
  if (edit) {
    showEdit(edit);
    await generate();
  }
}

function showEdit(edit) {
  const url = URL.createObjectURL(new Blob([edit.file], { type: "application/octet-stream" }));
  $("edit-download").href = url;
  $("edit-download").download = `websd-edit-${edit.seed}.safetensors`;
  $("edit-draw").hidden = false;
  $("use-edit").checked = true;
  $("edit-status").textContent = `Edit ready: "${edit.prompt}" (seed ${edit.seed}, ${edit.embedSteps} embedding and ${edit.tuneSteps} fine-tuning steps).`;
}

async function loadEditFile(event) {
  const file = event.target.files[0];
  if (!file) return;
  try {
    showMessage(null);
    showEdit(app.loadEdit(new Uint8Array(await file.arrayBuffer())));
  } catch (error) {
    showMessage(error);
  }
}

// The kept edit drawn at a range of etas, side by side in the strip.
async function etaStrip() {
  if (running) return;
  showMessage(null);
  setBusy(true);
  $("strip").replaceChildren();
  const params = await formParams();
  try {
    for (const eta of [0, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0]) {
      $("step-status").textContent = `Drawing eta ${eta}…`;
      const result = await app.generate({ ...params, eta, previewEvery: 0 }, () => {});
      const canvas = document.createElement("canvas");
      canvas.title = `eta ${eta}`;
      drawImage(canvas, result);
      $("strip").append(canvas);
    }
    $("step-status").textContent = "Done: the edit from eta 0 (the picture) to 1 (the prompt).";
  } catch (error) {
    $("step-status").textContent = "";
    showMessage(error);
  } finally {
    setBusy(false);
  }
}

function wire() {
  for (const radio of document.querySelectorAll("input[name=source]")) {
    radio.addEventListener("change", () => {
      $("bundled-row").hidden = radio.value !== "bundled" || !radio.checked;
      $("url-row").hidden = radio.value !== "url" || !radio.checked;
      $("folder-row").hidden = radio.value !== "folder" || !radio.checked;
    });
  }
  $("load-model").addEventListener("click", loadModel);
  $("bundled-model").addEventListener("change", () => { if (!running) loadModel(); });
  $("pick-folder").addEventListener("click", pickFolder);
  $("folder-input").addEventListener("change", loadFolderInput);
  $("clear-cache").addEventListener("click", async () => {
    try { await window.wasmBindings.App.clearCache(); $("file-progress").replaceChildren(); $("model-status").textContent += " Cache cleared."; }
    catch (error) { showMessage(error); }
  });
  $("controls").addEventListener("submit", generate);
  $("cancel").addEventListener("click", () => app.cancel());
  $("randomise-seed").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 4294967296); });
  $("strength").addEventListener("input", () => { $("strength-value").value = $("strength").value; });
  $("lora-scale").addEventListener("input", () => { $("lora-scale-value").value = $("lora-scale").value; });
  $("optimize").addEventListener("click", optimize);
  $("edit-file").addEventListener("change", loadEditFile);
  $("edit-strip").addEventListener("click", etaStrip);
  $("edit-eta").addEventListener("input", () => { $("edit-eta-value").value = $("edit-eta").value; });
  $("edit-strength").addEventListener("input", () => { $("edit-strength-value").value = $("edit-strength").value; });
  // Redraw when the slider is let go.
  $("edit-eta").addEventListener("change", () => { if ($("use-edit").checked && !running) generate(); });
  $("edit-strength").addEventListener("change", () => { if ($("use-edit").checked && !running) generate(); });
}

async function start() {
  wire();
  await listBundled();
  app = new window.wasmBindings.App();
  try {
    $("adapter").textContent = `GPU: ${await app.initGpu()}`;
  } catch (error) {
    $("adapter").textContent = "WebGPU unavailable.";
    showMessage(error);
    for (const el of document.querySelectorAll("button, input, select, textarea")) el.disabled = true;
    return;
  }
  await loadModel();
}

if (window.wasmBindings) start();
else addEventListener("TrunkApplicationStarted", start, { once: true });
