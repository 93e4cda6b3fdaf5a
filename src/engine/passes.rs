//! Graph preparation, run once per session: bind symbolic dimensions, infer every shape,
//! fold constant subgraphs on the host, fuse patterns the kernels run in one pass, and drop
//! nodes nothing needs. What remains is only GPU work over static shapes.

use std::collections::HashMap;
use std::sync::Arc;

use super::error::{Error, Result};
use super::fold;
use super::grad::{self, Objective};
use super::graph::{Dim, Graph, Node, Value, ValueId};
use super::infer::{self, InputInfo};
use super::ops::{BinaryOp, Op, UnaryOp, broadcast_shapes};
use super::tensor::{DType, HostTensor, numel};

/// Everything a session needs; with an objective, the loss and the backward pass are
/// appended once shapes are known, and fused with the forward pass.
pub fn prepare(
    graph: &mut Graph,
    dims: &HashMap<String, usize>,
    objective: Option<&Objective>,
) -> Result<()> {
    bind_inputs(graph, dims)?;
    infer_and_fold(graph, usize::MAX)?;
    if let Some(objective) = objective {
        // Fused first, so that the forward pass does not keep the score matrices for the
        // backward pass: its attention gradient recomputes them layer by layer.
        fuse_attention(graph);
        grad::append_backward(graph, objective)?;
    }
    fuse(graph);
    Ok(())
}

/// `prepare`, folding only small constants (the shape arithmetic shapes depend on): every
/// shape a session would compute, without the host work and memory of folding weights.
pub fn infer_shapes(graph: &mut Graph, dims: &HashMap<String, usize>) -> Result<()> {
    bind_inputs(graph, dims)?;
    infer_and_fold(graph, SHAPE_FOLD_LIMIT)?;
    fuse(graph);
    Ok(())
}

/// Elements up to which `infer_shapes` folds a constant result.
const SHAPE_FOLD_LIMIT: usize = 4096;

fn fuse(graph: &mut Graph) {
    skip_unit_scaling(graph);
    fuse_pad_into_conv(graph);
    fuse_silu(graph);
    fuse_group_norm(graph);
    fuse_attention(graph);
    fuse_matmul_bias(graph);
    remove_dead_nodes(graph);
}

fn bind_inputs(graph: &mut Graph, dims: &HashMap<String, usize>) -> Result<()> {
    for &id in &graph.inputs {
        let value = &mut graph.values[id];
        let declared = value.dims.clone().unwrap_or_default();
        value.shape = declared
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => Ok(*n),
                Dim::Named(name) => dims
                    .get(name)
                    .copied()
                    .ok_or_else(|| Error::UnboundDimension(name.clone())),
            })
            .collect::<Result<_>>()?;
    }
    Ok(())
}

/// Infers shapes and types node by node, folding nodes whose inputs are all constant (and
/// whose outputs have at most `fold_limit` elements) into constants.
fn infer_and_fold(graph: &mut Graph, fold_limit: usize) -> Result<()> {
    for value in &mut graph.values {
        if let Some(c) = &value.constant {
            value.shape = c.shape.clone();
            value.dtype = c.dtype();
        }
        if let Some(s) = &value.stored {
            value.shape = s.shape.clone();
            value.dtype = s.storage.dtype();
        }
    }
    let mut kept = Vec::with_capacity(graph.nodes.len());
    for node in std::mem::take(&mut graph.nodes) {
        if !infer_node(graph, &node, fold_limit)? {
            kept.push(node);
        }
    }
    graph.nodes = kept;
    Ok(())
}

/// What shape inference knows of `node`'s inputs.
pub(super) fn input_infos<'a>(graph: &'a Graph, node: &Node) -> Vec<Option<InputInfo<'a>>> {
    node.inputs
        .iter()
        .map(|i| {
            i.map(|i| {
                let v = &graph.values[i];
                InputInfo {
                    dtype: v.dtype,
                    shape: &v.shape,
                    constant: v.constant.as_deref(),
                }
            })
        })
        .collect()
}

