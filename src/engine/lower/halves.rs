//! Which values the GPU keeps as packed f16 pairs, at half the memory of f32: fp16
//! weights read by the kernels that unpack them, and the activations an fp16 model computes
//! in f16 between kernels that read and write halves.

use super::super::graph::{Graph, Node, Value};
use super::super::ops::{BinaryOp, Op, normalize_axis};
use super::super::tensor::{DType, Storage, numel};

/// Per value: whether it is an fp16 weight the GPU keeps as packed f16 pairs, at half the
/// memory of f32. That is every f16 initializer read only as MatMul's or Gemm's B, as
/// Conv's filter or as the table rows of a Gather (the kernels that read halves; a text
/// encoder's token embeddings are most of its weights); any other reader gets f32.
fn half_weights(graph: &Graph) -> Vec<bool> {
    let mut halves: Vec<bool> = graph
        .values
        .iter()
        .map(|v| {
            v.constant.as_ref().is_some_and(|c| c.is_stored_f16())
                || v.stored.as_ref().is_some_and(|s| s.storage == Storage::F16)
        })
        .collect();
    for node in &graph.nodes {
        let reads_halves = |i: usize| match node.op {
            Op::MatMul | Op::Gemm { .. } | Op::Conv(_) => i == 1,
            Op::Gather { axis } => i == 0 && gathers_even_rows(graph, node, axis),
            _ => false,
        };
        for (i, v) in node.inputs.iter().enumerate() {
            if let Some(v) = v
                && !reads_halves(i)
            {
                halves[*v] = false;
            }
        }
    }
    for &v in &graph.outputs {
        halves[v] = false;
    }
    halves
}

/// Per value: whether the GPU keeps it as packed f16 pairs: the fp16 weights of
/// `half_weights`, and when run for `inference`, the largest intermediates the model
/// computes in f16 (`computed_f16`) that a kernel writing halves makes and only kernels
/// reading halves use: the convolutions, group norms, residual sums and upsamplings at a
/// VAE decoder's full resolution, which set a generation's memory peak, at half the memory
/// and traffic. Arithmetic stays f32. Smaller activations stay f32 too: each value stored
/// as halves rounds, and the rounding of the deep, low-resolution layers grows through
/// everything after them, while keeping them f32 costs next to nothing at the peak. What
/// attention, MatMul and the copies touch stays f32, and so does everything training sees
/// (its gradients). A model that only stores its weights as f16 and casts them up computes
/// in f32, and keeps f32 activations.
pub fn half_values(graph: &Graph, inference: bool) -> Vec<bool> {
    let mut halves = half_weights(graph);
    if !inference {
        return halves;
    }
    let f16 = computed_f16(graph);
    let large = large_activations(graph);
    let mut half = vec![false; graph.values.len()];
    for node in &graph.nodes {
        if let [out] = node.outputs[..] {
            half[out] = f16[out] && large[out] && writes_halves(graph, node);
        }
    }
    for node in &graph.nodes {
        for (i, v) in node.inputs.iter().enumerate() {
            if let Some(v) = v
                && !reads_halves(graph, node, i)
            {
                half[*v] = false;
            }
        }
    }
    for &v in &graph.outputs {
        half[v] = false;
    }
    for (v, value) in graph.values.iter().enumerate() {
        if half[v] && value.is_computed() && value.dtype == DType::F32 {
            halves[v] = true;
        }
    }
    halves
}

/// Per value: whether it is an activation of at least half the elements of the graph's
/// largest one: the sizes that can set the memory peak.
fn large_activations(graph: &Graph) -> Vec<bool> {
    let size = |v: &Value| numel(&v.shape);
    let computed = || graph.values.iter().filter(|v| v.is_computed());
    let largest = computed().map(size).max().unwrap_or(0);
    graph
        .values
        .iter()
        .map(|v| v.is_computed() && 2 * size(v) >= largest)
        .collect()
}

/// Per value: whether the model computes it in float16: what it declares so (inputs,
/// Casts to f16), and the float outputs of any other op reading such an activation (ONNX
/// gives an op's float inputs and outputs one type; weights are not counted, so that an
/// f32 graph fed f16 weights directly, as `websd bench --f16` builds, stays f32).
fn computed_f16(graph: &Graph) -> Vec<bool> {
    let mut f16: Vec<bool> = graph.values.iter().map(|v| v.declared_f16).collect();
    for node in &graph.nodes {
        if matches!(node.op, Op::Cast(_)) {
            continue;
        }
        let from_f16 = node
            .inputs
            .iter()
            .flatten()
            .any(|&i| f16[i] && graph.values[i].is_computed());
        for &out in &node.outputs {
            f16[out] |= from_f16 && graph.values[out].dtype == DType::F32;
        }
    }
    f16
}

