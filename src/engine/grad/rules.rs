//! One gradient rule per operator: given a forward node and the gradients of its outputs,
//! the nodes computing the gradients of its inputs (only those `wanted`), in the engine's
//! own operators. Refusals name what is missing.

use super::super::error::{Error, Result};
use super::super::graph::{Node, ValueId};
use super::super::infer::{
    ConvGeometry, conv_geometry, reduce_axes, reduced_shape, slice_plan, transpose_perm,
};
use super::super::ops::{
    BinaryOp, ConvAttrs, CoordinateMode, NearestMode, Op, ReduceOp, ResizeMode, UnaryOp,
    normalize_axis,
};
use super::super::passes::input_infos;
use super::super::tensor::{DType, HostTensor, numel};
use super::tape::Tape;

type Grads = Vec<Option<ValueId>>;

/// The gradients of `node`'s inputs from those of its outputs (`upstream`, `None` where an
/// output does not reach the loss).
pub fn backward(
    tape: &mut Tape,
    node: &Node,
    upstream: &[Option<ValueId>],
    wanted: &[bool],
) -> Result<Grads> {
    let refuse = |reason: &str| Error::Node {
        node: node.name.clone(),
        op_type: node.op.name(),
        reason: format!("cannot be differentiated: {reason}"),
    };
    let input = |i: usize| node.inputs[i].expect("wanted inputs are present");
    let y = node.outputs[0];
    let Some(g) = upstream[0] else {
        return match node.op {
            Op::Split { axis, .. } => split(tape, node, upstream, axis),
            _ => Ok(vec![None; node.inputs.len()]),
        };
    };
    let only_first = |grad: ValueId| {
        let mut grads = vec![None; node.inputs.len()];
        grads[0] = Some(grad);
        Ok(grads)
    };
    match &node.op {
        Op::Unary(op) => {
            let grad = unary(tape, *op, input(0), y, g)?.ok_or_else(|| refuse("no derivative"))?;
            only_first(grad)
        }
        Op::Binary(op) => binary(tape, *op, input(0), input(1), y, g, wanted)
            .and_then(|grads| grads.ok_or_else(|| refuse("comparison or selection"))),
        Op::Where => {
            let zero = tape.scalar(0.0);
            let condition = input(0);
            let mut grads = vec![None; 3];
            for (k, branch) in [(1, [g, zero]), (2, [zero, g])] {
                if wanted[k] {
                    let picked = tape.op(Op::Where, &[condition, branch[0], branch[1]])?;
                    let shape = tape.shape(input(k)).to_vec();
                    grads[k] = Some(tape.unbroadcast(picked, &shape)?);
                }
            }
            Ok(grads)
        }
        Op::Cast(_) => only_first(g),
        Op::MatMul => {
            if tape.shape(input(0)).len() < 2 || tape.shape(input(1)).len() < 2 {
                return Err(refuse("1-D operands"));
            }
            matmul(tape, input(0), input(1), g, wanted)
        }
        Op::Gemm {
            alpha,
            beta,
            trans_a,
            trans_b,
        } => gemm(tape, node, g, wanted, *alpha, *beta, *trans_a, *trans_b),
        Op::Attention { scale } => attention(tape, input(0), input(1), input(2), g, *scale, wanted),
        Op::Conv(attrs) => {
            if attrs.group != 1 {
                return Err(refuse("grouped convolution"));
            }
            conv(tape, node, attrs, g, wanted)
        }
        Op::InstanceNorm { epsilon } => {
            let rank = tape.shape(input(0)).len();
            affine_norm(tape, node, g, wanted, (2..rank).collect(), *epsilon, 1)
        }
        Op::LayerNorm { axis, epsilon } => {
            let rank = tape.shape(input(0)).len();
            let axis = normalize_axis(*axis, rank).map_err(|e| refuse(&e))?;
            affine_norm(
                tape,
                node,
                g,
                wanted,
                (axis..rank).collect(),
                *epsilon,
                axis,
            )
        }
        Op::Softmax { axis, legacy } => {
            let rank = tape.shape(y).len();
            let axis = normalize_axis(*axis, rank).map_err(|e| refuse(&e))?;
            if *legacy && axis != rank - 1 {
                return Err(refuse("opset < 13 softmax over several axes"));
            }
            // dx = y * (g - sum(g * y))
            let gy = tape.mul(g, y)?;
            let sum = tape.reduce(ReduceOp::Sum, gy, vec![axis], true)?;
            let centred = tape.sub(g, sum)?;
            only_first(tape.mul(y, centred)?)
        }
        Op::Transpose { perm } => {
            let rank = tape.shape(g).len();
            let perm = transpose_perm(perm.as_deref(), rank).map_err(|e| refuse(&e))?;
            let mut inverse = vec![0; rank];
            for (i, &p) in perm.iter().enumerate() {
                inverse[p] = i;
            }
            only_first(tape.transpose(g, &inverse)?)
        }
        Op::Reshape { .. } | Op::Flatten { .. } | Op::Squeeze { .. } | Op::Unsqueeze { .. } => {
            let shape = tape.shape(input(0)).to_vec();
            only_first(tape.reshape(g, &shape)?)
        }
        Op::Expand => {
            let shape = tape.shape(input(0)).to_vec();
            only_first(tape.unbroadcast(g, &shape)?)
        }
        Op::Concat { axis } => concat(tape, node, g, *axis, wanted),
        Op::Split { axis, .. } => split(tape, node, upstream, *axis),
        Op::Slice => {
            let plan = slice_plan(&input_infos(tape.graph, node)).map_err(|e| refuse(&e))?;
            if plan.steps.iter().any(|&s| s != 1) {
                return Err(refuse("slices with steps other than 1"));
            }
            let x_shape = tape.shape(input(0)).to_vec();
            let begin: Vec<i64> = plan.starts.iter().map(|&s| s as i64).collect();
            let end: Vec<i64> = (0..x_shape.len())
                .map(|a| (x_shape[a] - plan.starts[a] - plan.shape[a]) as i64)
                .collect();
            only_first(tape.pad(g, &begin, &end)?)
        }
        Op::Pad => {
            // Cropping by the same amounts undoes constant padding.
            let x_shape = tape.shape(input(0)).to_vec();
            let pads = tape.graph.values[input(1)].constant.clone();
            let pads = pads
                .ok_or_else(|| refuse("pads computed at run time"))?
                .ints();
            let rank = x_shape.len();
            if pads.len() != 2 * rank || node.inputs.get(3).copied().flatten().is_some() {
                return Err(refuse("pads given for some axes only"));
            }
            let (begin, end): (Vec<i64>, Vec<i64>) =
                (0..rank).map(|a| (-pads[a], -pads[a + rank])).unzip();
            only_first(tape.pad(g, &begin, &end)?)
        }
        Op::Resize { mode, coordinates } => {
            let grad = resize(tape, input(0), g, *mode, *coordinates)?;
            only_first(grad.ok_or_else(|| refuse("only nearest upsampling by whole factors"))?)
        }
        Op::Reduce {
            op: op @ (ReduceOp::Sum | ReduceOp::Mean),
            axes,
            noop_with_empty_axes,
            ..
        } => {
            let (x_shape, y_count) = (tape.shape(input(0)).to_vec(), numel(tape.shape(y)));
            let axes = reduce_axes(
                axes,
                &input_infos(tape.graph, node),
                x_shape.len(),
                *noop_with_empty_axes,
            )
            .map_err(|e| refuse(&e))?;
            let kept = reduced_shape(&x_shape, &axes, true);
            let reshaped = tape.reshape(g, &kept)?;
            let mut spread = tape.expand(reshaped, &x_shape)?;
            if *op == ReduceOp::Mean {
                spread = tape.scale(spread, y_count as f32 / numel(&x_shape) as f32)?;
            }
            only_first(spread)
        }
        Op::Gather { axis } => {
            let rank = tape.shape(input(0)).len();
            if normalize_axis(*axis, rank) != Ok(0) {
                return Err(refuse("gathering along an axis other than the first"));
            }
            only_first(gather_table(tape, input(0), input(1), g)?)
        }
        other => Err(refuse(&format!("no gradient rule for {}", other.name()))),
    }
}

