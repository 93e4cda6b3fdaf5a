//! Model files in the browser: fetched through the Cache API (streamed to disk), picked
//! from disk, or downloaded into Blobs, and read by the engine a part at a time as Blobs,
//! never held in WebAssembly memory.

use std::collections::HashMap;

use bytes::Bytes;
use js_sys::{Array, Function, Object, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use web_sys::Blob;

use super::{js_error, set};
use crate::engine::{FileSource, ReadFuture, external_data_locations};
use crate::model::{ModelFiles, REQUIRED_FILES};

/// Files a folder may have besides the required ones.
const OPTIONAL_FILES: [&str; 4] = [
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "vae_encoder/model.onnx",
    "vae_encoder/config.json",
];
const GRAPHS: [&str; 4] = ["text_encoder", "unet", "vae_decoder", "vae_encoder"];
pub(super) const CACHE_NAME: &str = "websd-models-v1";
/// Header recording the length a cached file must have: a short or damaged entry is refetched.
const LENGTH_HEADER: &str = "x-websd-length";

/// A model folder whose files are Blobs: cached downloads or files the user picked. The
/// browser keeps them outside WebAssembly memory (large ones on disk), and the engine reads
/// only what it needs: the graphs' structure when a model loads, each weight a chunk at a
/// time when a session uploads it.
pub(super) struct BlobFolder(pub(super) HashMap<String, Blob>);

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

/// Fetches every file of a model folder, from the cache when it holds a sound copy.
pub(super) async fn fetch_folder(
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
