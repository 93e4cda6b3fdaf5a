//! Kernel benchmark at the shapes Stable Diffusion 1.5 runs at 512x512 with classifier-free
//! guidance (batch 2): each case is a one-op ONNX graph built in memory, timed through a
//! session like any model, and read against the adapter's measured ceilings.

use std::collections::HashMap;

use crate::clock::now_ms;
use crate::engine::ceiling::Ceilings;
use crate::engine::{
    Attr, DType, Gpu, GpuTensor, GraphBuilder, HostTensor, Model, Result, Session,
};
use crate::rng::TorchRng;

/// One op at one shape.
#[derive(Clone, Debug)]
pub enum Case {
    /// Conv2d, square kernel, stride 1, "same" padding.
    Conv {
        batch: usize,
        channels_in: usize,
        channels_out: usize,
        size: usize,
        kernel: usize,
    },
    /// [batch, rows, k] x [k, n] against a weight.
    Linear {
        batch: usize,
        rows: usize,
        k: usize,
        n: usize,
    },
    /// softmax(Q Kt / sqrt(d)) V over `heads` (batch x heads) matrices: N queries, M keys.
    Attention {
        heads: usize,
        queries: usize,
        keys: usize,
        dim: usize,
    },
    /// GroupNorm with 32 groups (memory-bound, as LayerNorm: read against the bandwidth
    /// ceiling).
    GroupNorm {
        batch: usize,
        channels: usize,
        size: usize,
    },
    /// LayerNorm over the last axis of [batch, tokens, channels] (a transformer block's).
    LayerNorm {
        batch: usize,
        tokens: usize,
        channels: usize,
    },
}

/// The UNet's and VAE decoder's hot shapes for SD 1.5 at 512x512 (64x64 latents), batch 2.
pub fn sd15_cases() -> Vec<Case> {
    let conv = |channels: usize, size: usize| Case::Conv {
        batch: 2,
        channels_in: channels,
        channels_out: channels,
        size,
        kernel: 3,
    };
    let linear = |rows: usize, k: usize, n: usize| Case::Linear {
        batch: 2,
        rows,
        k,
        n,
    };
    // 8 heads of width 40/80/160 at the 64/32/16/8 px levels.
    let attention = |size: usize, keys: Option<usize>, dim: usize| Case::Attention {
        heads: 16,
        queries: size * size,
        keys: keys.unwrap_or(size * size),
        dim,
    };
    vec![
        conv(320, 64),
        conv(640, 32),
        conv(1280, 16),
        conv(1280, 8),
        Case::Conv {
            batch: 1,
            channels_in: 128,
            channels_out: 128,
            size: 512,
            kernel: 3,
        },
        linear(4096, 320, 320),
        linear(4096, 320, 2560),
        linear(4096, 1280, 320),
        linear(1024, 640, 640),
        linear(256, 1280, 1280),
        linear(64, 1280, 1280),
        linear(77, 768, 320),
        linear(1, 320, 1280),
        attention(64, None, 40),
        attention(32, None, 80),
        attention(16, None, 160),
        attention(8, None, 160),
        attention(64, Some(77), 40),
        attention(32, Some(77), 80),
        attention(16, Some(77), 160),
        Case::GroupNorm {
            batch: 2,
            channels: 320,
            size: 64,
        },
        Case::LayerNorm {
            batch: 2,
            tokens: 4096,
            channels: 320,
        },
    ]
}

/// What a case's time is divided by.
#[derive(Clone, Copy, Debug)]
pub enum Work {
    Flops(f64),
    Bytes(f64),
}