fn unary(
    tape: &mut Tape,
    op: UnaryOp,
    x: ValueId,
    y: ValueId,
    g: ValueId,
) -> Result<Option<ValueId>> {
    use UnaryOp as U;
    let grad = match op {
        U::Identity => g,
        U::Neg => tape.unary(U::Neg, g)?,
        U::Sqrt => {
            let half = tape.scale(g, 0.5)?;
            tape.binary(BinaryOp::Div, half, y)?
        }
        U::Reciprocal => {
            let yy = tape.mul(y, y)?;
            let gyy = tape.mul(g, yy)?;
            tape.unary(U::Neg, gyy)?
        }
        U::Exp => tape.mul(g, y)?,
        U::Log => tape.binary(BinaryOp::Div, g, x)?,
        U::Sin => {
            let cos = tape.unary(U::Cos, x)?;
            tape.mul(g, cos)?
        }
        U::Cos => {
            let sin = tape.unary(U::Sin, x)?;
            let gs = tape.mul(g, sin)?;
            tape.unary(U::Neg, gs)?
        }
        U::Tanh => {
            let yy = tape.mul(y, y)?;
            let one = tape.scalar(1.0);
            let slope = tape.sub(one, yy)?;
            tape.mul(g, slope)?
        }
        U::Sigmoid => {
            let one = tape.scalar(1.0);
            let rest = tape.sub(one, y)?;
            let slope = tape.mul(y, rest)?;
            tape.mul(g, slope)?
        }
        U::Silu => {
            // d/dx x s(x) = s + x s (1 - s)
            let s = tape.unary(U::Sigmoid, x)?;
            let one = tape.scalar(1.0);
            let rest = tape.sub(one, s)?;
            let xs = tape.mul(x, s)?;
            let tail = tape.mul(xs, rest)?;
            let slope = tape.binary(BinaryOp::Add, s, tail)?;
            tape.mul(g, slope)?
        }
        U::Relu => {
            let zero = tape.scalar(0.0);
            let positive = tape.binary(BinaryOp::Greater, x, zero)?;
            tape.op(Op::Where, &[positive, g, zero])?
        }
        U::Erf => {
            // d/dx erf(x) = 2/sqrt(pi) exp(-x^2)
            let xx = tape.mul(x, x)?;
            let minus = tape.unary(U::Neg, xx)?;
            let bell = tape.unary(U::Exp, minus)?;
            let slope = tape.scale(bell, std::f32::consts::FRAC_2_SQRT_PI)?;
            tape.mul(g, slope)?
        }
        U::Abs | U::Floor | U::Ceil | U::Not => return Ok(None),
    };
    Ok(Some(grad))
}

