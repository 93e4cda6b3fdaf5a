//! Text-to-image and image-to-image generation, as diffusers' StableDiffusionPipeline and
//! StableDiffusionImg2ImgPipeline run it: prompt -> CLIP ids -> text embeddings (prompt and
//! negative prompt) -> seeded noise -> UNet + classifier-free guidance + scheduler step,
//! repeated -> VAE decode. Tensors stay on the GPU between steps.

use std::rc::Rc;

use crate::clock::now_ms;
use crate::engine::{Gpu, GpuTensor, HostTensor, LoraAdapter, Model, Session};
use crate::error::{Error, Result, invalid};
use crate::image::RgbaImage;
use crate::lora::Lora;
use crate::model::{self, ModelConfig, ModelFiles};
use crate::rng::TorchRng;
use crate::scheduler::{Scheduler, SchedulerKind};
use crate::tokenizer::ClipTokenizer;

mod checks;
mod denoiser;
mod imagic;

pub use denoiser::guidance_embedding;
use denoiser::{Denoiser, TimestepInput, unet_inputs};
pub use imagic::{Edit, EditProgress, EditSettings, EditStage, TuneLayers};

/// What to generate. `Default` gives diffusers' defaults (50 steps, guidance 7.5).
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance_scale: f64,
    pub seed: u64,
    /// `None`: the scheduler the model folder names.
    pub scheduler: Option<SchedulerKind>,
    /// `None`: the model's native size.
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// img2img: the picture to start from, and how much of the schedule to run over it.
    pub init_image: Option<RgbaImage>,
    pub strength: f64,
    /// Starting latents instead of seeded noise (diffusers' `latents=`).
    pub init_latents: Option<HostTensor>,
    /// The prompt's text embeddings `[1, tokens, width]` instead of encoding `prompt`
    /// (diffusers' `prompt_embeds=`), e.g. an Imagic edit's.
    pub prompt_embeds: Option<HostTensor>,
    /// Decode the latents through the VAE every this many steps (0: never).
    pub preview_every: usize,
    /// After every step, a cheap latent-space RGB picture (1/8 size, no VAE).
    pub live_preview: bool,
}

impl Default for Request {
    fn default() -> Self {
        Request {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 50,
            guidance_scale: 7.5,
            seed: 0,
            scheduler: None,
            width: None,
            height: None,
            init_image: None,
            strength: 0.8,
            init_latents: None,
            prompt_embeds: None,
            preview_every: 0,
            live_preview: false,
        }
    }
}

/// Reported after every denoising step.
pub struct StepEvent<'a> {
    /// Steps done so far (1-based) and in all.
    pub step: usize,
    pub total: usize,
    pub timestep: f64,
    pub latents: &'a GpuTensor,
    /// The decoded image, on preview steps.
    pub preview: Option<&'a RgbaImage>,
    /// The latent-space picture, when `live_preview` is set.
    pub live_preview: Option<&'a RgbaImage>,
    pub step_ms: f64,
}

/// The callback's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Continue,
    Cancel,
}

#[derive(Clone, Debug, Default)]
pub struct Timings {
    pub text_encoder_ms: f64,
    pub vae_encoder_ms: f64,
    pub unet_step_ms: Vec<f64>,
    pub vae_decoder_ms: f64,
    pub total_ms: f64,
    /// The most GPU memory the sessions held at once during the generation.
    pub gpu_peak_bytes: u64,
}

pub struct Generated {
    pub image: RgbaImage,
    pub latents: GpuTensor,
    pub timings: Timings,
    /// What the user should know about the result, e.g. the end of an over-long prompt
    /// that the model never saw.
    pub warnings: Vec<String>,
}

/// A session built for one set of input shapes, rebuilt when they change.
#[derive(Default)]
struct Cached {
    dims: std::collections::HashMap<String, usize>,
    session: Option<Session>,
}

