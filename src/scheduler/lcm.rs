//! Latent Consistency Models' multistep sampler (Luo et al. 2023): each step predicts the
//! clean sample through the consistency boundary condition, then re-noises it to the next
//! timestep with fresh noise (except after the last step).

use super::schedule::{NoiseSchedule, check_steps, vp_add_noise, vp_predictions};
use super::{NoiseSource, Prediction, SampleTensor, Scheduler, SchedulerConfig};
use crate::error::{Result, invalid};

pub struct Lcm {
    schedule: NoiseSchedule,
    prediction: Prediction,
    clip_sample: Option<f64>,
    original_steps: usize,
    timestep_scaling: f64,
    timesteps: Vec<f64>,
}

impl Lcm {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        if config.bool("thresholding", false)? {
            return invalid("LCM thresholding is not supported");
        }
        Ok(Lcm {
            schedule: NoiseSchedule::from_config(config, 0.00085, 0.012, "scaled_linear")?,
            prediction: Prediction::from_config(config)?,
            clip_sample: config
                .bool("clip_sample", false)?
                .then_some(config.f64("clip_sample_range", 1.0)?),
            original_steps: config.usize("original_inference_steps", 50)?,
            timestep_scaling: config.f64("timestep_scaling", 10.0)?,
            timesteps: Vec::new(),
        })
    }
}

impl<T: SampleTensor> Scheduler<T> for Lcm {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        check_steps(steps, self.schedule.train_steps)?;
        if steps > self.original_steps {
            return invalid(format!(
                "LCM takes at most {} steps (original_inference_steps)",
                self.original_steps
            ));
        }
        // The distillation's own schedule, then `steps` evenly spaced picks from its end.
        let k = self.schedule.train_steps / self.original_steps;
        let origin: Vec<usize> = (1..=self.original_steps).rev().map(|i| i * k - 1).collect();
        self.timesteps = (0..steps)
            .map(|i| origin[((i * origin.len()) as f64 / steps as f64).floor() as usize] as f64)
            .collect();
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &T,
        index: usize,
        sample: &T,
        noise: &mut NoiseSource<T>,
    ) -> Result<T> {
        let t = self.timesteps[index];
        let prev = self.timesteps.get(index + 1).copied().unwrap_or(t);
        let alpha = self.schedule.alphas_cumprod[t as usize];
        let alpha_prev = self.schedule.alphas_cumprod[prev as usize];
        // Boundary condition scalings with sigma_data = 0.5.
        let scaled = t * self.timestep_scaling;
        let c_skip = 0.25 / (scaled * scaled + 0.25);
        let c_out = scaled / (scaled * scaled + 0.25).sqrt();
        let (x0, _) = vp_predictions(self.prediction, alpha);
        let mut x0 = x0.apply(sample, model_output)?;
        if let Some(limit) = self.clip_sample {
            x0 = x0.clamp_abs(limit)?;
        }
        let denoised = T::combine(&[(c_out, &x0), (c_skip, sample)])?;
        if index + 1 == self.timesteps.len() {
            return Ok(denoised);
        }
        let noise = noise()?;
        T::combine(&[
            (alpha_prev.sqrt(), &denoised),
            ((1.0 - alpha_prev).sqrt(), &noise),
        ])
    }

    fn add_noise(&self, original: &T, noise: &T, index: usize) -> Result<T> {
        let alpha = self.schedule.alphas_cumprod[self.timesteps[index] as usize];
        vp_add_noise(alpha, original, noise)
    }
}