fn binary(
    tape: &mut Tape,
    op: BinaryOp,
    a: ValueId,
    b: ValueId,
    y: ValueId,
    g: ValueId,
    wanted: &[bool],
) -> Result<Option<Grads>> {
    use BinaryOp as B;
    let (ga, gb) = match op {
        B::Add => (Some(g), Some(g)),
        B::Sub => (
            Some(g),
            wanted[1].then(|| tape.unary(UnaryOp::Neg, g)).transpose()?,
        ),
        B::Mul => (
            wanted[0].then(|| tape.mul(g, b)).transpose()?,
            wanted[1].then(|| tape.mul(g, a)).transpose()?,
        ),
        B::Div => {
            let ga = tape.binary(B::Div, g, b)?;
            let gb = if wanted[1] {
                let gy = tape.mul(ga, y)?;
                Some(tape.unary(UnaryOp::Neg, gy)?)
            } else {
                None
            };
            (Some(ga), gb)
        }
        B::Pow => {
            let ga = if wanted[0] {
                let one = tape.scalar(1.0);
                let lower = tape.sub(b, one)?;
                let power = tape.binary(B::Pow, a, lower)?;
                let slope = tape.mul(b, power)?;
                Some(tape.mul(g, slope)?)
            } else {
                None
            };
            let gb = if wanted[1] {
                let log = tape.unary(UnaryOp::Log, a)?;
                let slope = tape.mul(y, log)?;
                Some(tape.mul(g, slope)?)
            } else {
                None
            };
            (ga, gb)
        }
        _ => return Ok(None),
    };
    let mut grads = vec![None, None];
    for (k, (grad, operand)) in [(ga, a), (gb, b)].into_iter().enumerate() {
        if let (true, Some(grad)) = (wanted[k], grad) {
            let shape = tape.shape(operand).to_vec();
            grads[k] = Some(tape.unbroadcast(grad, &shape)?);
        }
    }
    Ok(Some(grads))
}

