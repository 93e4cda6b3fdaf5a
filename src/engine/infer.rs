//! Static shape inference: with every dimension bound, each node's output types and shapes
//! follow from its inputs' shapes and, for shape-valued inputs (Reshape's `shape`, Slice's
//! `starts`...), their folded constant values.

use super::ops::{AttentionPart, ConvAttrs, Op, ReduceOp, broadcast_shapes, normalize_axis};
use super::tensor::{DType, HostTensor, numel};

/// What inference knows about one input.
#[derive(Clone, Copy)]
pub struct InputInfo<'a> {
    pub dtype: DType,
    pub shape: &'a [usize],
    pub constant: Option<&'a HostTensor>,
}

pub type TypeShape = (DType, Vec<usize>);
type InferResult<T> = std::result::Result<T, String>;

/// The `i`-th input, which must be present.
pub(crate) fn input<'a>(inputs: &[Option<InputInfo<'a>>], i: usize) -> InferResult<InputInfo<'a>> {
    inputs
        .get(i)
        .copied()
        .flatten()
        .ok_or_else(|| format!("input {i} is required"))
}

/// The constant value of the `i`-th input, if it is present.
pub(crate) fn const_input<'a>(
    inputs: &[Option<InputInfo<'a>>],
    i: usize,
    what: &str,
) -> InferResult<Option<&'a HostTensor>> {
    match inputs.get(i).copied().flatten() {
        None => Ok(None),
        Some(info) => info
            .constant
            .map(Some)
            .ok_or_else(|| format!("{what} must be a constant (it depends on runtime inputs)")),
    }
}

