//! What the schedulers share: the training noise schedule (betas -> cumulative alphas,
//! computed in f32 as torch does), numpy-style spacing helpers, and the model-output
//! conversions written as linear forms in (sample, model output).

use super::{Prediction, SchedulerConfig};
use crate::error::{Result, invalid};

/// The training-time noise schedule.
#[derive(Clone, Debug)]
pub struct NoiseSchedule {
    pub train_steps: usize,
    /// ᾱ_t for t in 0..train_steps.
    pub alphas_cumprod: Vec<f64>,
}

impl NoiseSchedule {
    /// Reads `num_train_timesteps`, `beta_start`, `beta_end`, `beta_schedule`, `trained_betas`
    /// with the given class defaults.
    pub fn from_config(
        config: &SchedulerConfig,
        beta_start: f64,
        beta_end: f64,
        beta_schedule: &str,
    ) -> Result<Self> {
        let n = config.usize("num_train_timesteps", 1000)?;
        if n < 2 {
            return invalid("num_train_timesteps must be at least 2");
        }
        let (start, end) = (
            config.f64("beta_start", beta_start)?,
            config.f64("beta_end", beta_end)?,
        );
        let betas: Vec<f32> = if let Some(trained) = config.floats("trained_betas") {
            trained.iter().map(|&b| b as f32).collect()
        } else {
            match config.string("beta_schedule", beta_schedule).as_str() {
                "linear" => torch_linspace_f32(start as f32, end as f32, n),
                "scaled_linear" => {
                    torch_linspace_f32((start as f32).sqrt(), (end as f32).sqrt(), n)
                        .iter()
                        .map(|b| b * b)
                        .collect()
                }
                "squaredcos_cap_v2" => cosine_betas(n),
                other => return invalid(format!("beta_schedule `{other}` is not supported")),
            }
        };
        if config.bool("rescale_betas_zero_snr", false)? {
            return invalid("rescale_betas_zero_snr is not supported");
        }
        let mut product = 1.0f32;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                product *= 1.0 - b;
                product as f64
            })
            .collect();
        Ok(NoiseSchedule {
            train_steps: betas.len(),
            alphas_cumprod,
        })
    }

    /// σ_t = sqrt((1 - ᾱ_t) / ᾱ_t) for every training step (k-diffusion's sigmas), in f32
    /// as diffusers computes them.
    pub fn sigmas(&self) -> Vec<f64> {
        self.alphas_cumprod
            .iter()
            .map(|&a| {
                let a = a as f32;
                ((1.0 - a) / a).sqrt() as f64
            })
            .collect()
    }
}

/// `torch.linspace(start, end, n, dtype=float32)`: symmetric evaluation from both ends.
fn torch_linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

/// The Glide cosine schedule (`betas_for_alpha_bar`, max beta 0.999).
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `np.linspace(start, stop, n)` in f64.
pub fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    (0..n)
        .map(|i| {
            if i == n - 1 {
                stop
            } else {
                start + step * i as f64
            }
        })
        .collect()
}

/// Integer timesteps for the `linspace`, `leading` and `trailing` spacings, descending,
/// as DDIM, DDPM and LCM-style schedulers compute them (`np.round` is round-half-even).
pub fn spaced_timesteps(
    config: &SchedulerConfig,
    default_spacing: &str,
    train_steps: usize,
    steps: usize,
) -> Result<Vec<f64>> {
    let offset = config.usize("steps_offset", 0)? as f64;
    Ok(
        match config.string("timestep_spacing", default_spacing).as_str() {
            "linspace" => linspace(0.0, (train_steps - 1) as f64, steps)
                .iter()
                .rev()
                .map(|t| t.round_ties_even())
                .collect(),
            "leading" => {
                let ratio = (train_steps / steps) as f64;
                (0..steps)
                    .rev()
                    .map(|i| i as f64 * ratio + offset)
                    .collect()
            }
            "trailing" => {
                // np.arange(train_steps, 0, -ratio): element i is train_steps - i * ratio.
                let ratio = train_steps as f64 / steps as f64;
                let count = (train_steps as f64 / ratio).ceil() as usize;
                (0..count)
                    .map(|i| (train_steps as f64 - i as f64 * ratio).round_ties_even() - 1.0)
                    .collect()
            }
            other => return invalid(format!("timestep_spacing `{other}` is not supported")),
        },
    )
}

