//! The browser shell: a small wasm-bindgen API over the same core as the CLI. JavaScript
//! wires the page to it and draws; fetching, caching, checking and generating happen here.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use bytes::Bytes;
use js_sys::{Array, Function, Object, Reflect, Uint8Array, Uint8ClampedArray};
use serde::Deserialize;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{JsFuture, future_to_promise};
use web_sys::Blob;

use crate::engine::{FileSource, Gpu, ReadFuture, external_data_locations};
use crate::image::RgbaImage;
use crate::model::{ModelFiles, REQUIRED_FILES};
use crate::pipeline::{Control, Request, StableDiffusion, StepEvent};
use crate::scheduler::SchedulerKind;

/// Files a folder may have besides the required ones.
const OPTIONAL_FILES: [&str; 4] = [
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "vae_encoder/model.onnx",
    "vae_encoder/config.json",
];
const GRAPHS: [&str; 4] = ["text_encoder", "unet", "vae_decoder", "vae_encoder"];
const CACHE_NAME: &str = "websd-models-v1";
/// Header recording the length a cached file must have: a short or damaged entry is refetched.
const LENGTH_HEADER: &str = "x-websd-length";

const NO_WEBGPU: &str = "This browser does not offer WebGPU. Use a recent Chrome or Edge (113+) on a machine \
with a supported GPU; in Firefox enable dom.webgpu.enabled in about:config (Nightly), in Safari enable \
WebGPU under Develop > Feature Flags. On Linux, Chrome may need chrome://flags/#enable-unsafe-webgpu.";

fn js_error(message: impl std::fmt::Display) -> JsValue {
    JsError::new(&message.to_string()).into()
}

fn set(object: &Object, key: &str, value: impl Into<JsValue>) {
    let _ = Reflect::set(object, &key.into(), &value.into());
}

/// A model folder whose files are Blobs: cached downloads or files the user picked. The
/// browser keeps them outside WebAssembly memory (large ones on disk), and the engine reads
/// only what it needs: the graphs' structure when a model loads, each weight a chunk at a
/// time when a session uploads it.
struct BlobFolder(HashMap<String, Blob>);

impl FileSource for BlobFolder {
    fn read<'a>(&'a self, path: &'a str, range: std::ops::Range<u64>) -> ReadFuture<'a> {
        Box::pin(async move {
            let blob = self
                .0
                .get(path)
                .ok_or_else(|| format!("`{path}` was not supplied"))?;
            let size = blob.size();
            let (start, end) = ((range.start as f64).min(size), (range.end as f64).min(size));
            let part = blob
                .slice_with_f64_and_f64(start, end.max(start))
                .map_err(|e| format!("{e:?}"))?;
            let buffer = JsFuture::from(part.array_buffer())
                .await
                .map_err(unreadable)?;
            Ok(Bytes::from(Uint8Array::new(&buffer).to_vec()))
        })
    }

    fn size(&self, path: &str) -> Result<u64, String> {
        self.0
            .get(path)
            .map(|b| b.size() as u64)
            .ok_or_else(|| format!("`{path}` was not supplied"))
    }
}

/// Why a Blob could not be read. Browsers drop the data of Blobs they cannot keep: a
/// private window holds them in memory, about 2 GB in all.
fn unreadable(error: JsValue) -> String {
    match error.dyn_ref::<web_sys::DomException>() {
        Some(e) if e.name() == "NotReadableError" => "the browser no longer holds its copy of the \
            file (a private window keeps downloads in memory, about 2 GB in all: use a normal \
            window, or an fp16 export at half the size)"
            .to_string(),
        Some(e) => format!("{}: {}", e.name(), e.message()),
        None => format!("{error:?}"),
    }
}

impl ModelFiles for BlobFolder {
    fn exists(&self, path: &str) -> bool {
        self.0.contains_key(path)
    }
}

/// A loaded model's files, kept (as Blobs, cheaply) so that a lost device can be replaced
/// without downloading again.
#[derive(Clone)]
struct Source {
    name: String,
    files: Rc<BlobFolder>,
}

/// What the page's promises share. The pipeline is taken out while a generation runs
/// (`busy`), so nothing else can reach it half-way.
#[derive(Default)]
struct State {
    gpu: RefCell<Option<Gpu>>,
    pipeline: RefCell<Option<StableDiffusion>>,
    source: RefCell<Option<Source>>,
    busy: Cell<bool>,
    cancel: Cell<bool>,
    /// Set when a generation failed because the device was lost or out of memory.
    device_failed: Cell<bool>,
}

