//! Imagic (Kawar et al., CVPR 2023): editing a real image from a sentence. (A) The target
//! text's embedding is optimised, with the model frozen, until the UNet reconstructs the
//! image from it; (B) a LoRA on the UNet's attention projections is trained, on that
//! embedding, to reconstruct the image better; (C) pictures are sampled, with the LoRA
//! attached, from `eta * target + (1 - eta) * optimised` (diffusers' community
//! `imagic_stable_diffusion.py` calls eta `alpha`).
//!
//! Both stages minimise the denoising loss of diffusers' training scripts: the image's
//! latents noised at a random training timestep, the UNet's prediction against the noise
//! (or the velocity). The posterior sample, every noise and every timestep come from the
//! seeded generator, in that order, so an edit is reproducible.

use super::StableDiffusion;
use super::denoiser::{TimestepInput, unet_inputs};
use crate::clock::now_ms;
use crate::engine::{AdamW, GpuTensor, HostTensor, LoraAdapter};
use crate::error::{Error, Result, bad_file, invalid};
use crate::image::RgbaImage;
use crate::lora;
use crate::pipeline::{Control, Request};
use crate::rng::TorchRng;
use crate::safetensors::{self, SafeTensors};
use crate::scheduler::NoiseProcess;
use crate::train::{ATTENTION_PROJECTIONS, LoraTrainer, Trainer, fresh_adapters, layers_named};

/// The UNet output both stages train.
const UNET_OUTPUT: &str = "out_sample";
/// The edit file's own tensors and header entry.
const TARGET_KEY: &str = "imagic.target_embedding";
const OPTIMIZED_KEY: &str = "imagic.optimized_embedding";
const SETTINGS_KEY: &str = "imagic";

/// How to optimise an edit. `Default` is tuned on Glyph SD (see README).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct EditSettings {
    /// What the image should become.
    pub prompt: String,
    pub seed: u64,
    /// Stage A: Adam steps on the text embedding, and their learning rate.
    pub embed_steps: usize,
    pub embed_lr: f32,
    /// Stage B: Adam steps on the LoRA (none: no LoRA), their learning rate, its rank and
    /// the layers it adapts.
    pub tune_steps: usize,
    pub tune_lr: f32,
    pub lora_rank: usize,
    #[serde(default)]
    pub tune_layers: TuneLayers,
    /// The size to optimise and generate at (`None`: the model's native size); the image's
    /// centre is cropped to its aspect and resized to it.
    pub width: Option<usize>,
    pub height: Option<usize>,
}

impl Default for EditSettings {
    fn default() -> Self {
        EditSettings {
            prompt: String::new(),
            seed: 0,
            embed_steps: 60,
            embed_lr: 1e-2,
            tune_steps: 40,
            tune_lr: 2e-3,
            lora_rank: 4,
            tune_layers: TuneLayers::Attention,
            width: None,
            height: None,
        }
    }
}

/// Which of the UNet's layers stage B adapts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TuneLayers {
    /// The attention projections (`to_q`, `to_k`, `to_v`, `to_out.0`), as SD LoRAs usually.
    #[default]
    Attention,
    /// Every linear and convolution layer (LoCon on the convolutions): the closest a LoRA
    /// comes to Imagic's fine-tuning of the whole UNet.
    All,
}

impl TuneLayers {
    pub fn parse(name: &str) -> Result<TuneLayers> {
        match name {
            "attention" => Ok(TuneLayers::Attention),
            "all" => Ok(TuneLayers::All),
            other => Err(Error::Invalid(format!(
                "unknown layer set `{other}` (attention or all)"
            ))),
        }
    }
}

/// The two optimisation stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EditStage {
    Embedding,
    Tuning,
}

impl EditStage {
    pub fn name(self) -> &'static str {
        match self {
            EditStage::Embedding => "embedding",
            EditStage::Tuning => "fine-tuning",
        }
    }
}