pub fn infer(
    op: &Op,
    inputs: &[Option<InputInfo>],
    num_outputs: usize,
) -> InferResult<Vec<TypeShape>> {
    let x = || input(inputs, 0);
    let same = |dtype| -> InferResult<Vec<TypeShape>> { Ok(vec![(dtype, x()?.shape.to_vec())]) };
    match op {
        Op::Unary(_) => same(x()?.dtype),
        Op::Cast(to) => same(*to),
        Op::Binary(b) => {
            if inputs.len() != 2 {
                return Err(format!(
                    "takes two inputs, not {} (variadic forms are not supported)",
                    inputs.len()
                ));
            }
            let (a, c) = (x()?, input(inputs, 1)?);
            let shape = broadcast_shapes(&[a.shape, c.shape])?;
            Ok(vec![(
                if b.is_comparison() {
                    DType::Bool
                } else {
                    a.dtype
                },
                shape,
            )])
        }
        Op::Where => {
            let (c, a, b) = (x()?, input(inputs, 1)?, input(inputs, 2)?);
            Ok(vec![(
                a.dtype,
                broadcast_shapes(&[c.shape, a.shape, b.shape])?,
            )])
        }
        Op::MatMul => Ok(vec![(
            DType::F32,
            matmul_shape(x()?.shape, input(inputs, 1)?.shape)?,
        )]),
        Op::Gemm {
            trans_a, trans_b, ..
        } => {
            let (a, b) = (x()?.shape, input(inputs, 1)?.shape);
            if a.len() != 2 || b.len() != 2 {
                return Err("Gemm needs 2-D inputs".into());
            }
            let (m, k) = if *trans_a { (a[1], a[0]) } else { (a[0], a[1]) };
            let (k2, n) = if *trans_b { (b[1], b[0]) } else { (b[0], b[1]) };
            if k != k2 {
                return Err(format!("Gemm inner dimensions differ: {a:?} x {b:?}"));
            }
            if let Some(c) = inputs.get(2).copied().flatten()
                && broadcast_shapes(&[c.shape, &[m, n]])? != [m, n]
            {
                return Err(format!(
                    "Gemm bias {:?} does not broadcast to [{m}, {n}]",
                    c.shape
                ));
            }
            Ok(vec![(DType::F32, vec![m, n])])
        }
        Op::Conv(attrs) => Ok(vec![(
            DType::F32,
            conv_geometry(attrs, x()?.shape, input(inputs, 1)?.shape)?.output_shape(),
        )]),
        Op::InstanceNorm { .. }
        | Op::LayerNorm { .. }
        | Op::GroupNorm { .. }
        | Op::Softmax { .. } => {
            if let Op::LayerNorm { axis, .. } = op {
                normalize_axis(*axis, x()?.shape.len())?;
            }
            if num_outputs > 1 {
                return Err("only the first output (the normalised tensor) is supported".into());
            }
            same(DType::F32)
        }
        Op::Transpose { perm } => {
            let shape = x()?.shape;
            let perm = transpose_perm(perm.as_deref(), shape.len())?;
            Ok(vec![(x()?.dtype, perm.iter().map(|&p| shape[p]).collect())])
        }
        Op::Reshape { allow_zero } => {
            let target = const_input(inputs, 1, "the target shape")?.ok_or("shape is required")?;
            Ok(vec![(
                x()?.dtype,
                reshape_shape(x()?.shape, &target.ints(), *allow_zero)?,
            )])
        }
        Op::Flatten { axis } => {
            let shape = x()?.shape;
            let axis = if *axis == shape.len() as i64 {
                shape.len()
            } else {
                normalize_axis(*axis, shape.len())?
            };
            Ok(vec![(
                x()?.dtype,
                vec![numel(&shape[..axis]), numel(&shape[axis..])],
            )])
        }
        Op::Squeeze { axes } => {
            let shape = x()?.shape;
            let axes = axes_from(axes, inputs, 1)?;
            let axes = match axes {
                Some(axes) => axes
                    .iter()
                    .map(|&a| normalize_axis(a, shape.len()))
                    .collect::<InferResult<Vec<_>>>()?,
                None => (0..shape.len()).filter(|&i| shape[i] == 1).collect(),
            };
            if let Some(&bad) = axes.iter().find(|&&a| shape[a] != 1) {
                return Err(format!("cannot squeeze axis {bad} of shape {shape:?}"));
            }
            let out = (0..shape.len())
                .filter(|i| !axes.contains(i))
                .map(|i| shape[i])
                .collect();
            Ok(vec![(x()?.dtype, out)])
        }
        Op::Unsqueeze { axes } => {
            let shape = x()?.shape;
            let axes = axes_from(axes, inputs, 1)?.ok_or("axes are required")?;
            let rank = shape.len() + axes.len();
            let axes = axes
                .iter()
                .map(|&a| normalize_axis(a, rank))
                .collect::<InferResult<Vec<_>>>()?;
            let mut dims = shape.iter();
            let out = (0..rank)
                .map(|i| {
                    if axes.contains(&i) {
                        1
                    } else {
                        *dims.next().unwrap_or(&1)
                    }
                })
                .collect();
            Ok(vec![(x()?.dtype, out)])
        }
        Op::Concat { axis } => {
            let first = x()?;
            let axis = normalize_axis(*axis, first.shape.len())?;
            let mut out = first.shape.to_vec();
            out[axis] = 0;
            for info in inputs.iter().flatten() {
                let s = info.shape;
                if s.len() != out.len() || (0..s.len()).any(|i| i != axis && s[i] != out[i]) {
                    return Err(format!(
                        "Concat inputs {:?} and {s:?} differ off axis {axis}",
                        first.shape
                    ));
                }
                out[axis] += s[axis];
            }
            Ok(vec![(first.dtype, out)])
        }
        Op::Slice => {
            let plan = slice_plan(inputs)?;
            Ok(vec![(x()?.dtype, plan.shape)])
        }
        Op::Split { axis, split } => {
            let (shape, dtype) = (x()?.shape, x()?.dtype);
            let axis = normalize_axis(*axis, shape.len())?;
            let sizes = split_sizes(shape[axis], split, inputs, num_outputs)?;
            Ok(sizes
                .into_iter()
                .map(|s| {
                    let mut out = shape.to_vec();
                    out[axis] = s;
                    (dtype, out)
                })
                .collect())
        }
        Op::Gather { axis } => {
            let (data, idx) = (x()?, input(inputs, 1)?);
            let axis = normalize_axis(*axis, data.shape.len())?;
            let mut out = data.shape[..axis].to_vec();
            out.extend_from_slice(idx.shape);
            out.extend_from_slice(&data.shape[axis + 1..]);
            Ok(vec![(data.dtype, out)])
        }
        Op::Expand => {
            let target = const_input(inputs, 1, "the target shape")?.ok_or("shape is required")?;
            let target: Vec<usize> = target.ints().iter().map(|&d| d.max(0) as usize).collect();
            Ok(vec![(
                x()?.dtype,
                broadcast_shapes(&[x()?.shape, &target])?,
            )])
        }
        Op::Pad => {
            let (begin, end) = pad_amounts(inputs)?;
            let shape = x()?.shape;
            let out = (0..shape.len())
                .map(|i| {
                    let d = shape[i] as i64 + begin[i] + end[i];
                    usize::try_from(d).map_err(|_| format!("padding makes axis {i} negative"))
                })
                .collect::<InferResult<_>>()?;
            Ok(vec![(x()?.dtype, out)])
        }
        Op::Resize { .. } => Ok(vec![(x()?.dtype, resize_shape(inputs)?)]),
        Op::Reduce {
            op,
            axes,
            keep_dims,
            noop_with_empty_axes,
        } => {
            let shape = x()?.shape;
            let axes = reduce_axes(axes, inputs, shape.len(), *noop_with_empty_axes)?;
            let dtype = if *op == ReduceOp::ArgMax {
                DType::I64
            } else {
                x()?.dtype
            };
            Ok(vec![(dtype, reduced_shape(shape, &axes, *keep_dims))])
        }
        Op::ArgMax {
            axis, keep_dims, ..
        } => {
            let shape = x()?.shape;
            let axis = normalize_axis(*axis, shape.len())?;
            Ok(vec![(
                DType::I64,
                reduced_shape(shape, &[axis], *keep_dims),
            )])
        }
        Op::Shape { start, end } => {
            let rank = x()?.shape.len() as i64;
            let clamp = |v: i64| (if v < 0 { v + rank } else { v }).clamp(0, rank);
            let (s, e) = (clamp(*start), clamp(end.unwrap_or(rank)));
            Ok(vec![(DType::I64, vec![(e - s).max(0) as usize])])
        }
        Op::ConstantOfShape { value } => {
            let shape = const_input(inputs, 0, "the shape")?.ok_or("shape is required")?;
            Ok(vec![(
                value.dtype(),
                shape.ints().iter().map(|&d| d.max(0) as usize).collect(),
            )])
        }
        Op::Range => {
            let scalar = |i| -> InferResult<f64> {
                let t = const_input(inputs, i, "Range bounds")?
                    .ok_or("start, limit and delta are required")?;
                Ok(t.to_f32().first().copied().unwrap_or(0.0) as f64)
            };
            let (start, limit, delta) = (scalar(0)?, scalar(1)?, scalar(2)?);
            if delta == 0.0 {
                return Err("Range delta is zero".into());
            }
            let n = ((limit - start) / delta).ceil().max(0.0) as usize;
            Ok(vec![(x()?.dtype, vec![n])])
        }
        Op::Trilu { .. } => same(x()?.dtype),
        Op::Attention { .. } => {
            let (q, kt, v) = (x()?.shape, input(inputs, 1)?.shape, input(inputs, 2)?.shape);
            let scores = matmul_shape(q, kt)?;
            Ok(vec![(DType::F32, matmul_shape(&scores, v)?)])
        }
        Op::AttentionGrad { part, .. } => {
            let shape = match part {
                AttentionPart::Statistics => {
                    let mut rows = x()?.shape.to_vec();
                    *rows.last_mut().ok_or("attention of a scalar")? = 2;
                    rows
                }
                AttentionPart::Query => x()?.shape.to_vec(),
                AttentionPart::Key => input(inputs, 1)?.shape.to_vec(),
                AttentionPart::Value => input(inputs, 2)?.shape.to_vec(),
            };
            Ok(vec![(DType::F32, shape)])
        }
    }
}