/// Sets the types and shapes of `node`'s outputs from its inputs'; folds it into constant
/// outputs when its inputs are all constant and its outputs have at most `fold_limit`
/// elements. Returns whether it was folded (and needs no node).
pub(super) fn infer_node(graph: &mut Graph, node: &Node, fold_limit: usize) -> Result<bool> {
    let node_error = |reason: String| Error::Node {
        node: node.name.clone(),
        op_type: node.op.name(),
        reason,
    };
    let infos = input_infos(graph, node);
    let outputs = infer::infer(&node.op, &infos, node.outputs.len()).map_err(node_error)?;
    let all_constant = infos.iter().flatten().all(|i| i.constant.is_some());
    let small = outputs.iter().all(|(_, shape)| numel(shape) <= fold_limit);
    let foldable =
        (all_constant && fold::can_fold(&node.op) && small) || matches!(node.op, Op::Shape { .. });
    let folded = if foldable {
        Some(fold::fold(&node.op, &infos, &outputs).map_err(node_error)?)
    } else {
        None
    };
    for (k, (&out, (dtype, shape))) in node.outputs.iter().zip(outputs).enumerate() {
        let value = &mut graph.values[out];
        value.dtype = dtype;
        value.shape = shape;
        if let Some(results) = &folded {
            value.constant = Some(Arc::new(results[k].clone()));
        }
    }
    Ok(folded.is_some())
}

/// How many nodes (and graph outputs) read each value.
fn use_counts(graph: &Graph) -> Vec<usize> {
    let mut uses = vec![0; graph.values.len()];
    for node in &graph.nodes {
        for &i in node.inputs.iter().flatten() {
            uses[i] += 1;
        }
    }
    for &o in &graph.outputs {
        uses[o] += 1;
    }
    uses
}

/// The node producing each value.
fn producers(graph: &Graph) -> HashMap<ValueId, usize> {
    let mut map = HashMap::new();
    for (n, node) in graph.nodes.iter().enumerate() {
        for &o in &node.outputs {
            map.insert(o, n);
        }
    }
    map
}

/// The single node reading `value`, if exactly one does and it is not a graph output.
fn sole_consumer(graph: &Graph, uses: &[usize], value: ValueId) -> Option<usize> {
    if uses[value] != 1 || graph.outputs.contains(&value) {
        return None;
    }
    graph
        .nodes
        .iter()
        .position(|n| n.inputs.contains(&Some(value)))
}

/// A Mul or Div by a constant one (diffusers' `output_scale_factor` of 1 after every
/// resnet of a VAE) changes nothing, exactly: its readers read its input instead, which
/// saves a pass over the tensor and a copy of it alive.
fn skip_unit_scaling(graph: &mut Graph) {
    let is_one = |v: ValueId| {
        graph.values[v]
            .constant
            .as_ref()
            .is_some_and(|c| c.len() == 1 && c.to_f32()[0] == 1.0)
    };
    let mut forward: HashMap<ValueId, ValueId> = HashMap::new();
    let mut dead = vec![false; graph.nodes.len()];
    for (n, node) in graph.nodes.iter().enumerate() {
        let (Op::Binary(op @ (BinaryOp::Mul | BinaryOp::Div)), &[Some(a), Some(b)]) =
            (&node.op, &node.inputs[..])
        else {
            continue;
        };
        let x = match (is_one(a), is_one(b)) {
            (_, true) => a,
            (true, false) if *op == BinaryOp::Mul => b,
            _ => continue,
        };
        let out = node.outputs[0];
        let (input, output) = (&graph.values[x], &graph.values[out]);
        if input.shape == output.shape
            && input.dtype == output.dtype
            && !graph.outputs.contains(&out)
        {
            forward.insert(out, x);
            dead[n] = true;
        }
    }
    for node in &mut graph.nodes {
        for input in node.inputs.iter_mut().flatten() {
            while let Some(&x) = forward.get(input) {
                *input = x;
            }
        }
    }
    retain_nodes(graph, &dead);
}

