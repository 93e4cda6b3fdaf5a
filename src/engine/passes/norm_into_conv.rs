//! A GroupNorm read only as the image of convolutions is folded into them: it writes a
//! table of scale and shift per image and channel ([N, C, 2], `Op::NormTable`) instead of
//! the normalised tensor, and each convolution applies that (and the fused SiLU) as it
//! reads its image. Inference only. The normalised tensor, the size of the norm's input,
//! is never stored: a VAE decoder's resnets at full resolution hold one buffer less, save
//! a pass over it, and an fp16 model rounds once less.

use super::super::graph::{Graph, ValueId};
use super::super::ops::{NormalizedInput, Op};

pub(super) fn fold_norm_into_conv(graph: &mut Graph) {
    let mut readers: Vec<Vec<(usize, usize)>> = vec![Vec::new(); graph.values.len()];
    for (n, node) in graph.nodes.iter().enumerate() {
        for (i, v) in node.inputs.iter().enumerate() {
            if let Some(v) = v {
                readers[*v].push((n, i));
            }
        }
    }
    for n in 0..graph.nodes.len() {
        let Op::GroupNorm {
            epsilon,
            groups,
            per_channel_affine,
            silu,
        } = graph.nodes[n].op
        else {
            continue;
        };
        let (Some(x), y) = (graph.nodes[n].inputs[0], graph.nodes[n].outputs[0]) else {
            continue;
        };
        if !only_images_of_convolutions(graph, &readers[y], y) {
            continue;
        }
        graph.nodes[n].op = Op::NormTable {
            epsilon,
            groups,
            per_channel_affine,
        };
        let shape = &mut graph.values[y].shape;
        *shape = vec![shape[0], shape[1], 2];
        for &(c, _) in &readers[y] {
            let conv = &mut graph.nodes[c];
            conv.inputs[0] = Some(x);
            conv.inputs.resize(3, None);
            conv.inputs.push(Some(y));
            if let Op::Conv(attrs) = &mut conv.op {
                attrs.normalized_input = Some(NormalizedInput { silu });
            }
        }
    }
}

/// Whether `y` (read by `readers`: node, input) is not a graph output and is read only
/// as the image of 2-D convolutions that read no other norm's table.
fn only_images_of_convolutions(graph: &Graph, readers: &[(usize, usize)], y: ValueId) -> bool {
    let image = graph.values[y].shape.len() == 4;
    image
        && !readers.is_empty()
        && !graph.outputs.contains(&y)
        && readers.iter().all(|&(c, i)| {
            let conv = &graph.nodes[c];
            let once = conv.inputs.iter().filter(|&&v| v == Some(y)).count() == 1;
            i == 0
                && once
                && matches!(&conv.op, Op::Conv(attrs) if attrs.normalized_input.is_none())
        })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::super::super::builder::{Attr, GraphBuilder};
    use super::super::super::loader::load_graph_bytes;
    use super::super::prepare;
    use super::*;

    /// x -> GroupNorm -> Conv -> a, and x -> GroupNorm -> (Conv, Add) -> b: the first norm
    /// is folded into its convolution, the second (also read by the Add) is not. (The
    /// fused SiLU of exporters' GroupNorm is folded too: the tiny SD VAE's tests.)
    #[test]
    fn a_norm_read_only_by_convolutions_becomes_their_table() {
        let norm = |out: &str| {
            (
                ["x", "gamma", "beta"],
                [out.to_string()],
                [("num_groups", Attr::Int(2)), ("epsilon", Attr::Float(1e-5))],
            )
        };
        let (inputs, first, attrs) = norm("n");
        let (_, second, attrs2) = norm("m");
        let pads = || [("pads", Attr::Ints(vec![1, 1, 1, 1]))];
        let bytes = GraphBuilder::new(18)
            .input("x", &[1, 4, 8, 8])
            .weight("gamma", &[4], &[1.0, 0.5, 2.0, 1.5])
            .weight("beta", &[4], &[0.0, 0.1, -0.2, 0.3])
            .weight("w", &[4, 4, 3, 3], &[0.05; 144])
            .node("GroupNormalization", &inputs, &[&first[0]], &attrs)
            .node("Conv", &["n", "w"], &["a"], &pads())
            .node("GroupNormalization", &inputs, &[&second[0]], &attrs2)
            .node("Conv", &["m", "w"], &["c"], &pads())
            .node("Add", &["m", "c"], &["b"], &[])
            .output("a")
            .output("b")
            .to_bytes();
        let mut graph = load_graph_bytes(bytes.into()).unwrap();
        prepare(&mut graph, &HashMap::new(), None).unwrap();
        let ops: Vec<String> = graph
            .nodes
            .iter()
            .map(|n| match &n.op {
                Op::Conv(attrs) => format!("Conv {:?}", attrs.normalized_input),
                Op::NormTable { .. } => "NormTable".into(),
                Op::GroupNorm { silu, .. } => format!("GroupNorm silu={silu}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            ops,
            [
                "NormTable",
                "Conv Some(NormalizedInput { silu: false })",
                "GroupNorm silu=false",
                "Conv None",
                "Binary(Add)"
            ]
        );
        let conv = &graph.nodes[1];
        let x = graph.inputs[0];
        assert_eq!(conv.inputs[0], Some(x));
        assert_eq!(conv.inputs[3], Some(graph.nodes[0].outputs[0]));
        assert_eq!(graph.values[graph.nodes[0].outputs[0]].shape, [1, 4, 2]);
    }
}