/// Output shape of a numpy matmul (1-D operands promoted and their axis removed after).
pub fn matmul_shape(a: &[usize], b: &[usize]) -> InferResult<Vec<usize>> {
    if a.is_empty() || b.is_empty() {
        return Err("MatMul of a scalar".into());
    }
    let a2: Vec<usize> = if a.len() == 1 {
        vec![1, a[0]]
    } else {
        a.to_vec()
    };
    let b2: Vec<usize> = if b.len() == 1 {
        vec![b[0], 1]
    } else {
        b.to_vec()
    };
    let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
    let (k2, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
    if k != k2 {
        return Err(format!("MatMul inner dimensions differ: {a:?} x {b:?}"));
    }
    let mut out = broadcast_shapes(&[&a2[..a2.len() - 2], &b2[..b2.len() - 2]])?;
    if a.len() > 1 {
        out.push(m);
    }
    if b.len() > 1 {
        out.push(n);
    }
    Ok(out)
}

/// Resolved 2-D convolution geometry.
#[derive(Clone, Debug)]
pub struct ConvGeometry {
    pub batch: usize,
    pub in_channels: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub out_channels: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
    /// Padding before each spatial axis; the padding after only sets the output size.
    pub pad: [usize; 2],
    pub out_h: usize,
    pub out_w: usize,
    pub group: usize,
}

impl ConvGeometry {
    pub fn output_shape(&self) -> Vec<usize> {
        vec![self.batch, self.out_channels, self.out_h, self.out_w]
    }
}

pub fn conv_geometry(attrs: &ConvAttrs, x: &[usize], w: &[usize]) -> InferResult<ConvGeometry> {
    if x.len() != 4 || w.len() != 4 {
        return Err(format!(
            "only 2-D convolution is supported (input {x:?}, weight {w:?})"
        ));
    }
    let two = |v: &[usize], default: usize| -> [usize; 2] {
        if v.len() >= 2 {
            [v[0], v[1]]
        } else {
            [default, default]
        }
    };
    let (kernel, stride, dilation) = (
        [w[2], w[3]],
        two(&attrs.strides, 1),
        two(&attrs.dilations, 1),
    );
    if x[1] != w[1] * attrs.group || !w[0].is_multiple_of(attrs.group) {
        return Err(format!(
            "channels of input {x:?} and weight {w:?} do not match group {}",
            attrs.group
        ));
    }
    let mut pad = [0usize; 2];
    let mut out = [0usize; 2];
    for i in 0..2 {
        let extent = dilation[i] * (kernel[i] - 1) + 1;
        let (begin, end) = match attrs.auto_pad.as_str() {
            "NOTSET" => {
                if attrs.pads.len() == 4 {
                    (attrs.pads[i], attrs.pads[i + 2])
                } else {
                    (0, 0)
                }
            }
            "VALID" => (0, 0),
            "SAME_UPPER" | "SAME_LOWER" => {
                let o = x[2 + i].div_ceil(stride[i]).max(1);
                let total = ((o - 1) * stride[i] + extent).saturating_sub(x[2 + i]);
                let small = total / 2;
                if attrs.auto_pad == "SAME_UPPER" {
                    (small, total - small)
                } else {
                    (total - small, small)
                }
            }
            other => return Err(format!("auto_pad `{other}`")),
        };
        let padded = x[2 + i] + begin + end;
        if padded < extent {
            return Err(format!("kernel {kernel:?} larger than padded input {x:?}"));
        }
        pad[i] = begin;
        out[i] = (padded - extent) / stride[i] + 1;
    }
    Ok(ConvGeometry {
        batch: x[0],
        in_channels: x[1],
        in_h: x[2],
        in_w: x[3],
        out_channels: w[0],
        kernel,
        stride,
        dilation,
        pad,
        out_h: out[0],
        out_w: out[1],
        group: attrs.group,
    })
}

pub fn transpose_perm(perm: Option<&[i64]>, rank: usize) -> InferResult<Vec<usize>> {
    let perm: Vec<usize> = match perm {
        Some(p) => p
            .iter()
            .map(|&a| normalize_axis(a, rank))
            .collect::<InferResult<_>>()?,
        None => (0..rank).rev().collect(),
    };
    let mut seen = vec![false; rank];
    for &p in &perm {
        if std::mem::replace(&mut seen[p], true) {
            return Err(format!("perm {perm:?} is not a permutation"));
        }
    }
    if perm.len() != rank {
        return Err(format!("perm {perm:?} does not match rank {rank}"));
    }
    Ok(perm)
}

pub fn reshape_shape(shape: &[usize], target: &[i64], allow_zero: bool) -> InferResult<Vec<usize>> {
    let mut out = Vec::with_capacity(target.len());
    let mut infer_at = None;
    for (i, &d) in target.iter().enumerate() {
        match d {
            -1 if infer_at.is_none() => {
                infer_at = Some(i);
                out.push(1);
            }
            0 if !allow_zero => out.push(*shape.get(i).ok_or("0 in shape beyond input rank")?),
            d if d >= 0 => out.push(d as usize),
            _ => return Err(format!("invalid target shape {target:?}")),
        }
    }
    let total = numel(shape);
    if let Some(i) = infer_at {
        let known = numel(&out);
        if known == 0 || !total.is_multiple_of(known) {
            return Err(format!("cannot reshape {shape:?} to {target:?}"));
        }
        out[i] = total / known;
    }
    if numel(&out) != total {
        return Err(format!(
            "cannot reshape {shape:?} ({total} elements) to {out:?}"
        ));
    }
    Ok(out)
}

fn axes_from(
    attr: &Option<Vec<i64>>,
    inputs: &[Option<InputInfo>],
    i: usize,
) -> InferResult<Option<Vec<i64>>> {
    if let Some(axes) = attr {
        return Ok(Some(axes.clone()));
    }
    Ok(const_input(inputs, i, "axes")?.map(|t| t.ints()))
}

/// Start offsets, steps and result shape of a Slice, all resolved.
pub struct SlicePlan {
    pub starts: Vec<usize>,
    pub steps: Vec<i64>,
    pub shape: Vec<usize>,
}

pub fn slice_plan(inputs: &[Option<InputInfo>]) -> InferResult<SlicePlan> {
    let shape = input(inputs, 0)?.shape;
    let rank = shape.len();
    let ints = |i, what| -> InferResult<Option<Vec<i64>>> {
        Ok(const_input(inputs, i, what)?.map(|t| t.ints()))
    };
    let starts = ints(1, "starts")?.ok_or("starts are required")?;
    let ends = ints(2, "ends")?.ok_or("ends are required")?;
    let axes = ints(3, "axes")?.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = ints(4, "steps")?.unwrap_or_else(|| vec![1; starts.len()]);
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
        return Err("starts, ends, axes and steps differ in length".into());
    }
    let mut plan = SlicePlan {
        starts: vec![0; rank],
        steps: vec![1; rank],
        shape: shape.to_vec(),
    };
    for i in 0..starts.len() {
        let axis = normalize_axis(axes[i], rank)?;
        let (dim, step) = (shape[axis] as i64, steps[i]);
        if step == 0 {
            return Err("slice step 0".into());
        }
        let resolve = |v: i64| if v < 0 { v.saturating_add(dim) } else { v };
        let (start, end) = if step > 0 {
            (
                resolve(starts[i]).clamp(0, dim),
                resolve(ends[i]).clamp(0, dim),
            )
        } else {
            (
                resolve(starts[i]).clamp(0, dim - 1),
                resolve(ends[i]).clamp(-1, dim - 1),
            )
        };
        let len = if step > 0 {
            (end - start + step - 1).div_euclid(step).max(0)
        } else {
            (start - end + (-step) - 1).div_euclid(-step).max(0)
        };
        plan.starts[axis] = if len > 0 { start as usize } else { 0 };
        plan.steps[axis] = step;
        plan.shape[axis] = len as usize;
    }
    Ok(plan)
}