/// The state behind the page.
#[wasm_bindgen]
pub struct App {
    state: Rc<State>,
}

impl Default for App {
    fn default() -> Self {
        Self::new()
    }
}

#[wasm_bindgen]
impl App {
    #[wasm_bindgen(constructor)]
    pub fn new() -> App {
        console_error_panic_hook::set_once();
        App {
            state: Rc::default(),
        }
    }

    /// Opens the GPU; resolves to a description of the adapter, or rejects with how to get WebGPU.
    #[wasm_bindgen(js_name = initGpu)]
    pub fn init_gpu(&self) -> js_sys::Promise {
        let state = self.state.clone();
        future_to_promise(async move { Ok(JsValue::from(state.gpu().await?.describe())) })
    }

    /// Fetches a model folder from `base_url` (through the cache) and loads it.
    /// `on_progress({file, loaded, total, fileIndex, fileCount, cached})` reports downloads.
    #[wasm_bindgen(js_name = loadUrl)]
    pub fn load_url(&self, base_url: String, on_progress: Function) -> js_sys::Promise {
        let state = self.state.clone();
        future_to_promise(async move {
            state.ensure_idle()?;
            let base = if base_url.ends_with('/') {
                base_url.clone()
            } else {
                format!("{base_url}/")
            };
            let files = fetch_folder(&base, &on_progress).await?;
            state
                .install(Source {
                    name: base_url,
                    files: Rc::new(BlobFolder(files)),
                })
                .await
        })
    }

    /// Loads a folder the user picked: `files` maps relative paths to `File`s (or other
    /// Blobs), which are read in place, never copied whole into WebAssembly memory.
    #[wasm_bindgen(js_name = loadFiles)]
    pub fn load_files(&self, name: String, files: js_sys::Map) -> js_sys::Promise {
        let mut map = HashMap::new();
        files.for_each(&mut |value, key| {
            if let (Some(path), Ok(blob)) = (key.as_string(), value.dyn_into::<Blob>()) {
                map.insert(path, blob);
            }
        });
        let state = self.state.clone();
        future_to_promise(async move {
            state.ensure_idle()?;
            let files = Rc::new(BlobFolder(map));
            state.install(Source { name, files }).await
        })
    }

    /// Generates. `params`: {prompt, negativePrompt, steps, guidanceScale, seed, scheduler,
    /// width, height, initImage (PNG/JPEG bytes), strength, previewEvery, lowMemory}. `on_step` gets
    /// {step, total, timestep, stepMs, live: {width, height, rgba}, preview: {...}}.
    /// Resolves to {png, width, height, rgba, seed, scheduler, timings (per stage, and the
    /// GPU memory the sessions hold), warnings}.
    pub fn generate(&self, params: JsValue, on_step: Function) -> js_sys::Promise {
        let state = self.state.clone();
        future_to_promise(async move {
            let params: GenerateParams = serde_wasm_bindgen::from_value(params)
                .map_err(|e| js_error(format!("bad parameters: {e}")))?;
            state.ensure_idle()?;
            // After a lost device, rebuild everything from the files still at hand.
            if state.pipeline.borrow().is_none() {
                let source = state
                    .source
                    .borrow()
                    .clone()
                    .ok_or_else(|| js_error("load a model first"))?;
                state.install(source).await?;
            }
            let mut pipeline = state
                .pipeline
                .borrow_mut()
                .take()
                .ok_or_else(|| js_error("load a model first"))?;
            state.busy.set(true);
            state.cancel.set(false);
            let result = run_generation(&mut pipeline, &state, &params, &on_step).await;
            state.busy.set(false);
            if state.device_failed.replace(false) {
                // The next Generate starts from a fresh device and the kept files.
                state.gpu.borrow_mut().take();
            } else {
                *state.pipeline.borrow_mut() = Some(pipeline);
            }
            result
        })
    }

    /// Asks the running generation to stop after its current step.
    pub fn cancel(&self) {
        self.state.cancel.set(true);
    }

