//! Gradient rules of the layers that carry weights: products (MatMul, Gemm, the fused
//! attention), convolutions and normalisations.

use super::super::error::{Error, Result};
use super::super::graph::{Node, ValueId};
use super::super::infer::{ConvGeometry, conv_geometry};
use super::super::ops::{AttentionPart, BinaryOp, ConvAttrs, Op, ReduceOp, UnaryOp};
use super::super::tensor::numel;
use super::Grads;
use super::tape::Tape;

/// numpy matmul: dA = g B^T, dB = A^T g, each summed over broadcast batch axes.
pub(super) fn matmul(
    tape: &mut Tape,
    a: ValueId,
    b: ValueId,
    g: ValueId,
    wanted: &[bool],
) -> Result<Grads> {
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
/// matrix: neither does its backward pass (attention_grad.wgsl). A statistics pass keeps
/// each query row's log-sum-exp and G . O ([.., N, 2]); from those, dQ, dKt and dV each
/// recompute the probabilities tile by tile.
pub(super) fn attention(
    tape: &mut Tape,
    node: &Node,
    g: ValueId,
    scale: f32,
    wanted: &[bool],
) -> Result<Grads> {
    let inputs: Vec<ValueId> = node.inputs.iter().map(|i| i.unwrap()).collect();
    let pass = |tape: &mut Tape, part: AttentionPart, last: ValueId| {
        let op = Op::AttentionGrad { scale, part };
        tape.op(op, &[inputs[0], inputs[1], inputs[2], g, last])
    };
    let statistics = pass(tape, AttentionPart::Statistics, node.outputs[0])?;
    let parts = [
        AttentionPart::Query,
        AttentionPart::Key,
        AttentionPart::Value,
    ];
    parts
        .into_iter()
        .zip(wanted)
        .map(|(part, &wanted)| wanted.then(|| pass(tape, part, statistics)).transpose())
        .collect()
}

#[allow(clippy::too_many_arguments)]
pub(super) fn gemm(
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
/// flipped and its channel axes swapped within each group; the filter's gradient is a Conv
/// of the input (its channels as the batch) with the gradient as the filter (its batch as
/// the channels), the stride and dilation trading places. Groups stay groups: each group's
/// channels only ever meet the same group's.
pub(super) fn conv(
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

fn conv_attrs(group: usize, strides: [usize; 2], dilations: [usize; 2], pads: [usize; 4]) -> Op {
    Op::Conv(ConvAttrs {
        group,
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
    // [O, I/G, kh, kw] -> [I, O/G, kh, kw]: within each group, outputs become inputs.
    let (groups, w_shape) = (c.group, tape.shape(w).to_vec());
    let per_group = [groups, o / groups, w_shape[1], w_shape[2], w_shape[3]];
    let split = tape.reshape(w, &per_group)?;
    let swapped = tape.transpose(split, &[0, 2, 1, 3, 4])?;
    let swapped = tape.reshape(
        swapped,
        &[c.in_channels, o / groups, w_shape[2], w_shape[3]],
    )?;
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
    tape.op(
        conv_attrs(groups, [1, 1], c.dilation, pads),
        &[spread, flipped],
    )
}

fn conv_filter_grad(tape: &mut Tape, x: ValueId, g: ValueId, c: &ConvGeometry) -> Result<ValueId> {
    // The batch becomes the channels, grouped: input [I/G, G*N, H, W] (a group's channels
    // are the batch) and filter [O, N, oh, ow], so group k's outputs only see group k.
    let (n, groups) = (c.batch, c.group);
    let (per_in, per_out) = (c.in_channels / groups, c.out_channels / groups);
    let split = tape.reshape(x, &[n, groups, per_in, c.in_h, c.in_w])?;
    let moved = tape.transpose(split, &[2, 1, 0, 3, 4])?;
    let mut input = tape.reshape(moved, &[per_in, groups * n, c.in_h, c.in_w])?;
    let split = tape.reshape(g, &[n, groups, per_out, c.out_h, c.out_w])?;
    let moved = tape.transpose(split, &[1, 2, 0, 3, 4])?;
    let filter = tape.reshape(moved, &[c.out_channels, n, c.out_h, c.out_w])?;
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
    let grad = tape.op(
        conv_attrs(groups, c.dilation, c.stride, pads),
        &[input, filter],
    )?;
    tape.transpose(grad, &[1, 0, 2, 3])
}

/// Normalisation over `axes` with a scale and bias laid out like the input's axes from
/// `affine_from` on (InstanceNorm: per channel, axis 1; LayerNorm: the normalised axes).
pub(super) fn affine_norm(
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
    let stats = Standardised::new(tape, x, axes, epsilon)?;
    let mut grads = vec![None; node.inputs.len()];
    let affine_axes: Vec<usize> = (0..rank).filter(|&i| affine_shape[i] == 1).collect();
    let to_param = |tape: &mut Tape, v: ValueId, param: ValueId| -> Result<ValueId> {
        let summed = tape.reduce(ReduceOp::Sum, v, affine_axes.clone(), true)?;
        let shape = tape.shape(param).to_vec();
        tape.reshape(summed, &shape)
    };
    if let Some(s) = scale.filter(|_| wanted[1]) {
        let gn = tape.mul(g, stats.normalised)?;
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
    grads[0] = Some(stats.input_grad(tape, g_normalised)?);
    Ok(grads)
}

/// GroupNormalization: statistics over each group of channels and the spatial axes; the
/// scale and bias per channel (opset 21) or per group (opset 18, shared by its channels).
pub(super) fn group_norm(
    tape: &mut Tape,
    node: &Node,
    g: ValueId,
    wanted: &[bool],
    epsilon: f32,
    groups: usize,
    per_channel_affine: bool,
) -> Result<Grads> {
    let (x, scale) = (node.inputs[0].unwrap(), node.inputs[1].unwrap());
    let x_shape = tape.shape(x).to_vec();
    let (n, channels) = (x_shape[0], x_shape[1]);
    let spatial: Vec<usize> = (2..x_shape.len()).collect();
    let by_group = [n, groups, numel(&x_shape) / (n * groups)];
    let grouped = tape.reshape(x, &by_group)?;
    let stats = Standardised::new(tape, grouped, vec![2], epsilon)?;
    let normalised = tape.reshape(stats.normalised, &x_shape)?;

    // Per-channel views of the parameters and back: [C] or [G] -> [1, C, 1...].
    let mut channel_shape = vec![1; x_shape.len()];
    channel_shape[1] = channels;
    let per_channel = |tape: &mut Tape, p: ValueId| -> Result<ValueId> {
        let p = if per_channel_affine {
            p
        } else {
            let column = tape.reshape(p, &[groups, 1])?;
            tape.expand(column, &[groups, channels / groups])?
        };
        tape.reshape(p, &channel_shape)
    };
    let to_param = |tape: &mut Tape, v: ValueId| -> Result<ValueId> {
        let mut axes = vec![0];
        axes.extend(&spatial);
        let summed = tape.reduce(ReduceOp::Sum, v, axes, false)?;
        if per_channel_affine {
            return Ok(summed);
        }
        let split = tape.reshape(summed, &[groups, channels / groups])?;
        tape.reduce(ReduceOp::Sum, split, vec![1], false)
    };
    let mut grads = vec![None; node.inputs.len()];
    if wanted[1] {
        let gn = tape.mul(g, normalised)?;
        grads[1] = Some(to_param(tape, gn)?);
    }
    if wanted.get(2) == Some(&true) {
        grads[2] = Some(to_param(tape, g)?);
    }
    let scale = per_channel(tape, scale)?;
    let g_normalised = tape.mul(g, scale)?;
    let g_grouped = tape.reshape(g_normalised, &by_group)?;
    let grad = stats.input_grad(tape, g_grouped)?;
    grads[0] = Some(tape.reshape(grad, &x_shape)?);
    Ok(grads)
}

/// x standardised over some axes, xhat = (x - mean) / sqrt(var + eps), recomputed for the
/// backward pass.
struct Standardised {
    axes: Vec<usize>,
    normalised: ValueId,
    rstd: ValueId,
}

impl Standardised {
    fn new(tape: &mut Tape, x: ValueId, axes: Vec<usize>, epsilon: f32) -> Result<Self> {
        let mean = tape.reduce(ReduceOp::Mean, x, axes.clone(), true)?;
        let centred = tape.sub(x, mean)?;
        let square = tape.mul(centred, centred)?;
        let variance = tape.reduce(ReduceOp::Mean, square, axes.clone(), true)?;
        let eps = tape.scalar(epsilon);
        let shifted = tape.binary(BinaryOp::Add, variance, eps)?;
        let std = tape.unary(UnaryOp::Sqrt, shifted)?;
        let rstd = tape.unary(UnaryOp::Reciprocal, std)?;
        let normalised = tape.mul(centred, rstd)?;
        Ok(Standardised {
            axes,
            normalised,
            rstd,
        })
    }

    /// dx from the gradient of xhat: rstd (gn - mean(gn) - xhat mean(gn xhat)).
    fn input_grad(&self, tape: &mut Tape, gn: ValueId) -> Result<ValueId> {
        let m1 = tape.reduce(ReduceOp::Mean, gn, self.axes.clone(), true)?;
        let gx = tape.mul(gn, self.normalised)?;
        let m2 = tape.reduce(ReduceOp::Mean, gx, self.axes.clone(), true)?;
        let along = tape.mul(self.normalised, m2)?;
        let less = tape.sub(gn, m1)?;
        let inner = tape.sub(less, along)?;
        tape.mul(self.rstd, inner)
    }
}