pub fn split_sizes(
    dim: usize,
    attr: &Option<Vec<i64>>,
    inputs: &[Option<InputInfo>],
    outputs: usize,
) -> InferResult<Vec<usize>> {
    let split = match attr {
        Some(s) => Some(s.clone()),
        None => const_input(inputs, 1, "split sizes")?.map(|t| t.ints()),
    };
    match split {
        Some(s) => {
            let sizes: Vec<usize> = s.iter().map(|&x| x.max(0) as usize).collect();
            if sizes.iter().sum::<usize>() != dim || sizes.len() != outputs {
                return Err(format!(
                    "split {s:?} does not fit axis of {dim} into {outputs} outputs"
                ));
            }
            Ok(sizes)
        }
        None => {
            let chunk = dim.div_ceil(outputs.max(1));
            Ok((0..outputs)
                .map(|i| chunk.min(dim.saturating_sub(i * chunk)))
                .collect())
        }
    }
}

/// Padding before and after each axis (may be negative: cropping).
pub fn pad_amounts(inputs: &[Option<InputInfo>]) -> InferResult<(Vec<i64>, Vec<i64>)> {
    let rank = input(inputs, 0)?.shape.len();
    let pads = const_input(inputs, 1, "pads")?
        .ok_or("pads are required")?
        .ints();
    let axes = match const_input(inputs, 3, "axes")? {
        Some(t) => t
            .ints()
            .iter()
            .map(|&a| normalize_axis(a, rank))
            .collect::<InferResult<Vec<_>>>()?,
        None => (0..rank).collect(),
    };
    if pads.len() != 2 * axes.len() {
        return Err(format!("{} pads for {} axes", pads.len(), axes.len()));
    }
    let (mut begin, mut end) = (vec![0; rank], vec![0; rank]);
    for (i, &a) in axes.iter().enumerate() {
        begin[a] = pads[i];
        end[a] = pads[i + axes.len()];
    }
    Ok((begin, end))
}

