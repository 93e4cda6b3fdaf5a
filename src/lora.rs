//! LoRA files for a UNet, in the layout diffusers and peft write
//! (`StableDiffusionPipeline.save_lora_weights`): per layer
//! `unet.<module>.lora_A.weight` `[rank, in]` and `unet.<module>.lora_B.weight` `[out, rank]`
//! (torch's Linear layout; older files say `lora.down` / `lora.up`), the scale
//! `lora_alpha / rank` (`/ sqrt(rank)` for rsLoRA) from a per-layer `<module>.alpha` or the
//! `lora_adapter_metadata` header entry (`unet.lora_alpha`), else 1. Per-module
//! `alpha_pattern` / `rank_pattern` overrides are not read.

use std::collections::BTreeMap;

use crate::engine::{HostTensor, LoraAdapter};
use crate::error::{Error, Result, bad_file};
use crate::safetensors::{self, SafeTensors};

/// The component prefix of UNet keys.
const PREFIX: &str = "unet.";

/// Suffixes naming a layer's two factors, newest first.
const FACTORS: [(&str, &str); 2] = [
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
];

fn transpose(t: &HostTensor) -> HostTensor {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let v = t.to_f32();
    let out = (0..cols)
        .flat_map(|c| (0..rows).map(move |r| (r, c)))
        .map(|(r, c)| v[r * cols + c])
        .collect();
    HostTensor::f32(vec![cols, rows], out)
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
    let config: Option<serde_json::Value> = file
        .metadata
        .get("lora_adapter_metadata")
        .and_then(|m| serde_json::from_str(m).ok());
    let setting = |key: &str| {
        config
            .as_ref()
            .and_then(|c| c.get(format!("{PREFIX}{key}")))
    };
    let alpha = setting("lora_alpha")
        .and_then(|a| a.as_f64())
        .map(|a| a as f32);
    // rsLoRA scales by alpha / sqrt(rank).
    let rs = setting("use_rslora").and_then(|u| u.as_bool()) == Some(true);
    let mut adapters = Vec::new();
    for (key, down) in &file.tensors {
        let Some((stem, up_suffix)) = FACTORS
            .iter()
            .find_map(|(down_suffix, up_suffix)| Some((key.strip_suffix(down_suffix)?, up_suffix)))
        else {
            continue;
        };
        let module = stem.strip_prefix(PREFIX).unwrap_or(stem);
        let up = file
            .tensors
            .get(&format!("{stem}{up_suffix}"))
            .ok_or_else(|| bad_file(name, format!("`{key}` has no matching up factor")))?;
        if down.shape.len() != 2 || up.shape.len() != 2 || up.shape[1] != down.shape[0] {
            return Err(bad_file(
                name,
                format!(
                    "`{module}`: factors {:?} and {:?} do not chain",
                    down.shape, up.shape
                ),
            ));
        }
        let rank = down.shape[0];
        let layer_alpha = file
            .tensors
            .get(&format!("{stem}.alpha"))
            .map(|a| a.to_f32()[0])
            .or(alpha)
            .unwrap_or(rank as f32);
        adapters.push(LoraAdapter {
            module: module.to_string(),
            rank,
            scale: layer_alpha
                / if rs {
                    (rank as f32).sqrt()
                } else {
                    rank as f32
                }
                * strength,
            weights: Some((transpose(down), transpose(up))),
        });
    }
    if adapters.is_empty() {
        return Err(bad_file(
            name,
            "no UNet LoRA layers (expected keys like `unet.<module>.lora_A.weight`)",
        ));
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
        tensors.insert(
            format!("{PREFIX}{}{}", adapter.module, FACTORS[0].0),
            transpose(a),
        );
        tensors.insert(
            format!("{PREFIX}{}{}", adapter.module, FACTORS[0].1),
            transpose(b),
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
