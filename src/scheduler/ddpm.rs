//! DDPM ancestral sampling (Ho et al. 2020) with the `fixed_small` variance.

use super::schedule::{NoiseSchedule, check_steps, spaced_timesteps, vp_add_noise, vp_predictions};
use super::{NoiseSource, Prediction, SampleTensor, Scheduler, SchedulerConfig};
use crate::error::{Result, invalid};

pub struct Ddpm {
    config: SchedulerConfig,
    schedule: NoiseSchedule,
    prediction: Prediction,
    clip_sample: Option<f64>,
    timesteps: Vec<f64>,
}

impl Ddpm {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        let variance = config.string("variance_type", "fixed_small");
        if variance != "fixed_small" {
            return invalid(format!("DDPM variance_type `{variance}` is not supported"));
        }
        if config.bool("thresholding", false)? {
            return invalid("DDPM thresholding is not supported");
        }
        Ok(Ddpm {
            config: config.clone(),
            schedule: NoiseSchedule::from_config(config, 0.0001, 0.02, "linear")?,
            prediction: Prediction::from_config(config)?,
            clip_sample: config
                .bool("clip_sample", true)?
                .then_some(config.f64("clip_sample_range", 1.0)?),
            timesteps: Vec::new(),
        })
    }

    fn alpha_at(&self, t: f64) -> f64 {
        if t >= 0.0 {
            self.schedule.alphas_cumprod[t as usize]
        } else {
            1.0
        }
    }
}

impl<T: SampleTensor> Scheduler<T> for Ddpm {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        check_steps(steps, self.schedule.train_steps)?;
        self.timesteps =
            spaced_timesteps(&self.config, "leading", self.schedule.train_steps, steps)?;
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
        let prev_t = self.timesteps.get(index + 1).copied().unwrap_or(-1.0);
        let (alpha, alpha_prev) = (self.alpha_at(t), self.alpha_at(prev_t));
        let (beta, beta_prev) = (1.0 - alpha, 1.0 - alpha_prev);
        let current_alpha = alpha / alpha_prev;
        let current_beta = 1.0 - current_alpha;
        let (x0, _) = vp_predictions(self.prediction, alpha);
        let mut x0 = x0.apply(sample, model_output)?;
        if let Some(limit) = self.clip_sample {
            x0 = x0.clamp_abs(limit)?;
        }
        let x0_coeff = alpha_prev.sqrt() * current_beta / beta;
        let sample_coeff = current_alpha.sqrt() * beta_prev / beta;
        if t <= 0.0 {
            return T::combine(&[(x0_coeff, &x0), (sample_coeff, sample)]);
        }
        let variance = (beta_prev / beta * current_beta).max(1e-20);
        let noise = noise()?;
        T::combine(&[
            (x0_coeff, &x0),
            (sample_coeff, sample),
            (variance.sqrt(), &noise),
        ])
    }

    fn add_noise(&self, original: &T, noise: &T, index: usize) -> Result<T> {
        let alpha = self.alpha_at(self.timesteps[index]);
        vp_add_noise(alpha, original, noise)
    }
}