/// Zero padding of the image axes read only by a Conv becomes the Conv's own padding
/// (its kernel reads anything outside the image as zero, before and after): SD's VAE
/// encoder pads (0, 1, 0, 1) before each stride-2 downsampling convolution, a full copy of
/// a tensor of up to 128 MiB at 512x512, now never made.
fn fuse_pad_into_conv(graph: &mut Graph) {
    let uses = use_counts(graph);
    let mut dead = vec![false; graph.nodes.len()];
    for (p, folded) in dead.iter_mut().enumerate() {
        if !matches!(graph.nodes[p].op, Op::Pad) {
            continue;
        }
        let padded = graph.nodes[p].outputs[0];
        let Some(c) = sole_consumer(graph, &uses, padded) else {
            continue;
        };
        let Some(spatial) = zero_padding_of_images(graph, &graph.nodes[p]) else {
            continue;
        };
        let source = graph.nodes[p].inputs[0];
        let conv = &mut graph.nodes[c];
        let Op::Conv(attrs) = &mut conv.op else {
            continue;
        };
        if conv.inputs[0] != Some(padded) || attrs.auto_pad != "NOTSET" {
            continue;
        }
        let own = match attrs.pads.len() {
            4 => attrs.pads.clone(),
            _ => vec![0; 4],
        };
        attrs.pads = own.iter().zip(spatial).map(|(a, b)| a + b).collect();
        conv.inputs[0] = source;
        *folded = true;
    }
    retain_nodes(graph, &dead);
}

/// A constant-zero Pad of only the last two axes of a 4-D tensor, by non-negative amounts:
/// those amounts in ONNX Conv order (begins, then ends).
fn zero_padding_of_images(graph: &Graph, pad: &Node) -> Option<[usize; 4]> {
    let infos = input_infos(graph, pad);
    let (begin, end) = infer::pad_amounts(&infos).ok()?;
    let zero_value = infer::const_input(&infos, 2, "the pad value")
        .ok()?
        .is_none_or(|v| v.to_f32().iter().all(|&x| x == 0.0));
    let (&[0, 0, top, left], &[0, 0, bottom, right]) = (&begin[..], &end[..]) else {
        return None; // not 4-D, or padding batch or channels
    };
    let amounts = [top, left, bottom, right];
    (zero_value && amounts.iter().all(|&a| a >= 0)).then(|| amounts.map(|a| a as usize))
}

/// Sigmoid(x) -> Mul(x, s) becomes one Silu(x).
fn fuse_silu(graph: &mut Graph) {
    let uses = use_counts(graph);
    let pairs: Vec<(usize, usize)> = (0..graph.nodes.len())
        .filter_map(|s| {
            let sigmoid = &graph.nodes[s];
            if !matches!(sigmoid.op, Op::Unary(UnaryOp::Sigmoid)) {
                return None;
            }
            let (x, sig) = (sigmoid.inputs[0], sigmoid.outputs[0]);
            let m = sole_consumer(graph, &uses, sig)?;
            let mul = &graph.nodes[m];
            let other = if mul.inputs[0] == Some(sig) {
                mul.inputs[1]
            } else {
                mul.inputs[0]
            };
            let same_shape = graph.values[sig].shape == graph.values[mul.outputs[0]].shape;
            (matches!(mul.op, Op::Binary(BinaryOp::Mul)) && other == x && same_shape)
                .then_some((s, m))
        })
        .collect();
    let mut dead = vec![false; graph.nodes.len()];
    for (s, m) in pairs {
        let x = graph.nodes[s].inputs[0];
        let mul = &mut graph.nodes[m];
        mul.op = Op::Unary(UnaryOp::Silu);
        mul.inputs = vec![x];
        dead[s] = true;
    }
    retain_nodes(graph, &dead);
}

