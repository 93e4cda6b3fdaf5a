//! Low-rank adapters (LoRA) on a model's linear layers. Exporters keep a layer's module path
//! in its MatMul's node name (`/down_blocks.0/attentions.0/transformer_blocks.0/attn1/to_q/MatMul`)
//! even where the weight initializer itself is anonymous, so a layer is found by that path
//! (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`) and its `y = x W` becomes
//! `y = x W + scale (x A) B`, with A `[in, rank]` and B `[rank, out]` either constants (an
//! adapter loaded for inference) or new graph inputs (an adapter being trained).

use super::error::{Error, Result};
use super::graph::{Graph, Node, ValueId};
use super::ops::{BinaryOp, Op};
use super::session::Model;
use super::tensor::HostTensor;

/// A linear layer an adapter can attach to.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearLayer {
    /// The module path, dot-separated.
    pub module: String,
    pub in_features: usize,
    pub out_features: usize,
}

/// One adapter: its layer, the factor its product is scaled by, and its weights (A
/// `[in, rank]`, B `[rank, out]`), or `None` to make them graph inputs named by
/// [`lora_input_names`] (of shapes `[in, rank]` and `[rank, out]`).
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    pub module: String,
    pub rank: usize,
    pub scale: f32,
    pub weights: Option<(HostTensor, HostTensor)>,
}

/// The graph inputs holding a trainable adapter's A and B.
pub fn lora_input_names(module: &str) -> (String, String) {
    (format!("{module}.lora_A"), format!("{module}.lora_B"))
}

/// The module path a MatMul node's name records, if it follows the exporters' pattern.
fn module_of(node: &Node) -> Option<String> {
    let path = node.name.strip_prefix('/')?.strip_suffix("/MatMul")?;
    Some(path.replace('/', "."))
}

impl Model {
    /// The linear layers (MatMuls by a 2-D initializer whose node names carry a module
    /// path), in graph order.
    pub fn linear_layers(&self) -> Vec<LinearLayer> {
        let graph = self.graph();
        graph
            .nodes
            .iter()
            .filter(|n| matches!(n.op, Op::MatMul))
            .filter_map(|n| {
                let shape = weight_shape(graph, n.inputs.get(1).copied().flatten()?)?;
                Some(LinearLayer {
                    module: module_of(n)?,
                    in_features: shape[0],
                    out_features: shape[1],
                })
            })
            .collect()
    }

    /// The same model with `adapters` attached to their layers.
    pub fn with_lora(&self, adapters: &[LoraAdapter]) -> Result<Model> {
        let mut graph = self.graph().clone();
        let layers = self.linear_layers();
        for adapter in adapters {
            let layer = layers
                .iter()
                .find(|l| l.module == adapter.module)
                .ok_or_else(|| Error::Input {
                    name: adapter.module.clone(),
                    reason: "the model has no linear layer of that name".into(),
                })?;
            attach(&mut graph, layer, adapter)?;
        }
        Ok(self.with_graph(graph))
    }
}

/// The shape of a 2-D weight: an initializer, or one cast from one (as models whose weights
/// are stored in f16 read them).
fn weight_shape(graph: &Graph, id: ValueId) -> Option<&[usize]> {
    let cast_from = graph
        .nodes
        .iter()
        .find(|n| n.outputs.contains(&id) && matches!(n.op, Op::Cast(_)))
        .and_then(|n| n.inputs[0]);
    let value = &graph.values[cast_from.unwrap_or(id)];
    let shape = match (&value.constant, &value.stored) {
        (Some(c), _) => c.shape.as_slice(),
        (None, Some(s)) => s.shape.as_slice(),
        _ => return None,
    };
    (shape.len() == 2).then_some(shape)
}

fn attach(graph: &mut Graph, layer: &LinearLayer, adapter: &LoraAdapter) -> Result<()> {
    let position = graph
        .nodes
        .iter()
        .position(|n| matches!(n.op, Op::MatMul) && module_of(n).as_deref() == Some(&layer.module))
        .expect("found by linear_layers");
    let (rank, (input_a, input_b)) = (adapter.rank, lora_input_names(&adapter.module));
    let shapes = [
        vec![layer.in_features, rank],
        vec![rank, layer.out_features],
    ];
    let [a, b] = match &adapter.weights {
        Some((a, b)) => {
            for (tensor, shape, name) in [(a, &shapes[0], "A"), (b, &shapes[1], "B")] {
                if tensor.shape != *shape {
                    return Err(Error::Input {
                        name: adapter.module.clone(),
                        reason: format!(
                            "LoRA {name} of shape {:?}, expected {shape:?}",
                            tensor.shape
                        ),
                    });
                }
            }
            [
                graph.add_value(&input_a, Some(a.clone())),
                graph.add_value(&input_b, Some(b.clone())),
            ]
        }
        None => [
            graph.add_input(&input_a, &shapes[0]),
            graph.add_input(&input_b, &shapes[1]),
        ],
    };
    let scale = graph.add_value(
        &format!("{}.lora_scale", adapter.module),
        Some(HostTensor::f32(vec![], vec![adapter.scale])),
    );
    // The original product now lands in `base`; the layer's output is base + adapter.
    let node = &graph.nodes[position];
    let (x, output, name) = (node.inputs[0], node.outputs[0], node.name.clone());
    let base = graph.add_value(&format!("{name}/base"), None);
    graph.nodes[position].outputs[0] = base;
    let down = graph.add_value(&format!("{name}/lora_down"), None);
    let up = graph.add_value(&format!("{name}/lora_up"), None);
    let scaled = graph.add_value(&format!("{name}/lora_scaled"), None);
    let lora_node = |suffix: &str, op: Op, inputs: Vec<Option<ValueId>>, out: ValueId| Node {
        name: format!("{name}/{suffix}"),
        op,
        inputs,
        outputs: vec![out],
    };
    let added = [
        lora_node("lora_down", Op::MatMul, vec![x, Some(a)], down),
        lora_node("lora_up", Op::MatMul, vec![Some(down), Some(b)], up),
        lora_node(
            "lora_scale",
            Op::Binary(BinaryOp::Mul),
            vec![Some(up), Some(scale)],
            scaled,
        ),
        lora_node(
            "lora_add",
            Op::Binary(BinaryOp::Add),
            vec![Some(base), Some(scaled)],
            output,
        ),
    ];
    graph.nodes.splice(position + 1..position + 1, added);
    Ok(())
}