/// Reported after every optimisation step.
#[derive(Clone, Copy, Debug)]
pub struct EditProgress {
    pub stage: EditStage,
    /// Steps of this stage done (1-based) and in all.
    pub step: usize,
    pub total: usize,
    /// The denoising loss before the step.
    pub loss: f32,
    pub step_ms: f64,
    /// GPU memory the stage holds: the model, what the backward pass keeps, the optimizer.
    pub gpu_bytes: u64,
}

/// An optimised edit: everything sampling needs, for any eta.
#[derive(Clone)]
pub struct Edit {
    pub settings: EditSettings,
    /// The target text's embedding and the optimised one, `[1, tokens, width]`.
    pub target: HostTensor,
    pub optimized: HostTensor,
    /// Stage B's adapters (empty without stage B).
    pub lora: Vec<LoraAdapter>,
}

impl Edit {
    /// `eta * target + (1 - eta) * optimised`: 0 reconstructs the image, 1 is the target
    /// text's own embedding; values past 1 extrapolate.
    pub fn embedding(&self, eta: f32) -> HostTensor {
        let values = self
            .target
            .to_f32()
            .iter()
            .zip(self.optimized.to_f32().iter())
            .map(|(t, o)| eta * t + (1.0 - eta) * o)
            .collect();
        HostTensor::f32(self.target.shape.clone(), values)
    }

    /// One `.safetensors` file: the two embeddings, the LoRA in diffusers' layout (so the
    /// file also loads as a plain LoRA), and the settings in the header.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut file = if self.lora.is_empty() {
            SafeTensors::default()
        } else {
            lora::unet_lora_file(&self.lora)?
        };
        file.tensors.insert(TARGET_KEY.into(), self.target.clone());
        file.tensors
            .insert(OPTIMIZED_KEY.into(), self.optimized.clone());
        let settings = serde_json::to_string(&self.settings).expect("settings serialise");
        file.metadata.insert(SETTINGS_KEY.into(), settings);
        Ok(safetensors::write(&file))
    }

    /// Reads a file [`Edit::to_bytes`] wrote; `name` is for messages.
    pub fn from_bytes(name: &str, bytes: &[u8]) -> Result<Edit> {
        let mut file = safetensors::read(bytes).map_err(|e| bad_file(name, e))?;
        let not_edit = || bad_file(name, "not an edit file (no Imagic embeddings)");
        let settings = file.metadata.get(SETTINGS_KEY).ok_or_else(not_edit)?;
        let settings: EditSettings =
            serde_json::from_str(settings).map_err(|e| bad_file(name, format!("settings: {e}")))?;
        let target = file.tensors.remove(TARGET_KEY).ok_or_else(not_edit)?;
        let optimized = file.tensors.remove(OPTIMIZED_KEY).ok_or_else(not_edit)?;
        if target.shape != optimized.shape {
            return Err(bad_file(
                name,
                format!(
                    "embeddings of shapes {:?} and {:?}",
                    target.shape, optimized.shape
                ),
            ));
        }
        let lora = if file.tensors.is_empty() {
            Vec::new()
        } else {
            lora::unet_lora_adapters(name, &file, 1.0)?
        };
        Ok(Edit {
            settings,
            target,
            optimized,
            lora,
        })
    }
}

