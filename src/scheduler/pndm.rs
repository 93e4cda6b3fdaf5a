//! PNDM (Liu et al. 2022) in its PLMS form (`skip_prk_steps`), the SD 1.x default: a
//! linear multistep method over the last four noise predictions.

use super::schedule::{NoiseSchedule, check_steps, spaced_timesteps, vp_add_noise};
use super::{NoiseSource, Prediction, SampleTensor, Scheduler, SchedulerConfig};
use crate::error::{Result, invalid};

pub struct Pndm<T> {
    config: SchedulerConfig,
    schedule: NoiseSchedule,
    prediction: Prediction,
    final_alpha_cumprod: f64,
    timesteps: Vec<f64>,
    step_ratio: i64,
    /// Past model outputs, newest last (at most four).
    ets: Vec<T>,
    /// The sample before the first step, reused by the second (which repeats its timestep).
    first_sample: Option<T>,
    counter: usize,
}

impl<T> Pndm<T> {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        if !config.bool("skip_prk_steps", false)? {
            return invalid(
                "PNDM with Runge-Kutta warm-up steps (skip_prk_steps false) is not supported",
            );
        }
        let prediction = Prediction::from_config(config)?;
        if prediction == Prediction::Sample {
            return invalid("PNDM does not support prediction_type `sample`");
        }
        let schedule = NoiseSchedule::from_config(config, 0.0001, 0.02, "linear")?;
        let final_alpha_cumprod = if config.bool("set_alpha_to_one", false)? {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        Ok(Pndm {
            config: config.clone(),
            schedule,
            prediction,
            final_alpha_cumprod,
            timesteps: Vec::new(),
            step_ratio: 1,
            ets: Vec::new(),
            first_sample: None,
            counter: 0,
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

impl<T: SampleTensor> Scheduler<T> for Pndm<T> {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        check_steps(steps, self.schedule.train_steps)?;
        let train = self.schedule.train_steps;
        let mut ascending = spaced_timesteps(&self.config, "leading", train, steps)?;
        ascending.reverse();
        // PLMS evaluates the model twice at the second timestep: [t_n, ..., t_2, t_2, t_1] reversed.
        let n = ascending.len();
        let mut plms: Vec<f64> = ascending[..n - 1].to_vec();
        plms.extend_from_slice(&ascending[n.saturating_sub(2)..n - 1]);
        plms.push(ascending[n - 1]);
        plms.reverse();
        self.timesteps = plms;
        self.step_ratio = (train / steps) as i64;
        self.ets.clear();
        self.first_sample = None;
        self.counter = 0;
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
        let mut timestep = self.timesteps[index] as i64;
        let mut prev_timestep = timestep - self.step_ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.remove(0);
            }
            self.ets.push(model_output.clone());
        } else {
            prev_timestep = timestep;
            timestep += self.step_ratio;
        }
        let e = &self.ets;
        let k = e.len();
        let (output, sample) = match (k, self.counter) {
            (1, 0) => {
                self.first_sample = Some(sample.clone());
                (model_output.clone(), sample.clone())
            }
            (1, 1) => {
                let first = self
                    .first_sample
                    .take()
                    .ok_or_else(|| crate::error::Error::Invalid("PLMS state lost".into()))?;
                (T::combine(&[(0.5, model_output), (0.5, &e[0])])?, first)
            }
            (2, _) => (T::combine(&[(1.5, &e[1]), (-0.5, &e[0])])?, sample.clone()),
            (3, _) => (
                T::combine(&[
                    (23.0 / 12.0, &e[2]),
                    (-16.0 / 12.0, &e[1]),
                    (5.0 / 12.0, &e[0]),
                ])?,
                sample.clone(),
            ),
            _ => (
                T::combine(&[
                    (55.0 / 24.0, &e[k - 1]),
                    (-59.0 / 24.0, &e[k - 2]),
                    (37.0 / 24.0, &e[k - 3]),
                    (-9.0 / 24.0, &e[k - 4]),
                ])?,
                sample.clone(),
            ),
        };
        self.counter += 1;

        let (alpha, alpha_prev) = (self.alpha_at(timestep), self.alpha_at(prev_timestep));
        let (beta, beta_prev) = (1.0 - alpha, 1.0 - alpha_prev);
        let eps = match self.prediction {
            Prediction::VPrediction => {
                T::combine(&[(alpha.sqrt(), &output), (beta.sqrt(), &sample)])?
            }
            _ => output,
        };
        let sample_coeff = (alpha_prev / alpha).sqrt();
        let denom = alpha * beta_prev.sqrt() + (alpha * beta * alpha_prev).sqrt();
        T::combine(&[
            (sample_coeff, &sample),
            (-(alpha_prev - alpha) / denom, &eps),
        ])
    }

    fn add_noise(&self, original: &T, noise: &T, index: usize) -> Result<T> {
        let alpha = self.alpha_at(self.timesteps[index] as i64);
        vp_add_noise(alpha, original, noise)
    }
}
