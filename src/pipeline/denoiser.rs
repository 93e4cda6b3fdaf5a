//! One denoising evaluation: the UNet's inputs, its timestep in the form the export takes,
//! and classifier-free guidance (or a guidance-distilled UNet's scale embedding).

use crate::engine::{DType, Gpu, GpuTensor, HostTensor, Session};
use crate::error::{Error, Result, invalid};
use crate::scheduler::Scheduler;

/// The UNet's inputs for a batch of `sample`s with text `context` (and, for a
/// guidance-distilled UNet, the guidance embedding `cond`).
pub(super) fn unet_inputs<'a>(
    sample: &'a [usize],
    context: &'a [usize],
    cond: Option<&'a [usize; 2]>,
) -> Vec<(&'static str, &'a [usize])> {
    let mut shapes = vec![("sample", sample), ("encoder_hidden_states", context)];
    if let Some(c) = cond {
        shapes.push(("timestep_cond", c.as_slice()));
    }
    shapes
}

/// One UNet evaluation per step, with classifier-free guidance when `guidance` is set.
pub(super) struct Denoiser<'a> {
    pub(super) unet: &'a Session,
    pub(super) timestep: TimestepInput,
    pub(super) context: GpuTensor,
    pub(super) timestep_cond: Option<GpuTensor>,
    /// The guidance scale, when the UNet runs on [uncond, cond] and the two are mixed.
    pub(super) guidance: Option<f32>,
}

impl Denoiser<'_> {
    pub(super) async fn predict(
        &self,
        scheduler: &dyn Scheduler<GpuTensor>,
        latents: &GpuTensor,
        index: usize,
        t: f64,
    ) -> Result<GpuTensor> {
        let batch = if self.guidance.is_some() {
            GpuTensor::concat(&[latents, latents])?
        } else {
            latents.clone()
        };
        let sample = scheduler.scale_model_input(&batch, index)?;
        let timestep = self.timestep.tensor(self.context.gpu(), t);
        let mut feeds: Vec<(&str, &GpuTensor)> = vec![
            ("sample", &sample),
            ("timestep", &timestep),
            ("encoder_hidden_states", &self.context),
        ];
        if let Some(c) = &self.timestep_cond {
            feeds.push(("timestep_cond", c));
        }
        let mut outputs = self.unet.run(&feeds).await?;
        let prediction = outputs
            .remove("out_sample")
            .or_else(|| outputs.into_values().next())
            .ok_or_else(|| Error::Invalid("the UNet has no outputs".into()))?;
        let Some(g) = self.guidance else {
            return Ok(prediction);
        };
        // uncond + g * (cond - uncond)
        let halves = prediction.split(2)?;
        Ok(GpuTensor::combine(&[
            (1.0 - g, &halves[0]),
            (g, &halves[1]),
        ])?)
    }
}

/// How the UNet takes its timestep: scalar or per batch item, float or integer.
pub(super) struct TimestepInput {
    shape: Vec<usize>,
    dtype: DType,
}

impl TimestepInput {
    pub(super) fn of(unet: &Session, batch: usize) -> Result<TimestepInput> {
        let shape = unet
            .input_shape("timestep")
            .ok_or_else(|| Error::Invalid("the UNet has no `timestep` input".into()))?
            .to_vec();
        if shape.iter().product::<usize>() > batch {
            return invalid(format!("unexpected UNet timestep shape {shape:?}"));
        }
        Ok(TimestepInput {
            shape,
            dtype: unet.input_dtype("timestep").unwrap_or(DType::F32),
        })
    }

    pub(super) fn tensor(&self, gpu: &Gpu, t: f64) -> GpuTensor {
        let n = self.shape.iter().product();
        let host = match self.dtype {
            DType::F32 => HostTensor::f32(self.shape.clone(), vec![t as f32; n]),
            _ => HostTensor::i64(self.shape.clone(), vec![t as i64; n]),
        };
        GpuTensor::from_host(gpu, &host)
    }
}

/// The guidance-scale embedding of guidance-distilled UNets (`get_guidance_scale_embedding`
/// in diffusers): sinusoids of `1000 * w` at `dim / 2` frequencies, computed in f32.
pub fn guidance_embedding(w: f64, dim: usize) -> Vec<f32> {
    let half = dim / 2;
    let w = w as f32 * 1000.0;
    let step = (10000.0f32).ln() / (half as f32 - 1.0);
    let args: Vec<f32> = (0..half).map(|i| w * (i as f32 * -step).exp()).collect();
    let mut out: Vec<f32> = args
        .iter()
        .map(|a| a.sin())
        .chain(args.iter().map(|a| a.cos()))
        .collect();
    out.resize(dim, 0.0);
    out
}
