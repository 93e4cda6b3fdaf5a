//! Low-rank adapters (LoRA) on a model's linear and convolution layers. Exporters keep a
//! layer's module path in its node's name
//! (`/down_blocks.0/attentions.0/transformer_blocks.0/attn1/to_q/MatMul`, `.../proj_in/Conv`)
//! even where the weight initializer itself is anonymous, so a layer is found by that path
//! (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`). A linear layer's
//! `y = x W` becomes `y = x W + scale (x A) B`, with A `[in, rank]` and B `[rank, out]`; a
//! convolution's `y = conv(x, W)` becomes `y + scale conv(conv(x, A), B)`, A `[rank, in, kh,
//! kw]` read with the layer's own strides and padding, B `[out, rank, 1, 1]` (LoCon). The
//! factors are either constants (an adapter loaded for inference) or new graph inputs (an
//! adapter being trained).

use super::error::{Error, Result};
use super::graph::{Graph, Node, ValueId};
use super::ops::{BinaryOp, ConvAttrs, Op};
use super::session::Model;
use super::tensor::HostTensor;

/// A layer an adapter can attach to.
#[derive(Clone, Debug, PartialEq)]
pub struct AdaptableLayer {
    /// The module path, dot-separated.
    pub module: String,
    pub in_features: usize,
    pub out_features: usize,
    /// A convolution's filter size; `None` for a linear layer.
    pub kernel: Option<[usize; 2]>,
}

impl AdaptableLayer {
    /// The shapes of a rank-`rank` adapter's A and B on this layer.
    pub fn factor_shapes(&self, rank: usize) -> [Vec<usize>; 2] {
        match self.kernel {
            None => [vec![self.in_features, rank], vec![rank, self.out_features]],
            Some([kh, kw]) => [
                vec![rank, self.in_features, kh, kw],
                vec![self.out_features, rank, 1, 1],
            ],
        }
    }
}

/// One adapter: its layer, the factor its product is scaled by, and its weights (A and B
/// of [`AdaptableLayer::factor_shapes`]), or `None` to make them graph inputs named by
/// [`lora_input_names`].
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

/// The module path a MatMul or Conv node's name records, if it follows the exporters'
/// pattern.
fn module_of(node: &Node) -> Option<String> {
    let suffix = match node.op {
        Op::MatMul => "/MatMul",
        Op::Conv(_) => "/Conv",
        _ => return None,
    };
    let path = node.name.strip_prefix('/')?.strip_suffix(suffix)?;
    Some(path.replace('/', "."))
}

impl Model {
    /// The layers adapters can attach to, in graph order: MatMuls by a 2-D weight and
    /// ungrouped Convs by a 4-D one, whose node names carry a module path.
    pub fn adaptable_layers(&self) -> Vec<AdaptableLayer> {
        let graph = self.graph();
        graph
            .nodes
            .iter()
            .filter_map(|n| {
                let module = module_of(n)?;
                let shape = weight_shape(graph, n.inputs.get(1).copied().flatten()?)?;
                match (&n.op, shape) {
                    (Op::MatMul, &[rows, columns]) => Some(AdaptableLayer {
                        module,
                        in_features: rows,
                        out_features: columns,
                        kernel: None,
                    }),
                    (Op::Conv(attrs), &[out, inputs, kh, kw]) if attrs.group == 1 => {
                        Some(AdaptableLayer {
                            module,
                            in_features: inputs,
                            out_features: out,
                            kernel: Some([kh, kw]),
                        })
                    }
                    _ => None,
                }
            })
            .collect()
    }

    /// The same model with `adapters` attached to their layers.
    pub fn with_lora(&self, adapters: &[LoraAdapter]) -> Result<Model> {
        let mut graph = self.graph().clone();
        let layers = self.adaptable_layers();
        for adapter in adapters {
            let layer = layers
                .iter()
                .find(|l| l.module == adapter.module)
                .ok_or_else(|| Error::Input {
                    name: adapter.module.clone(),
                    reason: "the model has no linear or convolution layer of that name".into(),
                })?;
            attach(&mut graph, layer, adapter)?;
        }
        Ok(self.with_graph(graph))
    }
}

/// The shape of a weight: an initializer, or one cast from one (as models whose weights
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
    Some(shape)
}

fn attach(graph: &mut Graph, layer: &AdaptableLayer, adapter: &LoraAdapter) -> Result<()> {
    let position = graph
        .nodes
        .iter()
        .position(|n| module_of(n).as_deref() == Some(&layer.module))
        .expect("found by adaptable_layers");
    let (rank, (input_a, input_b)) = (adapter.rank, lora_input_names(&adapter.module));
    let shapes = layer.factor_shapes(rank);
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
    // A convolution's down factor reads the input as the layer does; its up factor is 1x1.
    let (down_op, up_op) = match &node.op {
        Op::Conv(attrs) => {
            let pointwise = ConvAttrs {
                strides: vec![],
                dilations: vec![],
                pads: vec![],
                auto_pad: "NOTSET".into(),
                ..attrs.clone()
            };
            (Op::Conv(attrs.clone()), Op::Conv(pointwise))
        }
        _ => (Op::MatMul, Op::MatMul),
    };
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
        lora_node("lora_down", down_op, vec![x, Some(a)], down),
        lora_node("lora_up", up_op, vec![Some(down), Some(b)], up),
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