impl StableDiffusion {
    /// Stages A and B of an edit of `image` (see the module docs). `on_step` sees every
    /// step and may cancel. Generate the edited picture with [`Edit::embedding`] as the
    /// request's `prompt_embeds` and [`Edit::lora`] attached ([`StableDiffusion::set_lora`]).
    pub async fn optimize_edit(
        &mut self,
        image: &RgbaImage,
        settings: &EditSettings,
        on_step: &mut dyn FnMut(EditProgress) -> Control,
    ) -> Result<Edit> {
        let (width, height) = self.edit_size(settings)?;
        let process = NoiseProcess::from_config(&self.config.scheduler)?;
        // The sampling session is not needed while training: free its memory.
        self.unet_session.session = None;

        let mut rng = TorchRng::new(settings.seed);
        let image = image.cropped_to(width, height);
        let clean = self.encode_image(&image, &mut rng).await?;
        self.encoder_session.release_if(self.low_memory);
        let target = self.encode_text(&settings.prompt).await?.to_host().await?;
        self.text_session.release_if(self.low_memory);
        let clean = GpuTensor::from_host(&self.gpu, &clean);
        let dims = self
            .unet
            .dims_for_shapes(&unet_inputs(&clean.shape, &target.shape, None))?;

        let adam = |lr| AdamW {
            lr,
            weight_decay: 0.0,
            ..AdamW::default()
        };
        // A buffer of its own: the optimizer updates it in place.
        let embedding = GpuTensor::from_host(&self.gpu, &target);
        let params = vec![("encoder_hidden_states".to_string(), embedding)];
        let mut trainer = Trainer::new(
            &self.gpu,
            &self.unet,
            params,
            UNET_OUTPUT,
            &dims,
            adam(settings.embed_lr),
        )
        .await?;
        let mut examples = Examples {
            timestep: TimestepInput::of(trainer.session(), 1)?,
            process: &process,
            clean: &clean,
            rng: &mut rng,
        };
        let stage = Stage {
            stage: EditStage::Embedding,
            steps: settings.embed_steps,
            gpu_bytes: self.memory_with(&trainer),
        };
        stage.run(&mut trainer, &[], &mut examples, on_step).await?;
        let optimized = trainer.params()[0].clone();
        drop(trainer);

        let lora = if settings.tune_steps == 0 {
            Vec::new()
        } else {
            let layers = match settings.tune_layers {
                TuneLayers::Attention => {
                    layers_named(self.unet.adaptable_layers(), &ATTENTION_PROJECTIONS)
                }
                TuneLayers::All => self.unet.adaptable_layers(),
            };
            let rank = settings.lora_rank;
            let initial = fresh_adapters(&layers, rank, rank as f32, settings.seed);
            let mut trainer = LoraTrainer::new(
                &self.gpu,
                &self.unet,
                &initial,
                UNET_OUTPUT,
                &dims,
                adam(settings.tune_lr),
            )
            .await?;
            let stage = Stage {
                stage: EditStage::Tuning,
                steps: settings.tune_steps,
                gpu_bytes: self.memory_with(trainer.trainer()),
            };
            let inputs = [("encoder_hidden_states", &optimized)];
            let tuned = trainer.trainer_mut();
            stage.run(tuned, &inputs, &mut examples, on_step).await?;
            trainer.adapters().await?
        };
        Ok(Edit {
            settings: settings.clone(),
            target,
            optimized: optimized.to_host().await?,
            lora,
        })
    }

    /// Stage C's request for `edit` at `eta` (steps, guidance, scheduler from `base`). With
    /// a `strength` below 1, sampling starts from `image` (cropped and sized as stages A and
    /// B saw it) noised to that strength, as image-to-image does: it keeps more of the
    /// picture than starting from noise, as the paper does (strength 1).
    pub fn edit_request(
        &self,
        edit: &Edit,
        eta: f32,
        image: Option<&RgbaImage>,
        strength: f64,
        base: &Request,
    ) -> Result<Request> {
        let (width, height) = self.edit_size(&edit.settings)?;
        let init_image = match image {
            _ if strength >= 1.0 => None,
            Some(image) => Some(image.cropped_to(width, height)),
            None => return invalid("a strength below 1 needs the edited picture"),
        };
        Ok(Request {
            prompt_embeds: Some(edit.embedding(eta)),
            seed: edit.settings.seed,
            width: Some(width),
            height: Some(height),
            init_image,
            strength,
            ..base.clone()
        })
    }

