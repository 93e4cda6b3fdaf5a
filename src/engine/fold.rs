//! Host evaluation of operators whose inputs are all constant: the shape arithmetic that
//! exporters emit (Shape -> Gather -> Concat -> Reshape ...), constant masks and the odd
//! constant subexpression. It runs once, at session creation, so only real compute reaches
//! the GPU.

use super::infer::{self, InputInfo};
use super::ops::{
    BinaryOp, Op, ReduceOp, UnaryOp, broadcast_strides, contiguous_strides, normalize_axis,
};
use super::tensor::{DType, HostData, HostTensor, numel};

type FoldResult<T> = std::result::Result<T, String>;

/// Whether the host evaluator implements `op`. Heavy compute is never folded.
pub fn can_fold(op: &Op) -> bool {
    !matches!(
        op,
        Op::MatMul
            | Op::Gemm { .. }
            | Op::Conv(_)
            | Op::InstanceNorm { .. }
            | Op::LayerNorm { .. }
            | Op::GroupNorm { .. }
            | Op::Softmax { .. }
            | Op::Resize { .. }
            | Op::Attention { .. }
            | Op::AttentionGrad { .. }
    )
}

/// Evaluates `op` on constant inputs. `outputs` gives each output's inferred type and shape.
pub fn fold(
    op: &Op,
    infos: &[Option<InputInfo>],
    outputs: &[infer::TypeShape],
) -> FoldResult<Vec<HostTensor>> {
    if let Op::Shape { start, .. } = op {
        // Shapes are static, so Shape folds whatever its input is.
        let shape = infer::input(infos, 0)?.shape;
        let rank = shape.len() as i64;
        let s = (if *start < 0 { start + rank } else { *start }).clamp(0, rank) as usize;
        let dims = shape[s..s + outputs[0].1[0]]
            .iter()
            .map(|&d| d as i64)
            .collect();
        return Ok(vec![HostTensor::i64(outputs[0].1.clone(), dims)]);
    }
    let inputs: Vec<Option<&HostTensor>> =
        infos.iter().map(|i| i.and_then(|i| i.constant)).collect();
    let inputs = inputs.as_slice();
    let x = || inputs[0].ok_or_else(|| "input 0 is required".to_string());
    let (dtype, shape) = outputs[0].clone();
    let one = |t: HostTensor| Ok(vec![t]);
    match op {
        Op::Unary(u) => one(map_values(x()?, dtype, |v| unary(*u, v))),
        Op::Cast(to) => one(x()?.cast(*to)),
        Op::Binary(b) => one(binary(
            *b,
            x()?,
            inputs[1].ok_or("input 1 is required")?,
            &shape,
            dtype,
        )),
        Op::Where => {
            let (c, a, b) = (
                x()?,
                inputs[1].ok_or("X is required")?,
                inputs[2].ok_or("Y is required")?,
            );
            let cond = broadcast_pick(c, &shape).to_bool();
            let (a, b) = (broadcast_pick(a, &shape), broadcast_pick(b, &shape));
            let picks: Vec<usize> = (0..cond.len()).collect();
            let a = a.data_owned();
            let b = b.data_owned();
            one(HostTensor {
                shape,
                data: zip_select(&cond, a, b, &picks),
            })
        }
        Op::Reshape { .. } | Op::Flatten { .. } | Op::Squeeze { .. } | Op::Unsqueeze { .. } => {
            one(HostTensor {
                shape,
                data: x()?.data.clone(),
            })
        }
        Op::Transpose { perm } => {
            let t = x()?;
            let perm = infer::transpose_perm(perm.as_deref(), t.shape.len())?;
            let src = contiguous_strides(&t.shape);
            let strides: Vec<isize> = perm.iter().map(|&p| src[p] as isize).collect();
            one(take(
                t,
                shape.clone(),
                &strided_indices(&shape, &strides, 0),
            ))
        }
        Op::Expand => one(broadcast_pick(x()?, &shape)),
        Op::Concat { axis } => {
            let parts: Vec<&HostTensor> = inputs.iter().flatten().copied().collect();
            let axis = normalize_axis(*axis, shape.len())?;
            let outer = numel(&shape[..axis]);
            let mut out = Vec::with_capacity(numel(&shape));
            let typed: Vec<HostData> = parts.iter().map(|p| p.cast(dtype).data).collect();
            for o in 0..outer {
                for (p, data) in parts.iter().zip(&typed) {
                    let chunk = numel(&p.shape[axis..]);
                    out.push((data, o * chunk..(o + 1) * chunk));
                }
            }
            one(HostTensor {
                shape,
                data: concat_ranges(dtype, &out),
            })
        }
        Op::Slice => {
            let t = x()?;
            let plan = infer::slice_plan(infos)?;
            let src = contiguous_strides(&t.shape);
            let base: isize = plan
                .starts
                .iter()
                .zip(&src)
                .map(|(&s, &st)| (s * st) as isize)
                .sum();
            let strides: Vec<isize> = plan
                .steps
                .iter()
                .zip(&src)
                .map(|(&step, &st)| step as isize * st as isize)
                .collect();
            one(take(
                t,
                shape.clone(),
                &strided_indices(&shape, &strides, base),
            ))
        }
        Op::Split { axis, .. } => {
            let t = x()?;
            let axis = normalize_axis(*axis, t.shape.len())?;
            let src = contiguous_strides(&t.shape);
            let mut offset = 0;
            let mut results = Vec::new();
            for (_, out_shape) in outputs {
                let strides: Vec<isize> = src.iter().map(|&s| s as isize).collect();
                let base = (offset * src[axis]) as isize;
                results.push(take(
                    t,
                    out_shape.clone(),
                    &strided_indices(out_shape, &strides, base),
                ));
                offset += out_shape[axis];
            }
            Ok(results)
        }
        Op::Gather { axis } => {
            let (t, idx) = (x()?, inputs[1].ok_or("indices are required")?);
            let axis = normalize_axis(*axis, t.shape.len())?;
            let (dim, inner) = (t.shape[axis] as i64, numel(&t.shape[axis + 1..]));
            let outer = numel(&t.shape[..axis]);
            let mut picks = Vec::with_capacity(numel(&shape));
            let idx = idx.ints();
            for o in 0..outer {
                for &i in &idx {
                    let i = if i < 0 { i + dim } else { i };
                    if !(0..dim).contains(&i) {
                        return Err(format!("index {i} out of range for axis of {dim}"));
                    }
                    let base = (o * dim as usize + i as usize) * inner;
                    picks.extend(base..base + inner);
                }
            }
            one(take(t, shape, &picks))
        }
        Op::Pad => {
            let t = x()?;
            let pad_value = inputs
                .get(2)
                .copied()
                .flatten()
                .map_or(0.0, |v| v.to_f32().first().copied().unwrap_or(0.0));
            let (begin, _) = infer::pad_amounts(infos)?;
            let src = contiguous_strides(&t.shape);
            let values = t.to_f32();
            let mut out = vec![pad_value; numel(&shape)];
            for (o, slot) in out.iter_mut().enumerate() {
                if let Some(i) = padded_source(o, &shape, &t.shape, &begin, &src) {
                    *slot = values[i];
                }
            }
            one(HostTensor::f32(shape, out).cast(dtype))
        }
        Op::ConstantOfShape { value } => {
            let v = value.to_f32().first().copied().unwrap_or(0.0);
            let ints = value.to_i64().first().copied().unwrap_or(0);
            one(match value.dtype() {
                DType::I64 => HostTensor::i64(shape.clone(), vec![ints; numel(&shape)]),
                d => HostTensor::filled(d, shape, v as f64),
            })
        }
        Op::Range => {
            let n = shape[0];
            one(if dtype == DType::I64 {
                let (s, d) = (x()?.ints()[0], inputs[2].ok_or("delta")?.ints()[0]);
                HostTensor::i64(shape, (0..n as i64).map(|i| s + i * d).collect())
            } else {
                let (s, d) = (x()?.to_f32()[0], inputs[2].ok_or("delta")?.to_f32()[0]);
                HostTensor::f32(shape, (0..n).map(|i| s + i as f32 * d).collect())
            })
        }
        Op::Trilu { upper } => {
            let t = x()?;
            let k = inputs.get(1).copied().flatten().map_or(0, |k| k.ints()[0]);
            let rank = t.shape.len();
            if rank < 2 {
                return Err("Trilu needs rank >= 2".into());
            }
            let (rows, cols) = (t.shape[rank - 2], t.shape[rank - 1]);
            let keep: Vec<bool> = (0..t.len())
                .map(|i| {
                    let (r, c) = (((i / cols) % rows) as i64, (i % cols) as i64);
                    if *upper { c - r >= k } else { c - r <= k }
                })
                .collect();
            let zero = HostTensor::filled(dtype, t.shape.clone(), 0.0);
            let picks: Vec<usize> = (0..t.len()).collect();
            one(HostTensor {
                shape,
                data: zip_select(&keep, t.cast(dtype).data, zero.data, &picks),
            })
        }
        Op::ArgMax {
            axis, select_last, ..
        } => {
            let t = x()?;
            let axis = normalize_axis(*axis, t.shape.len())?;
            let values = t.to_f32();
            one(HostTensor::i64(
                shape,
                reduce_along(&t.shape, &[axis], |idx| {
                    let mut best = 0;
                    for (j, &i) in idx.iter().enumerate() {
                        let (v, b) = (values[i], values[idx[best]]);
                        if v > b || (*select_last && v == b) {
                            best = j;
                        }
                    }
                    best as f64
                })
                .into_iter()
                .map(|v| v as i64)
                .collect(),
            ))
        }
        Op::Reduce {
            op,
            axes,
            noop_with_empty_axes,
            ..
        } => {
            let t = x()?;
            let axes = infer::reduce_axes(axes, infos, t.shape.len(), *noop_with_empty_axes)?;
            let values = t.to_f32();
            let reduced = reduce_along(&t.shape, &axes, |idx| {
                let it = idx.iter().map(|&i| values[i] as f64);
                match op {
                    ReduceOp::Sum => it.sum(),
                    ReduceOp::Mean => it.sum::<f64>() / idx.len().max(1) as f64,
                    ReduceOp::Max => it.fold(f64::NEG_INFINITY, f64::max),
                    ReduceOp::Min => it.fold(f64::INFINITY, f64::min),
                    ReduceOp::Prod => it.product(),
                    ReduceOp::ArgMax => unreachable!("ArgMax is its own op"),
                }
            });
            one(HostTensor::f32(shape, reduced.into_iter().map(|v| v as f32).collect()).cast(dtype))
        }
        other => Err(format!("{} cannot be evaluated on the host", other.name())),
    }
}

