//! The WGSL kernels (one file per family in `kernels/`), their compiled pipelines, and the
//! description of one kernel launch.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use super::graph::ValueId;
use super::tensor::HostTensor;

/// Reading activations stored as halves (the kernels that may: Conv, Norm, Resize).
const HALVES: &str = include_str!("kernels/halves.wgsl");
const ATTENTION_IO: &str = include_str!("kernels/attention_io.wgsl");
/// A row per thread or per workgroup, for the kernels that reduce rows (Norm, Softmax).
const ROWS: &str = include_str!("kernels/rows.wgsl");

/// Largest head dimension the fused attention kernels hold per thread (attention_io.wgsl's
/// MAX_QUADS * 4). Wider heads run unfused.
pub const ATTENTION_MAX_HEAD_DIM: usize = 160;

/// Threads per workgroup of the one-thread-per-element kernels.
pub const LINEAR_WORKGROUP: u32 = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shader {
    Elementwise,
    Copy,
    Fill,
    Gather,
    MatMul,
    Conv,
    Norm,
    Softmax,
    Reduce,
    Resize,
    Attention,
    AttentionGrad,
    Combine,
    Adam,
    Peak,
}

impl Shader {
    /// The module's WGSL. The GEMM kernels (MatMul, Conv) are the prelude of their
    /// arithmetic (`Stage`, the type of the workgroup tiles, and `accumulate`), their
    /// operands' readers, then the GEMM core (gemm.wgsl, or gemm_subgroups.wgsl for
    /// `subgroups`): last, because naga 30 fails (a panic) on a workgroup array sized by
    /// an override when another override is declared after it. Those that read and write
    /// activations stored as halves (Conv, Norm, Resize) get the accessor of halves.wgsl,
    /// and those that reduce rows (Norm, Softmax) the helpers of rows.wgsl. Attention is
    /// attention_io.wgsl (its parameters and bindings), then attention.wgsl, or
    /// attention_subgroups.wgsl for `subgroups`.
    fn source(self, half_arithmetic: bool, subgroups: bool) -> String {
        let with_halves = |kernel: &str| format!("{HALVES}\n{kernel}");
        let gemm = |operands: &str| {
            let prelude = match half_arithmetic {
                true => include_str!("kernels/gemm_f16.wgsl"),
                false => include_str!("kernels/gemm_f32.wgsl"),
            };
            let core = match subgroups {
                true => include_str!("kernels/gemm_subgroups.wgsl"),
                false => include_str!("kernels/gemm.wgsl"),
            };
            format!("{prelude}\n{operands}\n{core}")
        };
        match self {
            Shader::Elementwise => include_str!("kernels/elementwise.wgsl").into(),
            Shader::Copy => include_str!("kernels/copy.wgsl").into(),
            Shader::Fill => include_str!("kernels/fill.wgsl").into(),
            Shader::Gather => include_str!("kernels/gather.wgsl").into(),
            Shader::MatMul => gemm(include_str!("kernels/matmul.wgsl")),
            Shader::Conv => gemm(&with_halves(include_str!("kernels/conv.wgsl"))),
            Shader::Norm => with_halves(&format!("{ROWS}\n{}", include_str!("kernels/norm.wgsl"))),
            Shader::Softmax => format!("{ROWS}\n{}", include_str!("kernels/softmax.wgsl")),
            Shader::Reduce => include_str!("kernels/reduce.wgsl").into(),
            Shader::Resize => with_halves(include_str!("kernels/resize.wgsl")),
            Shader::Attention if subgroups => format!(
                "{ATTENTION_IO}\n{}",
                include_str!("kernels/attention_subgroups.wgsl")
            ),
            Shader::Attention => {
                format!("{ATTENTION_IO}\n{}", include_str!("kernels/attention.wgsl"))
            }
            Shader::AttentionGrad => include_str!("kernels/attention_grad.wgsl").into(),
            Shader::Combine => include_str!("kernels/combine.wgsl").into(),
            Shader::Adam => include_str!("kernels/adam.wgsl").into(),
            Shader::Peak => include_str!("kernels/peak.wgsl").into(),
        }
    }
}