/// GroupNorm as exporters spell it, Reshape [N, G, -1] -> InstanceNorm (unit scale, zero
/// bias) -> Reshape back -> Mul(gamma) -> Add(beta) [-> SiLU], becomes one GroupNorm
/// launch with per-channel affine and optional SiLU: five passes over the tensor become one.
fn fuse_group_norm(graph: &mut Graph) {
    let uses = use_counts(graph);
    let produced_by = producers(graph);
    let mut dead = vec![false; graph.nodes.len()];
    for n in 0..graph.nodes.len() {
        let Some(found) = match_group_norm(graph, &uses, &produced_by, n) else {
            continue;
        };
        if found.chain.iter().any(|&c| dead[c]) {
            continue;
        }
        let channels = graph.values[found.x].shape[1];
        let mut param = |v: ValueId, name: &str| {
            let values = graph.values[v]
                .constant
                .as_ref()
                .expect("matched a constant")
                .to_f32()
                .into_owned();
            let id = graph.values.len();
            graph.values.push(Value {
                name: format!("{}/{name}", graph.nodes[found.last].name),
                dtype: DType::F32,
                dims: None,
                shape: vec![channels],
                constant: Some(Arc::new(HostTensor::f32(vec![channels], values))),
                stored: None,
                declared_f16: false,
            });
            id
        };
        let (gamma, beta) = (param(found.gamma, "gamma"), param(found.beta, "beta"));
        for &c in &found.chain {
            dead[c] = true;
        }
        let last = &mut graph.nodes[found.last];
        last.op = Op::GroupNorm {
            epsilon: found.epsilon,
            groups: found.groups,
            per_channel_affine: true,
            silu: found.silu,
        };
        last.inputs = vec![Some(found.x), Some(gamma), Some(beta)];
        dead[found.last] = false;
    }
    retain_nodes(graph, &dead);
}

struct GroupNormMatch {
    /// Every node of the pattern, the last one included.
    chain: Vec<usize>,
    last: usize,
    x: ValueId,
    gamma: ValueId,
    beta: ValueId,
    groups: usize,
    epsilon: f32,
    silu: bool,
}

fn match_group_norm(
    graph: &Graph,
    uses: &[usize],
    produced_by: &HashMap<ValueId, usize>,
    norm: usize,
) -> Option<GroupNormMatch> {
    let Op::InstanceNorm { epsilon } = graph.nodes[norm].op else {
        return None;
    };
    let node = &graph.nodes[norm];
    let constant = |v: Option<ValueId>| v.and_then(|v| graph.values[v].constant.clone());
    let all = |t: &Arc<HostTensor>, value: f32| t.to_f32().iter().all(|&x| x == value);
    if !all(&constant(node.inputs.get(1).copied().flatten())?, 1.0)
        || !all(&constant(node.inputs.get(2).copied().flatten())?, 0.0)
    {
        return None;
    }
    let grouped = node.inputs[0]?;
    let reshape_in = *produced_by.get(&grouped)?;
    let x = matches!(graph.nodes[reshape_in].op, Op::Reshape { .. })
        .then(|| graph.nodes[reshape_in].inputs[0])??;
    let x_shape = &graph.values[x].shape;
    let groups = *graph.values[grouped].shape.get(1)?;
    if x_shape.len() < 3 || uses[grouped] != 1 || groups == 0 || !x_shape[1].is_multiple_of(groups)
    {
        return None;
    }
    let follow = |value: ValueId| -> Option<usize> {
        graph
            .nodes
            .iter()
            .position(|n| n.inputs.contains(&Some(value)))
            .filter(|_| uses[value] == 1 && !graph.outputs.contains(&value))
    };
    let reshape_out = follow(node.outputs[0])?;
    if !matches!(graph.nodes[reshape_out].op, Op::Reshape { .. })
        || &graph.values[graph.nodes[reshape_out].outputs[0]].shape != x_shape
    {
        return None;
    }
    // Mul then Add by per-channel constants ([C, 1, ...] broadcast against [N, C, ...]).
    let per_channel = |v: ValueId| {
        let c = &graph.values[v];
        c.constant.is_some()
            && c.shape.len() <= x_shape.len()
            && c.shape.iter().product::<usize>() == x_shape[1]
            && super::ops::broadcast_strides(&c.shape, x_shape)
                .iter()
                .enumerate()
                .all(|(i, &st)| i == 1 || st == 0)
    };
    let affine = |node: usize, op: BinaryOp, input: ValueId| -> Option<ValueId> {
        let n = &graph.nodes[node];
        if !matches!(n.op, Op::Binary(b) if b == op) {
            return None;
        }
        let other = if n.inputs[0] == Some(input) {
            n.inputs[1]?
        } else {
            n.inputs[0]?
        };
        per_channel(other).then_some(other)
    };
    let mul = follow(graph.nodes[reshape_out].outputs[0])?;
    let gamma = affine(mul, BinaryOp::Mul, graph.nodes[reshape_out].outputs[0])?;
    let add = follow(graph.nodes[mul].outputs[0])?;
    let beta = affine(add, BinaryOp::Add, graph.nodes[mul].outputs[0])?;
    let mut chain = vec![reshape_in, norm, reshape_out, mul, add];
    let silu = follow(graph.nodes[add].outputs[0])
        .filter(|&s| matches!(graph.nodes[s].op, Op::Unary(UnaryOp::Silu)));
    if let Some(s) = silu {
        chain.push(s);
    }
    if uses[graph.nodes[reshape_in].outputs[0]] != 1 {
        return None;
    }
    Some(GroupNormMatch {
        last: *chain.last().unwrap(),
        chain,
        x,
        gamma,
        beta,
        groups,
        epsilon,
        silu: silu.is_some(),
    })
}