    /// GPU memory held with `trainer` built: its session (less its share of the shared
    /// slabs of intermediates, which `gpu_memory_bytes` counts whole) and moments, and the sessions kept.
    fn memory_with(&self, trainer: &Trainer) -> u64 {
        trainer.memory_bytes() - trainer.session().scratch_bytes + self.gpu_memory_bytes()
    }

    /// The size an edit works at, checked like a generation's.
    fn edit_size(&self, settings: &EditSettings) -> Result<(usize, usize)> {
        if self.vae_encoder.is_none() {
            return Err(Error::MissingFiles {
                folder: self.folder.clone(),
                missing: vec!["vae_encoder/model.onnx (needed to edit an image)".into()],
            });
        }
        if self.config.time_cond_proj_dim.is_some() {
            return invalid(
                "this model's UNet takes a guidance embedding (guidance-distilled); \
                 edit with the model it was distilled from",
            );
        }
        if settings.embed_steps == 0 {
            return invalid("an edit needs at least one embedding step");
        }
        if settings.tune_steps > 0 && settings.lora_rank == 0 {
            return invalid("the LoRA rank must be at least 1");
        }
        for lr in [settings.embed_lr, settings.tune_lr] {
            if !(lr.is_finite() && lr > 0.0) {
                return invalid(format!("learning rates must be positive (got {lr})"));
            }
        }
        let size = self.config.default_image_size();
        let (width, height) = (
            settings.width.unwrap_or(size),
            settings.height.unwrap_or(size),
        );
        let factor = self.config.vae_scale_factor;
        if width == 0 || height == 0 || width % factor != 0 || height % factor != 0 {
            return invalid(format!(
                "width and height must be positive multiples of {factor} (got {width}x{height})"
            ));
        }
        self.check_size(width, height, 1, true)?;
        Ok((width, height))
    }
}

/// Training examples drawn from one clean sample.
struct Examples<'a> {
    process: &'a NoiseProcess,
    clean: &'a GpuTensor,
    timestep: TimestepInput,
    rng: &'a mut TorchRng,
}

impl Examples<'_> {
    /// The noisy sample, its timestep input and the prediction's target, with the noise
    /// and the timestep drawn in that order (`torch.randn`, `torch.randint`).
    fn draw(&mut self) -> Result<(GpuTensor, GpuTensor, GpuTensor)> {
        let gpu = self.clean.gpu();
        let noise = GpuTensor::from_host(gpu, &self.rng.randn(&self.clean.shape));
        let t = self.rng.randint(self.process.train_steps() as u32) as usize;
        let sample = self.process.add_noise(self.clean, &noise, t)?;
        let target = self.process.target(self.clean, &noise, t)?;
        Ok((sample, self.timestep.tensor(gpu, t as f64), target))
    }
}

/// One optimisation stage and what its progress reports say.
struct Stage {
    stage: EditStage,
    steps: usize,
    gpu_bytes: u64,
}

impl Stage {
    /// `steps` steps of `trainer` on fresh examples, with `inputs` as the UNet's other
    /// inputs; `on_step` sees each and may cancel.
    async fn run(
        &self,
        trainer: &mut Trainer,
        inputs: &[(&str, &GpuTensor)],
        examples: &mut Examples<'_>,
        on_step: &mut dyn FnMut(EditProgress) -> Control,
    ) -> Result<()> {
        for step in 0..self.steps {
            let t0 = now_ms();
            let (sample, t, goal) = examples.draw()?;
            let mut feeds = vec![("sample", &sample), ("timestep", &t)];
            feeds.extend_from_slice(inputs);
            let loss = trainer.step(&feeds, &goal).await?;
            let progress = EditProgress {
                stage: self.stage,
                step: step + 1,
                total: self.steps,
                loss,
                step_ms: now_ms() - t0,
                gpu_bytes: self.gpu_bytes,
            };
            if on_step(progress) == Control::Cancel {
                return Err(Error::Cancelled);
            }
        }
        Ok(())
    }
}
