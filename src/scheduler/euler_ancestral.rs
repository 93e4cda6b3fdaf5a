//! Euler ancestral: an Euler step to a lower noise level, then fresh noise back up to the
//! next level, drawn from the pipeline's generator.

use super::euler::KSchedule;
use super::schedule::{NoiseSchedule, k_prediction_x0};
use super::{NoiseSource, Prediction, SampleTensor, Scheduler, SchedulerConfig};
use crate::error::Result;

pub struct EulerAncestral {
    config: SchedulerConfig,
    schedule: NoiseSchedule,
    prediction: Prediction,
    k: KSchedule,
}

impl EulerAncestral {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        Ok(EulerAncestral {
            config: config.clone(),
            schedule: NoiseSchedule::from_config(config, 0.0001, 0.02, "linear")?,
            prediction: Prediction::from_config(config)?,
            k: KSchedule {
                timesteps: Vec::new(),
                sigmas: Vec::new(),
                init_noise_sigma: 1.0,
            },
        })
    }
}

impl<T: SampleTensor> Scheduler<T> for EulerAncestral {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        self.k = KSchedule::new(&self.config, &self.schedule, steps)?;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.k.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.k.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &T, index: usize) -> Result<T> {
        let sigma = self.k.sigmas[index];
        T::combine(&[(1.0 / (sigma * sigma + 1.0).sqrt(), sample)])
    }

    fn step(
        &mut self,
        model_output: &T,
        index: usize,
        sample: &T,
        noise: &mut NoiseSource<T>,
    ) -> Result<T> {
        let (from, to) = (self.k.sigmas[index], self.k.sigmas[index + 1]);
        let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let down = (to * to - up * up).sqrt();
        let x0 = k_prediction_x0(self.prediction, from);
        let dt = (down - from) / from;
        let noise = noise()?;
        T::combine(&[
            (1.0 + dt - dt * x0.sample, sample),
            (-dt * x0.model, model_output),
            (up, &noise),
        ])
    }

    fn add_noise(&self, original: &T, noise: &T, index: usize) -> Result<T> {
        T::combine(&[(1.0, original), (self.k.sigmas[index], noise)])
    }
}
