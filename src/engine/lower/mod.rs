//! Lowering: each GPU node becomes kernel launches over graph values, or an alias of its
//! input when the op only reinterprets the shape (Reshape, Squeeze, Identity...).
//!
//! One file per family of kernels. Work past the device's storage binding limit is cut into
//! runs (`Lowering::runs`) whose launches bind parts of the tensors (`Operand::Part`).

mod conv;
mod copy;
mod elementwise;
mod halves;
mod matmul;
mod resize;
mod rows;

pub use halves::half_values;

use std::ops::Range;

use super::graph::{Graph, Node, ValueId};
use super::infer::{self, InputInfo};
use super::kernels::{KernelKey, LINEAR_WORKGROUP, Launch, Operand, Params, Shader, grid};
use super::ops::{Op, ReduceOp, UnaryOp, WHERE_CODE, normalize_axis};
use super::tensor::{DType, numel};

/// Highest rank the strided kernels (elementwise, copy, reduce) index.
const MAX_RANK: usize = 6;

pub enum Lowered {
    /// The output is the input's buffer under another shape.
    Alias(ValueId),
    Launches(Vec<Launch>),
}

type LowerResult<T> = std::result::Result<T, String>;

pub struct Lowering<'g> {
    graph: &'g Graph,
    /// Per value: stored as packed halves (see `half_values`).
    halves: &'g [bool],
    /// Whether products with half weights compute in f16 (`KernelKey::half_arithmetic`).
    half_arithmetic: bool,
    max_groups: u32,
    /// Elements one storage binding may hold.
    max_binding: usize,
    /// Elements between aligned binding offsets.
    align: usize,
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn lcm(a: usize, b: usize) -> usize {
    a / gcd(a, b) * b
}

fn check_rank(rank: usize) -> LowerResult<()> {
    match rank <= MAX_RANK {
        true => Ok(()),
        false => Err(format!("rank {rank} exceeds {MAX_RANK}")),
    }
}

impl<'g> Lowering<'g> {
    pub fn new(
        graph: &'g Graph,
        halves: &'g [bool],
        half_arithmetic: bool,
        limits: &wgpu::Limits,
    ) -> Self {
        Lowering {
            graph,
            halves,
            half_arithmetic,
            max_groups: limits.max_compute_workgroups_per_dimension,
            max_binding: (limits.max_storage_buffer_binding_size / 4) as usize,
            align: (limits.min_storage_buffer_offset_alignment / 4).max(1) as usize,
        }
    }

    /// The GEMM kernel (MatMul or Conv) reading `weight` as its B or filter: packed halves
    /// if the weight is kept so, and then f16 arithmetic where the device does it.
    fn gemm_kernel(&self, shader: Shader, weight: ValueId) -> KernelKey {
        let half_weights = self.half(weight);
        KernelKey {
            half_weights,
            half_arithmetic: half_weights && self.half_arithmetic,
            ..shader.into()
        }
    }

    pub fn lower(&self, node: &Node) -> LowerResult<Lowered> {
        let out = node.outputs[0];
        let x = || Self::input(node, 0);
        let launches = |l: Vec<Launch>| Ok(Lowered::Launches(l));
        match &node.op {
            Op::Reshape { .. }
            | Op::Flatten { .. }
            | Op::Squeeze { .. }
            | Op::Unsqueeze { .. }
            | Op::Unary(UnaryOp::Identity) => Ok(Lowered::Alias(x()?)),
            Op::Cast(to) if *to == self.dtype(x()?) => Ok(Lowered::Alias(x()?)),
            Op::Cast(_) => launches(self.elementwise(0, out, &[x()?])?),
            Op::Unary(u) => launches(self.elementwise(*u as u32, out, &[x()?])?),
            Op::Binary(b) => {
                launches(self.elementwise(*b as u32, out, &[x()?, Self::input(node, 1)?])?)
            }
            Op::Where => launches(self.elementwise(
                WHERE_CODE,
                out,
                &[x()?, Self::input(node, 1)?, Self::input(node, 2)?],
            )?),
            Op::Transpose { perm } => launches(self.transpose(node, perm.as_deref())?),
            Op::Expand => launches(self.expand(node)?),
            Op::Slice => launches(self.slice(node)?),
            Op::Concat { axis } => launches(self.concat(node, *axis)?),
            Op::Split { axis, .. } => launches(self.split(node, *axis)?),
            Op::Pad => launches(self.pad(node)?),
            Op::Gather { axis } => launches(self.gather(node, *axis)?),
            Op::MatMul => launches(self.matmul(node, None)?),
            Op::Gemm {
                alpha,
                beta,
                trans_a,
                trans_b,
            } => launches(self.matmul(node, Some((*alpha, *beta, *trans_a, *trans_b)))?),
            Op::Conv(attrs) => launches(self.conv(node, attrs)?),
            Op::InstanceNorm { epsilon } => {
                let shape = self.shape(x()?);
                let (rows, len) = (shape[0] * shape[1], numel(&shape[2..]));
                launches(self.norm(node, rows, len, [shape[1], 1, len], *epsilon, false)?)
            }
            Op::GroupNorm {
                epsilon,
                groups,
                per_channel_affine,
                silu,
            } => {
                let shape = self.shape(x()?);
                let (rows, len) = (shape[0] * groups, numel(&shape[1..]) / groups);
                let layout = if *per_channel_affine {
                    [*groups, shape[1] / groups, numel(&shape[2..])]
                } else {
                    [*groups, 1, len]
                };
                launches(self.norm(node, rows, len, layout, *epsilon, *silu)?)
            }
            Op::LayerNorm { axis, epsilon } => {
                let shape = self.shape(x()?);
                let axis = normalize_axis(*axis, shape.len())?;
                let (rows, len) = (numel(&shape[..axis]), numel(&shape[axis..]));
                launches(self.norm(node, rows, len, [1, 0, 1], *epsilon, false)?)
            }
            Op::Softmax { axis, legacy } => launches(self.softmax(node, *axis, *legacy)?),
            Op::Reduce {
                op,
                axes,
                noop_with_empty_axes,
                ..
            } => {
                let axes = infer::reduce_axes(
                    axes,
                    &self.infos(node),
                    self.shape(x()?).len(),
                    *noop_with_empty_axes,
                )?;
                launches(self.reduce(*op, out, x()?, &axes, false)?)
            }
            Op::ArgMax {
                axis, select_last, ..
            } => {
                let axis = normalize_axis(*axis, self.shape(x()?).len())?;
                launches(self.reduce(ReduceOp::ArgMax, out, x()?, &[axis], *select_last)?)
            }
            Op::Resize { mode, coordinates } => launches(self.resize(node, *mode, *coordinates)?),
            Op::Attention { scale } => launches(self.attention(node, *scale)?),
            Op::AttentionGrad { scale, part } => {
                launches(self.attention_grad(node, *scale, *part)?)
            }
            Op::Shape { .. } | Op::ConstantOfShape { .. } | Op::Range | Op::Trilu { .. } => {
                Err("its inputs must be constant (they depend on runtime inputs)".into())
            }
        }
    }