pub fn resize_shape(inputs: &[Option<InputInfo>]) -> InferResult<Vec<usize>> {
    let shape = input(inputs, 0)?.shape;
    if let Some(sizes) = const_input(inputs, 3, "sizes")?.filter(|t| !t.is_empty()) {
        let sizes = sizes.ints();
        if sizes.len() != shape.len() {
            return Err("sizes must give every axis".into());
        }
        return Ok(sizes.iter().map(|&s| s.max(0) as usize).collect());
    }
    let scales = const_input(inputs, 2, "scales")?
        .filter(|t| !t.is_empty())
        .ok_or("Resize needs scales or sizes")?
        .to_f32();
    if scales.len() != shape.len() {
        return Err("scales must give every axis".into());
    }
    Ok(shape
        .iter()
        .zip(scales.iter())
        .map(|(&d, &s)| (d as f32 * s).floor() as usize)
        .collect())
}

/// The axes a reduction runs over, sorted.
pub fn reduce_axes(
    attr: &Option<Vec<i64>>,
    inputs: &[Option<InputInfo>],
    rank: usize,
    noop_if_empty: bool,
) -> InferResult<Vec<usize>> {
    let axes = axes_from(attr, inputs, 1)?.unwrap_or_default();
    if axes.is_empty() {
        return Ok(if noop_if_empty {
            vec![]
        } else {
            (0..rank).collect()
        });
    }
    let mut axes = axes
        .iter()
        .map(|&a| normalize_axis(a, rank))
        .collect::<InferResult<Vec<_>>>()?;
    axes.sort_unstable();
    axes.dedup();
    Ok(axes)
}

pub fn reduced_shape(shape: &[usize], axes: &[usize], keep_dims: bool) -> Vec<usize> {
    (0..shape.len())
        .filter_map(|i| match (axes.contains(&i), keep_dims) {
            (false, _) => Some(shape[i]),
            (true, true) => Some(1),
            (true, false) => None,
        })
        .collect()
}
