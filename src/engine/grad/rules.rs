//! One gradient rule per operator: given a forward node and the gradients of its outputs,
//! the nodes computing the gradients of its inputs (only those `wanted`), in the engine's
//! own operators. Refusals name what is missing.

use super::super::error::{Error, Result};
use super::super::graph::{Node, ValueId};
use super::super::infer::{self, reduce_axes, reduced_shape, slice_plan, transpose_perm};
use super::super::ops::{BinaryOp, Op, ReduceOp, UnaryOp, normalize_axis};
use super::super::passes::input_infos;
use super::super::tensor::{DType, HostTensor, numel};
use super::Grads;
use super::layers::{affine_norm, attention, conv, gemm, group_norm, matmul};
use super::resize::Resize;
use super::tape::Tape;

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
        Op::Attention { scale } => attention(tape, node, g, *scale, wanted),
        Op::Conv(attrs) => conv(tape, node, attrs, g, wanted),
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
        Op::GroupNorm {
            epsilon,
            groups,
            per_channel_affine,
            silu: false,
        } => group_norm(
            tape,
            node,
            g,
            wanted,
            *epsilon,
            *groups,
            *per_channel_affine,
        ),
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
            let scales = infer::const_input(&input_infos(tape.graph, node), 2, "scales")
                .map_err(|e| refuse(&e))?
                .filter(|t| !t.is_empty())
                .map(|t| t.to_f32().into_owned());
            let resize = Resize {
                mode: *mode,
                coordinates: *coordinates,
                scales,
            };
            only_first(resize.backward(tape, input(0), g).map_err(|e| refuse(&e))?)
        }
        Op::Reduce {
            op,
            axes,
            noop_with_empty_axes,
            ..
        } => {
            let x_shape = tape.shape(input(0)).to_vec();
            let axes = reduce_axes(
                axes,
                &input_infos(tape.graph, node),
                x_shape.len(),
                *noop_with_empty_axes,
            )
            .map_err(|e| refuse(&e))?;
            let grad = reduction(tape, *op, input(0), y, g, axes)?;
            only_first(grad.ok_or_else(|| refuse("no derivative"))?)
        }
        Op::Gather { axis } => {
            let rank = tape.shape(input(0)).len();
            let axis = normalize_axis(*axis, rank).map_err(|e| refuse(&e))?;
            only_first(gather(tape, input(0), input(1), g, axis)?)
        }
        other => Err(refuse(&format!("no gradient rule for {}", other.name()))),
    }
}

/// The gradient of a reduction over `axes` (kept or not in `y`): a sum or mean spreads
/// the gradient back over what it reduced; a maximum or minimum gives it to the extreme
/// elements, shared evenly between ties (as torch's amax/amin).
fn reduction(
    tape: &mut Tape,
    op: ReduceOp,
    x: ValueId,
    y: ValueId,
    g: ValueId,
    axes: Vec<usize>,
) -> Result<Option<ValueId>> {
    let x_shape = tape.shape(x).to_vec();
    let kept = reduced_shape(&x_shape, &axes, true);
    let g = tape.reshape(g, &kept)?;
    let grad = match op {
        ReduceOp::Sum => tape.expand(g, &x_shape)?,
        ReduceOp::Mean => {
            let spread = tape.expand(g, &x_shape)?;
            tape.scale(spread, numel(&kept) as f32 / numel(&x_shape) as f32)?
        }
        ReduceOp::Max | ReduceOp::Min => {
            let extreme = tape.reshape(y, &kept)?;
            let hits = tape.binary(BinaryOp::Equal, x, extreme)?;
            let ones = tape.op(Op::Cast(DType::F32), &[hits])?;
            let count = tape.reduce(ReduceOp::Sum, ones, axes, true)?;
            let share = tape.binary(BinaryOp::Div, g, count)?;
            tape.mul(ones, share)?
        }
        ReduceOp::Prod | ReduceOp::ArgMax => return Ok(None),
    };
    Ok(Some(grad))
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
        U::Abs => {
            // sign(x) g, zero at zero (as torch).
            let zero = tape.scalar(0.0);
            let positive = tape.binary(BinaryOp::Greater, x, zero)?;
            let negative = tape.binary(BinaryOp::Less, x, zero)?;
            let flipped = tape.unary(U::Neg, g)?;
            let lower = tape.op(Op::Where, &[negative, flipped, zero])?;
            tape.op(Op::Where, &[positive, g, lower])?
        }
        U::Floor | U::Ceil | U::Not => return Ok(None),
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
        B::Max | B::Min => {
            // The winning operand takes the gradient; a tie splits it (as torch).
            let wins = if op == B::Max { B::Greater } else { B::Less };
            let tie = tape.binary(B::Equal, a, b)?;
            let half = tape.scale(g, 0.5)?;
            let zero = tape.scalar(0.0);
            let shared = tape.op(Op::Where, &[tie, half, zero])?;
            let share = |tape: &mut Tape, k: usize, own: ValueId, other: ValueId| {
                wanted[k]
                    .then(|| {
                        let won = tape.binary(wins, own, other)?;
                        tape.op(Op::Where, &[won, g, shared])
                    })
                    .transpose()
            };
            (share(tape, 0, a, b)?, share(tape, 1, b, a)?)
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

/// The gradient of Gather along `axis`: the gathered axis is moved first (the indices' axes
/// lead the gradient's), the rows summed as for a table, and the axes moved back.
fn gather(
    tape: &mut Tape,
    data: ValueId,
    indices: ValueId,
    g: ValueId,
    axis: usize,
) -> Result<ValueId> {
    let data_shape = tape.shape(data).to_vec();
    let index_rank = tape.shape(indices).len();
    if axis == 0 {
        return gather_table(tape, &data_shape, indices, g);
    }
    let rank = tape.shape(g).len();
    let leading: Vec<usize> = (axis..axis + index_rank)
        .chain(0..axis)
        .chain(axis + index_rank..rank)
        .collect();
    let g = tape.transpose(g, &leading)?;
    let mut table_shape = vec![data_shape[axis]];
    table_shape.extend(&data_shape[..axis]);
    table_shape.extend(&data_shape[axis + 1..]);
    let table_grad = gather_table(tape, &table_shape, indices, g)?;
    // The table's axis 0 goes back to `axis`.
    let back: Vec<usize> = (1..=axis)
        .chain(std::iter::once(0))
        .chain(axis + 1..data_shape.len())
        .collect();
    tape.transpose(table_grad, &back)
}

/// The gradient of a table gathered by rows (an embedding): each row sums the gradients of
/// the positions that read it, as a product with the indices' one-hot matrix, so repeated
/// indices add up without a scatter kernel.
fn gather_table(
    tape: &mut Tape,
    table_shape: &[usize],
    indices: ValueId,
    g: ValueId,
) -> Result<ValueId> {
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
    tape.reshape(summed, table_shape)
}