    /// Splits `units` consecutive units (elements, rows, channel planes) into runs whose
    /// parts fit one binding: each tensor the launch windows has `unit_len` 4-byte words per
    /// unit (`words`), and every run starts at an aligned offset in all of them. Runs hold at most
    /// `max_units` units (what another tensor of the launch allows). One run when
    /// everything fits, so small work never splits.
    fn runs(
        &self,
        units: usize,
        unit_lens: &[usize],
        max_units: usize,
        what: &str,
    ) -> LowerResult<Vec<Range<usize>>> {
        let widest = unit_lens.iter().copied().max().unwrap_or(1).max(1);
        if units * widest <= self.max_binding && units <= max_units {
            return Ok(std::iter::once(0..units).collect());
        }
        // Units between starts that are aligned in every windowed tensor.
        let step = unit_lens
            .iter()
            .map(|&len| self.align / gcd(len.max(1), self.align))
            .fold(1, lcm);
        let per = (self.max_binding / widest).min(max_units) / step * step;
        if per == 0 {
            return Err(format!(
                "{step} {what}s of {} bytes (the fewest that keep binding offsets aligned) exceed the GPU's storage binding limit of {} bytes",
                4 * widest,
                4 * self.max_binding
            ));
        }
        Ok((0..units)
            .step_by(per)
            .map(|start| start..(start + per).min(units))
            .collect())
    }

    /// Whether `value` is stored as packed halves (`half_values`).
    fn half(&self, value: ValueId) -> bool {
        self.halves[value]
    }

    /// 4-byte words that `elements` elements of `value` take (half values are windowed only
    /// in units of an even length: see `half_values`).
    fn words(&self, value: ValueId, elements: usize) -> usize {
        match self.half(value) {
            true => elements.div_ceil(2),
            false => elements,
        }
    }

    /// A binding that holds elements `range` of `value`: it starts at the aligned offset at
    /// or before `range.start`, and the kernel skips the returned number of elements.
    fn windowed(&self, value: ValueId, range: &Range<usize>) -> (Operand, usize) {
        // Offsets are aligned in bytes: halves need twice the elements between them.
        let align = if self.half(value) {
            2 * self.align
        } else {
            self.align
        };
        let start = range.start / align * align;
        (Operand::Part(value, start..range.end), range.start - start)
    }

    /// Elements `run` of `value` when the launch is one of several, else all of it.
    fn part(&self, value: ValueId, run: &Range<usize>, split: bool) -> Operand {
        match split {
            true => Operand::Part(value, run.clone()),
            false => Operand::Value(value),
        }
    }

    fn shape(&self, v: ValueId) -> &'g [usize] {
        &self.graph.values[v].shape
    }

    fn dtype(&self, v: ValueId) -> DType {
        self.graph.values[v].dtype
    }

    fn linear(&self, n: usize) -> [u32; 3] {
        grid(n.div_ceil(LINEAR_WORKGROUP as usize), self.max_groups)
    }

    fn input(node: &Node, i: usize) -> LowerResult<ValueId> {
        node.inputs
            .get(i)
            .copied()
            .flatten()
            .ok_or_else(|| format!("input {i} is required"))
    }

    fn infos(&self, node: &Node) -> Vec<Option<InputInfo<'g>>> {
        node.inputs
            .iter()
            .map(|i| {
                i.map(|i| {
                    let v = &self.graph.values[i];
                    InputInfo {
                        dtype: v.dtype,
                        shape: &v.shape,
                        constant: v.constant.as_deref(),
                    }
                })
            })
            .collect()
    }

    fn launch(
        &self,
        kernel: KernelKey,
        params: Params,
        output: ValueId,
        inputs: Vec<Operand>,
        workgroups: [u32; 3],
    ) -> Launch {
        Launch {
            kernel,
            params: params.0,
            output: Operand::Value(output),
            inputs,
            workgroups,
        }
    }
}