/// A shader specialised by its override constants: `OP`, if it has one; `HALF_INPUT` and
/// `HALF_OUTPUT` for the kernels that store activations as halves; for MatMul and
/// Conv `HALF_WEIGHTS` (B, or the filter, stored as packed f16 pairs) and `TILE_N` (output
/// tiles 16, 8 or 4 columns wide instead of 64, for products a few columns wide); and for
/// those two, by its arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelKey {
    pub shader: Shader,
    pub op: Option<u32>,
    pub half_weights: bool,
    /// MatMul and Conv: output columns per workgroup (`gemm_tile_columns`).
    pub tile_columns: u32,
    /// MatMul only: computed transposed (`SWAPPED` in matmul.wgsl).
    pub swapped: bool,
    /// MatMul and Conv with half weights, on a device with `shader-f16`: tiles staged as
    /// f16 and products summed in f16 four at a time, accumulated in f32 (gemm_f16.wgsl).
    pub half_arithmetic: bool,
    /// Conv, Norm and Resize: the input activation (`HALF_INPUT`) or the output
    /// (`HALF_OUTPUT`) stored as packed f16 pairs (`lower::half_values`).
    pub half_input: bool,
    pub half_output: bool,
    /// Attention: channel quads of a query or key and of a value (ceil(d / 4), ceil(e / 4)),
    /// constants of its kernels.
    pub head_quads: [u32; 2],
    /// Norm and Softmax: threads per row (`ROW_THREADS` of rows.wgsl: 1, 64 or 256; 0 for
    /// the other kernels).
    pub row_threads: u32,
}

/// Output columns per workgroup of the GEMM core (gemm.wgsl) for a product `n` columns
/// wide: 64, or the narrowest of 16, 8 and 4 that needs no more tiles, so that a product a
/// few columns wide does not compute mostly padding.
pub fn gemm_tile_columns(n: usize) -> u32 {
    match n {
        0..=4 => 4,
        5..=8 => 8,
        9..=32 => 16,
        _ => 64,
    }
}

impl From<Shader> for KernelKey {
    fn from(shader: Shader) -> Self {
        KernelKey {
            shader,
            op: None,
            half_weights: false,
            tile_columns: 64,
            swapped: false,
            half_arithmetic: false,
            half_input: false,
            half_output: false,
            head_quads: [0, 0],
            row_threads: 0,
        }
    }
}

/// A buffer a launch binds: a graph value, part of one, or a buffer the lowering made up,
/// uploaded once per `Arc` (zero bias, a slice of a weight, the scratch rows that
/// reductions and softmax past one binding carry between their launches).
#[derive(Clone, Debug)]
pub enum Operand {
    Value(ValueId),
    /// Elements `range` of a value: what a launch binds when the whole value exceeds the
    /// device's binding limit (`range.start` is aligned to the storage offset alignment).
    Part(ValueId, Range<usize>),
    Constant(Arc<HostTensor>),
}

impl Operand {
    /// The graph value bound, whole or in part.
    pub fn value(&self) -> Option<ValueId> {
        match self {
            Operand::Value(v) | Operand::Part(v, _) => Some(*v),
            Operand::Constant(_) => None,
        }
    }
}

/// One dispatch: binding 0 holds `params`, binding 1 is `output` (a value or part of one),
/// bindings 2.. are `inputs`.
#[derive(Clone, Debug)]
pub struct Launch {
    pub kernel: KernelKey,
    pub params: Vec<u32>,
    pub output: Operand,
    pub inputs: Vec<Operand>,
    pub workgroups: [u32; 3],
}

/// Packs a kernel's `Params` struct: 32-bit fields and fixed-length arrays, in order.
#[derive(Default)]
pub struct Params(pub Vec<u32>);

impl Params {
    pub fn u(mut self, v: usize) -> Self {
        self.0.push(v as u32);
        self
    }

    pub fn i(mut self, v: isize) -> Self {
        self.0.push(v as i32 as u32);
        self
    }

    pub fn f(mut self, v: f32) -> Self {
        self.0.push(v.to_bits());
        self
    }