impl Cached {
    async fn get(
        &mut self,
        gpu: &Gpu,
        model: &Model,
        shapes: &[(&str, &[usize])],
    ) -> Result<&Session> {
        let dims = model.dims_for_shapes(shapes)?;
        if self.session.is_none() || dims != self.dims {
            self.session = None; // free the old buffers before building new ones
            self.session = Some(Session::new(gpu, model, &dims).await?);
            self.dims = dims;
        }
        Ok(self.session.as_ref().expect("just built"))
    }

    /// Frees the session (its weights and its share of the intermediates) when `low_memory`.
    fn release_if(&mut self, low_memory: bool) {
        if low_memory {
            self.session = None;
        }
    }
}

/// A loaded Stable Diffusion model folder on the GPU.
pub struct StableDiffusion {
    gpu: Gpu,
    /// The folder's name, for messages.
    folder: String,
    pub config: ModelConfig,
    tokenizer: ClipTokenizer,
    text_encoder: Model,
    unet: Model,
    /// The text encoder and UNet with LoRA adapters attached (see
    /// [`StableDiffusion::set_lora`]).
    adapted_text_encoder: Option<Model>,
    adapted_unet: Option<Model>,
    vae_decoder: Model,
    vae_encoder: Option<Model>,
    text_session: Cached,
    unet_session: Cached,
    decoder_session: Cached,
    encoder_session: Cached,
    /// See [`StableDiffusion::set_low_memory`].
    low_memory: bool,
}

impl StableDiffusion {
    /// Opens a model folder: configs, tokenizer and the graphs' structure. Weights are read
    /// from `files` when sessions are built, on first use, for the sizes requested.
    pub async fn load(
        gpu: &Gpu,
        files: Rc<dyn ModelFiles>,
        folder: &str,
    ) -> Result<StableDiffusion> {
        model::check_files(&*files, folder)?;
        let vae_encoder = if files.exists("vae_encoder/model.onnx") {
            Some(model::read_graph(&files, "vae_encoder").await?)
        } else {
            None
        };
        Ok(StableDiffusion {
            gpu: gpu.clone(),
            folder: folder.to_string(),
            config: ModelConfig::read(&*files).await?,
            tokenizer: model::read_tokenizer(&*files).await?,
            text_encoder: model::read_graph(&files, "text_encoder").await?,
            unet: model::read_graph(&files, "unet").await?,
            adapted_text_encoder: None,
            adapted_unet: None,
            vae_decoder: model::read_graph(&files, "vae_decoder").await?,
            vae_encoder,
            text_session: Cached::default(),
            unet_session: Cached::default(),
            decoder_session: Cached::default(),
            encoder_session: Cached::default(),
            low_memory: false,
        })
    }

    /// With `on`, each model's session is freed as soon as its stage is done, so the GPU
    /// holds one model at a time (the largest stage, not the sum), and every generation
    /// uploads the weights again, read from the model's files. Turning it on frees the
    /// sessions held now.
    pub fn set_low_memory(&mut self, on: bool) {
        self.low_memory = on;
        for cached in [
            &mut self.text_session,
            &mut self.unet_session,
            &mut self.decoder_session,
            &mut self.encoder_session,
        ] {
            cached.release_if(on);
        }
    }

    /// Attaches a LoRA (from [`crate::lora::read_lora`]) to the text encoder and the UNet
    /// for the next generations, replacing any attached before; an empty one detaches
    /// them. Nothing changes if a layer does not fit. Sessions are rebuilt on next use.
    pub fn set_lora(&mut self, lora: &Lora) -> Result<()> {
        let adapt = |model: &Model, adapters: &[LoraAdapter], component: &str| {
            if adapters.is_empty() {
                return Ok(None);
            }
            let adapters = Lora::resolve(adapters, &model.adaptable_layers(), component)?;
            Ok::<_, Error>(Some(model.with_lora(&adapters)?))
        };
        let text_encoder = adapt(&self.text_encoder, &lora.text_encoder, "text encoder")?;
        self.adapted_unet = adapt(&self.unet, &lora.unet, "UNet")?;
        self.adapted_text_encoder = text_encoder;
        self.text_session.session = None;
        self.unet_session.session = None;
        Ok(())
    }

