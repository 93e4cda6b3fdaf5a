//! LoRA files for Stable Diffusion, in the layouts users bring:
//! - diffusers/peft (`StableDiffusionPipeline.save_lora_weights`): `unet.<module>` and
//!   `text_encoder.<module>` with `.lora_A.weight` `[rank, in]` and `.lora_B.weight`
//!   `[out, rank]` (torch's Linear layout; `[rank, in, kh, kw]` and `[out, rank, 1, 1]` on a
//!   convolution), older files `.lora.down` / `.lora.up`;
//! - kohya (sd-scripts, most community LoRAs): `lora_unet_<module with _ for .>` and
//!   `lora_te_<...>` with `.lora_down.weight` / `.lora_up.weight` and a per-layer `.alpha`.
//!
//! Each layer's scale is `alpha / rank` (`/ sqrt(rank)` for rsLoRA) times the strength, its
//! alpha from the layer's `.alpha` tensor, else the `lora_adapter_metadata` header's
//! `<component>.alpha_pattern` (the entry whose key the module path ends with), else its
//! `<component>.lora_alpha`, else the rank. Ranks come from the factors' shapes, so
//! `rank_pattern` needs no reading. Kohya's flattened names are matched against the model's
//! layers when the LoRA is attached ([`Lora::resolve`]).

use std::collections::BTreeMap;

use crate::engine::{AdaptableLayer, HostTensor, LoraAdapter};
use crate::error::{Error, Result, bad_file};
use crate::safetensors::{self, SafeTensors};

/// The component prefix of UNet keys in diffusers' layout.
const PREFIX: &str = "unet.";

/// Key prefixes of each component: diffusers', then kohya's (which flattens module paths).
const UNET_PREFIXES: [&str; 2] = [PREFIX, "lora_unet_"];
const TEXT_ENCODER_PREFIXES: [&str; 2] = ["text_encoder.", "lora_te_"];

/// Suffixes naming a layer's two factors, newest first.
const FACTORS: [(&str, &str); 3] = [
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_down.weight", ".lora_up.weight"),
];

/// The adapters of a LoRA file, per model component.
#[derive(Clone, Debug, Default)]
pub struct Lora {
    pub unet: Vec<LoraAdapter>,
    pub text_encoder: Vec<LoraAdapter>,
}