impl Case {
    pub fn family(&self) -> &'static str {
        match self {
            Case::Conv { .. } => "conv",
            Case::Linear { .. } => "linear",
            Case::Attention { keys, queries, .. } if keys == queries => "self-attention",
            Case::Attention { .. } => "cross-attention",
            Case::GroupNorm { .. } => "groupnorm",
            Case::LayerNorm { .. } => "layernorm",
        }
    }

    pub fn describe(&self) -> String {
        match *self {
            Case::Conv {
                batch,
                channels_in,
                channels_out,
                size,
                kernel,
            } => format!(
                "{kernel}x{kernel} {channels_in}->{channels_out} at {size}x{size}, batch {batch}"
            ),
            Case::Linear { batch, rows, k, n } => format!("[{batch}, {rows}, {k}] x [{k}, {n}]"),
            Case::Attention {
                heads,
                queries,
                keys,
                dim,
            } => format!("{heads} heads, N {queries}, keys {keys}, head size {dim}"),
            Case::GroupNorm {
                batch,
                channels,
                size,
            } => format!("[{batch}, {channels}, {size}, {size}], 32 groups"),
            Case::LayerNorm {
                batch,
                tokens,
                channels,
            } => format!("[{batch}, {tokens}, {channels}], last axis"),
        }
    }

    pub fn work(&self) -> Work {
        match *self {
            Case::Conv {
                batch,
                channels_in,
                channels_out,
                size,
                kernel,
            } => Work::Flops(
                2.0 * (batch * channels_out * size * size * channels_in * kernel * kernel) as f64,
            ),
            Case::Linear { batch, rows, k, n } => Work::Flops(2.0 * (batch * rows * k * n) as f64),
            // Q Kt and P V: 2 N M d each.
            Case::Attention {
                heads,
                queries,
                keys,
                dim,
            } => Work::Flops(4.0 * (heads * queries * keys * dim) as f64),
            // Read once, written once.
            Case::GroupNorm {
                batch,
                channels,
                size,
            } => Work::Bytes(8.0 * (batch * channels * size * size) as f64),
            Case::LayerNorm {
                batch,
                tokens,
                channels,
            } => Work::Bytes(8.0 * (batch * tokens * channels) as f64),
        }
    }

    /// The one-op model; with `half_weights`, its filter or weight matrix is stored as f16
    /// (as an fp16 export's are).
    pub fn model(&self, half_weights: bool) -> Result<Model> {
        let graph = GraphBuilder::new(21);
        let weight =
            |graph: GraphBuilder, name: &str, shape: &[usize], values: &[f32]| match half_weights {
                true => graph.weight_f16(name, shape, values),
                false => graph.weight(name, shape, values),
            };
        let graph = match *self {
            Case::Conv {
                batch,
                channels_in,
                channels_out,
                size,
                kernel,
            } => {
                let x = vec![batch, channels_in, size, size];
                let w = [channels_out, channels_in, kernel, kernel];
                let pad = (kernel / 2) as i64;
                let scale = fan_in(channels_in * kernel * kernel);
                weight(
                    graph.input("x", &x),
                    "w",
                    &w,
                    &noise(w.iter().product(), 1, scale),
                )
                .weight("b", &[channels_out], &noise(channels_out, 2, 1.0))
                .node(
                    "Conv",
                    &["x", "w", "b"],
                    &["y"],
                    &[("pads", Attr::Ints(vec![pad; 4]))],
                )
            }
            Case::Linear { batch, rows, k, n } => {
                let x = vec![batch, rows, k];
                weight(
                    graph.input("x", &x),
                    "w",
                    &[k, n],
                    &noise(k * n, 1, fan_in(k)),
                )
                .node("MatMul", &["x", "w"], &["y"], &[])
            }
            Case::Attention {
                heads,
                queries,
                keys,
                dim,
            } => {
                let (q, kt, v) = (
                    vec![heads, queries, dim],
                    vec![heads, dim, keys],
                    vec![heads, keys, dim],
                );
                graph
                    .input("q", &q)
                    .input("kt", &kt)
                    .input("v", &v)
                    .weight("scale", &[], &[1.0 / (dim as f32).sqrt()])
                    .node("MatMul", &["q", "kt"], &["scores"], &[])
                    .node("Mul", &["scores", "scale"], &["scaled"], &[])
                    .node(
                        "Softmax",
                        &["scaled"],
                        &["probs"],
                        &[("axis", Attr::Int(-1))],
                    )
                    .node("MatMul", &["probs", "v"], &["y"], &[])
            }
            Case::GroupNorm {
                batch,
                channels,
                size,
            } => {
                let x = vec![batch, channels, size, size];
                graph
                    .input("x", &x)
                    .weight("scale", &[channels], &noise(channels, 1, 1.0))
                    .weight("bias", &[channels], &noise(channels, 2, 1.0))
                    .node(
                        "GroupNormalization",
                        &["x", "scale", "bias"],
                        &["y"],
                        &[("num_groups", Attr::Int(32))],
                    )
            }
            Case::LayerNorm {
                batch,
                tokens,
                channels,
            } => graph
                .input("x", &[batch, tokens, channels])
                .weight("scale", &[channels], &noise(channels, 1, 1.0))
                .weight("bias", &[channels], &noise(channels, 2, 1.0))
                .node(
                    "LayerNormalization",
                    &["x", "scale", "bias"],
                    &["y"],
                    &[("axis", Attr::Int(-1))],
                ),
        };
        graph.output("y").build()
    }
}