    /// GPU memory the built sessions hold (weights and activations), in bytes.
    pub fn gpu_memory_bytes(&self) -> u64 {
        let own: u64 = [
            &self.text_session,
            &self.unet_session,
            &self.decoder_session,
            &self.encoder_session,
        ]
        .iter()
        .filter_map(|cached| cached.session.as_ref())
        .map(|session| session.memory_bytes - session.scratch_bytes)
        .sum();
        own + self.gpu.scratch_bytes()
    }

    /// Whether the folder has the VAE encoder img2img needs.
    pub fn has_vae_encoder(&self) -> bool {
        self.vae_encoder.is_some()
    }

    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Runs the text encoder on one prompt: `[1, 77, hidden]`.
    async fn encode_text(&mut self, text: &str) -> Result<GpuTensor> {
        let ids = self.tokenizer.encode(text)?;
        let shape = [1, ids.len()];
        let input = self.text_encoder.input_names()[0].to_string();
        let text_encoder = self
            .adapted_text_encoder
            .as_ref()
            .unwrap_or(&self.text_encoder);
        let session = self
            .text_session
            .get(&self.gpu, text_encoder, &[(&input, &shape)])
            .await?;
        let ids = GpuTensor::from_host(&self.gpu, &HostTensor::i64(shape.to_vec(), ids));
        let mut outputs = session.run(&[(&input, &ids)]).await?;
        let name = if outputs.contains_key("last_hidden_state") {
            "last_hidden_state".to_string()
        } else {
            session.output_names()[0].to_string()
        };
        outputs
            .remove(&name)
            .ok_or_else(|| Error::Invalid("the text encoder has no outputs".into()))
    }

    /// Latents -> RGBA through the VAE decoder (`vae.decode(latents / scaling_factor)`).
    pub async fn decode(&mut self, latents: &GpuTensor) -> Result<RgbaImage> {
        decode_latents(
            &self.gpu,
            &self.config,
            &self.vae_decoder,
            &mut self.decoder_session,
            latents,
        )
        .await
    }

    /// The VAE encoder's session for images of `shape`, and the name of its input.
    async fn encoder_for(&mut self, shape: &[usize]) -> Result<(&Session, String)> {
        let encoder = self
            .vae_encoder
            .as_ref()
            .ok_or_else(|| Error::Invalid("no VAE encoder".into()))?;
        let input = encoder.input_names()[0].to_string();
        let session = self
            .encoder_session
            .get(&self.gpu, encoder, &[(&input, shape)])
            .await?;
        Ok((session, input))
    }

    /// Image -> scaled latents through the VAE encoder, sampling the posterior with `rng`
    /// (`latent_dist.sample(generator) * scaling_factor`).
    async fn encode_image(&mut self, image: &RgbaImage, rng: &mut TorchRng) -> Result<HostTensor> {
        let pixels = GpuTensor::from_host(&self.gpu, &image.to_vae_input());
        let (session, input) = self.encoder_for(&pixels.shape).await?;
        let outputs = session.run(&[(&input, &pixels)]).await?;
        let parameters = outputs
            .into_values()
            .next()
            .ok_or_else(|| Error::Invalid("the VAE encoder has no outputs".into()))?;
        let parameters = parameters.to_host().await?;
        let [1, channels, h, w] = parameters.shape[..] else {
            return invalid(format!(
                "unexpected VAE encoder output {:?}",
                parameters.shape
            ));
        };
        let half = channels / 2 * h * w;
        let values = parameters.to_f32();
        let shape = vec![1, channels / 2, h, w];
        let noise = rng.randn(&shape).to_f32().into_owned();
        let scale = self.config.scaling_factor as f32;
        let latents = (0..half)
            .map(|i| {
                let (mean, log_var) = (values[i], values[half + i].clamp(-30.0, 20.0));
                (mean + (0.5 * log_var).exp() * noise[i]) * scale
            })
            .collect();
        Ok(HostTensor::f32(shape, latents))
    }

