//! Euler (Karras et al. 2022, Algorithm 2 without churn) over k-diffusion sigmas, and its
//! ancestral variant (Euler a), which draws fresh noise from the pipeline's generator.

use super::schedule::{
    NoiseSchedule, check_steps, interp, k_prediction_x0, linspace, spaced_timesteps,
};
use super::{NoiseSource, Prediction, SampleTensor, Scheduler, SchedulerConfig};
use crate::error::{Result, invalid};

/// Timesteps and sigmas of the k-diffusion schedulers (Euler, Euler ancestral).
pub struct KSchedule {
    pub timesteps: Vec<f64>,
    /// One per timestep plus the final 0.
    pub sigmas: Vec<f64>,
    pub init_noise_sigma: f64,
}

impl KSchedule {
    /// diffusers' float timesteps for each spacing (cast to f32) and interpolated sigmas.
    pub fn new(
        config: &SchedulerConfig,
        schedule: &NoiseSchedule,
        steps: usize,
    ) -> Result<KSchedule> {
        check_steps(steps, schedule.train_steps)?;
        let train = schedule.train_steps;
        let spacing = config.string("timestep_spacing", "linspace");
        // linspace keeps fractional timesteps (as f32); the others are DDIM's integers.
        let timesteps: Vec<f64> = match spacing.as_str() {
            "linspace" => linspace(0.0, (train - 1) as f64, steps)
                .iter()
                .rev()
                .map(|&t| t as f32 as f64)
                .collect(),
            _ => spaced_timesteps(config, "linspace", train, steps)?,
        };
        if config.string("interpolation_type", "linear") != "linear" {
            return invalid("only interpolation_type `linear` is supported");
        }
        let all = schedule.sigmas();
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &all)).collect();
        sigmas.push(0.0);
        let sigmas: Vec<f64> = sigmas.iter().map(|&s| s as f32 as f64).collect();
        let max = sigmas.iter().cloned().fold(0.0, f64::max);
        let init_noise_sigma = if spacing == "leading" {
            (max * max + 1.0).sqrt()
        } else {
            max
        };
        Ok(KSchedule {
            timesteps,
            sigmas,
            init_noise_sigma,
        })
    }
}

pub struct Euler {
    config: SchedulerConfig,
    schedule: NoiseSchedule,
    prediction: Prediction,
    /// Euler ancestral: step to a lower noise level, then add fresh noise up to the next.
    ancestral: bool,
    k: KSchedule,
}

impl Euler {
    pub fn new(config: &SchedulerConfig, ancestral: bool) -> Result<Self> {
        if config.bool("use_karras_sigmas", false)? {
            return invalid("Euler with Karras sigmas is not supported (use dpm++2m-karras)");
        }
        Ok(Euler {
            config: config.clone(),
            schedule: NoiseSchedule::from_config(config, 0.0001, 0.02, "linear")?,
            prediction: Prediction::from_config(config)?,
            ancestral,
            k: KSchedule {
                timesteps: Vec::new(),
                sigmas: Vec::new(),
                init_noise_sigma: 1.0,
            },
        })
    }
}

impl<T: SampleTensor> Scheduler<T> for Euler {
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
        let (sigma, next) = (self.k.sigmas[index], self.k.sigmas[index + 1]);
        let x0 = k_prediction_x0(self.prediction, sigma);
        // The ancestral variant steps down to sigma_down and re-noises by sigma_up.
        let (target, up) = if self.ancestral {
            let up = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).sqrt();
            ((next * next - up * up).sqrt(), up)
        } else {
            (next, 0.0)
        };
        // sample + (sample - x0) / sigma * (target - sigma), expanded in (sample, model output).
        let dt = (target - sigma) / sigma;
        let sample_coeff = 1.0 + dt - dt * x0.sample;
        if !self.ancestral {
            return T::combine(&[(sample_coeff, sample), (-dt * x0.model, model_output)]);
        }
        let noise = noise()?;
        T::combine(&[
            (sample_coeff, sample),
            (-dt * x0.model, model_output),
            (up, &noise),
        ])
    }

    fn add_noise(&self, original: &T, noise: &T, index: usize) -> Result<T> {
        T::combine(&[(1.0, original), (self.k.sigmas[index], noise)])
    }
}