/// The scalar semantics of unary ops, shared in spirit with `elementwise.wgsl`.
fn unary(op: UnaryOp, x: f64) -> f64 {
    match op {
        UnaryOp::Identity => x,
        UnaryOp::Neg => -x,
        UnaryOp::Abs => x.abs(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Reciprocal => 1.0 / x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sin => x.sin(),
        UnaryOp::Cos => x.cos(),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        UnaryOp::Relu => x.max(0.0),
        UnaryOp::Erf => erf(x),
        UnaryOp::Floor => x.floor(),
        UnaryOp::Ceil => x.ceil(),
        UnaryOp::Not => (x == 0.0) as u8 as f64,
        UnaryOp::Silu => x / (1.0 + (-x).exp()),
    }
}

/// erf to double precision (Abramowitz & Stegun 7.1.26 is not enough for folding tests).
fn erf(x: f64) -> f64 {
    // Series for small |x|, continued fraction for erfc otherwise.
    let ax = x.abs();
    let r = if ax < 2.5 {
        let mut sum = ax;
        let mut term = ax;
        let x2 = ax * ax;
        for n in 1..60 {
            term *= -x2 / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        let mut f = 0.0;
        for n in (1..60).rev() {
            f = (n as f64 / 2.0) / (ax + f);
        }
        1.0 - (-ax * ax).exp() / std::f64::consts::PI.sqrt() / (ax + f)
    };
    r.copysign(x)
}

fn map_values(t: &HostTensor, dtype: DType, f: impl Fn(f64) -> f64) -> HostTensor {
    let shape = t.shape.clone();
    match dtype {
        DType::F32 => HostTensor::f32(
            shape,
            t.to_f32().iter().map(|&v| f(v as f64) as f32).collect(),
        ),
        DType::I64 => HostTensor::i64(
            shape,
            t.to_i64().iter().map(|&v| f(v as f64) as i64).collect(),
        ),
        DType::Bool => HostTensor::bool(
            shape,
            t.to_f32().iter().map(|&v| f(v as f64) != 0.0).collect(),
        ),
    }
}

fn binary(
    op: BinaryOp,
    a: &HostTensor,
    b: &HostTensor,
    shape: &[usize],
    dtype: DType,
) -> HostTensor {
    let (a, b) = (broadcast_pick(a, shape), broadcast_pick(b, shape));
    let shape = shape.to_vec();
    if a.dtype() == DType::I64 && b.dtype() == DType::I64 {
        // Exact integer arithmetic: shape constants such as i64::MAX must survive.
        let (x, y) = (a.to_i64(), b.to_i64());
        let pairs = x.iter().zip(y.iter());
        return match op {
            _ if op.is_comparison() => HostTensor::bool(
                shape,
                pairs
                    .map(|(&p, &q)| compare(op, p as f64, q as f64, p.cmp(&q)))
                    .collect(),
            ),
            BinaryOp::Add => {
                HostTensor::i64(shape, pairs.map(|(p, q)| p.wrapping_add(*q)).collect())
            }
            BinaryOp::Sub => {
                HostTensor::i64(shape, pairs.map(|(p, q)| p.wrapping_sub(*q)).collect())
            }
            BinaryOp::Mul => {
                HostTensor::i64(shape, pairs.map(|(p, q)| p.wrapping_mul(*q)).collect())
            }
            BinaryOp::Div => HostTensor::i64(
                shape,
                pairs
                    .map(|(p, q)| if *q == 0 { 0 } else { p / q })
                    .collect(),
            ),
            BinaryOp::Max => HostTensor::i64(shape, pairs.map(|(p, q)| *p.max(q)).collect()),
            BinaryOp::Min => HostTensor::i64(shape, pairs.map(|(p, q)| *p.min(q)).collect()),
            _ => HostTensor::i64(
                shape,
                pairs
                    .map(|(&p, &q)| (p as f64).powf(q as f64) as i64)
                    .collect(),
            ),
        };
    }
    let (x, y) = (a.to_f32(), b.to_f32());
    let values = x.iter().zip(y.iter()).map(|(&p, &q)| {
        let (p, q) = (p as f64, q as f64);
        match op {
            _ if op.is_comparison() => compare(op, p, q, p.total_cmp(&q)) as u8 as f64,
            BinaryOp::Add => p + q,
            BinaryOp::Sub => p - q,
            BinaryOp::Mul => p * q,
            BinaryOp::Div => p / q,
            BinaryOp::Pow => p.powf(q),
            BinaryOp::Max => p.max(q),
            BinaryOp::Min => p.min(q),
            _ => unreachable!("comparisons handled above"),
        }
    });
    match dtype {
        DType::Bool => HostTensor::bool(shape, values.map(|v| v != 0.0).collect()),
        DType::I64 => HostTensor::i64(shape, values.map(|v| v as i64).collect()),
        DType::F32 => HostTensor::f32(shape, values.map(|v| v as f32).collect()),
    }
}

fn compare(op: BinaryOp, p: f64, q: f64, order: std::cmp::Ordering) -> bool {
    use std::cmp::Ordering::*;
    match op {
        BinaryOp::Equal => order == Equal,
        BinaryOp::Less => order == Less,
        BinaryOp::Greater => order == Greater,
        BinaryOp::LessOrEqual => order != Greater,
        BinaryOp::GreaterOrEqual => order != Less,
        BinaryOp::And => p != 0.0 && q != 0.0,
        BinaryOp::Or => p != 0.0 || q != 0.0,
        BinaryOp::Xor => (p != 0.0) != (q != 0.0),
        _ => unreachable!("not a comparison"),
    }
}

/// `t` broadcast to `shape` (a copy).
fn broadcast_pick(t: &HostTensor, shape: &[usize]) -> HostTensor {
    if t.shape == shape {
        return t.clone();
    }
    let strides: Vec<isize> = broadcast_strides(&t.shape, shape)
        .iter()
        .map(|&s| s as isize)
        .collect();
    take(t, shape.to_vec(), &strided_indices(shape, &strides, 0))
}

/// For each element of `shape` in row-major order, `base + sum(index * stride)`.
fn strided_indices(shape: &[usize], strides: &[isize], base: isize) -> Vec<usize> {
    let n = numel(shape);
    let mut out = Vec::with_capacity(n);
    let mut index = vec![0usize; shape.len()];
    let mut offset = base;
    for _ in 0..n {
        out.push(offset as usize);
        for d in (0..shape.len()).rev() {
            index[d] += 1;
            offset += strides[d];
            if index[d] < shape[d] {
                break;
            }
            offset -= strides[d] * shape[d] as isize;
            index[d] = 0;
        }
    }
    out
}

/// A new tensor of `shape` whose elements are `t`'s elements at `picks`.
fn take(t: &HostTensor, shape: Vec<usize>, picks: &[usize]) -> HostTensor {
    let data = match t.dtype() {
        DType::F32 => {
            let v = t.to_f32();
            HostData::F32(picks.iter().map(|&i| v[i]).collect())
        }
        DType::I64 => {
            let v = t.to_i64();
            HostData::I64(picks.iter().map(|&i| v[i]).collect())
        }
        DType::Bool => {
            let v = t.to_bool();
            HostData::Bool(picks.iter().map(|&i| v[i]).collect())
        }
    };
    HostTensor { shape, data }
}

impl HostTensor {
    fn data_owned(&self) -> HostData {
        self.cast(self.dtype()).data
    }
}

/// Element-wise choice between two tensors of the same type: `a` where `cond`, else `b`.
fn zip_select(cond: &[bool], a: HostData, b: HostData, picks: &[usize]) -> HostData {
    fn choose<T: Copy>(cond: &[bool], a: &[T], b: &[T], picks: &[usize]) -> Vec<T> {
        picks
            .iter()
            .map(|&i| if cond[i] { a[i] } else { b[i] })
            .collect()
    }
    match (a, b) {
        (HostData::F32(a), HostData::F32(b)) => HostData::F32(choose(cond, &a, &b, picks)),
        (HostData::I64(a), HostData::I64(b)) => HostData::I64(choose(cond, &a, &b, picks)),
        (HostData::Bool(a), HostData::Bool(b)) => HostData::Bool(choose(cond, &a, &b, picks)),
        (a, b) => {
            let (a, b) = (
                HostTensor {
                    shape: vec![cond.len()],
                    data: a,
                },
                HostTensor {
                    shape: vec![cond.len()],
                    data: b,
                },
            );
            let (a, b) = (a.to_f32(), b.cast(DType::F32).to_f32().into_owned());
            HostData::F32(choose(cond, &a, &b, picks))
        }
    }
}

fn concat_ranges(dtype: DType, parts: &[(&HostData, std::ops::Range<usize>)]) -> HostData {
    match dtype {
        DType::F32 => HostData::F32(
            parts
                .iter()
                .flat_map(|(d, r)| match d {
                    HostData::F32(v) => v[r.clone()].to_vec(),
                    _ => unreachable!(),
                })
                .collect(),
        ),
        DType::I64 => HostData::I64(
            parts
                .iter()
                .flat_map(|(d, r)| match d {
                    HostData::I64(v) => v[r.clone()].to_vec(),
                    _ => unreachable!(),
                })
                .collect(),
        ),
        DType::Bool => HostData::Bool(
            parts
                .iter()
                .flat_map(|(d, r)| match d {
                    HostData::Bool(v) => v[r.clone()].to_vec(),
                    _ => unreachable!(),
                })
                .collect(),
        ),
    }
}

/// The source index of output element `o` of a Pad, or `None` in the padding.
fn padded_source(
    o: usize,
    out_shape: &[usize],
    in_shape: &[usize],
    begin: &[i64],
    src_strides: &[usize],
) -> Option<usize> {
    let mut rest = o;
    let mut src = 0;
    for d in (0..out_shape.len()).rev() {
        let i = (rest % out_shape[d]) as i64 - begin[d];
        rest /= out_shape[d];
        if i < 0 || i >= in_shape[d] as i64 {
            return None;
        }
        src += i as usize * src_strides[d];
    }
    Some(src)
}

/// Applies `f` to the flat indices of each group of elements that share the kept axes,
/// in row-major order of the kept axes.
fn reduce_along(shape: &[usize], axes: &[usize], mut f: impl FnMut(&[usize]) -> f64) -> Vec<f64> {
    let strides = contiguous_strides(shape);
    let kept: Vec<usize> = (0..shape.len()).filter(|i| !axes.contains(i)).collect();
    let kept_shape: Vec<usize> = kept.iter().map(|&i| shape[i]).collect();
    let kept_strides: Vec<isize> = kept.iter().map(|&i| strides[i] as isize).collect();
    let red_shape: Vec<usize> = axes.iter().map(|&i| shape[i]).collect();
    let red_strides: Vec<isize> = axes.iter().map(|&i| strides[i] as isize).collect();
    let inner = strided_indices(&red_shape, &red_strides, 0);
    strided_indices(&kept_shape, &kept_strides, 0)
        .into_iter()
        .map(|base| {
            let idx: Vec<usize> = inner.iter().map(|&i| base + i).collect();
            f(&idx)
        })
        .collect()
}
