//! Lowering: each GPU node becomes kernel launches over graph values, or an alias of its
//! input when the op only reinterprets the shape (Reshape, Squeeze, Identity...).

use std::ops::Range;
use std::sync::Arc;

use super::graph::{Graph, Node, ValueId};
use super::infer::{self, InputInfo};
use super::kernels::{KernelKey, LINEAR_WORKGROUP, Launch, Operand, Params, Shader, grid};
use super::ops::{
    ConvAttrs, Op, ReduceOp, UnaryOp, WHERE_CODE, broadcast_strides, contiguous_strides,
    normalize_axis,
};
use super::tensor::{DType, HostTensor, numel};

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

/// conv.wgsl's parameters for `g`.
fn conv_params(g: &infer::ConvGeometry, has_bias: bool, accumulate: bool) -> Params {
    Params::default()
        .u(g.in_channels)
        .u(g.in_h)
        .u(g.in_w)
        .u(g.out_channels)
        .u(g.out_h)
        .u(g.out_w)
        .u(g.kernel[0])
        .u(g.kernel[1])
        .u(g.stride[0])
        .u(g.stride[1])
        .u(g.pad[0])
        .u(g.pad[1])
        .u(g.dilation[0])
        .u(g.dilation[1])
        .u(g.group)
        .u(has_bias as usize)
        .u(accumulate as usize)
}

/// The lowest and highest element offsets a group of copied elements touches.
#[derive(Clone, Copy)]
struct Span {
    lo: isize,
    hi: isize,
}

impl Span {
    fn shifted(self, by: isize) -> Span {
        Span {
            lo: self.lo + by,
            hi: self.hi + by,
        }
    }

    fn union(self, other: Span) -> Span {
        Span {
            lo: self.lo.min(other.lo),
            hi: self.hi.max(other.hi),
        }
    }
}

/// One launch of a copy: the copy's elements it covers, the windows of `src` and `out` it
/// binds, and the bases relative to those windows.
struct CopyRun {
    elements: Range<usize>,
    src_window: Range<usize>,
    out_window: Range<usize>,
    src_base: isize,
    out_base: isize,
}

impl CopyRun {
    fn whole(n: usize, src_base: isize, out_base: isize) -> Self {
        CopyRun {
            elements: 0..n,
            src_window: 0..0,
            out_window: 0..0,
            src_base,
            out_base,
        }
    }
}

fn dtype_code(d: DType) -> usize {
    match d {
        DType::F32 => 0,
        DType::I64 => 1,
        DType::Bool => 2,
    }
}

impl<'g> Lowering<'g> {
    pub fn new(graph: &'g Graph, limits: &wgpu::Limits) -> Self {
        Lowering {
            graph,
            max_groups: limits.max_compute_workgroups_per_dimension,
            max_binding: (limits.max_storage_buffer_binding_size / 4) as usize,
            align: (limits.min_storage_buffer_offset_alignment / 4).max(1) as usize,
        }
    }

