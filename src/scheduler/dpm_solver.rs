//! DPM-Solver++ (Lu et al. 2022), multistep, order 2, midpoint: each step reuses the
//! previous step's data prediction. Optionally on Karras sigmas (`dpm++2m-karras`).

use super::schedule::{
    Linear, NoiseSchedule, check_steps, interp, karras_sigmas, linspace, sigma_to_t,
};
use super::{NoiseSource, Prediction, SampleTensor, Scheduler, SchedulerConfig};
use crate::error::{Result, invalid};

pub struct DpmSolver<T> {
    config: SchedulerConfig,
    schedule: NoiseSchedule,
    prediction: Prediction,
    karras: bool,
    lower_order_final: bool,
    final_sigma_zero: bool,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    /// The data prediction of the previous step.
    previous: Option<T>,
}

impl<T> DpmSolver<T> {
    pub fn new(config: &SchedulerConfig, karras: bool) -> Result<Self> {
        let algorithm = config.string("algorithm_type", "dpmsolver++");
        let solver = config.string("solver_type", "midpoint");
        let order = config.usize("solver_order", 2)?;
        if algorithm != "dpmsolver++" || solver != "midpoint" || order != 2 {
            return invalid(format!(
                "DPM-Solver supports dpmsolver++ / midpoint / order 2 (config: {algorithm} / {solver} / {order})"
            ));
        }
        if config.bool("thresholding", false)? {
            return invalid("DPM-Solver thresholding is not supported");
        }
        let final_type = config.string("final_sigmas_type", "zero");
        if final_type != "zero" && final_type != "sigma_min" {
            return invalid(format!("final_sigmas_type `{final_type}` is not supported"));
        }
        Ok(DpmSolver {
            config: config.clone(),
            schedule: NoiseSchedule::from_config(config, 0.0001, 0.02, "linear")?,
            prediction: Prediction::from_config(config)?,
            karras: karras || config.bool("use_karras_sigmas", false)?,
            lower_order_final: config.bool("lower_order_final", true)?,
            final_sigma_zero: final_type == "zero",
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            previous: None,
        })
    }

    /// (α_t, σ_t) of the variance-preserving process at k-diffusion sigma `sigma`.
    fn alpha_sigma(sigma: f64) -> (f64, f64) {
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        (alpha, sigma * alpha)
    }

    fn lambda(sigma: f64) -> f64 {
        let (a, s) = Self::alpha_sigma(sigma);
        a.ln() - s.ln()
    }
}

impl<T: SampleTensor> Scheduler<T> for DpmSolver<T> {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        check_steps(steps, self.schedule.train_steps)?;
        let train = self.schedule.train_steps;
        let offset = self.config.usize("steps_offset", 0)? as f64;
        let mut timesteps: Vec<f64> =
            match self.config.string("timestep_spacing", "linspace").as_str() {
                "linspace" => {
                    let mut t: Vec<f64> = linspace(0.0, (train - 1) as f64, steps + 1)
                        .iter()
                        .map(|t| t.round_ties_even())
                        .collect();
                    t.reverse();
                    t.pop();
                    t
                }
                "leading" => {
                    let ratio = (train / (steps + 1)) as f64;
                    (1..=steps)
                        .rev()
                        .map(|i| i as f64 * ratio + offset)
                        .collect()
                }
                "trailing" => {
                    let ratio = train as f64 / steps as f64;
                    let count = (train as f64 / ratio).ceil() as usize;
                    (0..count)
                        .map(|i| (train as f64 - i as f64 * ratio).round_ties_even() - 1.0)
                        .collect()
                }
                other => return invalid(format!("timestep_spacing `{other}` is not supported")),
            };
        let all = self.schedule.sigmas();
        let mut sigmas: Vec<f64> = if self.karras {
            let descending: Vec<f64> = all.iter().rev().cloned().collect();
            let sigmas = karras_sigmas(&descending, steps);
            let log: Vec<f64> = all.iter().map(|s| s.ln()).collect();
            timesteps = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &log).round_ties_even())
                .collect();
            sigmas
        } else {
            timesteps.iter().map(|&t| interp(t, &all)).collect()
        };
        sigmas.push(if self.final_sigma_zero { 0.0 } else { all[0] });
        self.sigmas = sigmas.iter().map(|&s| s as f32 as f64).collect();
        self.timesteps = timesteps;
        self.previous = None;
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
        let steps = self.timesteps.len();
        let sigma_s = self.sigmas[index];
        let (alpha_s, sigma_s_vp) = Self::alpha_sigma(sigma_s);
        let x0 = match self.prediction {
            Prediction::Epsilon => Linear {
                sample: 1.0 / alpha_s,
                model: -sigma_s_vp / alpha_s,
            },
            Prediction::VPrediction => Linear {
                sample: alpha_s,
                model: -sigma_s_vp,
            },
            Prediction::Sample => Linear {
                sample: 0.0,
                model: 1.0,
            },
        }
        .apply(sample, model_output)?;

        let sigma_t = self.sigmas[index + 1];
        let (alpha_t, sigma_t_vp) = Self::alpha_sigma(sigma_t);
        let h = Self::lambda(sigma_t) - Self::lambda(sigma_s);
        let phi = alpha_t * ((-h).exp() - 1.0); // α_t (e^{-h} - 1)
        let last = index == steps - 1;
        let lower_order_final =
            last && (self.lower_order_final && steps < 15 || self.final_sigma_zero);
        let result = match (&self.previous, lower_order_final) {
            (Some(prev), false) => {
                let h0 = Self::lambda(sigma_s) - Self::lambda(self.sigmas[index - 1]);
                let r0 = h0 / h;
                // D0 = x0, D1 = (x0 - prev) / r0; x_t = σ_t/σ_s x - φ D0 - φ/2 D1.
                let d1 = 0.5 * phi / r0;
                T::combine(&[
                    (sigma_t_vp / sigma_s_vp, sample),
                    (-phi - d1, &x0),
                    (d1, prev),
                ])?
            }
            _ => T::combine(&[(sigma_t_vp / sigma_s_vp, sample), (-phi, &x0)])?,
        };
        self.previous = Some(x0);
        Ok(result)
    }

    fn add_noise(&self, original: &T, noise: &T, index: usize) -> Result<T> {
        let (alpha, sigma) = Self::alpha_sigma(self.sigmas[index]);
        T::combine(&[(alpha, original), (sigma, noise)])
    }
}
