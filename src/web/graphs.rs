//! Single graphs run on the page, for checks against other runtimes in the same browser:
//! `timeGraph` times one on noise inputs, `runGraph` runs one on given inputs and hands
//! back its outputs. Each fetches the graph with its external data, outside the cache.

use std::collections::HashMap;
use std::rc::Rc;

use js_sys::{Object, Uint8Array};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{JsFuture, future_to_promise};
use web_sys::{Blob, Response};

use super::files::BlobFolder;
use super::{App, js_error, set, wasm_memory_bytes};
use crate::bench::time_session;
use crate::clock::now_ms;
use crate::engine::{DType, HostTensor, Model, Session, external_data_locations};
use crate::npy;

/// The graph's own file name in the folder `fetch_graph` makes.
const GRAPH: &str = "model.onnx";

/// A successful response to `url`.
async fn fetch(url: &str) -> Result<Response, JsValue> {
    let window = web_sys::window().ok_or_else(|| js_error("no window"))?;
    let response: Response = JsFuture::from(window.fetch_with_str(url))
        .await?
        .dyn_into()?;
    if !response.ok() {
        return Err(js_error(format!("{url}: HTTP {}", response.status())));
    }
    Ok(response)
}

async fn fetch_blob(url: &str) -> Result<Blob, JsValue> {
    JsFuture::from(fetch(url).await?.blob()?).await?.dyn_into()
}

/// The ONNX graph at `url` and the external data files it names (next to it), as Blobs:
/// the browser holds them, WebAssembly memory never does.
async fn fetch_graph(url: &str) -> Result<Model, JsValue> {
    let mut files = HashMap::from([(GRAPH.to_string(), fetch_blob(url).await?)]);
    let folder = url.rsplit_once('/').map_or("", |(folder, _)| folder);
    let locations = external_data_locations(&BlobFolder(files.clone()), GRAPH)
        .await
        .map_err(|e| js_error(format!("{url}: {e}")))?;
    for location in locations {
        let blob = fetch_blob(&format!("{folder}/{location}")).await?;
        files.insert(location, blob);
    }
    Model::open(Rc::new(BlobFolder(files)), GRAPH)
        .await
        .map_err(js_error)
}

/// A `.npy` file at `url`, read whole (inputs are small).
async fn fetch_npy(url: &str) -> Result<HostTensor, JsValue> {
    let buffer = JsFuture::from(fetch(url).await?.array_buffer()?).await?;
    npy::read(&Uint8Array::new(&buffer).to_vec()).map_err(|e| js_error(format!("{url}: {e}")))
}

/// What both calls resolve to besides their own fields: {buildMs, gpuMemoryBytes,
/// wasmMemoryBytes}.
fn session_report(session: &Session, build_ms: f64) -> Object {
    let result = Object::new();
    set(&result, "buildMs", build_ms);
    set(&result, "gpuMemoryBytes", session.memory_bytes as f64);
    set(&result, "wasmMemoryBytes", wasm_memory_bytes());
    result
}

#[wasm_bindgen]
impl App {
    /// Times one ONNX graph fetched from `url`, for side by side comparisons with other
    /// runtimes on the same page: its session is built for `dims` (`{batch_size: 2, ...}`)
    /// and run once, then `runs` more times on noise inputs (`websd bench`'s). Resolves to
    /// {buildMs, firstMs, bestMs, gpuMemoryBytes, wasmMemoryBytes, inputs: [{name, shape,
    /// float}]} so that the other runtime can be fed the same shapes.
    #[wasm_bindgen(js_name = timeGraph)]
    pub fn time_graph(&self, url: String, dims: JsValue, runs: u32) -> js_sys::Promise {
        let state = self.state.clone();
        future_to_promise(async move {
            let dims: HashMap<String, usize> = serde_wasm_bindgen::from_value(dims)
                .map_err(|e| js_error(format!("bad dimensions: {e}")))?;
            let gpu = state.gpu().await?;
            let model = fetch_graph(&url).await?;
            let start = now_ms();
            let session = Session::new(&gpu, &model, &dims).await.map_err(js_error)?;
            let build_ms = now_ms() - start;
            let times = time_session(&gpu, &session, runs as usize)
                .await
                .map_err(js_error)?;
            let inputs = js_sys::Array::new();
            for name in session.input_names() {
                let input = Object::new();
                set(&input, "name", name);
                let shape: js_sys::Array = session
                    .input_shape(name)
                    .unwrap_or(&[])
                    .iter()
                    .map(|&d| JsValue::from(d as u32))
                    .collect();
                set(&input, "shape", shape);
                set(
                    &input,
                    "float",
                    session.input_dtype(name) == Some(DType::F32),
                );
                inputs.push(&input);
            }
            let result = session_report(&session, build_ms);
            set(&result, "firstMs", times.first * 1000.0);
            set(&result, "bestMs", times.best * 1000.0);
            set(&result, "inputs", inputs);
            Ok(result.into())
        })
    }

    /// Runs the ONNX graph at `url` once on the `.npy` files `inputs` names (`{sample:
    /// "/run/sample.npy", ...}`; its symbolic dimensions are read off their shapes), as
    /// `websd run` does natively. Resolves to {outputs: {name: Uint8Array (.npy)}, buildMs,
    /// runMs, gpuMemoryBytes, wasmMemoryBytes}.
    #[wasm_bindgen(js_name = runGraph)]
    pub fn run_graph(&self, url: String, inputs: JsValue) -> js_sys::Promise {
        let state = self.state.clone();
        future_to_promise(async move {
            let urls: HashMap<String, String> = serde_wasm_bindgen::from_value(inputs)
                .map_err(|e| js_error(format!("bad inputs: {e}")))?;
            let gpu = state.gpu().await?;
            let model = fetch_graph(&url).await?;
            let mut tensors = Vec::new();
            for (name, npy_url) in &urls {
                tensors.push((name.as_str(), fetch_npy(npy_url).await?));
            }
            let shapes: Vec<(&str, &[usize])> = tensors
                .iter()
                .map(|(name, t)| (*name, t.shape.as_slice()))
                .collect();
            let dims = model.dims_for_shapes(&shapes).map_err(js_error)?;
            let start = now_ms();
            let session = Session::new(&gpu, &model, &dims).await.map_err(js_error)?;
            let build_ms = now_ms() - start;
            let feeds: Vec<(&str, &HostTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
            let start = now_ms();
            let outputs = session.run_host(&feeds).await.map_err(js_error)?;
            let run_ms = now_ms() - start;
            let files = Object::new();
            for (name, tensor) in &outputs {
                set(
                    &files,
                    name,
                    Uint8Array::from(npy::write(tensor).as_slice()),
                );
            }
            let result = session_report(&session, build_ms);
            set(&result, "outputs", files);
            set(&result, "runMs", run_ms);
            Ok(result.into())
        })
    }
}
