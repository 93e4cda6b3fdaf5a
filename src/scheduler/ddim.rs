//! DDIM (Song et al. 2020), deterministic (eta = 0) as the SD pipelines call it.

use super::schedule::{NoiseSchedule, check_steps, spaced_timesteps, vp_add_noise, vp_predictions};
use super::{NoiseSource, Prediction, SampleTensor, Scheduler, SchedulerConfig};
use crate::error::Result;

pub struct Ddim {
    config: SchedulerConfig,
    schedule: NoiseSchedule,
    prediction: Prediction,
    clip_sample: Option<f64>,
    final_alpha_cumprod: f64,
    timesteps: Vec<f64>,
    step_ratio: usize,
}

impl Ddim {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let schedule = NoiseSchedule::from_config(config, 0.0001, 0.02, "linear")?;
        let final_alpha_cumprod = if config.bool("set_alpha_to_one", true)? {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        let clip = config
            .bool("clip_sample", true)?
            .then_some(config.f64("clip_sample_range", 1.0)?);
        Ok(Ddim {
            config: config.clone(),
            prediction: Prediction::from_config(config)?,
            clip_sample: clip,
            final_alpha_cumprod,
            schedule,
            timesteps: Vec::new(),
            step_ratio: 1,
        })
    }

    fn alpha_at(&self, t: i64) -> f64 {
        if t >= 0 {
            self.schedule.alphas_cumprod[t as usize]
        } else {
            self.final_alpha_cumprod
        }
    }
}

impl<T: SampleTensor> Scheduler<T> for Ddim {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        check_steps(steps, self.schedule.train_steps)?;
        self.timesteps =
            spaced_timesteps(&self.config, "leading", self.schedule.train_steps, steps)?;
        self.step_ratio = self.schedule.train_steps / steps;
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
        _noise: &mut NoiseSource<T>,
    ) -> Result<T> {
        let t = self.timesteps[index] as i64;
        let (alpha, alpha_prev) = (self.alpha_at(t), self.alpha_at(t - self.step_ratio as i64));
        let (x0, eps) = vp_predictions(self.prediction, alpha);
        let mut x0 = x0.apply(sample, model_output)?;
        if let Some(limit) = self.clip_sample {
            x0 = x0.clamp_abs(limit)?;
        }
        let eps = eps.apply(sample, model_output)?;
        T::combine(&[(alpha_prev.sqrt(), &x0), ((1.0 - alpha_prev).sqrt(), &eps)])
    }

    fn add_noise(&self, original: &T, noise: &T, index: usize) -> Result<T> {
        let alpha = self.alpha_at(self.timesteps[index] as i64);
        vp_add_noise(alpha, original, noise)
    }
}