fn fan_in(n: usize) -> f32 {
    1.0 / (n as f32).sqrt()
}

/// `n` standard-normal values times `scale`, from the pipeline's seeded generator
/// (`torch.randn`'s stream): deterministic, and far from the all-zero data some drivers
/// special-case.
pub fn noise(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    TorchRng::new(seed)
        .randn(&[n])
        .to_f32()
        .iter()
        .map(|v| v * scale)
        .collect()
}

/// A session's first run and the best of the timed runs after it, in seconds.
#[derive(Clone, Copy, Debug)]
pub struct SessionTimes {
    pub first: f64,
    pub best: f64,
}

/// Times a session's first run, then `repeats` more, with noise for float inputs and ones
/// for integer inputs.
pub async fn time_session(gpu: &Gpu, session: &Session, repeats: usize) -> Result<SessionTimes> {
    let inputs: Vec<(String, GpuTensor)> = session
        .input_names()
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let shape = session.input_shape(name).unwrap_or(&[]).to_vec();
            let tensor = match session.input_dtype(name).unwrap_or(DType::F32) {
                DType::F32 => HostTensor::f32(
                    shape.clone(),
                    noise(shape.iter().product(), 10 + i as u64, 1.0),
                ),
                dtype => HostTensor::filled(dtype, shape, 1.0),
            };
            (name.to_string(), GpuTensor::from_host(gpu, &tensor))
        })
        .collect();
    let refs: Vec<(&str, &GpuTensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let start = now_ms();
    session.run(&refs).await?;
    gpu.finish().await?;
    let first = (now_ms() - start) / 1000.0;
    let mut best = f64::INFINITY;
    for _ in 0..repeats.max(1) {
        let start = now_ms();
        session.run(&refs).await?;
        gpu.finish().await?;
        best = best.min((now_ms() - start) / 1000.0);
    }
    Ok(SessionTimes { first, best })
}

/// One case's result.
#[derive(Clone, Debug)]
pub struct Timing {
    pub seconds: f64,
    /// GFLOP/s, or GB/s for memory-bound cases.
    pub rate: f64,
    /// `rate` over the matching ceiling.
    pub fraction: f64,
    /// Kernel launches per run by family, e.g. "Conv 1".
    pub kernels: String,
}

/// Times one case, its weights stored as f16 with `half_weights`.
pub async fn time_case(
    gpu: &Gpu,
    case: &Case,
    half_weights: bool,
    ceilings: &Ceilings,
    repeats: usize,
) -> Result<Timing> {
    let model = case.model(half_weights)?;
    let session = Session::new(gpu, &model, &HashMap::new()).await?;
    let seconds = time_session(gpu, &session, repeats).await?.best;
    let (rate, ceiling) = match case.work() {
        Work::Flops(f) => (f / seconds / 1e9, ceilings.gflops),
        Work::Bytes(b) => (b / seconds / 1e9, ceilings.gbytes_per_s),
    };
    let kernels = session
        .kernel_counts()
        .iter()
        .map(|(name, count)| format!("{name} {count}"))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(Timing {
        seconds,
        rate,
        fraction: rate / ceiling,
        kernels,
    })
}
