//! Noise schedulers with diffusers' semantics and configuration keys, one file each behind
//! one trait. Coefficients are computed once on the host; each step is a few linear
//! combinations of tensors, so with GPU tensors the latents never leave the GPU.
//!
//! A scheduler is chosen like diffusers' `NewScheduler.from_config(pipe.scheduler.config)`:
//! keys present in the model's `scheduler_config.json` win, the class's defaults fill the rest.

mod config;
mod ddim;
mod ddpm;
mod dpm_solver;
mod euler;
mod lcm;
mod pndm;
mod schedule;
mod tensor;
mod training;

pub use config::SchedulerConfig;
pub use tensor::SampleTensor;
pub use training::NoiseProcess;

use crate::error::{Result, invalid};

/// What the model predicts (`prediction_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
    Sample,
}

impl Prediction {
    fn from_config(config: &SchedulerConfig) -> Result<Prediction> {
        match config.string("prediction_type", "epsilon").as_str() {
            "epsilon" => Ok(Prediction::Epsilon),
            "v_prediction" => Ok(Prediction::VPrediction),
            "sample" => Ok(Prediction::Sample),
            other => invalid(format!("prediction_type `{other}` is not supported")),
        }
    }
}

/// Source of Gaussian noise for stochastic steps, called at most once per step.
pub type NoiseSource<'a, T> = dyn FnMut() -> Result<T> + 'a;

pub trait Scheduler<T: SampleTensor> {
    /// Discretises the schedule into `steps` inference steps (`set_timesteps`).
    fn set_timesteps(&mut self, steps: usize) -> Result<()>;

    /// The model's timestep input at each step.
    fn timesteps(&self) -> &[f64];

    /// Standard deviation of the initial noise (`init_noise_sigma`).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// Model evaluations per step (`order`): img2img skips `order` entries per skipped step.
    fn order(&self) -> usize {
        1
    }

    /// Scales the model input at step `index` (`scale_model_input`).
    fn scale_model_input(&self, sample: &T, _index: usize) -> Result<T> {
        Ok(sample.clone())
    }

    /// One denoising step at `index` into [`Scheduler::timesteps`] (`step`).
    fn step(
        &mut self,
        model_output: &T,
        index: usize,
        sample: &T,
        noise: &mut NoiseSource<T>,
    ) -> Result<T>;

    /// Noises a clean sample to the noise level of step `index` (`add_noise`).
    fn add_noise(&self, original: &T, noise: &T, index: usize) -> Result<T>;
}

/// The schedulers websd offers, by their CLI names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedulerKind {
    Ddim,
    Pndm,
    Euler,
    EulerAncestral,
    DpmSolverMultistep,
    DpmSolverMultistepKarras,
    Lcm,
    Ddpm,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 8] = [
        SchedulerKind::Ddim,
        SchedulerKind::Pndm,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmSolverMultistep,
        SchedulerKind::DpmSolverMultistepKarras,
        SchedulerKind::Lcm,
        SchedulerKind::Ddpm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::DpmSolverMultistep => "dpm++2m",
            SchedulerKind::DpmSolverMultistepKarras => "dpm++2m-karras",
            SchedulerKind::Lcm => "lcm",
            SchedulerKind::Ddpm => "ddpm",
        }
    }

    pub fn parse(name: &str) -> Result<SchedulerKind> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
                crate::error::Error::Invalid(format!(
                    "unknown scheduler `{name}` (choose one of {})",
                    names.join(", ")
                ))
            })
    }

    /// The kind a `_class_name` of scheduler_config.json names, if websd has it.
    pub fn from_class_name(class: &str) -> Option<SchedulerKind> {
        Some(match class {
            "DDIMScheduler" => SchedulerKind::Ddim,
            "PNDMScheduler" => SchedulerKind::Pndm,
            "EulerDiscreteScheduler" => SchedulerKind::Euler,
            "EulerAncestralDiscreteScheduler" => SchedulerKind::EulerAncestral,
            "DPMSolverMultistepScheduler" => SchedulerKind::DpmSolverMultistep,
            "LCMScheduler" => SchedulerKind::Lcm,
            "DDPMScheduler" => SchedulerKind::Ddpm,
            _ => return None,
        })
    }

    /// Builds the scheduler from a model's configuration.
    pub fn build<T: SampleTensor + 'static>(
        self,
        config: &SchedulerConfig,
    ) -> Result<Box<dyn Scheduler<T>>> {
        Ok(match self {
            SchedulerKind::Ddim => Box::new(ddim::Ddim::new(config)?),
            SchedulerKind::Pndm => Box::new(pndm::Pndm::new(config)?),
            SchedulerKind::Euler => Box::new(euler::Euler::new(config, false)?),
            SchedulerKind::EulerAncestral => Box::new(euler::Euler::new(config, true)?),
            SchedulerKind::DpmSolverMultistep => {
                Box::new(dpm_solver::DpmSolver::new(config, false)?)
            }
            SchedulerKind::DpmSolverMultistepKarras => {
                Box::new(dpm_solver::DpmSolver::new(config, true)?)
            }
            SchedulerKind::Lcm => Box::new(lcm::Lcm::new(config)?),
            SchedulerKind::Ddpm => Box::new(ddpm::Ddpm::new(config)?),
        })
    }
}