    /// {defaultSize, sizeStep, scheduler, schedulers, hasEncoder, name}, or null before a
    /// model is loaded (and while one generates).
    #[wasm_bindgen(js_name = modelInfo)]
    pub fn model_info(&self) -> JsValue {
        let pipeline = self.state.pipeline.borrow();
        let Some(p) = pipeline.as_ref() else {
            return JsValue::NULL;
        };
        let info = Object::new();
        set(&info, "defaultSize", p.config.default_image_size() as u32);
        set(&info, "sizeStep", p.config.vae_scale_factor as u32);
        set(&info, "scheduler", p.config.default_scheduler.name());
        let names = js_sys::Array::new();
        for kind in SchedulerKind::ALL {
            names.push(&kind.name().into());
        }
        set(&info, "schedulers", names);
        set(&info, "hasEncoder", p.has_vae_encoder());
        set(
            &info,
            "name",
            self.state
                .source
                .borrow()
                .as_ref()
                .map(|s| s.name.clone())
                .unwrap_or_default(),
        );
        info.into()
    }

    /// Deletes every cached model download.
    #[wasm_bindgen(js_name = clearCache)]
    pub fn clear_cache() -> js_sys::Promise {
        future_to_promise(async move {
            let caches = web_sys::window()
                .ok_or_else(|| js_error("no window"))?
                .caches()?;
            JsFuture::from(caches.delete(CACHE_NAME)).await
        })
    }
}

impl State {
    fn ensure_idle(&self) -> Result<(), JsValue> {
        if self.busy.get() {
            Err(js_error(
                "a generation is running; cancel it or wait for it to finish",
            ))
        } else {
            Ok(())
        }
    }

    /// The device, opened on first use (and again after a loss).
    async fn gpu(&self) -> Result<Gpu, JsValue> {
        if let Some(gpu) = self.gpu.borrow().as_ref() {
            return Ok(gpu.clone());
        }
        let navigator = web_sys::window()
            .ok_or_else(|| js_error("no window"))?
            .navigator();
        let has_gpu = Reflect::get(&navigator, &"gpu".into())
            .is_ok_and(|g| !g.is_undefined() && !g.is_null());
        if !has_gpu {
            return Err(js_error(NO_WEBGPU));
        }
        let gpu = Gpu::new()
            .await
            .map_err(|e| js_error(format!("{e}. {NO_WEBGPU}")))?;
        *self.gpu.borrow_mut() = Some(gpu.clone());
        Ok(gpu)
    }