/// `np.interp(x, 0..len, values)`.
pub fn interp(x: f64, values: &[f64]) -> f64 {
    if x <= 0.0 {
        return values[0];
    }
    let last = values.len() - 1;
    if x >= last as f64 {
        return values[last];
    }
    let i = x.floor() as usize;
    let w = x - i as f64;
    values[i] + w * (values[i + 1] - values[i])
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose log-sigma is `sigma`'s.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let below = log_sigmas.iter().filter(|&&l| log_sigma - l >= 0.0).count();
    let low = below.saturating_sub(1).min(log_sigmas.len() - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// Karras et al. (2022) sigmas, rho = 7, from `sigmas[0]` (max) to `sigmas.last()` (min).
pub fn karras_sigmas(sigmas: &[f64], steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min, max) = (*sigmas.last().unwrap(), sigmas[0]);
    let (min_inv, max_inv) = (min.powf(1.0 / rho), max.powf(1.0 / rho));
    linspace(0.0, 1.0, steps)
        .iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// A linear form `a * sample + b * model_output`.
#[derive(Clone, Copy, Debug)]
pub struct Linear {
    pub sample: f64,
    pub model: f64,
}

impl Linear {
    pub fn apply<T: super::SampleTensor>(self, sample: &T, model: &T) -> Result<T> {
        T::combine(&[(self.sample, sample), (self.model, model)])
    }
}

/// The predicted clean sample x0 and noise ε as linear forms, for a variance-preserving
/// step with cumulative alpha `alpha_prod` (DDIM, DDPM, LCM, PNDM).
pub fn vp_predictions(prediction: Prediction, alpha_prod: f64) -> (Linear, Linear) {
    let (a, b) = (alpha_prod.sqrt(), (1.0 - alpha_prod).sqrt());
    match prediction {
        Prediction::Epsilon => (
            Linear {
                sample: 1.0 / a,
                model: -b / a,
            },
            Linear {
                sample: 0.0,
                model: 1.0,
            },
        ),
        Prediction::VPrediction => (
            Linear {
                sample: a,
                model: -b,
            },
            Linear {
                sample: b,
                model: a,
            },
        ),
        Prediction::Sample => (
            Linear {
                sample: 0.0,
                model: 1.0,
            },
            Linear {
                sample: 1.0 / b,
                model: -a / b,
            },
        ),
    }
}

/// x0 for k-diffusion style schedulers (Euler) at noise level `sigma`.
pub fn k_prediction_x0(prediction: Prediction, sigma: f64) -> Linear {
    match prediction {
        Prediction::Epsilon => Linear {
            sample: 1.0,
            model: -sigma,
        },
        Prediction::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            Linear {
                sample: 1.0 / s2,
                model: -sigma / s2.sqrt(),
            }
        }
        Prediction::Sample => Linear {
            sample: 0.0,
            model: 1.0,
        },
    }
}

/// `add_noise` of variance-preserving schedulers: sqrt(ᾱ) x0 + sqrt(1 - ᾱ) ε.
pub fn vp_add_noise<T: super::SampleTensor>(alpha_prod: f64, original: &T, noise: &T) -> Result<T> {
    T::combine(&[
        (alpha_prod.sqrt(), original),
        ((1.0 - alpha_prod).sqrt(), noise),
    ])
}

/// Checks a requested step count against the training schedule.
pub fn check_steps(steps: usize, train_steps: usize) -> Result<()> {
    if steps == 0 {
        return invalid("the number of steps must be at least 1");
    }
    if steps > train_steps {
        return invalid(format!(
            "{steps} steps exceed the {train_steps} training timesteps"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigma_to_t_inverts_the_schedule() {
        let schedule = NoiseSchedule::from_config(
            &SchedulerConfig::default(),
            0.00085,
            0.012,
            "scaled_linear",
        )
        .unwrap();
        let log: Vec<f64> = schedule.sigmas().iter().map(|s| s.ln()).collect();
        for t in [0usize, 1, 500, 998, 999] {
            assert!(
                (sigma_to_t(log[t].exp(), &log) - t as f64).abs() < 1e-6,
                "t = {t}"
            );
        }
    }

    #[test]
    fn spacing_matches_numpy() {
        let config = SchedulerConfig::default().with("steps_offset", 1.into());
        assert_eq!(
            spaced_timesteps(&config, "leading", 1000, 4).unwrap(),
            vec![751.0, 501.0, 251.0, 1.0]
        );
        assert_eq!(
            spaced_timesteps(&config, "trailing", 1000, 3).unwrap(),
            vec![999.0, 666.0, 332.0]
        );
        assert_eq!(
            spaced_timesteps(&config, "linspace", 1000, 3).unwrap(),
            vec![999.0, 500.0, 0.0]
        );
    }
}
