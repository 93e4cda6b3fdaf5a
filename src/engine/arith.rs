//! Tensor arithmetic on GPU tensors outside any graph: linear combinations, clamping, and
//! joining or splitting along the first axis. This is what a sampling loop needs between
//! graph runs, so its tensors never leave the GPU.

use super::error::{Error, Result};
use super::gpu::GpuTensor;
use super::kernels::{KernelKey, LINEAR_WORKGROUP, Params, Shader, bind_buffers, grid};
use super::tensor::DType;

/// Tensors the combine kernel reads per launch.
const TERMS_PER_LAUNCH: usize = 4;

impl GpuTensor {
    /// `sum(coefficient * tensor)` over tensors of one shape.
    pub fn combine(terms: &[(f32, &GpuTensor)]) -> Result<GpuTensor> {
        Self::combine_clamped(terms, None)
    }

    /// `self * factor`.
    pub fn scale(&self, factor: f32) -> Result<GpuTensor> {
        Self::combine(&[(factor, self)])
    }

    /// Elements clamped to `[low, high]`.
    pub fn clamp(&self, low: f32, high: f32) -> Result<GpuTensor> {
        Self::combine_clamped(&[(1.0, self)], Some((low, high)))
    }

    fn combine_clamped(
        terms: &[(f32, &GpuTensor)],
        clamp: Option<(f32, f32)>,
    ) -> Result<GpuTensor> {
        let first = terms
            .first()
            .ok_or_else(|| Error::Device("combine of no tensors".into()))?
            .1;
        if let Some((_, t)) = terms
            .iter()
            .find(|(_, t)| t.shape != first.shape || t.dtype != DType::F32)
        {
            return Err(Error::Input {
                name: "combine".into(),
                reason: format!(
                    "tensors {:?} and {:?} ({:?}) cannot be combined",
                    first.shape, t.shape, t.dtype
                ),
            });
        }
        // More terms than one launch takes: the partial sum becomes the next launch's first term.
        let mut rest = terms;
        let mut partial: Option<GpuTensor> = None;
        loop {
            let room = TERMS_PER_LAUNCH - partial.is_some() as usize;
            let (now, later) = rest.split_at(room.min(rest.len()));
            let mut list: Vec<(f32, &GpuTensor)> = partial.iter().map(|p| (1.0, p)).collect();
            list.extend_from_slice(now);
            let result = launch_combine(&list, if later.is_empty() { clamp } else { None });
            if later.is_empty() {
                return Ok(result);
            }
            partial = Some(result);
            rest = later;
        }
    }

    /// Joins tensors along the first axis (e.g. the unconditional and conditional halves of
    /// a classifier-free-guidance batch). Shapes must agree past the first axis.
    pub fn concat(parts: &[&GpuTensor]) -> Result<GpuTensor> {
        let first = parts
            .first()
            .ok_or_else(|| Error::Device("concat of no tensors".into()))?;
        if parts
            .iter()
            .any(|p| p.shape.get(1..) != first.shape.get(1..) || p.dtype != first.dtype)
        {
            return Err(Error::Input {
                name: "concat".into(),
                reason: "shapes differ past the first axis".into(),
            });
        }
        let mut shape = first.shape.clone();
        shape[0] = parts.iter().map(|p| p.shape[0]).sum();
        let gpu = &first.gpu;
        let bytes: u64 = parts.iter().map(|p| p.byte_len()).sum();
        let buffer = gpu.storage_buffer("concat", bytes);
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        let mut offset = 0;
        for part in parts {
            if part.byte_len() > 0 {
                encoder.copy_buffer_to_buffer(&part.buffer, 0, &buffer, offset, part.byte_len());
            }
            offset += part.byte_len();
        }
        gpu.queue.submit([encoder.finish()]);
        Ok(GpuTensor {
            gpu: gpu.clone(),
            buffer,
            dtype: first.dtype,
            shape,
        })
    }

    /// Splits along the first axis into `count` equal parts.
    pub fn split(&self, count: usize) -> Result<Vec<GpuTensor>> {
        let rows = *self.shape.first().unwrap_or(&0);
        if count == 0 || !rows.is_multiple_of(count) {
            return Err(Error::Input {
                name: "split".into(),
                reason: format!("{rows} rows do not split into {count}"),
            });
        }
        let mut shape = self.shape.clone();
        shape[0] = rows / count;
        let part_bytes = self.byte_len() / count as u64;
        let mut encoder = self.gpu.device.create_command_encoder(&Default::default());
        let parts = (0..count)
            .map(|i| {
                let buffer = self.gpu.storage_buffer("split", part_bytes);
                if part_bytes > 0 {
                    encoder.copy_buffer_to_buffer(
                        &self.buffer,
                        i as u64 * part_bytes,
                        &buffer,
                        0,
                        part_bytes,
                    );
                }
                GpuTensor {
                    gpu: self.gpu.clone(),
                    buffer,
                    dtype: self.dtype,
                    shape: shape.clone(),
                }
            })
            .collect();
        self.gpu.queue.submit([encoder.finish()]);
        Ok(parts)
    }

    /// The same data under another shape of equal size.
    pub fn reshape(&self, shape: Vec<usize>) -> Result<GpuTensor> {
        if shape.iter().product::<usize>() != self.len() {
            return Err(Error::Input {
                name: "reshape".into(),
                reason: format!("{:?} to {shape:?}", self.shape),
            });
        }
        Ok(GpuTensor {
            shape,
            ..self.clone()
        })
    }
}

fn launch_combine(terms: &[(f32, &GpuTensor)], clamp: Option<(f32, f32)>) -> GpuTensor {
    let first = terms[0].1;
    let gpu = &first.gpu;
    let n = first.len();
    let (low, high) = clamp.unwrap_or((0.0, 0.0));
    let mut params = Params::default()
        .u(n)
        .u(terms.len())
        .u(clamp.is_some() as usize)
        .u(0)
        .f(low)
        .f(high)
        .u(0)
        .u(0);
    for k in 0..TERMS_PER_LAUNCH {
        params = params.f(terms.get(k).map_or(0.0, |t| t.0));
    }
    let out = gpu.storage_buffer("combined", first.byte_len());
    let params = gpu.params_buffer(&params.0);
    let mut buffers = vec![
        params.as_entire_buffer_binding(),
        out.as_entire_buffer_binding(),
    ];
    buffers.extend((0..TERMS_PER_LAUNCH).map(|k| {
        terms
            .get(k)
            .unwrap_or(&terms[0])
            .1
            .buffer
            .as_entire_buffer_binding()
    }));
    let mut kernels = gpu.pipelines();
    let pipeline = kernels.get(&gpu.device, KernelKey::from(Shader::Combine));
    let bind_group = bind_buffers(&gpu.device, pipeline, &buffers);
    let mut encoder = gpu.device.create_command_encoder(&Default::default());
    {
        let mut pass = encoder.begin_compute_pass(&Default::default());
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        let [x, y, z] = grid(
            n.div_ceil(LINEAR_WORKGROUP as usize),
            gpu.limits.max_compute_workgroups_per_dimension,
        );
        pass.dispatch_workgroups(x, y, z);
    }
    gpu.queue.submit([encoder.finish()]);
    GpuTensor {
        gpu: gpu.clone(),
        buffer: out,
        dtype: DType::F32,
        shape: first.shape.clone(),
    }
}
