//! Checking a request before any GPU work: its parameters, and whether its sizes fit the
//! GPU's buffers (by shape inference, nothing allocated).

use super::StableDiffusion;
use super::denoiser::unet_inputs;
use crate::engine::{Model, ShapePlan};
use crate::error::{Error, Result, invalid};
use crate::pipeline::Request;

impl StableDiffusion {
    /// Checks a request before any GPU work.
    pub(super) fn validate(&self, request: &Request) -> Result<(usize, usize)> {
        let size = self.config.default_image_size();
        let (width, height) = match &request.init_image {
            Some(image) if request.width.is_none() && request.height.is_none() => {
                (image.width, image.height)
            }
            _ => (
                request.width.unwrap_or(size),
                request.height.unwrap_or(size),
            ),
        };
        let factor = self.config.vae_scale_factor;
        if width == 0 || height == 0 || width % factor != 0 || height % factor != 0 {
            return invalid(format!(
                "width and height must be positive multiples of {factor} (got {width}x{height})"
            ));
        }
        if request.steps == 0 {
            return invalid("steps must be at least 1");
        }
        if let Some(embeds) = &request.prompt_embeds {
            let own = self.text_embedding_shape()?;
            if embeds.shape.len() != 3 || embeds.shape[0] != 1 || embeds.shape[2] != own[2] {
                return invalid(format!(
                    "prompt embeddings of shape {:?}, the text encoder makes {own:?}",
                    embeds.shape
                ));
            }
        }
        if !request.guidance_scale.is_finite() || request.guidance_scale < 0.0 {
            return invalid(format!(
                "guidance scale must be a non-negative number (got {})",
                request.guidance_scale
            ));
        }
        if request.init_image.is_some() {
            if !(0.0..=1.0).contains(&request.strength) {
                return invalid(format!(
                    "strength must be within [0, 1] (got {})",
                    request.strength
                ));
            }
            if self.vae_encoder.is_none() {
                return Err(Error::MissingFiles {
                    folder: self.folder.clone(),
                    missing: vec!["vae_encoder/model.onnx (needed for img2img)".into()],
                });
            }
        }
        Ok((width, height))
    }

    /// Refuses a size whose largest tensor would not fit one GPU buffer, before anything is
    /// allocated, naming the largest size that would fit.
    pub(super) fn check_size(
        &self,
        width: usize,
        height: usize,
        batch: usize,
        img2img: bool,
    ) -> Result<()> {
        let limit = self.gpu.limits.max_buffer_size;
        // Activations grow with the pixel count (attention is fused: no tensor grows
        // faster), so sizes are first judged from a plan at the model's own size; planning
        // a huge size itself could overflow 32-bit sizes in WebAssembly.
        let own = self.config.default_image_size();
        let (own_part, own_name, own_bytes) = self.largest_tensor(own, own, batch, img2img)?;
        let scaled = |w: usize, h: usize| {
            let bytes = own_bytes as u128 * w as u128 * h as u128 / (own * own).max(1) as u128;
            u64::try_from(bytes).unwrap_or(u64::MAX)
        };
        let (part, name, bytes) = match scaled(width, height) {
            estimate if estimate > limit => (own_part, own_name, estimate),
            _ if (width, height) == (own, own) => (own_part, own_name, own_bytes),
            _ => self.largest_tensor(width, height, batch, img2img)?,
        };
        if bytes <= limit {
            return Ok(());
        }
        // Shrink both sides by the square root of the excess, in steps every UNet level
        // divides, until the estimate fits.
        let step = 8 * self.config.vae_scale_factor;
        let ratio = (limit as f64 / bytes as f64).sqrt();
        let fit = |side: usize| (side as f64 * ratio) as usize / step * step;
        let (mut w, mut h) = (fit(width), fit(height));
        while w > step && h > step && scaled(w, h) > limit {
            (w, h) = (w - step, h - step);
        }
        let mib = |b: u64| b >> 20;
        invalid(format!(
            "{width}x{height} is too large for this GPU: the {part} would need a {} MiB tensor \
             (`{name}`), and the largest buffer the GPU allows is {} MiB; the largest size \
             that fits is about {w}x{h}",
            mib(bytes),
            mib(limit)
        ))
    }

    /// The largest tensor any model part computes for an image of `width`x`height`
    /// (the part, the tensor and its bytes), by shape inference: nothing is allocated.
    fn largest_tensor(
        &self,
        width: usize,
        height: usize,
        batch: usize,
        img2img: bool,
    ) -> Result<(&'static str, String, u64)> {
        let plan = |model: &Model, shapes: &[(&str, &[usize])]| -> Result<ShapePlan> {
            Ok(model.plan(&model.dims_for_shapes(shapes)?)?)
        };
        let hidden = self.text_embedding_shape()?;
        let context = [batch, hidden[1], hidden[2]];
        let latents = self.latent_shape(width, height);
        let sample = [batch, latents[1], latents[2], latents[3]];
        let cond = self.config.time_cond_proj_dim.map(|d| [batch, d]);
        let unet = plan(
            self.adapted_unet.as_ref().unwrap_or(&self.unet),
            &unet_inputs(&sample, &context, cond.as_ref()),
        )?;
        let decoder_input = self.vae_decoder.input_names()[0];
        let decoder = plan(&self.vae_decoder, &[(decoder_input, &latents)])?;
        let mut parts = vec![("UNet", unet.largest), ("VAE decoder", decoder.largest)];
        if let Some(encoder) = self.vae_encoder.as_ref().filter(|_| img2img) {
            let pixels = [1, 3, height, width];
            let planned = plan(encoder, &[(encoder.input_names()[0], &pixels)])?;
            parts.push(("VAE encoder", planned.largest));
        }
        let (part, (name, bytes)) = parts
            .into_iter()
            .max_by_key(|(_, (_, bytes))| *bytes)
            .expect("two parts at least");
        Ok((part, name, bytes))
    }

    /// The text encoder's output for one prompt, `[1, tokens, width]`, by shape inference.
    pub(super) fn text_embedding_shape(&self) -> Result<Vec<usize>> {
        let ids_input = self.text_encoder.input_names()[0];
        let ids = [1, self.tokenizer.max_length()];
        let dims = self.text_encoder.dims_for_shapes(&[(ids_input, &ids)])?;
        let mut plan = self.text_encoder.plan(&dims)?;
        let name = match plan.outputs.contains_key("last_hidden_state") {
            true => "last_hidden_state",
            false => self.text_encoder.output_names()[0],
        };
        plan.outputs
            .remove(name)
            .ok_or_else(|| Error::Invalid("the text encoder has no outputs".into()))
    }
}