/// Elements per row of a normalisation (the unit its kernel writes in pairs).
fn norm_row(graph: &Graph, node: &Node) -> Option<usize> {
    let shape = &graph.values[node.outputs[0]].shape;
    match node.op {
        Op::GroupNorm { groups, .. } => Some(numel(&shape[1..]) / groups.max(1)),
        Op::InstanceNorm { .. } => Some(numel(shape.get(2..)?)),
        _ => None,
    }
}

/// An arithmetic op over operands of the output's shape (no broadcasting): what the
/// element-wise kernel runs in pairs of halves.
fn same_shape_arithmetic(graph: &Graph, node: &Node) -> bool {
    let shape = &graph.values[node.outputs[0]].shape;
    matches!(
        node.op,
        Op::Binary(BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Div)
    ) && node
        .inputs
        .iter()
        .all(|i| i.is_some_and(|i| graph.values[i].shape == *shape))
}

/// Whether `node`'s kernel can store its output as halves: it writes them two at a time,
/// so the pairs must not straddle a unit it computes apart (four output pixels of a
/// convolution, a normalised row, an upsampled plane).
fn writes_halves(graph: &Graph, node: &Node) -> bool {
    let shape = &graph.values[node.outputs[0]].shape;
    let even = numel(shape).is_multiple_of(2);
    match node.op {
        Op::Conv(_) => shape.len() == 4 && (shape[2] * shape[3]).is_multiple_of(4),
        Op::GroupNorm { .. } | Op::InstanceNorm { .. } => {
            norm_row(graph, node).is_some_and(|len| len.is_multiple_of(2))
        }
        Op::Resize { .. } => shape.len() == 4 && (shape[2] * shape[3]).is_multiple_of(2),
        _ => even && same_shape_arithmetic(graph, node),
    }
}

/// Whether `node`'s kernel can read its input `i` as halves (the image of a convolution;
/// a normalisation's or upsampling's input, in units of even length; either operand of
/// same-shape arithmetic).
fn reads_halves(graph: &Graph, node: &Node, i: usize) -> bool {
    let input = |k: usize| node.inputs[k].map(|v| &graph.values[v].shape);
    match node.op {
        Op::Conv(_) => i == 0,
        Op::GroupNorm { .. } | Op::InstanceNorm { .. } => {
            i == 0 && norm_row(graph, node).is_some_and(|len| len.is_multiple_of(2))
        }
        Op::Resize { .. } => {
            i == 0 && input(0).is_some_and(|s| s.len() == 4 && (s[2] * s[3]).is_multiple_of(2))
        }
        _ => i < 2 && same_shape_arithmetic(graph, node),
    }
}

/// A Gather of whole rows of an even number of elements: rows then start on word
/// boundaries, so a table of halves is cut into runs of rows like one of f32 words.
fn gathers_even_rows(graph: &Graph, node: &Node, axis: i64) -> bool {
    let Some(Some(table)) = node.inputs.first() else {
        return false;
    };
    let shape = &graph.values[*table].shape;
    normalize_axis(axis, shape.len()) == Ok(0) && numel(&shape[1..]).is_multiple_of(2)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::engine::builder::{Attr, GraphBuilder};
    use crate::engine::{loader, passes};

    /// A graph computing in f16 (its input cast to FLOAT16) with one activation at full
    /// size, then a strided convolution down to a sixteenth and two small values after it.
    fn graph() -> Graph {
        let pads = || ("pads", Attr::Ints(vec![1, 1, 1, 1]));
        let bytes = GraphBuilder::new(17)
            .input("x", &[1, 4, 32, 32])
            .weight("w", &[4, 4, 3, 3], &[0.1; 144])
            .weight("down", &[4, 4, 4, 4], &[0.1; 256])
            .node("Cast", &["x"], &["xh"], &[("to", Attr::Int(10))])
            .node("Conv", &["xh", "w"], &["full"], &[pads()])
            .node(
                "Conv",
                &["full", "down"],
                &["small"],
                &[("strides", Attr::Ints(vec![4, 4]))],
            )
            .node("Conv", &["small", "w"], &["smaller_too"], &[pads()])
            .node("Add", &["small", "smaller_too"], &["sum"], &[])
            .node("Cast", &["sum"], &["y"], &[("to", Attr::Int(1))])
            .output("y")
            .to_bytes();
        let mut graph = loader::load_graph_bytes(bytes.into()).unwrap();
        passes::prepare(&mut graph, &HashMap::new(), None).unwrap();
        graph
    }

    fn named(graph: &Graph, halves: &[bool]) -> Vec<String> {
        let mut names: Vec<String> = (0..halves.len())
            .filter(|&v| halves[v])
            .map(|v| graph.values[v].name.clone())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn only_the_largest_activations_are_stored_as_halves() {
        let graph = graph();
        assert_eq!(named(&graph, &half_values(&graph, true)), ["full"]);
        // Training keeps every activation f32.
        assert!(named(&graph, &half_values(&graph, false)).is_empty());
    }
}