/// numpy matmul: dA = g B^T, dB = A^T g, each summed over broadcast batch axes.
fn matmul(tape: &mut Tape, a: ValueId, b: ValueId, g: ValueId, wanted: &[bool]) -> Result<Grads> {
    let (a_shape, b_shape) = (tape.shape(a).to_vec(), tape.shape(b).to_vec());
    if a_shape.len() < 2 || b_shape.len() < 2 {
        return Err(Error::Parse("1-D matmul operands".into()));
    }
    let mut grads = vec![None; 2];
    if wanted[0] {
        let bt = tape.swap_last_two(b)?;
        let ga = tape.op(Op::MatMul, &[g, bt])?;
        grads[0] = Some(tape.unbroadcast(ga, &a_shape)?);
    }
    if wanted[1] {
        let at = tape.swap_last_two(a)?;
        let gb = tape.op(Op::MatMul, &[at, g])?;
        grads[1] = Some(tape.unbroadcast(gb, &b_shape)?);
    }
    Ok(grads)
}

/// The fused attention softmax(scale Q Kt) V, whose forward pass never stores the score
/// matrix: the backward pass recomputes it, one layer at a time (P below lives only while
/// this layer's gradients are computed), then
/// dV = P^T g, dP = g V^T, dS = scale P (dP - rowsum(dP P)), dQ = dS Kt^T, dKt = Q^T dS.
fn attention(
    tape: &mut Tape,
    q: ValueId,
    kt: ValueId,
    v: ValueId,
    g: ValueId,
    scale: f32,
    wanted: &[bool],
) -> Result<Grads> {
    let scores = tape.op(Op::MatMul, &[q, kt])?;
    let scaled = tape.scale(scores, scale)?;
    let softmax = Op::Softmax {
        axis: -1,
        legacy: false,
    };
    let p = tape.op(softmax, &[scaled])?;
    let mut grads = vec![None; 3];
    if wanted[2] {
        let pt = tape.swap_last_two(p)?;
        grads[2] = Some(tape.op(Op::MatMul, &[pt, g])?);
    }
    if wanted[0] || wanted[1] {
        let vt = tape.swap_last_two(v)?;
        let dp = tape.op(Op::MatMul, &[g, vt])?;
        let weighted = tape.mul(dp, p)?;
        let last = tape.shape(p).len() - 1;
        let rows = tape.reduce(ReduceOp::Sum, weighted, vec![last], true)?;
        let centred = tape.sub(dp, rows)?;
        let ds = tape.mul(p, centred)?;
        let ds = tape.scale(ds, scale)?;
        if wanted[0] {
            let k = tape.swap_last_two(kt)?;
            grads[0] = Some(tape.op(Op::MatMul, &[ds, k])?);
        }
        if wanted[1] {
            let qt = tape.swap_last_two(q)?;
            grads[1] = Some(tape.op(Op::MatMul, &[qt, ds])?);
        }
    }
    Ok(grads)
}

#[allow(clippy::too_many_arguments)]
fn gemm(
    tape: &mut Tape,
    node: &Node,
    g: ValueId,
    wanted: &[bool],
    alpha: f32,
    beta: f32,
    trans_a: bool,
    trans_b: bool,
) -> Result<Grads> {
    let (a, b) = (node.inputs[0].unwrap(), node.inputs[1].unwrap());
    let mut grads = vec![None; node.inputs.len()];
    // With A' = op(A), B' = op(B): dA' = alpha g B'^T, dB' = alpha A'^T g.
    let effective = |tape: &mut Tape, x: ValueId, transposed: bool| {
        if transposed {
            tape.transpose(x, &[1, 0])
        } else {
            Ok(x)
        }
    };
    if wanted[0] {
        let b_eff = effective(tape, b, trans_b)?;
        let bt = tape.transpose(b_eff, &[1, 0])?;
        let ga = tape.op(Op::MatMul, &[g, bt])?;
        let ga = effective(tape, ga, trans_a)?;
        grads[0] = Some(tape.scale(ga, alpha)?);
    }
    if wanted[1] {
        let a_eff = effective(tape, a, trans_a)?;
        let at = tape.transpose(a_eff, &[1, 0])?;
        let gb = tape.op(Op::MatMul, &[at, g])?;
        let gb = effective(tape, gb, trans_b)?;
        grads[1] = Some(tape.scale(gb, alpha)?);
    }
    if let Some(Some(c)) = node.inputs.get(2)
        && wanted[2]
    {
        let shape = tape.shape(*c).to_vec();
        let gc = tape.unbroadcast(g, &shape)?;
        grads[2] = Some(tape.scale(gc, beta)?);
    }
    Ok(grads)
}