    /// Splits `units` consecutive units (elements, rows, channel planes) into runs whose
    /// parts fit one binding: each tensor the launch windows has `unit_len` elements per
    /// unit, and every run starts at an aligned offset in all of them. Runs hold at most
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
            Op::Transpose { perm } => {
                let shape = self.shape(x()?);
                let perm = infer::transpose_perm(perm.as_deref(), shape.len())?;
                let src = contiguous_strides(shape);
                let strides = perm.iter().map(|&p| src[p] as isize).collect();
                launches(self.copy(out, x()?, self.shape(out), strides, 0, 0)?)
            }
            Op::Expand => {
                let strides = broadcast_strides(self.shape(x()?), self.shape(out))
                    .iter()
                    .map(|&s| s as isize)
                    .collect();
                launches(self.copy(out, x()?, self.shape(out), strides, 0, 0)?)
            }
            Op::Slice => {
                let plan = infer::slice_plan(&self.infos(node))?;
                let src = contiguous_strides(self.shape(x()?));
                let base = plan
                    .starts
                    .iter()
                    .zip(&src)
                    .map(|(&s, &st)| (s * st) as isize)
                    .sum();
                let strides = plan
                    .steps
                    .iter()
                    .zip(&src)
                    .map(|(&step, &st)| step as isize * st as isize)
                    .collect();
                launches(self.copy(out, x()?, &plan.shape, strides, base, 0)?)
            }
            Op::Concat { axis } => {
                let out_shape = self.shape(out);
                let axis = normalize_axis(*axis, out_shape.len())?;
                let out_strides = contiguous_strides(out_shape);
                let mut offset = 0;
                let mut list = Vec::new();
                for &input in node.inputs.iter().flatten() {
                    let shape = self.shape(input);
                    if numel(shape) > 0 {
                        let strides = contiguous_strides(shape)
                            .iter()
                            .map(|&s| s as isize)
                            .collect();
                        list.extend(self.copy(
                            out,
                            input,
                            shape,
                            strides,
                            0,
                            offset * out_strides[axis],
                        )?);
                    }
                    offset += shape[axis];
                }
                launches(list)
            }
            Op::Split { axis, .. } => {
                let in_shape = self.shape(x()?);
                let axis = normalize_axis(*axis, in_shape.len())?;
                let src = contiguous_strides(in_shape);
                let strides: Vec<isize> = src.iter().map(|&s| s as isize).collect();
                let mut offset = 0;
                let mut list = Vec::new();
                for &o in &node.outputs {
                    let shape = self.shape(o);
                    list.extend(self.copy(
                        o,
                        x()?,
                        shape,
                        strides.clone(),
                        (offset * src[axis]) as isize,
                        0,
                    )?);
                    offset += shape[axis];
                }
                launches(list)
            }
            Op::Pad => self.pad(node),
            Op::Gather { axis } => {
                let (data, idx) = (x()?, Self::input(node, 1)?);
                let shape = self.shape(data);
                let axis = normalize_axis(*axis, shape.len())?;
                let (outer, inner) = (numel(&shape[..axis]), numel(&shape[axis + 1..]));
                let runs = self.runs(shape[axis], &[inner], usize::MAX, "gathered row")?;
                let split = runs.len() > 1;
                if split && outer > 1 {
                    return Err(
                        "a Gather past the binding limit must gather along its first axis".into(),
                    );
                }
                let n = numel(self.shape(out));
                launches(
                    runs.into_iter()
                        .map(|run| Launch {
                            kernel: Shader::Gather.into(),
                            params: Params::default()
                                .u(n)
                                .u(inner)
                                .u(numel(self.shape(idx)))
                                .u(shape[axis])
                                .u(run.start)
                                .u(run.len())
                                .0,
                            output: Operand::Value(out),
                            inputs: vec![
                                self.part(data, &(run.start * inner..run.end * inner), split),
                                Operand::Value(idx),
                            ],
                            workgroups: self.linear(n),
                        })
                        .collect(),
                )
            }
            Op::MatMul => launches(self.matmul(node, None)?),
            Op::Gemm {
                alpha,
                beta,
                trans_a,
                trans_b,
            } => launches(self.matmul(node, Some((*alpha, *beta, *trans_a, *trans_b)))?),
            Op::Conv(attrs) => self.conv(node, attrs),
            Op::InstanceNorm { epsilon } => {
                let shape = self.shape(x()?);
                let (rows, len) = (shape[0] * shape[1], numel(&shape[2..]));
                self.norm(node, rows, len, [shape[1], 1, len], *epsilon, false)
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
                self.norm(node, rows, len, layout, *epsilon, *silu)
            }
            Op::LayerNorm { axis, epsilon } => {
                let shape = self.shape(x()?);
                let axis = normalize_axis(*axis, shape.len())?;
                self.norm(
                    node,
                    numel(&shape[..axis]),
                    numel(&shape[axis..]),
                    [1, 0, 1],
                    *epsilon,
                    false,
                )
            }
            Op::Softmax { axis, legacy } => {
                let shape = self.shape(x()?);
                let axis = normalize_axis(*axis, shape.len())?;
                let (outer, len, inner) = if *legacy {
                    (numel(&shape[..axis]), numel(&shape[axis..]), 1)
                } else {
                    (
                        numel(&shape[..axis]),
                        shape[axis],
                        numel(&shape[axis + 1..]),
                    )
                };
                // Rows over the last axis are contiguous: past the binding limit, launches
                // take runs of them.
                let input = x()?;
                let runs = match inner {
                    1 => self.runs(outer, &[len], usize::MAX, "softmax row")?,
                    _ => std::iter::once(0..outer * inner).collect(),
                };
                let split = runs.len() > 1;
                launches(
                    runs.into_iter()
                        .map(|run| {
                            let elements = run.start * len..run.end * len;
                            Launch {
                                kernel: Shader::Softmax.into(),
                                params: Params::default().u(run.len()).u(len).u(inner).0,
                                output: self.part(out, &elements, split),
                                inputs: vec![self.part(input, &elements, split)],
                                workgroups: grid(run.len(), self.max_groups),
                            }
                        })
                        .collect(),
                )
            }
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
                launches(vec![self.reduce(*op as u32, out, x()?, &axes, false)?])
            }
            Op::ArgMax {
                axis, select_last, ..
            } => {
                let axis = normalize_axis(*axis, self.shape(x()?).len())?;
                launches(vec![self.reduce(
                    ReduceOp::ArgMax as u32,
                    out,
                    x()?,
                    &[axis],
                    *select_last,
                )?])
            }
            Op::Resize { mode, coordinates } => self.resize(node, *mode, *coordinates),
            Op::Attention { scale } => self.attention(node, *scale),
            Op::Shape { .. } | Op::ConstantOfShape { .. } | Op::Range | Op::Trilu { .. } => {
                Err("its inputs must be constant (they depend on runtime inputs)".into())
            }
        }
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

    /// One launch per run of output elements that fits a binding: inputs of the output's
    /// shape are windowed alike, broadcast inputs are bound whole.
    fn elementwise(&self, op: u32, out: ValueId, inputs: &[ValueId]) -> LowerResult<Vec<Launch>> {
        let shape = self.shape(out);
        if shape.len() > MAX_RANK {
            return Err(format!("rank {} exceeds {MAX_RANK}", shape.len()));
        }
        let n = numel(shape);
        // Unused operand slots repeat the first input (read-only bindings may alias).
        let operand = |i: usize| inputs.get(i).copied().unwrap_or(inputs[0]);
        let strides = |i: usize| {
            broadcast_strides(self.shape(operand(i)), shape)
                .into_iter()
                .map(|s| s as isize)
        };
        let broadcast = inputs.iter().any(|&i| self.shape(i) != shape);
        let key = KernelKey {
            shader: Shader::Elementwise,
            op: Some(op),
        };
        let runs = self.runs(n, &[1], usize::MAX, "element")?;
        let split = runs.len() > 1;
        Ok(runs
            .into_iter()
            .map(|run| {
                let windowed = |i: usize| split && self.shape(operand(i)) == shape;
                let base = |i: usize| if windowed(i) { run.start as isize } else { 0 };
                let params = Params::default()
                    .u(run.len())
                    .u(shape.len())
                    .u(dtype_code(self.dtype(out)))
                    .u(dtype_code(self.dtype(operand(0))))
                    .u(dtype_code(self.dtype(operand(1))))
                    .u(dtype_code(self.dtype(operand(2))))
                    .u(broadcast as usize)
                    .u(run.start)
                    .array(shape.iter().map(|&d| d as isize), MAX_RANK)
                    .array(strides(0), MAX_RANK)
                    .array(strides(1), MAX_RANK)
                    .array(strides(2), MAX_RANK)
                    .array((0..3).map(base), 4);
                let operands = (0..3)
                    .map(|i| match windowed(i) {
                        true => Operand::Part(operand(i), run.clone()),
                        false => Operand::Value(operand(i)),
                    })
                    .collect();
                Launch {
                    kernel: key,
                    params: params.0,
                    output: self.part(out, &run, split),
                    inputs: operands,
                    workgroups: self.linear(run.len()),
                }
            })
            .collect())
    }

    /// Elements `run` of `value` when the launch is one of several, else all of it.
    fn part(&self, value: ValueId, run: &Range<usize>, split: bool) -> Operand {
        match split {
            true => Operand::Part(value, run.clone()),
            false => Operand::Value(value),
        }
    }

    /// Strided copy of `shape` elements from `src` into `out` (see copy.wgsl). Past the
    /// binding limit, launches take runs of the copy's leading axes, each binding the spans
    /// of `out` and `src` it touches; a copy whose runs touch too much (a transpose of a huge
    /// tensor) is an error.
    fn copy(
        &self,
        out: ValueId,
        src: ValueId,
        shape: &[usize],
        src_strides: Vec<isize>,
        src_base: isize,
        out_base: usize,
    ) -> LowerResult<Vec<Launch>> {
        if shape.len() > MAX_RANK {
            return Err(format!("rank {} exceeds {MAX_RANK}", shape.len()));
        }
        // Offsets into the output follow its own layout; for Concat the copy is a window of it.
        let out_shape = self.shape(out);
        let out_strides: Vec<isize> = if out_shape.len() == shape.len() {
            contiguous_strides(out_shape)
        } else {
            contiguous_strides(shape)
        }
        .iter()
        .map(|&s| s as isize)
        .collect();
        let fits = [out, src]
            .iter()
            .all(|&v| numel(self.shape(v)) <= self.max_binding);
        let runs = if fits {
            vec![CopyRun::whole(numel(shape), src_base, out_base as isize)]
        } else {
            self.copy_runs(
                shape,
                &src_strides,
                &out_strides,
                src_base,
                out_base as isize,
            )?
        };
        Ok(runs
            .into_iter()
            .map(|run| {
                let params = Params::default()
                    .u(run.elements.len())
                    .u(shape.len())
                    .i(run.src_base)
                    .i(run.out_base)
                    .u(run.elements.start)
                    .array(shape.iter().map(|&d| d as isize), MAX_RANK)
                    .array(src_strides.iter().copied(), MAX_RANK)
                    .array(out_strides.iter().copied(), MAX_RANK);
                Launch {
                    kernel: Shader::Copy.into(),
                    params: params.0,
                    output: self.part(out, &run.out_window, !fits),
                    inputs: vec![self.part(src, &run.src_window, !fits)],
                    workgroups: self.linear(run.elements.len()),
                }
            })
            .collect())
    }

    /// Runs of a copy too large for whole bindings: units are the positions of the leading
    /// axes (as few as leave inner spans that fit), grouped while the `out` and `src` spans
    /// of the group fit one binding from aligned starts.
    fn copy_runs(
        &self,
        shape: &[usize],
        src_strides: &[isize],
        out_strides: &[isize],
        src_base: isize,
        out_base: isize,
    ) -> LowerResult<Vec<CopyRun>> {
        // The offsets the axes from `k` on reach, for given strides.
        let extent = |k: usize, strides: &[isize]| {
            shape[k..].iter().zip(&strides[k..]).fold(
                Span { lo: 0, hi: 0 },
                |span, (&n, &stride)| {
                    let reach = (n as isize - 1).max(0) * stride;
                    Span {
                        lo: span.lo + reach.min(0),
                        hi: span.hi + reach.max(0),
                    }
                },
            )
        };
        let k = (1..=shape.len())
            .find(|&k| {
                self.span_fits(extent(k, src_strides)) && self.span_fits(extent(k, out_strides))
            })
            .ok_or("a copy whose every slice spans more than a binding cannot be split")?;
        let inner = numel(&shape[k..]);
        let (src_extent, out_extent) = (extent(k, src_strides), extent(k, out_strides));
        // The spans of `src` and `out` that each unit touches, in row-major order.
        let units: Vec<(Span, Span)> = (0..numel(&shape[..k]))
            .map(|unit| {
                let mut rest = unit;
                let (mut s, mut o) = (src_base, out_base);
                for d in (0..k).rev() {
                    let coordinate = (rest % shape[d]) as isize;
                    rest /= shape[d];
                    s += coordinate * src_strides[d];
                    o += coordinate * out_strides[d];
                }
                (src_extent.shifted(s), out_extent.shifted(o))
            })
            .collect();
        let mut runs = Vec::new();
        let mut first = 0;
        while first < units.len() {
            let (mut src, mut out) = units[first];
            if !(self.span_fits(src) && self.span_fits(out)) {
                return Err(
                    "a slice of this copy does not fit a binding at an aligned offset".into(),
                );
            }
            let mut end = first + 1;
            while let Some(&(s, o)) = units.get(end) {
                let (s, o) = (src.union(s), out.union(o));
                if !(self.span_fits(s) && self.span_fits(o)) {
                    break;
                }
                (src, out, end) = (s, o, end + 1);
            }
            let (src_window, out_window) = (self.window(src), self.window(out));
            runs.push(CopyRun {
                elements: first * inner..end * inner,
                src_base: src_base - src_window.start as isize,
                out_base: out_base - out_window.start as isize,
                src_window,
                out_window,
            });
            first = end;
        }
        Ok(runs)
    }

    /// The elements a binding of `span` covers, from the aligned offset at or below it.
    fn window(&self, span: Span) -> Range<usize> {
        let start = span.lo - span.lo.rem_euclid(self.align as isize);
        start as usize..span.hi as usize + 1
    }

    fn span_fits(&self, span: Span) -> bool {
        self.window(span).len() <= self.max_binding
    }

    fn pad(&self, node: &Node) -> LowerResult<Lowered> {
        let (x, out) = (Self::input(node, 0)?, node.outputs[0]);
        let infos = self.infos(node);
        let (begin, end) = infer::pad_amounts(&infos)?;
        if begin.iter().chain(&end).any(|&p| p < 0) {
            return Err("negative padding (cropping) is not supported on the GPU".into());
        }
        let value = infer::const_input(&infos, 2, "the pad value")?
            .map(|v| v.cast(self.dtype(out)).to_gpu_words()[0])
            .unwrap_or(0);
        let n = numel(self.shape(out));
        let runs = self.runs(n, &[1], usize::MAX, "element")?;
        let split = runs.len() > 1;
        let mut launches: Vec<Launch> = runs
            .into_iter()
            .map(|run| Launch {
                kernel: Shader::Fill.into(),
                params: Params::default().u(run.len()).u(value as usize).0,
                output: self.part(out, &run, split),
                inputs: vec![],
                workgroups: self.linear(run.len()),
            })
            .collect();
        let out_strides = contiguous_strides(self.shape(out));
        let base = begin
            .iter()
            .zip(&out_strides)
            .map(|(&b, &s)| b as usize * s)
            .sum();
        let src = contiguous_strides(self.shape(x))
            .iter()
            .map(|&s| s as isize)
            .collect();
        launches.extend(self.copy(out, x, self.shape(x), src, 0, base)?);
        Ok(Lowered::Launches(launches))
    }

    fn matmul(
        &self,
        node: &Node,
        gemm: Option<(f32, f32, bool, bool)>,
    ) -> LowerResult<Vec<Launch>> {
        let (a, b, out) = (
            Self::input(node, 0)?,
            Self::input(node, 1)?,
            node.outputs[0],
        );
        // A MatMul's third input (set by fusion) is a bias over [M, N], like Gemm's C.
        let (alpha, beta, trans_a, trans_b) = gemm.unwrap_or((1.0, 1.0, false, false));
        // 1-D operands act as a row (A) or a column (B) vector.
        let a_shape: Vec<usize> = match self.shape(a) {
            [k] => vec![1, *k],
            s => s.to_vec(),
        };
        let b_shape: Vec<usize> = match self.shape(b) {
            [k] => vec![*k, 1],
            s => s.to_vec(),
        };
        let (ar, br) = (a_shape.len(), b_shape.len());
        let (a_strides, b_strides) = (contiguous_strides(&a_shape), contiguous_strides(&b_shape));
        let (m, k, a_m, a_k) = if trans_a {
            (
                a_shape[ar - 1],
                a_shape[ar - 2],
                a_strides[ar - 1],
                a_strides[ar - 2],
            )
        } else {
            (
                a_shape[ar - 2],
                a_shape[ar - 1],
                a_strides[ar - 2],
                a_strides[ar - 1],
            )
        };
        let (n, b_k, b_n) = if trans_b {
            (b_shape[br - 2], b_strides[br - 1], b_strides[br - 2])
        } else {
            (b_shape[br - 1], b_strides[br - 2], b_strides[br - 1])
        };
        let batch_shape = super::ops::broadcast_shapes(&[&a_shape[..ar - 2], &b_shape[..br - 2]])?;
        if batch_shape.len() > 4 {
            return Err("MatMul with more than 4 batch axes".into());
        }
        // Batch strides in matrices, scaled to elements; 0 on broadcast axes.
        let batch_strides = |shape: &[usize]| -> Vec<isize> {
            let matrix = shape[shape.len() - 2] * shape[shape.len() - 1];
            broadcast_strides(&shape[..shape.len() - 2], &batch_shape)
                .iter()
                .map(|&s| (s * matrix) as isize)
                .collect()
        };
        let bias = node.inputs.get(2).copied().flatten();
        let (bias_m, bias_n) = match bias {
            Some(c) => {
                let s = broadcast_strides(self.shape(c), &[m, n]);
                (s[0], s[1])
            }
            None => (0, 0),
        };
        let batch: usize = batch_shape.iter().product();
        if batch > self.max_groups as usize {
            return Err(format!(
                "MatMul batch {batch} exceeds {} workgroups",
                self.max_groups
            ));
        }
        let params = |m: usize, batch_shape: &[usize]| {
            Params::default()
                .u(m)
                .u(n)
                .u(k)
                .u(batch_shape.len())
                .u(a_m)
                .u(a_k)
                .u(b_k)
                .u(b_n)
                .f(alpha)
                .f(beta)
                .u(bias.is_some() as usize)
                .u(bias_m)
                .u(bias_n)
                .u(0)
                .u(0)
                .u(0)
                .array(batch_shape.iter().map(|&d| d as isize), 4)
                .array(batch_strides(&a_shape), 4)
                .array(batch_strides(&b_shape), 4)
        };
        let fits = [Some(a), Some(b), Some(out), bias]
            .iter()
            .flatten()
            .all(|&v| numel(self.shape(v)) <= self.max_binding);
        if fits {
            let groups = [n.div_ceil(64) as u32, m.div_ceil(64) as u32, batch as u32];
            let inputs = vec![
                Operand::Value(a),
                Operand::Value(b),
                Operand::Value(bias.unwrap_or(a)),
            ];
            return Ok(vec![self.launch(
                Shader::MatMul.into(),
                params(m, &batch_shape),
                out,
                inputs,
                groups,
            )]);
        }
        // Past the binding limit (unfused attention scores of the VAE's mid block at 768 px
        // and up): per matrix of the batch, runs of output rows with their rows of A and the
        // whole of that matrix's B.
        if trans_a || bias_m != 0 {
            return Err(
                "a transposed A or a per-row bias past the binding limit cannot be split".into(),
            );
        }
        let (a_batch, b_batch) = (batch_strides(&a_shape), batch_strides(&b_shape));
        let runs = self.runs(m, &[n, k], usize::MAX, "matrix row")?;
        let mut launches = Vec::new();
        for index in 0..batch {
            let (mut rest, mut a_base, mut b_base) = (index, 0, 0);
            for d in (0..batch_shape.len()).rev() {
                let coordinate = (rest % batch_shape[d]) as isize;
                rest /= batch_shape[d];
                a_base += coordinate * a_batch[d];
                b_base += coordinate * b_batch[d];
            }
            let (a_base, b_base, out_base) = (a_base as usize, b_base as usize, index * m * n);
            if ![a_base, b_base, out_base]
                .iter()
                .all(|o| o.is_multiple_of(self.align))
            {
                return Err("matrices of this size cannot be split at aligned offsets".into());
            }
            for run in &runs {
                let rows = Operand::Part(a, a_base + run.start * k..a_base + run.end * k);
                launches.push(Launch {
                    kernel: Shader::MatMul.into(),
                    params: params(run.len(), &[]).0,
                    output: Operand::Part(out, out_base + run.start * n..out_base + run.end * n),
                    inputs: vec![
                        rows.clone(),
                        Operand::Part(b, b_base..b_base + k * n),
                        // An unused bias binding repeats A's rows.
                        bias.map_or(rows, Operand::Value),
                    ],
                    workgroups: [n.div_ceil(64) as u32, run.len().div_ceil(64) as u32, 1],
                });
            }
        }
        Ok(launches)
    }

    fn conv(&self, node: &Node, attrs: &ConvAttrs) -> LowerResult<Lowered> {
        let (image, weight, out) = (
            Self::input(node, 0)?,
            Self::input(node, 1)?,
            node.outputs[0],
        );
        let g = infer::conv_geometry(attrs, self.shape(image), self.shape(weight))?;
        let bias = node.inputs.get(2).copied().flatten();
        let fits = [image, weight, out]
            .iter()
            .all(|&v| numel(self.shape(v)) <= self.max_binding);
        if !fits {
            return self.conv_in_parts(&g, image, weight, bias, out);
        }
        let params = conv_params(&g, bias.is_some(), false);
        let groups = [
            (g.out_h * g.out_w).div_ceil(64) as u32,
            (g.out_channels / g.group).div_ceil(64) as u32,
            (g.batch * g.group) as u32,
        ];
        let inputs = vec![
            Operand::Value(image),
            Operand::Value(weight),
            Operand::Value(bias.unwrap_or(weight)),
        ];
        Ok(Lowered::Launches(vec![self.launch(
            Shader::Conv.into(),
            params,
            out,
            inputs,
            groups,
        )]))
    }

    /// A convolution whose image, output or weights exceed one binding (the VAE decoder's
    /// last blocks at 512 px and up): per image, runs of output channels times runs of input
    /// channels, each launch adding its input channels' share into the output run. The
    /// weight and bias slices become constants of their own.
    fn conv_in_parts(
        &self,
        g: &infer::ConvGeometry,
        image: ValueId,
        weight: ValueId,
        bias: Option<ValueId>,
        out: ValueId,
    ) -> LowerResult<Lowered> {
        if g.group != 1 {
            return Err(
                "a grouped convolution past the storage binding limit is not supported".into(),
            );
        }
        let constant = |v: ValueId, what: &str| {
            self.graph.values[v]
                .constant
                .as_ref()
                .map(|c| c.to_f32())
                .ok_or_else(|| format!("the {what} must be constant to split this convolution"))
        };
        let weights = constant(weight, "weight")?;
        let biases = bias.map(|b| constant(b, "bias")).transpose()?;
        let (in_plane, out_plane) = (g.in_h * g.in_w, g.out_h * g.out_w);
        let taps = g.kernel[0] * g.kernel[1];
        // Input runs leave room for one output channel's weight slice; output runs for
        // the whole slice of an input run.
        let in_runs = self.runs(
            g.in_channels,
            &[in_plane],
            self.max_binding / taps,
            "input channel",
        )?;
        let out_runs = self.runs(
            g.out_channels,
            &[out_plane],
            self.max_binding / (in_runs[0].len() * taps),
            "output channel",
        )?;
        let image_len = g.in_channels * in_plane;
        let out_len = g.out_channels * out_plane;
        if g.batch > 1
            && !(image_len.is_multiple_of(self.align) && out_len.is_multiple_of(self.align))
        {
            return Err("images of this size cannot be split at aligned offsets".into());
        }
        // Weight slice [co, ci, kh, kw] and bias slice of each (output run, input run),
        // shared by every image of the batch.
        let slices: Vec<(Operand, Option<Operand>)> = out_runs
            .iter()
            .flat_map(|co| in_runs.iter().map(move |ci| (co.clone(), ci.clone())))
            .map(|(co, ci)| {
                let values = co
                    .clone()
                    .flat_map(|o| {
                        let row = o * g.in_channels * taps;
                        weights[row + ci.start * taps..row + ci.end * taps]
                            .iter()
                            .copied()
                    })
                    .collect();
                let shape = vec![co.len(), ci.len(), g.kernel[0], g.kernel[1]];
                let weight = Operand::Constant(Arc::new(HostTensor::f32(shape, values)));
                let bias = biases.as_ref().filter(|_| ci.start == 0).map(|b| {
                    Operand::Constant(Arc::new(HostTensor::f32(
                        vec![co.len()],
                        b[co.clone()].to_vec(),
                    )))
                });
                (weight, bias)
            })
            .collect();
        let mut launches = Vec::new();
        for n in 0..g.batch {
            for (k, (weight, bias)) in slices.iter().enumerate() {
                let (co, ci) = (&out_runs[k / in_runs.len()], &in_runs[k % in_runs.len()]);
                let part = infer::ConvGeometry {
                    batch: 1,
                    in_channels: ci.len(),
                    out_channels: co.len(),
                    ..g.clone()
                };
                let (image_start, out_start) = (n * image_len, n * out_len);
                launches.push(Launch {
                    kernel: Shader::Conv.into(),
                    // The first input run writes (with the bias), the others add to it.
                    params: conv_params(&part, bias.is_some(), ci.start > 0).0,
                    output: Operand::Part(
                        out,
                        out_start + co.start * out_plane..out_start + co.end * out_plane,
                    ),
                    inputs: vec![
                        Operand::Part(
                            image,
                            image_start + ci.start * in_plane..image_start + ci.end * in_plane,
                        ),
                        weight.clone(),
                        bias.clone().unwrap_or_else(|| weight.clone()),
                    ],
                    workgroups: [
                        out_plane.div_ceil(64) as u32,
                        co.len().div_ceil(64) as u32,
                        1,
                    ],
                });
            }
        }
        Ok(Lowered::Launches(launches))
    }

    /// `layout` = [row_mod, row_mul, col_div] (see norm.wgsl); `silu` applies SiLU after.
    fn norm(
        &self,
        node: &Node,
        rows: usize,
        len: usize,
        layout: [usize; 3],
        epsilon: f32,
        silu: bool,
    ) -> LowerResult<Lowered> {
        let (x, scale, out) = (
            Self::input(node, 0)?,
            Self::input(node, 1)?,
            node.outputs[0],
        );
        let bias = match node.inputs.get(2).copied().flatten() {
            Some(b) => Operand::Value(b),
            None => Operand::Constant(Arc::new(HostTensor::f32(vec![len], vec![0.0; len]))),
        };
        let runs = self.runs(rows, &[len], usize::MAX, "normalised row")?;
        let split = runs.len() > 1;
        let launches = runs
            .into_iter()
            .map(|run| {
                let params = Params::default()
                    .u(run.len())
                    .u(len)
                    .u(layout[0])
                    .u(layout[1])
                    .u(layout[2])
                    .f(epsilon)
                    .u(silu as usize)
                    .u(run.start);
                let elements = run.start * len..run.end * len;
                Launch {
                    kernel: Shader::Norm.into(),
                    params: params.0,
                    output: self.part(out, &elements, split),
                    inputs: vec![
                        self.part(x, &elements, split),
                        Operand::Value(scale),
                        bias.clone(),
                    ],
                    workgroups: grid(run.len(), self.max_groups),
                }
            })
            .collect();
        Ok(Lowered::Launches(launches))
    }

    fn reduce(
        &self,
        op: u32,
        out: ValueId,
        x: ValueId,
        axes: &[usize],
        select_last: bool,
    ) -> LowerResult<Launch> {
        let shape = self.shape(x);
        if shape.len() > MAX_RANK {
            return Err(format!("rank {} exceeds {MAX_RANK}", shape.len()));
        }
        let strides = contiguous_strides(shape);
        let kept: Vec<usize> = (0..shape.len()).filter(|i| !axes.contains(i)).collect();
        let pick =
            |list: &[usize], of: &[usize]| list.iter().map(|&i| of[i] as isize).collect::<Vec<_>>();
        let n = numel(self.shape(out));
        let params = Params::default()
            .u(n)
            .u(kept.len())
            .u(axes.len())
            .u(axes.iter().map(|&a| shape[a]).product())
            .u((self.dtype(x) != DType::F32) as usize)
            .u(select_last as usize)
            .u(0)
            .u(0)
            .array(pick(&kept, shape), MAX_RANK)
            .array(pick(&kept, &strides), MAX_RANK)
            .array(pick(axes, shape), MAX_RANK)
            .array(pick(axes, &strides), MAX_RANK);
        let key = KernelKey {
            shader: Shader::Reduce,
            op: Some(op),
        };
        Ok(self.launch(key, params, out, vec![Operand::Value(x)], self.linear(n)))
    }

    fn resize(
        &self,
        node: &Node,
        mode: super::ops::ResizeMode,
        coordinates: super::ops::CoordinateMode,
    ) -> LowerResult<Lowered> {
        use super::ops::{CoordinateMode as C, NearestMode as N, ResizeMode as R};
        let (x, out) = (Self::input(node, 0)?, node.outputs[0]);
        let (ins, outs) = (self.shape(x), self.shape(out));
        if ins.len() != 4 || ins[0] != outs[0] || ins[1] != outs[1] {
            return Err(format!(
                "only resizing the last two axes of a 4-D tensor is supported ({ins:?} -> {outs:?})"
            ));
        }
        let infos = self.infos(node);
        let scales = infer::const_input(&infos, 2, "scales")?
            .filter(|t| !t.is_empty())
            .map(|t| t.to_f32().into_owned());
        let scale = |axis: usize| {
            scales
                .as_ref()
                .map_or(outs[axis] as f32 / ins[axis] as f32, |s| s[axis])
        };
        let (linear, rounding) = match mode {
            R::Linear => (1, 0),
            R::Nearest(N::RoundPreferFloor) => (0, 0),
            R::Nearest(N::RoundPreferCeil) => (0, 1),
            R::Nearest(N::Floor) => (0, 2),
            R::Nearest(N::Ceil) => (0, 3),
        };
        let coordinates = match coordinates {
            C::HalfPixel => 0,
            C::PytorchHalfPixel => 1,
            C::AlignCorners => 2,
            C::Asymmetric => 3,
            C::TfHalfPixelForNearest => 4,
        };
        // Each output plane reads only its own input plane: runs of planes window both.
        let (in_plane, out_plane) = (ins[2] * ins[3], outs[2] * outs[3]);
        let runs = self.runs(
            outs[0] * outs[1],
            &[in_plane, out_plane],
            usize::MAX,
            "image plane",
        )?;
        let split = runs.len() > 1;
        let launches = runs
            .into_iter()
            .map(|run| {
                let n = run.len() * out_plane;
                let params = Params::default()
                    .u(n)
                    .u(ins[2])
                    .u(ins[3])
                    .u(outs[2])
                    .u(outs[3])
                    .u(linear)
                    .u(coordinates)
                    .u(rounding)
                    .f(scale(2))
                    .f(scale(3));
                Launch {
                    kernel: Shader::Resize.into(),
                    params: params.0,
                    output: self.part(out, &(run.start * out_plane..run.end * out_plane), split),
                    inputs: vec![self.part(x, &(run.start * in_plane..run.end * in_plane), split)],
                    workgroups: self.linear(n),
                }
            })
            .collect();
        Ok(Lowered::Launches(launches))
    }

    fn attention(&self, node: &Node, scale: f32) -> LowerResult<Lowered> {
        let (q, kt, v, out) = (
            Self::input(node, 0)?,
            Self::input(node, 1)?,
            Self::input(node, 2)?,
            node.outputs[0],
        );
        let (qs, ks, vs) = (self.shape(q), self.shape(kt), self.shape(v));
        let r = qs.len();
        let (n, d, m, e) = (qs[r - 2], qs[r - 1], ks[r - 1], vs[r - 1]);
        let batch = numel(&qs[..r - 2]);
        let params = Params::default()
            .u(n)
            .u(m)
            .u(d)
            .u(e)
            .f(scale)
            .u(n * d)
            .u(d)
            .u(1)
            .u(d * m)
            .u(m)
            .u(1)
            .u(m * e)
            .u(e)
            .u(1);
        let groups = [n.div_ceil(64) as u32, 1, batch as u32];
        let inputs = vec![Operand::Value(q), Operand::Value(kt), Operand::Value(v)];
        Ok(Lowered::Launches(vec![self.launch(
            Shader::Attention.into(),
            params,
            out,
            inputs,
            groups,
        )]))
    }
}
