//! Lowering: each GPU node becomes kernel launches over graph values, or an alias of its
//! input when the op only reinterprets the shape (Reshape, Squeeze, Identity...).

use std::sync::Arc;

use super::graph::{Graph, Node, ValueId};
use super::infer::{self, InputInfo};
use super::kernels::{KernelKey, LINEAR_WORKGROUP, Launch, Operand, Params, Shader, grid};
use super::ops::{
    Op, ReduceOp, UnaryOp, WHERE_CODE, broadcast_strides, contiguous_strides, normalize_axis,
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
}

fn dtype_code(d: DType) -> usize {
    match d {
        DType::F32 => 0,
        DType::I64 => 1,
        DType::Bool => 2,
    }
}

impl<'g> Lowering<'g> {
    pub fn new(graph: &'g Graph, max_groups: u32) -> Self {
        Lowering { graph, max_groups }
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
            Op::Cast(_) => launches(vec![self.elementwise(0, out, &[x()?])?]),
            Op::Unary(u) => launches(vec![self.elementwise(*u as u32, out, &[x()?])?]),
            Op::Binary(b) => launches(vec![self.elementwise(
                *b as u32,
                out,
                &[x()?, Self::input(node, 1)?],
            )?]),
            Op::Where => launches(vec![self.elementwise(
                WHERE_CODE,
                out,
                &[x()?, Self::input(node, 1)?, Self::input(node, 2)?],
            )?]),
            Op::Transpose { perm } => {
                let shape = self.shape(x()?);
                let perm = infer::transpose_perm(perm.as_deref(), shape.len())?;
                let src = contiguous_strides(shape);
                let strides = perm.iter().map(|&p| src[p] as isize).collect();
                launches(vec![self.copy(
                    out,
                    x()?,
                    self.shape(out),
                    strides,
                    0,
                    0,
                )?])
            }
            Op::Expand => {
                let strides = broadcast_strides(self.shape(x()?), self.shape(out))
                    .iter()
                    .map(|&s| s as isize)
                    .collect();
                launches(vec![self.copy(
                    out,
                    x()?,
                    self.shape(out),
                    strides,
                    0,
                    0,
                )?])
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
                launches(vec![self.copy(out, x()?, &plan.shape, strides, base, 0)?])
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
                        list.push(self.copy(
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
                    list.push(self.copy(
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
                let n = numel(self.shape(out));
                let params = Params::default()
                    .u(n)
                    .u(numel(&shape[axis + 1..]))
                    .u(numel(self.shape(idx)))
                    .u(shape[axis]);
                launches(vec![self.launch(
                    Shader::Gather.into(),
                    params,
                    out,
                    vec![Operand::Value(data), Operand::Value(idx)],
                    self.linear(n),
                )])
            }
            Op::MatMul => launches(vec![self.matmul(node, None)?]),
            Op::Gemm {
                alpha,
                beta,
                trans_a,
                trans_b,
            } => launches(vec![
                self.matmul(node, Some((*alpha, *beta, *trans_a, *trans_b)))?,
            ]),
            Op::Conv(attrs) => {
                let (image, weight) = (x()?, Self::input(node, 1)?);
                let g = infer::conv_geometry(attrs, self.shape(image), self.shape(weight))?;
                let bias = node.inputs.get(2).copied().flatten();
                let params = Params::default()
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
                    .u(bias.is_some() as usize);
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
                launches(vec![self.launch(
                    Shader::Conv.into(),
                    params,
                    out,
                    inputs,
                    groups,
                )])
            }
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
                let params = Params::default().u(outer * inner).u(len).u(inner);
                launches(vec![self.launch(
                    Shader::Softmax.into(),
                    params,
                    out,
                    vec![Operand::Value(x()?)],
                    grid(outer * inner, self.max_groups),
                )])
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
            output,
            inputs,
            workgroups,
        }
    }

    fn elementwise(&self, op: u32, out: ValueId, inputs: &[ValueId]) -> LowerResult<Launch> {
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
        let params = Params::default()
            .u(n)
            .u(shape.len())
            .u(dtype_code(self.dtype(out)))
            .u(dtype_code(self.dtype(operand(0))))
            .u(dtype_code(self.dtype(operand(1))))
            .u(dtype_code(self.dtype(operand(2))))
            .u(broadcast as usize)
            .u(0)
            .array(shape.iter().map(|&d| d as isize), MAX_RANK)
            .array(strides(0), MAX_RANK)
            .array(strides(1), MAX_RANK)
            .array(strides(2), MAX_RANK);
        let key = KernelKey {
            shader: Shader::Elementwise,
            op: Some(op),
        };
        let operands = (0..3).map(|i| Operand::Value(operand(i))).collect();
        Ok(self.launch(key, params, out, operands, self.linear(n)))
    }

    fn copy(
        &self,
        out: ValueId,
        src: ValueId,
        shape: &[usize],
        src_strides: Vec<isize>,
        src_base: isize,
        out_base: usize,
    ) -> LowerResult<Launch> {
        if shape.len() > MAX_RANK {
            return Err(format!("rank {} exceeds {MAX_RANK}", shape.len()));
        }
        // Offsets into the output follow its own layout; for Concat the copy is a window of it.
        let out_shape = self.shape(out);
        let out_strides = if out_shape.len() == shape.len() {
            contiguous_strides(out_shape)
        } else {
            contiguous_strides(shape)
        };
        let n = numel(shape);
        let params = Params::default()
            .u(n)
            .u(shape.len())
            .i(src_base)
            .u(out_base)
            .array(shape.iter().map(|&d| d as isize), MAX_RANK)
            .array(src_strides, MAX_RANK)
            .array(out_strides.iter().map(|&s| s as isize), MAX_RANK);
        Ok(self.launch(
            Shader::Copy.into(),
            params,
            out,
            vec![Operand::Value(src)],
            self.linear(n),
        ))
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
        let fill = self.launch(
            Shader::Fill.into(),
            Params::default().u(n).u(value as usize),
            out,
            vec![],
            self.linear(n),
        );
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
        let copy = self.copy(out, x, self.shape(x), src, 0, base)?;
        Ok(Lowered::Launches(vec![fill, copy]))
    }

    fn matmul(&self, node: &Node, gemm: Option<(f32, f32, bool, bool)>) -> LowerResult<Launch> {
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
        let params = Params::default()
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
            .array(batch_strides(&b_shape), 4);
        let groups = [n.div_ceil(64) as u32, m.div_ceil(64) as u32, batch as u32];
        let inputs = vec![
            Operand::Value(a),
            Operand::Value(b),
            Operand::Value(bias.unwrap_or(a)),
        ];
        Ok(self.launch(Shader::MatMul.into(), params, out, inputs, groups))
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
        let params = Params::default()
            .u(rows)
            .u(len)
            .u(layout[0])
            .u(layout[1])
            .u(layout[2])
            .f(epsilon)
            .u(silu as usize)
            .u(0);
        let inputs = vec![Operand::Value(x), Operand::Value(scale), bias];
        Ok(Lowered::Launches(vec![self.launch(
            Shader::Norm.into(),
            params,
            out,
            inputs,
            grid(rows, self.max_groups),
        )]))
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
        let n = numel(outs);
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
        Ok(Lowered::Launches(vec![self.launch(
            Shader::Resize.into(),
            params,
            out,
            vec![Operand::Value(x)],
            self.linear(n),
        )]))
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