/// 2-D convolution. The input's gradient is the transposed convolution, spelled as a Conv
/// of the gradient (zeros inserted between its pixels for strides > 1) with the filter
/// flipped and its channel axes swapped; the filter's gradient is a Conv of the input (its
/// channels as the batch) with the gradient as the filter (its batch as the channels),
/// the stride and dilation trading places.
fn conv(
    tape: &mut Tape,
    node: &Node,
    attrs: &ConvAttrs,
    g: ValueId,
    wanted: &[bool],
) -> Result<Grads> {
    let (x, w) = (node.inputs[0].unwrap(), node.inputs[1].unwrap());
    let geometry = conv_geometry(attrs, tape.shape(x), tape.shape(w)).map_err(Error::Parse)?;
    let mut grads = vec![None; node.inputs.len()];
    if wanted[0] {
        grads[0] = Some(conv_input_grad(tape, w, g, &geometry)?);
    }
    if wanted[1] {
        grads[1] = Some(conv_filter_grad(tape, x, g, &geometry)?);
    }
    if let Some(Some(_)) = node.inputs.get(2)
        && wanted[2]
    {
        grads[2] = Some(tape.reduce(ReduceOp::Sum, g, vec![0, 2, 3], false)?);
    }
    Ok(grads)
}

fn conv_attrs(strides: [usize; 2], dilations: [usize; 2], pads: [usize; 4]) -> Op {
    Op::Conv(ConvAttrs {
        group: 1,
        strides: strides.to_vec(),
        dilations: dilations.to_vec(),
        pads: pads.to_vec(),
        auto_pad: "NOTSET".into(),
    })
}

fn conv_input_grad(tape: &mut Tape, w: ValueId, g: ValueId, c: &ConvGeometry) -> Result<ValueId> {
    let (n, o) = (c.batch, c.out_channels);
    let mut spread = g;
    if c.stride != [1, 1] {
        let [sh, sw] = c.stride;
        let split = tape.reshape(g, &[n, o, c.out_h, 1, c.out_w, 1])?;
        let padded = tape.pad(split, &[0; 6], &[0, 0, 0, sh as i64 - 1, 0, sw as i64 - 1])?;
        let spaced = tape.reshape(padded, &[n, o, c.out_h * sh, c.out_w * sw])?;
        spread = tape.pad(spaced, &[0; 4], &[0, 0, 1 - sh as i64, 1 - sw as i64])?;
    }
    let swapped = tape.transpose(w, &[1, 0, 2, 3])?;
    let starts = tape.ints(&[-1, -1]);
    let ends = tape.ints(&[i64::MIN, i64::MIN]);
    let axes = tape.ints(&[2, 3]);
    let steps = tape.ints(&[-1, -1]);
    let flipped = tape.op(Op::Slice, &[swapped, starts, ends, axes, steps])?;
    let spread_shape = tape.shape(spread).to_vec();
    let mut pads = [0usize; 4];
    for i in 0..2 {
        let extent = c.dilation[i] * (c.kernel[i] - 1) + 1;
        let begin = extent as i64 - 1 - c.pad[i] as i64;
        let input = [c.in_h, c.in_w][i] as i64;
        let end = input - spread_shape[2 + i] as i64 - begin + extent as i64 - 1;
        if begin < 0 || end < 0 {
            return Err(Error::Parse(format!(
                "padding {:?} wider than the filter's reach",
                c.pad
            )));
        }
        (pads[i], pads[i + 2]) = (begin as usize, end as usize);
    }
    tape.op(conv_attrs([1, 1], c.dilation, pads), &[spread, flipped])
}

