//! The forward process models are trained on (`DDPMScheduler.add_noise` and the training
//! target of diffusers' training scripts), for fine-tuning: a clean sample noised to a
//! training timestep, and what the model should predict from it.

use super::schedule::{NoiseSchedule, vp_add_noise};
use super::{Prediction, SampleTensor, SchedulerConfig};
use crate::error::Result;

pub struct NoiseProcess {
    schedule: NoiseSchedule,
    prediction: Prediction,
}

impl NoiseProcess {
    /// The process of a model folder's `scheduler_config.json` (DDPMScheduler's defaults).
    pub fn from_config(config: &SchedulerConfig) -> Result<NoiseProcess> {
        Ok(NoiseProcess {
            schedule: NoiseSchedule::from_config(config, 0.0001, 0.02, "linear")?,
            prediction: Prediction::from_config(config)?,
        })
    }

    /// The number of training timesteps (`num_train_timesteps`).
    pub fn train_steps(&self) -> usize {
        self.schedule.train_steps
    }

    /// `x0` noised to training timestep `t`: sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε.
    pub fn add_noise<T: SampleTensor>(&self, x0: &T, noise: &T, t: usize) -> Result<T> {
        vp_add_noise(self.schedule.alphas_cumprod[t], x0, noise)
    }

    /// What the model should output for `x0` noised by `noise` at `t`: the noise, the
    /// velocity sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x0 (`get_velocity`), or the sample itself.
    pub fn target<T: SampleTensor>(&self, x0: &T, noise: &T, t: usize) -> Result<T> {
        let alpha = self.schedule.alphas_cumprod[t];
        match self.prediction {
            Prediction::Epsilon => Ok(noise.clone()),
            Prediction::VPrediction => {
                T::combine(&[(alpha.sqrt(), noise), (-(1.0 - alpha).sqrt(), x0)])
            }
            Prediction::Sample => Ok(x0.clone()),
        }
    }
}
