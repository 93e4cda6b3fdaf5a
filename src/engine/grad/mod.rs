//! Reverse-mode differentiation as a graph pass. A model given an [`Objective`] gets, after
//! shape inference and before fusion, a scalar loss node and the nodes of its backward pass:
//! each forward node's gradient rule (`rules`) is spelled in the engine's own operators
//! (a MatMul's input gradients are MatMuls, a Conv's are Convs, a normalisation's are
//! reductions and element-wise ops), so the backward pass is planned, fused and run on the
//! GPU like any graph, with nothing read back. The gradients become graph outputs named
//! `<input>.grad`, beside `loss`.

mod layers;
mod resize;
mod rules;
mod tape;

use std::collections::HashMap;

use super::error::{Error, Result};
use super::graph::{Graph, ValueId};
use super::ops::{BinaryOp, Op, ReduceOp, UnaryOp};
use super::tensor::HostTensor;

use tape::Tape;

/// The gradients of a node's inputs, `None` where an input gets none.
type Grads = Vec<Option<ValueId>>;

/// What a training step minimises and what it differentiates by.
#[derive(Clone, Debug)]
pub struct Objective {
    /// The graph output the loss is measured on.
    pub output: String,
    /// The name of the new graph input holding the output's target (same shape): the loss
    /// is their mean squared error.
    pub target: String,
    /// Graph inputs to differentiate the loss by (a model's trainable initializers are made
    /// inputs first, see `Model::with_objective`).
    pub wrt: Vec<String>,
}

/// The name of the loss output.
pub const LOSS: &str = "loss";

/// The name of the output holding the loss's gradient with respect to `input`.
pub fn grad_name(input: &str) -> String {
    format!("{input}.grad")
}

/// Appends the loss and the backward pass to a graph whose shapes are inferred.
pub fn append_backward(graph: &mut Graph, objective: &Objective) -> Result<()> {
    let by_name = |graph: &Graph, name: &str| {
        graph
            .values
            .iter()
            .position(|v| v.name == name)
            .filter(|id| graph.inputs.contains(id) || graph.outputs.contains(id))
    };
    let output = by_name(graph, &objective.output)
        .filter(|id| graph.outputs.contains(id))
        .ok_or_else(|| objective_error(format!("no output `{}`", objective.output)))?;
    let wrt: Vec<ValueId> = objective
        .wrt
        .iter()
        .map(|name| {
            by_name(graph, name)
                .filter(|id| graph.inputs.contains(id) && graph.values[*id].dtype.is_float())
                .ok_or_else(|| objective_error(format!("no float input `{name}`")))
        })
        .collect::<Result<_>>()?;
    let shape = graph.values[output].shape.clone();
    let target = graph.add_input(&objective.target, &shape);

    let mut tape = Tape::new(graph, "grad");
    let diff = tape.binary(BinaryOp::Sub, output, target)?;
    let square = tape.binary(BinaryOp::Mul, diff, diff)?;
    let rank = tape.shape(square).len();
    let loss = tape.reduce(ReduceOp::Mean, square, (0..rank).collect(), false)?;
    let one = tape.constant(HostTensor::f32(vec![], vec![1.0]));
    let forward_nodes = tape.graph.nodes.len();
    let reaches = reached_from(tape.graph, &wrt);

    let mut grads: HashMap<ValueId, ValueId> = HashMap::from([(loss, one)]);
    for n in (0..forward_nodes).rev() {
        let node = tape.graph.nodes[n].clone();
        let upstream: Vec<Option<ValueId>> =
            node.outputs.iter().map(|o| grads.get(o).copied()).collect();
        let wanted: Vec<bool> = node
            .inputs
            .iter()
            .map(|i| i.is_some_and(|i| reaches[i]))
            .collect();
        if upstream.iter().all(Option::is_none) || !wanted.contains(&true) {
            continue;
        }
        let downstream = rules::backward(&mut tape, &node, &upstream, &wanted)?;
        for (input, grad) in node.inputs.iter().zip(downstream) {
            if let (Some(input), Some(grad)) = (input, grad) {
                let sum = match grads.get(input) {
                    Some(&earlier) => tape.binary(BinaryOp::Add, earlier, grad)?,
                    None => grad,
                };
                grads.insert(*input, sum);
            }
        }
    }

    tape.graph.values[loss].name = LOSS.into();
    tape.graph.outputs.push(loss);
    for (&w, name) in wrt.iter().zip(&objective.wrt) {
        let grad = *grads.get(&w).ok_or_else(|| {
            objective_error(format!(
                "`{}` does not depend on `{name}`",
                objective.output
            ))
        })?;
        // A gradient may also be a forward value or another input's gradient: an identity
        // gives the output its own value and name.
        let named = tape.unary(UnaryOp::Identity, grad)?;
        tape.graph.values[named].name = grad_name(name);
        tape.graph.outputs.push(named);
    }
    Ok(())
}

fn objective_error(reason: String) -> Error {
    Error::Input {
        name: "objective".into(),
        reason,
    }
}

/// Which values depend on any of `sources`: only those carry gradients.
fn reached_from(graph: &Graph, sources: &[ValueId]) -> Vec<bool> {
    let mut reached = vec![false; graph.values.len()];
    for &s in sources {
        reached[s] = true;
    }
    for node in &graph.nodes {
        let float_op = !matches!(node.op, Op::Shape { .. } | Op::ArgMax { .. });
        if float_op && node.inputs.iter().flatten().any(|&i| reached[i]) {
            for &o in &node.outputs {
                reached[o] = graph.values[o].dtype.is_float();
            }
        }
    }
    reached
}
