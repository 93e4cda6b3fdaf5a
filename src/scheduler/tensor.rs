//! The tensor arithmetic schedulers use, for host tensors (reference and tests) and GPU
//! tensors (the pipeline).

use crate::engine::{GpuTensor, HostTensor};
use crate::error::{Result, invalid};

pub trait SampleTensor: Clone {
    /// `sum(coefficient * tensor)`; all tensors have one shape.
    fn combine(terms: &[(f64, &Self)]) -> Result<Self>;
    /// Elements clamped to `[-limit, limit]`.
    fn clamp_abs(&self, limit: f64) -> Result<Self>;
}

impl SampleTensor for GpuTensor {
    fn combine(terms: &[(f64, &Self)]) -> Result<Self> {
        let terms: Vec<(f32, &GpuTensor)> = terms.iter().map(|&(c, t)| (c as f32, t)).collect();
        Ok(GpuTensor::combine(&terms)?)
    }

    fn clamp_abs(&self, limit: f64) -> Result<Self> {
        Ok(self.clamp(-limit as f32, limit as f32)?)
    }
}

impl SampleTensor for HostTensor {
    fn combine(terms: &[(f64, &Self)]) -> Result<Self> {
        let Some((_, first)) = terms.first() else {
            return invalid("combine of no tensors");
        };
        let mut out = vec![0.0f32; first.len()];
        for (c, t) in terms {
            if t.shape != first.shape {
                return invalid(format!(
                    "combine of shapes {:?} and {:?}",
                    first.shape, t.shape
                ));
            }
            for (o, v) in out.iter_mut().zip(t.to_f32().iter()) {
                *o += *c as f32 * v;
            }
        }
        Ok(HostTensor::f32(first.shape.clone(), out))
    }

    fn clamp_abs(&self, limit: f64) -> Result<Self> {
        let limit = limit as f32;
        Ok(HostTensor::f32(
            self.shape.clone(),
            self.to_f32()
                .iter()
                .map(|v| v.clamp(-limit, limit))
                .collect(),
        ))
    }
}