    /// Builds every session `request` needs (text encoder, VAE encoder for an init image,
    /// UNet and VAE decoder at its size) without generating, and returns the most GPU
    /// memory the sessions hold at once (with `low_memory`, the largest stage's). Without
    /// `low_memory`, nothing is left to compile or upload before the first step.
    pub async fn prepare(&mut self, request: &Request) -> Result<u64> {
        let (width, height) = self.validate(request)?;
        let (guidance_embedding, guidance) = self.guidance(request);
        let batch = if guidance.is_some() { 2 } else { 1 };
        self.check_size(width, height, batch, request.init_image.is_some())?;
        let context = self.encode_prompts(request, guidance.is_some()).await?;
        let mut peak = self.gpu_memory_bytes();
        self.text_session.release_if(self.low_memory);
        let latents = self.latent_shape(width, height);
        self.keep_decoder_ahead(&latents).await?;
        if request.init_image.is_some() {
            let factor = self.config.vae_scale_factor;
            self.encoder_for(&[1, 3, latents[2] * factor, latents[3] * factor])
                .await?;
            peak = peak.max(self.gpu_memory_bytes());
            self.encoder_session.release_if(self.low_memory);
        }
        let sample = [batch, latents[1], latents[2], latents[3]];
        let cond = guidance_embedding.map(|e| [batch, e.len()]);
        let shapes = unet_inputs(&sample, &context.shape, cond.as_ref());
        let unet = self.adapted_unet.as_ref().unwrap_or(&self.unet);
        self.unet_session.get(&self.gpu, unet, &shapes).await?;
        peak = peak.max(self.gpu_memory_bytes());
        self.unet_session.release_if(self.low_memory);
        let input = self.vae_decoder.input_names()[0].to_string();
        self.decoder_session
            .get(&self.gpu, &self.vae_decoder, &[(&input, &latents)])
            .await?;
        peak = peak.max(self.gpu_memory_bytes());
        self.decoder_session.release_if(self.low_memory);
        Ok(peak)
    }

    /// With every session kept, builds the VAE decoder's session for `latents` before the
    /// VAE encoder's and the UNet's: a session places its intermediates in the slabs
    /// earlier ones made and adds slabs for what does not fit, so the decoder's full-size
    /// images (the largest intermediates) go first and the others fit in their slabs,
    /// instead of the decoder adding slabs beside theirs.
    async fn keep_decoder_ahead(&mut self, latents: &[usize]) -> Result<()> {
        if !self.low_memory {
            let input = self.vae_decoder.input_names()[0].to_string();
            self.decoder_session
                .get(&self.gpu, &self.vae_decoder, &[(&input, latents)])
                .await?;
        }
        Ok(())
    }

    /// The latents of one image of `width` x `height` pixels.
    fn latent_shape(&self, width: usize, height: usize) -> [usize; 4] {
        let factor = self.config.vae_scale_factor;
        [
            1,
            self.config.latent_channels,
            height / factor,
            width / factor,
        ]
    }

    /// The guidance-scale embedding of a guidance-distilled UNet (which takes the scale as
    /// an input and needs one pass per step), else the scale of classifier-free guidance
    /// when it applies.
    fn guidance(&self, request: &Request) -> (Option<Vec<f32>>, Option<f32>) {
        let embedding = self
            .config
            .time_cond_proj_dim
            .map(|dim| guidance_embedding(request.guidance_scale - 1.0, dim));
        let scale = (request.guidance_scale > 1.0 && embedding.is_none())
            .then_some(request.guidance_scale as f32);
        (embedding, scale)
    }

