//! The browser shell: a small wasm-bindgen API over the same core as the CLI. JavaScript
//! wires the page to it and draws; fetching, caching, checking and generating happen here.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use js_sys::{Function, Object, Reflect, Uint8Array, Uint8ClampedArray};
use serde::Deserialize;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{JsFuture, future_to_promise};
use web_sys::Blob;

mod edit;
mod files;
mod graphs;

use files::{BlobFolder, CACHE_NAME, fetch_folder};

use crate::engine::Gpu;
use crate::image::RgbaImage;
use crate::lora::Lora;
use crate::pipeline::{Control, Edit, Request, StableDiffusion, StepEvent};
use crate::scheduler::SchedulerKind;

const NO_WEBGPU: &str = "This browser does not offer WebGPU. Use a recent Chrome or Edge (113+) on a machine \
with a supported GPU; in Firefox enable dom.webgpu.enabled in about:config (Nightly), in Safari enable \
WebGPU under Develop > Feature Flags. On Linux, Chrome may need chrome://flags/#enable-unsafe-webgpu.";

fn js_error(message: impl std::fmt::Display) -> JsValue {
    JsError::new(&message.to_string()).into()
}

fn set(object: &Object, key: &str, value: impl Into<JsValue>) {
    let _ = Reflect::set(object, &key.into(), &value.into());
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
    /// A fingerprint of the adapters attached to the pipeline's UNet (a LoRA file and its
    /// strength, or a kept edit's), if any.
    lora: Cell<Option<u64>>,
    /// The Imagic edit `generate({eta})` draws, and how many were kept before it.
    edit: RefCell<Option<Edit>>,
    edits_kept: Cell<u64>,
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
    /// width, height, initImage (PNG/JPEG bytes), strength, previewEvery, lowMemory, lora
    /// (.safetensors bytes), loraScale, eta (draws the kept edit; with initImage, the edited
    /// picture, and a strength below 1, from it noised that far)}. `on_step` gets
    /// {step, total, timestep, stepMs, live: {width, height, rgba}, preview: {...}}.
    /// Resolves to {png, width, height, rgba, seed, scheduler, timings (per stage, and the
    /// GPU memory the sessions hold), warnings}.
    pub fn generate(&self, params: JsValue, on_step: Function) -> js_sys::Promise {
        let state = self.state.clone();
        future_to_promise(async move {
            let params: GenerateParams = serde_wasm_bindgen::from_value(params)
                .map_err(|e| js_error(format!("bad parameters: {e}")))?;
            state
                .exclusive(async |pipeline| {
                    run_generation(pipeline, &state, &params, &on_step).await
                })
                .await
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

    /// Runs `job` on the pipeline with the page's other calls kept out (`busy`) and the
    /// cancel flag cleared.
    async fn exclusive<T>(
        &self,
        job: impl AsyncFnOnce(&mut StableDiffusion) -> Result<T, JsValue>,
    ) -> Result<T, JsValue> {
        self.ensure_idle()?;
        // After a lost device, rebuild everything from the files still at hand.
        if self.pipeline.borrow().is_none() {
            let source = self
                .source
                .borrow()
                .clone()
                .ok_or_else(|| js_error("load a model first"))?;
            self.install(source).await?;
        }
        let mut pipeline = self
            .pipeline
            .borrow_mut()
            .take()
            .ok_or_else(|| js_error("load a model first"))?;
        self.busy.set(true);
        self.cancel.set(false);
        let result = job(&mut pipeline).await;
        self.busy.set(false);
        if self.device_failed.replace(false) {
            // The next call starts from a fresh device and the kept files.
            self.gpu.borrow_mut().take();
        } else {
            *self.pipeline.borrow_mut() = Some(pipeline);
        }
        result
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

    /// `error` for the page, remembering a lost device or exhausted memory so that the next
    /// call starts from a fresh device (and the kept files).
    fn fail(&self, error: crate::error::Error) -> JsValue {
        use crate::engine::Error as Engine;
        use crate::error::Error::Engine as Wrapped;
        if matches!(error, Wrapped(Engine::Device(_) | Engine::OutOfMemory(_))) {
            self.device_failed.set(true);
        }
        js_error(error)
    }

    fn keep_edit(&self, edit: Edit) {
        *self.edit.borrow_mut() = Some(edit);
        self.edits_kept.set(self.edits_kept.get() + 1);
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
        self.lora.set(None);
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
    /// A LoRA file (.safetensors, diffusers/peft layout) and its strength.
    #[serde(default)]
    lora: Option<serde_bytes::ByteBuf>,
    #[serde(default = "default_lora_scale")]
    lora_scale: f32,
    /// Draws the kept Imagic edit at this eta instead of the prompt (and the LoRA file);
    /// with `init_image` (the edited picture) and a strength below 1, from that picture.
    #[serde(default)]
    eta: Option<f32>,
}

fn default_lora_scale() -> f32 {
    1.0
}

/// Attaches the adapters this generation needs unless they are attached already (the UNet's
/// session is rebuilt when they change, so unchanged ones cost nothing): the kept edit's
/// when drawing an edit, else the LoRA file's.
fn attach_adapters(
    pipeline: &mut StableDiffusion,
    state: &State,
    params: &GenerateParams,
) -> Result<(), JsValue> {
    let edit = state.edit.borrow();
    let fingerprint = match params.eta {
        Some(_) if edit.is_none() => return Err(js_error("optimise or load an edit first")),
        // Edits are told apart from files by the top bit.
        Some(_) => Some(1 << 63 | state.edits_kept.get()),
        None => params.lora.as_ref().map(|bytes| {
            // FNV-1a over the file and the strength.
            let mut hash = 0xcbf29ce484222325u64;
            for &b in bytes.iter().chain(&params.lora_scale.to_le_bytes()) {
                hash = (hash ^ b as u64).wrapping_mul(0x100000001b3);
            }
            hash >> 1
        }),
    };
    if fingerprint == state.lora.get() {
        return Ok(());
    }
    let adapters = match (&*edit, params.eta, &params.lora) {
        (Some(edit), Some(_), _) => Lora::unet(edit.lora.clone()),
        (_, None, Some(bytes)) => {
            crate::lora::read_lora("the LoRA file", bytes, params.lora_scale).map_err(js_error)?
        }
        _ => Lora::default(),
    };
    state.lora.set(None);
    pipeline.set_lora(&adapters).map_err(js_error)?;
    state.lora.set(fingerprint);
    Ok(())
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
    pipeline.set_low_memory(params.low_memory);
    attach_adapters(pipeline, state, params)?;
    let mut request = Request {
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
        preview_every: params.preview_every,
        live_preview: true,
        ..Request::default()
    };
    if let (Some(eta), Some(edit)) = (params.eta, state.edit.borrow().as_ref()) {
        let source = request.init_image.as_ref();
        request = pipeline
            .edit_request(edit, eta, source, params.strength, &request)
            .map_err(js_error)?;
    }
    let kind = scheduler.unwrap_or(pipeline.config.default_scheduler);
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
        .map_err(|e| state.fail(e))?;
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
    set(&timings, "wasmMemoryBytes", wasm_memory_bytes());
    let steps = js_sys::Array::new();
    for ms in &t.unet_step_ms {
        steps.push(&(*ms).into());
    }
    set(&timings, "unetStepMs", steps);
    set(&result, "timings", timings);
    set(&result, "warnings", warnings);
    Ok(result.into())
}

/// The size of this module's WebAssembly memory, which only ever grows: its peak so far.
fn wasm_memory_bytes() -> f64 {
    const PAGE_BYTES: f64 = 65536.0;
    core::arch::wasm32::memory_size(0) as f64 * PAGE_BYTES
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