    /// A `array<u32, len>` field (or i32: values are written as two's complement).
    pub fn array(mut self, values: impl IntoIterator<Item = isize>, len: usize) -> Self {
        let start = self.0.len();
        self.0.extend(values.into_iter().map(|v| v as i32 as u32));
        debug_assert!(self.0.len() - start <= len, "array longer than its field");
        self.0.resize(start + len, 0);
        self
    }
}

/// Workgroup counts covering `groups` workgroups, folded into two dimensions so that no
/// dimension exceeds the device limit. Kernels rebuild the linear index from
/// `workgroup_id` and `num_workgroups`.
pub fn grid(groups: usize, max_per_dim: u32) -> [u32; 3] {
    let groups = groups.max(1);
    let x = groups.min(max_per_dim as usize);
    [x as u32, groups.div_ceil(x) as u32, 1]
}

/// Compiled pipelines of one device's settings, created on first use and then reused.
#[derive(Default)]
pub struct Pipelines {
    /// Whether wide GEMM tiles and attention run on subgroup kernels
    /// (`Gpu::subgroup_kernels`).
    subgroup_kernels: bool,
    modules: HashMap<(Shader, bool, bool), wgpu::ShaderModule>,
    pipelines: HashMap<KernelKey, wgpu::ComputePipeline>,
}

impl Pipelines {
    pub fn new(subgroup_kernels: bool) -> Pipelines {
        Pipelines {
            subgroup_kernels,
            ..Default::default()
        }
    }

    pub fn get(&mut self, device: &wgpu::Device, key: KernelKey) -> &wgpu::ComputePipeline {
        // The subgroup GEMM core has 64x64 tiles only; narrow ones stay on gemm.wgsl.
        let subgroups = self.subgroup_kernels
            && match key.shader {
                Shader::MatMul | Shader::Conv => key.tile_columns == 64,
                Shader::Attention => true,
                _ => false,
            };
        if !self.pipelines.contains_key(&key) {
            let source = (key.shader, key.half_arithmetic, subgroups);
            let module = self.modules.entry(source).or_insert_with(|| {
                device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(&format!("{:?}", key.shader)),
                    source: wgpu::ShaderSource::Wgsl(key.shader.source(source.1, subgroups).into()),
                })
            });
            let mut constants: Vec<(&str, f64)> =
                key.op.map(|op| ("OP", op as f64)).into_iter().collect();
            if key.half_weights {
                constants.push(("HALF_WEIGHTS", 1.0));
            }
            if key.tile_columns != 64 {
                constants.push(("TILE_N", key.tile_columns as f64));
            }
            if key.swapped {
                constants.push(("SWAPPED", 1.0));
            }
            if key.half_input {
                constants.push(("HALF_INPUT", 1.0));
            }
            if key.half_output {
                constants.push(("HALF_OUTPUT", 1.0));
            }
            if key.row_threads != 0 {
                constants.push(("ROW_THREADS", key.row_threads as f64));
            }
            if key.head_quads != [0, 0] {
                let [d, e] = key.head_quads;
                constants.extend([("D_QUADS", d as f64), ("E_QUADS", e as f64)]);
            }
            let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&format!("{key:?}")),
                layout: None,
                module,
                entry_point: Some("main"),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    // Every kernel writes its workgroup memory before reading it. Zeroing
                    // it first is what dominates compiling the GEMM and attention kernels
                    // on CPU adapters (SwiftShader: ~0.2 ms per 4 bytes; browsers always
                    // zero it).
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
            self.pipelines.insert(key, pipeline);
        }
        &self.pipelines[&key]
    }
}

/// A bind group giving `buffers` to bindings 0, 1, 2... of `pipeline` (the layout all
/// kernels share: parameters, output, inputs).
pub fn bind_buffers(
    device: &wgpu::Device,
    pipeline: &wgpu::ComputePipeline,
    buffers: &[wgpu::BufferBinding],
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry> = buffers
        .iter()
        .enumerate()
        .map(|(i, b)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource: wgpu::BindingResource::Buffer(b.clone()),
        })
        .collect();
    device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    })
}
