//! The adapter's own ceilings, measured (peak.wgsl): multiply-add throughput and memory
//! bandwidth. Kernel timings read as a fraction of these say how much of the device a
//! kernel uses, on any adapter, without a table of vendor figures.

use super::error::Result;
use super::gpu::Gpu;
use super::kernels::{KernelKey, Params, Shader, bind_buffers, grid};

/// Threads per workgroup of peak.wgsl.
const WORKGROUP: usize = 64;

/// FMA iterations per thread (under the 65535-iteration loop guard of llvmpipe).
const FMA_ITERATIONS: usize = 4096;

/// Threads of one throughput launch.
const FMA_THREADS: usize = 1 << 16;

/// Largest buffer the bandwidth kernel copies (past the last-level caches of GPUs).
const COPY_BYTES: u64 = 256 << 20;

/// A measurement keeps doubling its launches until it takes this long.
const MIN_SECONDS: f64 = 0.25;

#[derive(Clone, Copy, Debug)]
pub struct Ceilings {
    /// Multiply-add throughput, counting a multiply-add as 2 flops.
    pub gflops: f64,
    /// Bytes read plus bytes written per second, in GB/s.
    pub gbytes_per_s: f64,
}

/// Measures both ceilings (about a second each).
pub async fn measure(gpu: &Gpu) -> Result<Ceilings> {
    let fma_flops = (FMA_THREADS * FMA_ITERATIONS * 64) as f64;
    let fma = time_launches(gpu, 0, FMA_THREADS, FMA_ITERATIONS).await?;
    let copy_bytes = COPY_BYTES
        .min(gpu.limits.max_storage_buffer_binding_size)
        .min(gpu.limits.max_buffer_size);
    let vectors = (copy_bytes / 16) as usize;
    let copy = time_launches(gpu, 1, vectors, 0).await?;
    Ok(Ceilings {
        gflops: fma_flops / fma / 1e9,
        gbytes_per_s: (2 * 16 * vectors) as f64 / copy / 1e9,
    })
}

/// Seconds per launch of peak.wgsl's `op` over `threads` threads (a vec4 each in its two
/// buffers), from a run of launches long enough to time.
async fn time_launches(gpu: &Gpu, op: u32, threads: usize, iterations: usize) -> Result<f64> {
    let buffer_bytes = 16 * threads;
    let params = Params::default().u(iterations).u(threads);
    let params = gpu.params_buffer(&params.0);
    let out = gpu.storage_buffer("peak out", buffer_bytes as u64);
    // Multiplier just below 1 and a small addend keep the chains finite.
    let mut init = vec![0u32; buffer_bytes / 4];
    init[..4].fill(0.999f32.to_bits());
    init[4..8].fill(0.001f32.to_bits());
    let src = gpu.storage_buffer_with("peak src", &init);
    drop(init);
    let key = KernelKey {
        op: Some(op),
        ..Shader::Peak.into()
    };
    let [x, y, z] = grid(
        threads.div_ceil(WORKGROUP),
        gpu.limits.max_compute_workgroups_per_dimension,
    );
    let pipeline = gpu.pipelines().get(&gpu.device, key).clone();
    let bind_group = bind_buffers(
        &gpu.device,
        &pipeline,
        &[
            params.as_entire_buffer_binding(),
            out.as_entire_buffer_binding(),
            src.as_entire_buffer_binding(),
        ],
    );
    let record = |launches: usize| {
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            for _ in 0..launches {
                pass.dispatch_workgroups(x, y, z);
            }
        }
        encoder.finish()
    };
    // One untimed launch compiles the kernel and warms caches.
    gpu.queue.submit([record(1)]);
    gpu.finish().await?;
    let mut launches = 1;
    loop {
        let commands = record(launches);
        let start = crate::clock::now_ms();
        gpu.queue.submit([commands]);
        gpu.finish().await?;
        let seconds = (crate::clock::now_ms() - start) / 1000.0;
        if seconds >= MIN_SECONDS {
            return Ok(seconds / launches as f64);
        }
        launches *= 2;
    }
}