    /// Generates one image. `on_step` sees every step and may cancel.
    pub async fn generate(
        &mut self,
        request: &Request,
        on_step: &mut dyn FnMut(StepEvent) -> Control,
    ) -> Result<Generated> {
        let started = now_ms();
        let (width, height) = self.validate(request)?;
        let kind = request.scheduler.unwrap_or(self.config.default_scheduler);
        let mut scheduler = kind.build::<GpuTensor>(&self.config.scheduler)?;
        scheduler.set_timesteps(request.steps)?;
        let mut timings = Timings::default();

        let (guidance_embedding, guidance) = self.guidance(request);
        let batch = if guidance.is_some() { 2 } else { 1 };
        self.check_size(width, height, batch, request.init_image.is_some())?;
        let warnings = self.prompt_warnings(request, guidance.is_some())?;
        let t0 = now_ms();
        let context = self.encode_prompts(request, guidance.is_some()).await?;
        self.gpu.finish().await?;
        timings.text_encoder_ms = now_ms() - t0;
        timings.gpu_peak_bytes = self.gpu_memory_bytes();
        self.text_session.release_if(self.low_memory);

        let mut rng = TorchRng::new(request.seed);
        let shape = self.latent_shape(width, height).to_vec();
        self.keep_decoder_ahead(&shape).await?;
        let (first, mut latents) = self
            .initial_latents(request, scheduler.as_ref(), &mut rng, &shape, &mut timings)
            .await?;
        timings.gpu_peak_bytes = timings.gpu_peak_bytes.max(self.gpu_memory_bytes());
        self.encoder_session.release_if(self.low_memory);

        let sample_shape = [batch, shape[1], shape[2], shape[3]];
        let cond_shape = guidance_embedding.as_ref().map(|e| [batch, e.len()]);
        let shapes = unet_inputs(&sample_shape, &context.shape, cond_shape.as_ref());
        let unet = self.adapted_unet.as_ref().unwrap_or(&self.unet);
        let unet = self.unet_session.get(&self.gpu, unet, &shapes).await?;
        let denoiser = Denoiser {
            timestep: TimestepInput::of(unet, batch)?,
            unet,
            timestep_cond: guidance_embedding.map(|e| {
                let values: Vec<f32> = (0..batch).flat_map(|_| e.iter().copied()).collect();
                GpuTensor::from_host(&self.gpu, &HostTensor::f32(vec![batch, e.len()], values))
            }),
            context,
            guidance,
        };

        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len() - first;
        for (done, index) in (first..timesteps.len()).enumerate() {
            let t0 = now_ms();
            let noise_pred = denoiser
                .predict(scheduler.as_ref(), &latents, index, timesteps[index])
                .await?;
            let gpu = self.gpu.clone();
            latents = scheduler.step(&noise_pred, index, &latents, &mut || {
                Ok(GpuTensor::from_host(&gpu, &rng.randn(&shape)))
            })?;
            self.gpu.finish().await?;
            let step_ms = now_ms() - t0;
            timings.unet_step_ms.push(step_ms);
            // Like diffusers' `callback_steps`: after steps 0, K, 2K... (0-based).
            let preview = if request.preview_every > 0 && done % request.preview_every == 0 {
                Some(
                    decode_latents(
                        &self.gpu,
                        &self.config,
                        &self.vae_decoder,
                        &mut self.decoder_session,
                        &latents,
                    )
                    .await?,
                )
            } else {
                None
            };
            let live = if request.live_preview {
                Some(crate::image::latent_preview(&latents.to_host().await?)?)
            } else {
                None
            };
            let event = StepEvent {
                step: done + 1,
                total,
                timestep: timesteps[index],
                latents: &latents,
                preview: preview.as_ref(),
                live_preview: live.as_ref(),
                step_ms,
            };
            if on_step(event) == Control::Cancel {
                return Err(Error::Cancelled);
            }
        }
        drop(denoiser);
        timings.gpu_peak_bytes = timings.gpu_peak_bytes.max(self.gpu_memory_bytes());
        self.unet_session.release_if(self.low_memory);
        let t0 = now_ms();
        let image = self.decode(&latents).await?;
        timings.vae_decoder_ms = now_ms() - t0;
        timings.gpu_peak_bytes = timings.gpu_peak_bytes.max(self.gpu_memory_bytes());
        self.decoder_session.release_if(self.low_memory);
        timings.total_ms = now_ms() - started;
        Ok(Generated {
            image,
            latents,
            timings,
            warnings,
        })
    }