/// MatMul followed by the Add of a constant bias over its last two axes (every Linear
/// layer) becomes one MatMul launch with the bias added as results are stored.
fn fuse_matmul_bias(graph: &mut Graph) {
    let uses = use_counts(graph);
    let mut dead = vec![false; graph.nodes.len()];
    for m in 0..graph.nodes.len() {
        if !matches!(graph.nodes[m].op, Op::MatMul) || graph.nodes[m].inputs.len() != 2 {
            continue;
        }
        let product = graph.nodes[m].outputs[0];
        let Some(add) = sole_consumer(graph, &uses, product) else {
            continue;
        };
        let add_node = &graph.nodes[add];
        if !matches!(add_node.op, Op::Binary(BinaryOp::Add)) || dead[add] {
            continue;
        }
        let Some(bias) = (if add_node.inputs[0] == Some(product) {
            add_node.inputs[1]
        } else {
            add_node.inputs[0]
        }) else {
            continue;
        };
        let out_shape = &graph.values[product].shape;
        let bias_shape = &graph.values[bias].shape;
        let matrix = &out_shape[out_shape.len().saturating_sub(2)..];
        let fits = graph.values[bias].constant.is_some()
            && bias_shape.len() <= matrix.len()
            && broadcast_shapes(&[bias_shape, matrix]).is_ok_and(|s| s == matrix)
            && graph.values[add_node.outputs[0]].shape == *out_shape;
        if !fits {
            continue;
        }
        let outputs = add_node.outputs.clone();
        let node = &mut graph.nodes[m];
        node.inputs.push(Some(bias));
        node.outputs = outputs;
        dead[add] = true;
    }
    retain_nodes(graph, &dead);
}

