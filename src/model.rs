//! A Stable Diffusion model folder in the layout `optimum-cli export onnx --task
//! text-to-image` writes, read through [`ModelFiles`] so that the same code serves a
//! directory on disk and files fetched by the browser.

use std::collections::HashMap;
use std::rc::Rc;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde_json::Value;

#[cfg(not(target_arch = "wasm32"))]
pub use crate::engine::Directory;
use crate::engine::{FileSource, read_all};
use crate::error::{Error, Result, bad_file};
use crate::scheduler::{SchedulerConfig, SchedulerKind};
use crate::tokenizer::{ClipTokenizer, TokenizerFiles};

/// A model folder: its files by relative path (`unet/model.onnx`), read through the
/// engine's [`FileSource`], so that graphs are opened without reading their weights.
pub trait ModelFiles: FileSource {
    fn exists(&self, path: &str) -> bool;
}

/// Files already in memory (tests).
impl ModelFiles for HashMap<String, Bytes> {
    fn exists(&self, path: &str) -> bool {
        self.contains_key(path)
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl ModelFiles for Directory {
    fn exists(&self, path: &str) -> bool {
        self.0.join(path).is_file()
    }
}

/// The files every text-to-image folder needs; `vae_encoder/model.onnx` is needed for img2img only.
pub const REQUIRED_FILES: [&str; 9] = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "text_encoder/model.onnx",
    "unet/model.onnx",
    "unet/config.json",
    "vae_decoder/model.onnx",
    "vae_decoder/config.json",
];

/// What the folder's configs say, with diffusers' defaults where they are silent.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub scheduler: SchedulerConfig,
    pub default_scheduler: SchedulerKind,
    /// VAE latent scaling (`scaling_factor`, 0.18215 for SD 1.x).
    pub scaling_factor: f64,
    pub latent_channels: usize,
    /// Pixels per latent along each axis (2^(VAE blocks - 1), 8 for SD).
    pub vae_scale_factor: usize,
    /// The UNet's native latent size (`sample_size`).
    pub sample_size: usize,
    /// `time_cond_proj_dim`: set for guidance-distilled UNets that take the guidance scale.
    pub time_cond_proj_dim: Option<usize>,
}

/// The bytes of `path`; a file that cannot be read is a [`bad_file`] error naming it.
pub(crate) async fn read(files: &dyn ModelFiles, path: &str) -> Result<Bytes> {
    read_all(files, path)
        .await
        .map_err(|reason| bad_file(path, reason))
}

/// `path` parsed as JSON into any deserialisable type.
pub(crate) async fn read_json<T: DeserializeOwned>(
    files: &dyn ModelFiles,
    path: &str,
) -> Result<T> {
    serde_json::from_slice(&read(files, path).await?).map_err(|e| bad_file(path, e))
}

async fn text(files: &dyn ModelFiles, path: &str) -> Result<String> {
    String::from_utf8(read(files, path).await?.to_vec()).map_err(|_| bad_file(path, "not UTF-8"))
}

/// Fails with the list of required files the folder lacks.
pub fn check_files(files: &dyn ModelFiles, folder: &str) -> Result<()> {
    let missing: Vec<String> = REQUIRED_FILES
        .iter()
        .filter(|f| !files.exists(f))
        .map(|f| f.to_string())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::MissingFiles {
            folder: folder.into(),
            missing,
        })
    }
}

impl ModelConfig {
    pub async fn read(files: &dyn ModelFiles) -> Result<ModelConfig> {
        let scheduler =
            SchedulerConfig::from_json(&text(files, "scheduler/scheduler_config.json").await?)?;
        let class = scheduler
            .class_name()
            .unwrap_or("PNDMScheduler")
            .to_string();
        let default_scheduler = SchedulerKind::from_class_name(&class).ok_or_else(|| {
            Error::Invalid(format!("the folder's scheduler {class} is not supported"))
        })?;
        let vae: Value = read_json(files, "vae_decoder/config.json").await?;
        let unet: Value = read_json(files, "unet/config.json").await?;
        let blocks = vae["block_out_channels"].as_array().map_or(4, |b| b.len());
        Ok(ModelConfig {
            scheduler,
            default_scheduler,
            scaling_factor: vae["scaling_factor"].as_f64().unwrap_or(0.18215),
            latent_channels: vae["latent_channels"].as_u64().unwrap_or(4) as usize,
            vae_scale_factor: 1 << blocks.saturating_sub(1),
            sample_size: unet["sample_size"].as_u64().unwrap_or(64) as usize,
            time_cond_proj_dim: unet["time_cond_proj_dim"].as_u64().map(|d| d as usize),
        })
    }

    /// The image size the model was trained at.
    pub fn default_image_size(&self) -> usize {
        self.sample_size * self.vae_scale_factor
    }
}

pub async fn read_tokenizer(files: &dyn ModelFiles) -> Result<ClipTokenizer> {
    let vocab = text(files, "tokenizer/vocab.json").await?;
    let merges = text(files, "tokenizer/merges.txt").await?;
    let config = if files.exists("tokenizer/tokenizer_config.json") {
        Some(text(files, "tokenizer/tokenizer_config.json").await?)
    } else {
        None
    };
    ClipTokenizer::new(&TokenizerFiles {
        vocab_json: &vocab,
        merges_txt: &merges,
        config_json: config.as_deref(),
    })
}

/// Opens `<part>/model.onnx` (external data next to it); its weights stay in the files
/// until a session uploads them.
pub async fn read_graph(files: &Rc<dyn ModelFiles>, part: &str) -> Result<crate::engine::Model> {
    let path = format!("{part}/model.onnx");
    let source: Rc<dyn FileSource> = files.clone();
    crate::engine::Model::open(source, &path)
        .await
        .map_err(|e| bad_file(path, e))
}