impl Lora {
    /// A LoRA on the UNet only.
    pub fn unet(adapters: Vec<LoraAdapter>) -> Lora {
        Lora {
            unet: adapters,
            text_encoder: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.unet.is_empty() && self.text_encoder.is_empty()
    }

    pub fn extend(&mut self, other: Lora) {
        self.unet.extend(other.unet);
        self.text_encoder.extend(other.text_encoder);
    }

    /// `adapters` named as `layers` name them: kohya's flattened names
    /// (`down_blocks_0_attentions_0_proj_in`) become module paths, and factors saved for a
    /// 1x1 convolution fit a linear layer of the same size and the other way round (SD 2
    /// exports `proj_in` as linear, SD 1 as a convolution). `component` is for messages.
    pub fn resolve(
        adapters: &[LoraAdapter],
        layers: &[AdaptableLayer],
        component: &str,
    ) -> Result<Vec<LoraAdapter>> {
        adapters
            .iter()
            .map(|adapter| {
                let layer = layers
                    .iter()
                    .find(|l| l.module == adapter.module)
                    .or_else(|| {
                        layers
                            .iter()
                            .find(|l| l.module.replace('.', "_") == adapter.module)
                    })
                    .ok_or_else(|| {
                        Error::Invalid(format!(
                            "LoRA layer `{}`: the {component} has no layer of that name to adapt",
                            adapter.module
                        ))
                    })?;
                let weights = adapter
                    .weights
                    .as_ref()
                    .map(|(a, b)| fit_factors(a, b, layer));
                Ok(LoraAdapter {
                    module: layer.module.clone(),
                    weights,
                    ..adapter.clone()
                })
            })
            .collect()
    }
}

/// Factors in the layout `layer` takes, where they differ only by 1x1 spatial axes.
fn fit_factors(a: &HostTensor, b: &HostTensor, layer: &AdaptableLayer) -> (HostTensor, HostTensor) {
    match (layer.kernel, a.shape.len()) {
        (None, 4) if a.shape[2..] == [1, 1] => {
            let flat = |t: &HostTensor| reshaped(t, &t.shape[..2]);
            (transpose(&flat(a)), transpose(&flat(b)))
        }
        (Some([1, 1]), 2) => {
            let (a, b) = (transpose(a), transpose(b));
            let pointwise = |t: &HostTensor| reshaped(t, &[t.shape[0], t.shape[1], 1, 1]);
            (pointwise(&a), pointwise(&b))
        }
        _ => (a.clone(), b.clone()),
    }
}

fn reshaped(t: &HostTensor, shape: &[usize]) -> HostTensor {
    HostTensor::f32(shape.to_vec(), t.to_f32().into_owned())
}

fn transpose(t: &HostTensor) -> HostTensor {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let v = t.to_f32();
    let out = (0..cols)
        .flat_map(|c| (0..rows).map(move |r| (r, c)))
        .map(|(r, c)| v[r * cols + c])
        .collect();
    HostTensor::f32(vec![cols, rows], out)
}

/// Every adapter of a LoRA file (UNet and text encoder), scaled by `strength`.
pub fn read_lora(name: &str, bytes: &[u8], strength: f32) -> Result<Lora> {
    let file = safetensors::read(bytes).map_err(|e| bad_file(name, e))?;
    let lora = Lora {
        unet: component_adapters(name, &file, &UNET_PREFIXES, strength)?,
        text_encoder: component_adapters(name, &file, &TEXT_ENCODER_PREFIXES, strength)?,
    };
    if lora.is_empty() {
        return Err(bad_file(
            name,
            "no LoRA layers (expected keys like `unet.<module>.lora_A.weight` or \
             `lora_unet_<module>.lora_down.weight`)",
        ));
    }
    Ok(lora)
}

/// The UNet adapters of a LoRA file, each scaled by `alpha / rank` times `strength`.
pub fn read_unet_lora(name: &str, bytes: &[u8], strength: f32) -> Result<Vec<LoraAdapter>> {
    let file = safetensors::read(bytes).map_err(|e| bad_file(name, e))?;
    unet_lora_adapters(name, &file, strength)
}

/// [`read_unet_lora`] of a file already read.
pub fn unet_lora_adapters(
    name: &str,
    file: &SafeTensors,
    strength: f32,
) -> Result<Vec<LoraAdapter>> {
    let adapters = component_adapters(name, file, &UNET_PREFIXES, strength)?;
    if adapters.is_empty() {
        return Err(bad_file(
            name,
            "no UNet LoRA layers (expected keys like `unet.<module>.lora_A.weight`)",
        ));
    }
    Ok(adapters)
}

/// The adapters under one component's key prefixes (the first is diffusers' and also names
/// the component's header settings). Keys without any known prefix count as the UNet's.
fn component_adapters(
    name: &str,
    file: &SafeTensors,
    prefixes: &[&str],
    strength: f32,
) -> Result<Vec<LoraAdapter>> {
    let config: Option<serde_json::Value> = file
        .metadata
        .get("lora_adapter_metadata")
        .and_then(|m| serde_json::from_str(m).ok());
    let setting = |key: &str| {
        config
            .as_ref()
            .and_then(|c| c.get(format!("{}{key}", prefixes[0])))
    };
    let alpha = setting("lora_alpha")
        .and_then(|a| a.as_f64())
        .map(|a| a as f32);
    let pattern_alpha = |module: &str| {
        let patterns = setting("alpha_pattern")?.as_object()?;
        let (_, alpha) = patterns
            .iter()
            .find(|(key, _)| module == key.as_str() || module.ends_with(&format!(".{key}")))?;
        alpha.as_f64().map(|a| a as f32)
    };
    // rsLoRA scales by alpha / sqrt(rank).
    let rs = setting("use_rslora").and_then(|u| u.as_bool()) == Some(true);
    let is_unet = prefixes[0] == PREFIX;
    let known = UNET_PREFIXES.iter().chain(&TEXT_ENCODER_PREFIXES);
    let mut adapters = Vec::new();
    for (key, down) in &file.tensors {
        let Some((stem, up_suffix)) = FACTORS
            .iter()
            .find_map(|(down_suffix, up_suffix)| Some((key.strip_suffix(down_suffix)?, up_suffix)))
        else {
            continue;
        };
        let module = match prefixes.iter().find_map(|p| stem.strip_prefix(p)) {
            Some(module) => module,
            None if is_unet && !known.clone().any(|p| stem.starts_with(p)) => stem,
            None => continue,
        };
        let up = file
            .tensors
            .get(&format!("{stem}{up_suffix}"))
            .ok_or_else(|| bad_file(name, format!("`{key}` has no matching up factor")))?;
        let rank = down.shape.first().copied().unwrap_or(0);
        let chained = matches!(
            (down.shape.len(), up.shape.as_slice()),
            (2, &[_, r]) | (4, &[_, r, 1, 1]) if r == rank
        );
        if !chained {
            return Err(bad_file(
                name,
                format!(
                    "`{module}`: factors {:?} and {:?} do not chain",
                    down.shape, up.shape
                ),
            ));
        }
        let layer_alpha = file
            .tensors
            .get(&format!("{stem}.alpha"))
            .map(|a| a.to_f32()[0])
            .or_else(|| pattern_alpha(module))
            .or(alpha)
            .unwrap_or(rank as f32);
        let divisor = if rs {
            (rank as f32).sqrt()
        } else {
            rank as f32
        };
        // The engine's linear factors are x-major ([in, rank], [rank, out]); convolution
        // factors keep torch's filter layout.
        let weights = if down.shape.len() == 2 {
            (transpose(down), transpose(up))
        } else {
            (down.clone(), up.clone())
        };
        adapters.push(LoraAdapter {
            module: module.to_string(),
            rank,
            scale: layer_alpha / divisor * strength,
            weights: Some(weights),
        });
    }
    Ok(adapters)
}

/// A LoRA file of the given adapters (weights present), in diffusers' layout, with the
/// `alpha` that gives each its scale.
pub fn write_unet_lora(adapters: &[LoraAdapter]) -> Result<Vec<u8>> {
    Ok(safetensors::write(&unet_lora_file(adapters)?))
}

/// The tensors and header of [`write_unet_lora`]'s file, for files that carry more.
pub fn unet_lora_file(adapters: &[LoraAdapter]) -> Result<SafeTensors> {
    let mut file = SafeTensors::default();
    let first = adapters
        .first()
        .ok_or_else(|| Error::Invalid("no adapters to save".into()))?;
    let rank = first.rank;
    if adapters
        .iter()
        .any(|a| a.rank != rank || a.scale != first.scale)
    {
        return Err(Error::Invalid(
            "adapters of different ranks or scales in one file".into(),
        ));
    }
    let mut tensors = BTreeMap::new();
    for adapter in adapters {
        let (a, b) = adapter
            .weights
            .as_ref()
            .ok_or_else(|| Error::Invalid(format!("`{}` has no weights", adapter.module)))?;
        // Back to torch's layout: linear factors transposed, convolution filters as they are.
        let torch_layout = |t: &HostTensor| match t.shape.len() {
            2 => transpose(t),
            _ => t.clone(),
        };
        tensors.insert(
            format!("{PREFIX}{}{}", adapter.module, FACTORS[0].0),
            torch_layout(a),
        );
        tensors.insert(
            format!("{PREFIX}{}{}", adapter.module, FACTORS[0].1),
            torch_layout(b),
        );
    }
    file.tensors = tensors;
    // The peft LoraConfig diffusers' `load_lora_weights` rebuilds the layers from.
    let modules: Vec<&str> = adapters.iter().map(|a| a.module.as_str()).collect();
    let metadata = serde_json::json!({
        "unet.r": rank,
        "unet.lora_alpha": first.scale * rank as f32,
        "unet.rank_pattern": {},
        "unet.alpha_pattern": {},
        "unet.target_modules": modules,
    });
    file.metadata.insert("format".into(), "pt".into());
    file.metadata
        .insert("lora_adapter_metadata".into(), metadata.to_string());
    Ok(file)
}