    /// Builds the pipeline from a model's files and keeps the files.
    async fn install(&self, source: Source) -> Result<JsValue, JsValue> {
        let gpu = self.gpu().await?;
        self.pipeline.borrow_mut().take();
        let pipeline = StableDiffusion::load(&gpu, source.files.clone(), &source.name)
            .await
            .map_err(js_error)?;
        *self.pipeline.borrow_mut() = Some(pipeline);
        *self.source.borrow_mut() = Some(source);
        Ok(JsValue::TRUE)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenerateParams {
    prompt: String,
    #[serde(default)]
    negative_prompt: String,
    steps: usize,
    guidance_scale: f64,
    seed: f64,
    scheduler: Option<String>,
    width: Option<usize>,
    height: Option<usize>,
    #[serde(default)]
    init_image: Option<serde_bytes::ByteBuf>,
    #[serde(default = "default_strength")]
    strength: f64,
    #[serde(default)]
    preview_every: usize,
    #[serde(default)]
    low_memory: bool,
}

fn default_strength() -> f64 {
    0.8
}

async fn run_generation(
    pipeline: &mut StableDiffusion,
    state: &State,
    params: &GenerateParams,
    on_step: &Function,
) -> Result<JsValue, JsValue> {
    let scheduler = params
        .scheduler
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(SchedulerKind::parse)
        .transpose()
        .map_err(js_error)?;
    let init_image = params
        .init_image
        .as_ref()
        .map(|b| RgbaImage::decode(b))
        .transpose()
        .map_err(js_error)?;
    if !(params.seed >= 0.0 && params.seed <= u32::MAX as f64 && params.seed.fract() == 0.0) {
        return Err(js_error(
            "the seed must be a whole number from 0 to 4294967295",
        ));
    }
    let request = Request {
        prompt: params.prompt.clone(),
        negative_prompt: params.negative_prompt.clone(),
        steps: params.steps,
        guidance_scale: params.guidance_scale,
        seed: params.seed as u64,
        scheduler,
        width: params.width,
        height: params.height,
        init_image,
        strength: params.strength,
        init_latents: None,
        preview_every: params.preview_every,
        live_preview: true,
    };
    let kind = scheduler.unwrap_or(pipeline.config.default_scheduler);
    pipeline.set_low_memory(params.low_memory);
    let mut on_event = |event: StepEvent| {
        let info = Object::new();
        set(&info, "step", event.step as u32);
        set(&info, "total", event.total as u32);
        set(&info, "timestep", event.timestep);
        set(&info, "stepMs", event.step_ms);
        if let Some(image) = event.live_preview {
            set(&info, "live", image_object(image));
        }
        if let Some(image) = event.preview {
            set(&info, "preview", image_object(image));
        }
        let _ = on_step.call1(&JsValue::NULL, &info);
        if state.cancel.get() {
            Control::Cancel
        } else {
            Control::Continue
        }
    };
    let generated = pipeline
        .generate(&request, &mut on_event)
        .await
        .map_err(js_error)?;
    let model = state
        .source
        .borrow()
        .as_ref()
        .map(|s| s.name.clone())
        .unwrap_or_default();
    let text = [
        ("prompt", request.prompt.clone()),
        ("negative_prompt", request.negative_prompt.clone()),
        ("seed", request.seed.to_string()),
        ("steps", request.steps.to_string()),
        ("scheduler", kind.name().to_string()),
        ("guidance_scale", request.guidance_scale.to_string()),
        ("model", model),
    ];
    let png = generated.image.to_png(&text).map_err(js_error)?;
    let warnings: js_sys::Array = generated
        .warnings
        .iter()
        .chain(&png.warnings)
        .map(JsValue::from)
        .collect();
    let result = image_object(&generated.image);
    set(&result, "png", Uint8Array::from(png.bytes.as_slice()));
    set(&result, "seed", request.seed as f64);
    set(&result, "scheduler", kind.name());
    let t = &generated.timings;
    let timings = Object::new();
    set(&timings, "textEncoderMs", t.text_encoder_ms);
    set(&timings, "vaeEncoderMs", t.vae_encoder_ms);
    set(&timings, "vaeDecoderMs", t.vae_decoder_ms);
    set(&timings, "totalMs", t.total_ms);
    set(&timings, "gpuMemoryBytes", t.gpu_peak_bytes as f64);
    let steps = js_sys::Array::new();
    for ms in &t.unet_step_ms {
        steps.push(&(*ms).into());
    }
    set(&timings, "unetStepMs", steps);
    set(&result, "timings", timings);
    set(&result, "warnings", warnings);
    Ok(result.into())
}

fn image_object(image: &RgbaImage) -> Object {
    let object = Object::new();
    set(&object, "width", image.width as u32);
    set(&object, "height", image.height as u32);
    set(
        &object,
        "rgba",
        Uint8ClampedArray::from(image.pixels.as_slice()),
    );
    object
}

/// Fetches every file of a model folder, from the cache when it holds a sound copy.
async fn fetch_folder(
    base: &str,
    on_progress: &Function,
) -> Result<HashMap<String, Blob>, JsValue> {
    let mut files = HashMap::new();
    let mut wanted: Vec<(String, bool)> = REQUIRED_FILES
        .iter()
        .map(|f| (f.to_string(), true))
        .collect();
    wanted.extend(OPTIONAL_FILES.iter().map(|f| (f.to_string(), false)));
    let mut missing = Vec::new();
    let mut index = 0;
    while index < wanted.len() {
        let (path, required) = wanted[index].clone();
        let place = Place {
            url: format!("{base}{path}"),
            path: path.clone(),
            index,
            count: wanted.len(),
        };
        match fetch_cached(&place, on_progress).await? {
            Some(blob) => {
                // A graph's external data is fetched next to it.
                if let Some(part) = GRAPHS.iter().find(|g| path == format!("{g}/model.onnx")) {
                    let graph = BlobFolder(HashMap::from([(path.clone(), blob.clone())]));
                    let locations = external_data_locations(&graph, &path)
                        .await
                        .map_err(|e| js_error(format!("{path}: {e}")))?;
                    wanted.extend(locations.into_iter().map(|l| (format!("{part}/{l}"), true)));
                }
                files.insert(path, blob);
            }
            None if required => missing.push(path),
            None => {}
        }
        index += 1;
    }
    if !missing.is_empty() {
        return Err(js_error(format!(
            "the model at {base} is missing {}",
            missing.join(", ")
        )));
    }
    Ok(files)
}

/// Which file of a folder is being fetched.
#[derive(Clone)]
struct Place {
    url: String,
    path: String,
    index: usize,
    count: usize,
}

/// One file: the cached copy if its length checks out, else a download that is then cached.
/// `None` when the server has no such file.
async fn fetch_cached(place: &Place, on_progress: &Function) -> Result<Option<Blob>, JsValue> {
    let url = &place.url;
    let window = web_sys::window().ok_or_else(|| js_error("no window"))?;
    let report = |loaded: f64, total: f64, cached: bool, note: Option<&str>| {
        report_progress(on_progress, place, loaded, total, cached, note)
    };
    let cache: Option<web_sys::Cache> = match window.caches() {
        Ok(caches) => JsFuture::from(caches.open(CACHE_NAME))
            .await
            .ok()
            .and_then(|c| c.dyn_into().ok()),
        Err(_) => None,
    };
    if let Some(cache) = &cache
        && let Ok(hit) = JsFuture::from(cache.match_with_str(url)).await
        && let Ok(response) = hit.dyn_into::<web_sys::Response>()
    {
        let expected = response
            .headers()
            .get(LENGTH_HEADER)
            .ok()
            .flatten()
            .and_then(|v| v.parse::<f64>().ok());
        let blob: Blob = JsFuture::from(response.blob()?).await?.dyn_into()?;
        if Some(blob.size()) == expected {
            report(blob.size(), blob.size(), true, None);
            return Ok(Some(blob));
        }
        // Short or damaged: drop it and download again.
        let _ = JsFuture::from(cache.delete_with_str(url)).await;
    }
    let response: web_sys::Response = JsFuture::from(window.fetch_with_str(url))
        .await
        .map_err(|e| js_error(format!("cannot fetch {url}: {e:?}")))?
        .dyn_into()?;
    if response.status() == 404 {
        return Ok(None);
    }
    if !response.ok() {
        return Err(js_error(format!("{url}: HTTP {}", response.status())));
    }
    let total = response
        .headers()
        .get("content-length")
        .ok()
        .flatten()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    let mut response = response;
    let mut note = None;
    if let Some(cache) = &cache {
        let (on_progress, place_copy) = (on_progress.clone(), place.clone());
        let progress =
            move |loaded| report_progress(&on_progress, &place_copy, loaded, total, false, None);
        match stream_into_cache(cache, url, &response, total, progress).await {
            Ok(blob) => return Ok(Some(blob)),
            // A cache that refuses the file (quota, internal error) costs a second
            // download, never the load: the file is then kept uncached, with a note.
            Err(e) => {
                note = Some(format!("not cached ({e})"));
                response = JsFuture::from(window.fetch_with_str(url))
                    .await?
                    .dyn_into()?;
            }
        }
    }
    let blob = download(&response, |loaded| report(loaded, total, false, None)).await?;
    if total > 0.0 && blob.size() != total {
        return Err(js_error(format!(
            "{url}: received {} of {total} bytes",
            blob.size()
        )));
    }
    report(blob.size(), blob.size(), false, note.as_deref());
    Ok(Some(blob))
}

/// Tells the page how a file's download is going.
fn report_progress(
    on_progress: &Function,
    place: &Place,
    loaded: f64,
    total: f64,
    cached: bool,
    note: Option<&str>,
) {
    let info = Object::new();
    if let Some(note) = note {
        set(&info, "note", note);
    }
    set(&info, "file", place.path.as_str());
    set(&info, "loaded", loaded);
    set(&info, "total", total);
    set(&info, "fileIndex", place.index as u32);
    set(&info, "fileCount", place.count as u32);
    set(&info, "cached", cached);
    let _ = on_progress.call1(&JsValue::NULL, &info);
}

/// Streams a response body into the cache, which keeps it on disk, counting the bytes as
/// they pass; returns the cached copy (a Blob the browser reads from disk). Nothing of the
/// file passes through WebAssembly memory.
async fn stream_into_cache(
    cache: &web_sys::Cache,
    url: &str,
    response: &web_sys::Response,
    total: f64,
    mut progress: impl FnMut(f64) + 'static,
) -> Result<Blob, String> {
    let body = response.body().ok_or("the response has no body")?;
    let mut loaded = 0.0;
    let count = Closure::<
        dyn FnMut(JsValue, web_sys::TransformStreamDefaultController) -> Result<(), JsValue>,
    >::new(
        move |chunk: JsValue, controller: web_sys::TransformStreamDefaultController| {
            loaded += chunk
                .dyn_ref::<Uint8Array>()
                .map_or(0.0, |c| c.length() as f64);
            progress(loaded);
            controller.enqueue_with_chunk(&chunk)
        },
    );
    let transformer = Object::new();
    set(&transformer, "transform", count.as_ref().clone());
    let counter = web_sys::TransformStream::new_with_transformer(&transformer)
        .map_err(|e| format!("{e:?}"))?;
    let pair = web_sys::ReadableWritablePair::new(&counter.readable(), &counter.writable());
    let counted = body.pipe_through(&pair);
    let headers = web_sys::Headers::new().map_err(|e| format!("{e:?}"))?;
    if total > 0.0 {
        headers
            .set(LENGTH_HEADER, &total.to_string())
            .map_err(|e| format!("{e:?}"))?;
    }
    let init = web_sys::ResponseInit::new();
    init.set_headers(&headers);
    let streamed = web_sys::Response::new_with_opt_readable_stream_and_init(Some(&counted), &init)
        .map_err(|e| format!("{e:?}"))?;
    JsFuture::from(cache.put_with_str(url, &streamed))
        .await
        .map_err(cache_error)?;
    drop(count);
    let hit: web_sys::Response = JsFuture::from(cache.match_with_str(url))
        .await
        .and_then(|r| r.dyn_into())
        .map_err(|e| format!("{e:?}"))?;
    let blob: Blob = JsFuture::from(hit.blob().map_err(|e| format!("{e:?}"))?)
        .await
        .and_then(|b| b.dyn_into())
        .map_err(|e| format!("{e:?}"))?;
    if total > 0.0 && blob.size() != total {
        let _ = JsFuture::from(cache.delete_with_str(url)).await;
        return Err(format!("received {} of {total} bytes", blob.size()));
    }
    Ok(blob)
}

/// Reads a response body into a Blob chunk by chunk, reporting the bytes received so far
/// (when there is no cache to stream into). Every `PIECE_BYTES` of chunks become one Blob
/// piece and the file is one Blob of its pieces, so the browser can move them out of
/// memory; none of it passes through WebAssembly memory.
async fn download(
    response: &web_sys::Response,
    mut progress: impl FnMut(f64),
) -> Result<Blob, JsValue> {
    const PIECE_BYTES: f64 = (64 << 20) as f64;
    let Some(body) = response.body() else {
        return JsFuture::from(response.blob()?).await?.dyn_into();
    };
    let reader: web_sys::ReadableStreamDefaultReader = body.get_reader().dyn_into()?;
    let (pieces, chunks) = (Array::new(), Array::new());
    let (mut chunk_bytes, mut loaded) = (0.0, 0.0);
    loop {
        let chunk = JsFuture::from(reader.read()).await?;
        let done = Reflect::get(&chunk, &"done".into())?
            .as_bool()
            .unwrap_or(true);
        if !done {
            let value: Uint8Array = Reflect::get(&chunk, &"value".into())?.dyn_into()?;
            chunk_bytes += value.length() as f64;
            loaded += value.length() as f64;
            chunks.push(&value);
            progress(loaded);
        }
        if chunk_bytes > 0.0 && (done || chunk_bytes >= PIECE_BYTES) {
            pieces.push(&Blob::new_with_u8_array_sequence(&chunks)?.into());
            chunks.set_length(0);
            chunk_bytes = 0.0;
        }
        if done {
            return Blob::new_with_blob_sequence(&pieces);
        }
    }
}

/// A cache refusal as a readable message (a full quota says what to do).
fn cache_error(e: JsValue) -> String {
    let quota = e
        .dyn_ref::<web_sys::DomException>()
        .is_some_and(|d| d.name() == "QuotaExceededError");
    if quota {
        "the browser's storage quota is full; clear cached models or free disk space".to_string()
    } else {
        format!("{e:?}")
    }
}
