//! The page's Imagic calls: optimise an edit of a picture (progress, cancel), keep it, save
//! it as a file and load one back; `generate` with an `eta` then draws the kept edit.

use js_sys::{Function, Object, Uint8Array};
use serde::Deserialize;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

use super::{App, js_error, set};
use crate::image::RgbaImage;
use crate::pipeline::{Control, Edit, EditProgress, EditSettings, TuneLayers};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EditParams {
    image: serde_bytes::ByteBuf,
    prompt: String,
    seed: f64,
    embed_steps: Option<usize>,
    embed_lr: Option<f32>,
    tune_steps: Option<usize>,
    tune_lr: Option<f32>,
    lora_rank: Option<usize>,
    /// "attention" or "all" (`TuneLayers::parse`).
    tune_layers: Option<String>,
}

impl EditParams {
    fn settings(&self) -> Result<EditSettings, JsValue> {
        if !(self.seed >= 0.0 && self.seed <= u32::MAX as f64 && self.seed.fract() == 0.0) {
            return Err(js_error(
                "the seed must be a whole number from 0 to 4294967295",
            ));
        }
        let defaults = EditSettings::default();
        Ok(EditSettings {
            prompt: self.prompt.clone(),
            seed: self.seed as u64,
            embed_steps: self.embed_steps.unwrap_or(defaults.embed_steps),
            embed_lr: self.embed_lr.unwrap_or(defaults.embed_lr),
            tune_steps: self.tune_steps.unwrap_or(defaults.tune_steps),
            tune_lr: self.tune_lr.unwrap_or(defaults.tune_lr),
            lora_rank: self.lora_rank.unwrap_or(defaults.lora_rank),
            tune_layers: match &self.tune_layers {
                Some(name) => TuneLayers::parse(name).map_err(js_error)?,
                None => defaults.tune_layers,
            },
            ..defaults
        })
    }
}

/// What the page shows of a kept edit: {prompt, seed, embedSteps, tuneSteps, file (the
/// edit as .safetensors bytes)}.
fn edit_info(edit: &Edit) -> Result<JsValue, JsValue> {
    let info = Object::new();
    set(&info, "prompt", edit.settings.prompt.as_str());
    set(&info, "seed", edit.settings.seed as f64);
    set(&info, "embedSteps", edit.settings.embed_steps as u32);
    set(&info, "tuneSteps", edit.settings.tune_steps as u32);
    let bytes = edit.to_bytes().map_err(js_error)?;
    set(&info, "file", Uint8Array::from(bytes.as_slice()));
    Ok(info.into())
}

#[wasm_bindgen]
impl App {
    /// Optimises an Imagic edit of `params.image` (PNG/JPEG bytes) towards `params.prompt`:
    /// {image, prompt, seed, embedSteps, embedLr, tuneSteps, tuneLr, loraRank, tuneLayers
    /// ("attention" or "all")}. `on_step` gets {stage ("embedding" or "fine-tuning"), step,
    /// total, loss, stepMs, gpuMemoryBytes} after every step; `cancel()` stops it. The edit is kept for `generate({eta})` and
    /// resolves to its description (see `loadEdit`).
    #[wasm_bindgen(js_name = optimizeEdit)]
    pub fn optimize_edit(&self, params: JsValue, on_step: Function) -> js_sys::Promise {
        let state = self.state.clone();
        future_to_promise(async move {
            let params: EditParams = serde_wasm_bindgen::from_value(params)
                .map_err(|e| js_error(format!("bad parameters: {e}")))?;
            let settings = params.settings()?;
            let image = RgbaImage::decode(&params.image).map_err(js_error)?;
            let edit = state
                .exclusive(async |pipeline| {
                    let mut on_progress = |p: EditProgress| {
                        let info = Object::new();
                        set(&info, "stage", p.stage.name());
                        set(&info, "step", p.step as u32);
                        set(&info, "total", p.total as u32);
                        set(&info, "loss", p.loss);
                        set(&info, "stepMs", p.step_ms);
                        set(&info, "gpuMemoryBytes", p.gpu_bytes as f64);
                        let _ = on_step.call1(&JsValue::NULL, &info);
                        match state.cancel.get() {
                            true => Control::Cancel,
                            false => Control::Continue,
                        }
                    };
                    pipeline
                        .optimize_edit(&image, &settings, &mut on_progress)
                        .await
                        .map_err(|e| state.fail(e))
                })
                .await?;
            let info = edit_info(&edit)?;
            state.keep_edit(edit);
            Ok(info)
        })
    }

    /// Keeps an edit file (`.safetensors` from `optimizeEdit` or `websd edit --save-edit`)
    /// for `generate({eta})`; returns its description.
    #[wasm_bindgen(js_name = loadEdit)]
    pub fn load_edit(&self, bytes: Vec<u8>) -> Result<JsValue, JsValue> {
        self.state.ensure_idle()?;
        let edit = Edit::from_bytes("the edit file", &bytes).map_err(js_error)?;
        let info = edit_info(&edit)?;
        self.state.keep_edit(edit);
        Ok(info)
    }
}