fn conv_filter_grad(tape: &mut Tape, x: ValueId, g: ValueId, c: &ConvGeometry) -> Result<ValueId> {
    let mut input = tape.transpose(x, &[1, 0, 2, 3])?;
    let filter = tape.transpose(g, &[1, 0, 2, 3])?;
    // Rows and columns past the last window the forward pass read are cropped; the rest
    // of the far side is padding.
    let mut pads = [c.pad[0], c.pad[1], 0, 0];
    let mut crop = [0i64; 4];
    for i in 0..2 {
        let extent = c.dilation[i] * (c.kernel[i] - 1) + 1;
        let reach = c.stride[i] * ([c.out_h, c.out_w][i] - 1) + extent;
        let available = [c.in_h, c.in_w][i] + c.pad[i];
        if reach >= available {
            pads[i + 2] = reach - available;
        } else {
            crop[2 + i] = reach as i64 - available as i64;
        }
    }
    if crop != [0; 4] {
        input = tape.pad(input, &[0; 4], &crop)?;
    }
    let grad = tape.op(conv_attrs(c.dilation, c.stride, pads), &[input, filter])?;
    tape.transpose(grad, &[1, 0, 2, 3])
}

/// Normalisation over `axes` with a scale and bias laid out like the input's axes from
/// `affine_from` on (InstanceNorm: per channel, axis 1; LayerNorm: the normalised axes).
fn affine_norm(
    tape: &mut Tape,
    node: &Node,
    g: ValueId,
    wanted: &[bool],
    axes: Vec<usize>,
    epsilon: f32,
    affine_from: usize,
) -> Result<Grads> {
    let x = node.inputs[0].unwrap();
    let x_shape = tape.shape(x).to_vec();
    let rank = x_shape.len();
    let scale = node.inputs.get(1).copied().flatten();
    let bias = node.inputs.get(2).copied().flatten();
    // Scale and bias broadcast against x from `affine_from` on; instance norm's are [C].
    let affine_shape: Vec<usize> = if affine_from == 1 {
        let mut s = vec![1; rank];
        s[1] = x_shape[1];
        s
    } else {
        x_shape
            .iter()
            .enumerate()
            .map(|(i, &d)| if i >= affine_from { d } else { 1 })
            .collect()
    };
    let mean = tape.reduce(ReduceOp::Mean, x, axes.clone(), true)?;
    let centred = tape.sub(x, mean)?;
    let square = tape.mul(centred, centred)?;
    let variance = tape.reduce(ReduceOp::Mean, square, axes.clone(), true)?;
    let eps = tape.scalar(epsilon);
    let shifted = tape.binary(BinaryOp::Add, variance, eps)?;
    let std = tape.unary(UnaryOp::Sqrt, shifted)?;
    let rstd = tape.unary(UnaryOp::Reciprocal, std)?;
    let normalised = tape.mul(centred, rstd)?;

    let mut grads = vec![None; node.inputs.len()];
    let affine_axes: Vec<usize> = (0..rank).filter(|&i| affine_shape[i] == 1).collect();
    let to_param = |tape: &mut Tape, v: ValueId, param: ValueId| -> Result<ValueId> {
        let summed = tape.reduce(ReduceOp::Sum, v, affine_axes.clone(), true)?;
        let shape = tape.shape(param).to_vec();
        tape.reshape(summed, &shape)
    };
    if let Some(s) = scale.filter(|_| wanted[1]) {
        let gn = tape.mul(g, normalised)?;
        grads[1] = Some(to_param(tape, gn, s)?);
    }
    if let Some(b) = bias.filter(|_| wanted[2]) {
        grads[2] = Some(to_param(tape, g, b)?);
    }
    let g_normalised = match scale {
        Some(s) => {
            let s = tape.reshape(s, &affine_shape)?;
            tape.mul(g, s)?
        }
        None => g,
    };
    // dx = rstd (gn - mean(gn) - xhat mean(gn xhat))
    let m1 = tape.reduce(ReduceOp::Mean, g_normalised, axes.clone(), true)?;
    let gx = tape.mul(g_normalised, normalised)?;
    let m2 = tape.reduce(ReduceOp::Mean, gx, axes, true)?;
    let along = tape.mul(normalised, m2)?;
    let less = tape.sub(g_normalised, m1)?;
    let inner = tape.sub(less, along)?;
    grads[0] = Some(tape.mul(rstd, inner)?);
    Ok(grads)
}

