//! AdamW on GPU-resident parameters (`kernels/adam.wgsl`): moments live on the GPU beside
//! the parameters, gradients are clipped by their global norm on the GPU, and a step is one
//! submission with nothing read back.

use super::error::{Error, Result};
use super::gpu::{Gpu, GpuTensor};
use super::kernels::{KernelKey, LINEAR_WORKGROUP, Params, Shader, bind_buffers, grid};
use super::tensor::DType;

/// Gradient elements one workgroup of the squares phase sums (adam.wgsl: 256 x CHUNK).
const SQUARES_PER_WORKGROUP: usize = 256 * 16;

/// torch.optim.AdamW's hyperparameters, with optional clipping of the gradients' global
/// norm (torch.nn.utils.clip_grad_norm_) before each step.
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub max_grad_norm: Option<f32>,
}

impl Default for AdamW {
    /// torch's defaults.
    fn default() -> Self {
        AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            max_grad_norm: None,
        }
    }
}

/// The optimizer's state for one list of parameters.
pub struct Optimizer {
    gpu: Gpu,
    pub config: AdamW,
    steps: u32,
    /// First and second moments, one pair per parameter.
    moments: Vec<(wgpu::Buffer, wgpu::Buffer)>,
    shapes: Vec<Vec<usize>>,
    /// Per-workgroup sums of squared gradients, then [clip factor, norm].
    partials: wgpu::Buffer,
    clip: wgpu::Buffer,
}

impl Optimizer {
    pub fn new(gpu: &Gpu, config: AdamW, params: &[&GpuTensor]) -> Result<Optimizer> {
        if let Some(p) = params.iter().find(|p| p.dtype != DType::F32) {
            return Err(Error::Device(format!("parameter of type {:?}", p.dtype)));
        }
        let moments = params
            .iter()
            .map(|p| {
                let bytes = p.byte_len();
                (
                    gpu.storage_buffer("adam m", bytes),
                    gpu.storage_buffer("adam v", bytes),
                )
            })
            .collect();
        let partials: usize = params
            .iter()
            .map(|p| p.len().div_ceil(SQUARES_PER_WORKGROUP))
            .sum();
        Ok(Optimizer {
            gpu: gpu.clone(),
            config,
            steps: 0,
            moments,
            shapes: params.iter().map(|p| p.shape.clone()).collect(),
            partials: gpu.storage_buffer("adam partials", 4 * partials as u64),
            clip: gpu.storage_buffer("adam clip", 8),
        })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u32 {
        self.steps
    }

    /// One AdamW step: `params[i] -= update(grads[i])`, in place on the GPU.
    pub fn step(&mut self, params: &[&GpuTensor], grads: &[&GpuTensor]) -> Result<()> {
        let shapes_match = params.len() == self.shapes.len()
            && grads.len() == params.len()
            && params
                .iter()
                .zip(grads)
                .zip(&self.shapes)
                .all(|((p, g), s)| p.shape == *s && g.shape == *s);
        if !shapes_match {
            return Err(Error::Device(
                "the parameters or gradients differ from those the optimizer was made for".into(),
            ));
        }
        self.steps += 1;
        let c = &self.config;
        let t = self.steps as i32;
        let params_words = |n: usize, first_partial: usize, partials: usize| {
            Params::default()
                .u(n)
                .u(first_partial)
                .u(partials)
                .u(0)
                .f(c.lr)
                .f(c.beta1)
                .f(c.beta2)
                .f(c.eps)
                .f(c.weight_decay)
                .f(c.max_grad_norm.unwrap_or(0.0))
                .f(1.0 - c.beta1.powi(t))
                .f(1.0 - c.beta2.powi(t))
                .0
        };
        let gpu = &self.gpu;
        let max = gpu.limits.max_compute_workgroups_per_dimension;
        let mut launches = Vec::new();
        // Phase 0: squares of every gradient, each into its own run of partial sums.
        let mut first_partial = 0;
        for (i, g) in grads.iter().enumerate() {
            let groups = g.len().div_ceil(SQUARES_PER_WORKGROUP);
            let (m, v) = &self.moments[i];
            launches.push((
                0,
                params_words(g.len(), first_partial, 0),
                [&self.partials, &g.buffer, m, v, &self.clip],
                grid(groups, max),
            ));
            first_partial += groups;
        }
        // Phase 1: the norm and the clip factor.
        let (m0, v0) = &self.moments[0];
        launches.push((
            1,
            params_words(0, 0, first_partial),
            [&self.clip, &self.partials, m0, v0, &self.partials],
            [1, 1, 1],
        ));
        // Phase 2: the updates.
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let (m, v) = &self.moments[i];
            let groups = p.len().div_ceil(LINEAR_WORKGROUP as usize);
            launches.push((
                2,
                params_words(p.len(), 0, 0),
                [&p.buffer, &g.buffer, m, v, &self.clip],
                grid(groups, max),
            ));
        }

        let mut kernels = gpu.pipelines();
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            for (op, words, buffers, [x, y, z]) in &launches {
                let key = KernelKey {
                    op: Some(*op),
                    ..KernelKey::from(Shader::Adam)
                };
                let pipeline = kernels.get(&gpu.device, key);
                let uniform = gpu.params_buffer(words);
                let mut bindings = vec![uniform.as_entire_buffer_binding()];
                bindings.extend(buffers.iter().map(|b| b.as_entire_buffer_binding()));
                let bind_group = bind_buffers(&gpu.device, pipeline, &bindings);
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, &bind_group, &[]);
                pass.dispatch_workgroups(*x, *y, *z);
            }
        }
        gpu.queue.submit([encoder.finish()]);
        Ok(())
    }

    /// The global norm of the last step's gradients (before clipping). Reads back.
    pub async fn last_grad_norm(&self) -> Result<f32> {
        let both = GpuTensor {
            gpu: self.gpu.clone(),
            buffer: self.clip.clone(),
            dtype: DType::F32,
            shape: vec![2],
        };
        Ok(both.to_host().await?.to_f32()[1])
    }
}