    /// The words of the prompts that do not fit the text encoder's context.
    fn prompt_warnings(&self, request: &Request, guided: bool) -> Result<Vec<String>> {
        let prompts = [
            ("prompt", &request.prompt),
            ("negative prompt", &request.negative_prompt),
        ];
        let mut warnings = Vec::new();
        let given = request.prompt_embeds.is_some() as usize;
        for (name, text) in prompts.into_iter().take(1 + guided as usize).skip(given) {
            if let Some(dropped) = self.tokenizer.dropped_text(text)? {
                warnings.push(format!(
                    "the {name} is longer than the model's {} tokens; ignored: \"{dropped}\"",
                    self.tokenizer.max_length()
                ));
            }
        }
        Ok(warnings)
    }

    /// Text embeddings: the prompt's, preceded by the negative prompt's when guiding
    /// (`[uncond, cond]`, as diffusers batches them).
    async fn encode_prompts(&mut self, request: &Request, guided: bool) -> Result<GpuTensor> {
        let cond = match &request.prompt_embeds {
            Some(embeds) => GpuTensor::from_host(&self.gpu, embeds),
            None => self.encode_text(&request.prompt).await?,
        };
        if !guided {
            return Ok(cond);
        }
        let uncond = self.encode_text(&request.negative_prompt).await?;
        Ok(GpuTensor::concat(&[&uncond, &cond])?)
    }

    /// The first step index and the latents it starts from: scaled seeded noise (or the
    /// given latents) for text-to-image; the encoded image noised to the strength's step
    /// for img2img (diffusers' `get_timesteps` + `add_noise`).
    async fn initial_latents(
        &mut self,
        request: &Request,
        scheduler: &dyn Scheduler<GpuTensor>,
        rng: &mut TorchRng,
        shape: &[usize],
        timings: &mut Timings,
    ) -> Result<(usize, GpuTensor)> {
        let Some(image) = &request.init_image else {
            let noise = match &request.init_latents {
                Some(given) if given.shape == shape => given.clone(),
                Some(given) => {
                    return invalid(format!(
                        "init latents have shape {:?}, this size needs {shape:?}",
                        given.shape
                    ));
                }
                None => rng.randn(shape),
            };
            let noise = GpuTensor::from_host(&self.gpu, &noise);
            return Ok((0, noise.scale(scheduler.init_noise_sigma() as f32)?));
        };
        let factor = self.config.vae_scale_factor;
        let t0 = now_ms();
        let image = image.resized(shape[3] * factor, shape[2] * factor);
        let clean = self.encode_image(&image, rng).await?;
        timings.vae_encoder_ms = now_ms() - t0;
        let init_steps = ((request.steps as f64 * request.strength) as usize).min(request.steps);
        let start = (request.steps - init_steps) * scheduler.order();
        if start >= scheduler.timesteps().len() {
            return invalid(format!(
                "strength {} leaves no steps out of {}",
                request.strength, request.steps
            ));
        }
        let noise = GpuTensor::from_host(&self.gpu, &rng.randn(shape));
        let clean = GpuTensor::from_host(&self.gpu, &clean);
        Ok((start, scheduler.add_noise(&clean, &noise, start)?))
    }
}

async fn decode_latents(
    gpu: &Gpu,
    config: &ModelConfig,
    decoder: &Model,
    cache: &mut Cached,
    latents: &GpuTensor,
) -> Result<RgbaImage> {
    let scaled = latents.scale((1.0 / config.scaling_factor) as f32)?;
    let input = decoder.input_names()[0].to_string();
    let session = cache.get(gpu, decoder, &[(&input, &scaled.shape)]).await?;
    let outputs = session.run(&[(&input, &scaled)]).await?;
    let image = outputs
        .into_values()
        .next()
        .ok_or_else(|| Error::Invalid("the VAE decoder has no outputs".into()))?;
    RgbaImage::from_vae_output(&image.to_host().await?)
}