fn concat(tape: &mut Tape, node: &Node, g: ValueId, axis: i64, wanted: &[bool]) -> Result<Grads> {
    let rank = tape.shape(g).len();
    let axis = normalize_axis(axis, rank).map_err(Error::Parse)?;
    let mut grads = vec![None; node.inputs.len()];
    let mut offset = 0usize;
    for (k, input) in node.inputs.iter().enumerate() {
        let Some(input) = *input else { continue };
        let shape = tape.shape(input).to_vec();
        if wanted[k] {
            let total = tape.shape(g)[axis];
            let mut begin = vec![0; rank];
            let mut end = vec![0; rank];
            begin[axis] = -(offset as i64);
            end[axis] = -((total - offset - shape[axis]) as i64);
            grads[k] = Some(tape.pad(g, &begin, &end)?);
        }
        offset += shape[axis];
    }
    Ok(grads)
}

fn split(tape: &mut Tape, node: &Node, upstream: &[Option<ValueId>], axis: i64) -> Result<Grads> {
    let pieces: Vec<ValueId> = node
        .outputs
        .iter()
        .zip(upstream)
        .map(|(&out, grad)| match grad {
            Some(g) => Ok(*g),
            None => {
                let shape = tape.shape(out).to_vec();
                let zero = tape.constant(HostTensor::f32(vec![1], vec![0.0]));
                tape.expand(zero, &shape)
            }
        })
        .collect::<Result<_>>()?;
    let mut grads = vec![None; node.inputs.len()];
    grads[0] = Some(tape.op(Op::Concat { axis }, &pieces)?);
    Ok(grads)
}

/// The gradient of a table gathered by rows (an embedding): each row sums the gradients of
/// the positions that read it, as a product with the indices' one-hot matrix, so repeated
/// indices add up without a scatter kernel.
fn gather_table(tape: &mut Tape, table: ValueId, indices: ValueId, g: ValueId) -> Result<ValueId> {
    let table_shape = tape.shape(table).to_vec();
    let rows = table_shape[0];
    let width = numel(&table_shape[1..]);
    let picks = numel(tape.shape(indices));
    let column = tape.reshape(indices, &[picks, 1])?;
    // Negative indices count from the end, as Gather reads them.
    let wrapped = {
        let zero = tape.constant(HostTensor::i64(vec![], vec![0]));
        let negative = tape.binary(BinaryOp::Less, column, zero)?;
        let count = tape.constant(HostTensor::i64(vec![], vec![rows as i64]));
        let shifted = tape.binary(BinaryOp::Add, column, count)?;
        tape.op(Op::Where, &[negative, shifted, column])?
    };
    let ids = tape.constant(HostTensor::i64(vec![1, rows], (0..rows as i64).collect()));
    let hits = tape.binary(BinaryOp::Equal, wrapped, ids)?;
    let one_hot = tape.op(Op::Cast(DType::F32), &[hits])?;
    let by_row = tape.transpose(one_hot, &[1, 0])?;
    let flat = tape.reshape(g, &[picks, width])?;
    let summed = tape.op(Op::MatMul, &[by_row, flat])?;
    tape.reshape(summed, &table_shape)
}

/// Nearest-neighbour upsampling by whole factors: each input pixel's gradient is the sum
/// over the block of output pixels that copied it.
fn resize(
    tape: &mut Tape,
    x: ValueId,
    g: ValueId,
    mode: ResizeMode,
    coordinates: CoordinateMode,
) -> Result<Option<ValueId>> {
    let floors = matches!(
        (mode, coordinates),
        (
            ResizeMode::Nearest(NearestMode::Floor),
            CoordinateMode::Asymmetric
        ) | (
            ResizeMode::Nearest(NearestMode::RoundPreferFloor | NearestMode::RoundPreferCeil),
            CoordinateMode::HalfPixel | CoordinateMode::PytorchHalfPixel
        )
    );
    let (x_shape, y_shape) = (tape.shape(x).to_vec(), tape.shape(g).to_vec());
    let whole = x_shape
        .iter()
        .zip(&y_shape)
        .all(|(&i, &o)| i > 0 && o.is_multiple_of(i));
    if !floors || !whole {
        return Ok(None);
    }
    // Each upsampled axis splits into (input size, factor); the factors are summed away.
    let mut blocks = Vec::new();
    let mut axes = Vec::new();
    for (&i, &o) in x_shape.iter().zip(&y_shape) {
        blocks.push(i);
        if o > i {
            blocks.push(o / i);
            axes.push(blocks.len() - 1);
        }
    }
    let split = tape.reshape(g, &blocks)?;
    Ok(Some(tape.reduce(ReduceOp::Sum, split, axes, false)?))
}