/// MatMul(Q, Kt) -> Mul|Div(scalar) -> Softmax(last axis) -> MatMul(., V) becomes one
/// Attention node, so the [batch*heads, N, M] score matrix is never stored.
fn fuse_attention(graph: &mut Graph) {
    let uses = use_counts(graph);
    let produced_by = producers(graph);
    let mut dead = vec![false; graph.nodes.len()];
    for last in 0..graph.nodes.len() {
        let Some((chain, q, kt, v, scale)) = match_attention(graph, &uses, &produced_by, last)
        else {
            continue;
        };
        if chain.iter().any(|&n| dead[n]) {
            continue;
        }
        for &n in &chain {
            dead[n] = true;
        }
        let node = &mut graph.nodes[last];
        node.op = Op::Attention { scale };
        node.inputs = vec![Some(q), Some(kt), Some(v)];
        dead[last] = false;
    }
    retain_nodes(graph, &dead);
}

type AttentionMatch = (Vec<usize>, ValueId, ValueId, ValueId, f32);

fn match_attention(
    graph: &Graph,
    uses: &[usize],
    produced_by: &HashMap<ValueId, usize>,
    last: usize,
) -> Option<AttentionMatch> {
    let out_mm = &graph.nodes[last];
    if !matches!(out_mm.op, Op::MatMul) {
        return None;
    }
    let (probs, v) = (out_mm.inputs[0]?, out_mm.inputs[1]?);
    let softmax_node = *produced_by.get(&probs)?;
    let rank = graph.values[probs].shape.len();
    match graph.nodes[softmax_node].op {
        Op::Softmax {
            axis,
            legacy: false,
        } if axis == -1 || axis == rank as i64 - 1 => {}
        _ => return None,
    }
    if uses[probs] != 1 {
        return None;
    }
    let mut scores = graph.nodes[softmax_node].inputs[0]?;
    let mut chain = vec![softmax_node];
    let mut scale = 1.0f32;
    if let Some(&scale_node) = produced_by.get(&scores) {
        let node = &graph.nodes[scale_node];
        if let Op::Binary(op @ (BinaryOp::Mul | BinaryOp::Div)) = node.op {
            let c = graph.values[node.inputs[1]?]
                .constant
                .as_ref()
                .filter(|c| c.len() == 1)?;
            let c = c.to_f32()[0];
            scale = if op == BinaryOp::Mul { c } else { 1.0 / c };
            if uses[scores] != 1 {
                return None;
            }
            chain.push(scale_node);
            scores = node.inputs[0]?;
        }
    }
    let qk = *produced_by.get(&scores)?;
    if !matches!(graph.nodes[qk].op, Op::MatMul) || uses[scores] != 1 {
        return None;
    }
    chain.push(qk);
    let (q, kt) = (graph.nodes[qk].inputs[0]?, graph.nodes[qk].inputs[1]?);
    let shapes = [q, kt, v].map(|i| &graph.values[i].shape);
    // Same rank, same batch dims, no broadcasting: the kernel walks one flat batch.
    let batch = &shapes[0][..shapes[0].len().checked_sub(2)?];
    if shapes
        .iter()
        .any(|s| s.len() != batch.len() + 2 || &s[..batch.len()] != batch)
        || batch.is_empty()
    {
        return None;
    }
    if shapes[0][batch.len() + 1] > super::kernels::ATTENTION_MAX_HEAD_DIM
        || shapes[2][batch.len() + 1] > super::kernels::ATTENTION_MAX_HEAD_DIM
    {
        return None;
    }
    Some((chain, q, kt, v, scale))
}

fn retain_nodes(graph: &mut Graph, dead: &[bool]) {
    let mut i = 0;
    graph.nodes.retain(|_| {
        i += 1;
        !dead[i - 1]
    });
}

fn remove_dead_nodes(graph: &mut Graph) {
    let mut needed = vec![false; graph.values.len()];
    for &o in &graph.outputs {
        needed[o] = true;
    }
    let mut live = vec![false; graph.nodes.len()];
    for (n, node) in graph.nodes.iter().enumerate().rev() {
        if node.outputs.iter().any(|&o| needed[o]) {
            live[n] = true;
            for &i in node.inputs.iter().flatten() {
                needed[i] = true;
            }
        }
    }
    let dead: Vec<bool> = live.iter().map(|l| !l).collect();
    retain_nodes(graph, &dead);
}
