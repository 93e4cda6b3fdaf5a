//! Appends nodes to a shape-inferred graph one at a time, inferring each result's shape as
//! it goes (so gradient rules can read the shapes of what they just built) and folding the
//! small all-constant ones on the host.

use super::super::error::Result;
use super::super::graph::{Graph, Node, ValueId};
use super::super::ops::{BinaryOp, Op, ReduceOp, UnaryOp};
use super::super::passes::infer_node;
use super::super::tensor::HostTensor;

/// Elements up to which a new all-constant node is folded (shape tensors, scalars), never
/// a weight-sized one.
const FOLD_LIMIT: usize = 4096;

pub struct Tape<'g> {
    pub graph: &'g mut Graph,
    prefix: &'static str,
}

impl<'g> Tape<'g> {
    pub fn new(graph: &'g mut Graph, prefix: &'static str) -> Self {
        Tape { graph, prefix }
    }

    pub fn shape(&self, v: ValueId) -> &[usize] {
        &self.graph.values[v].shape
    }

    fn new_value(&mut self, constant: Option<HostTensor>) -> ValueId {
        let name = format!("{}/{}", self.prefix, self.graph.values.len());
        self.graph.add_value(&name, constant)
    }

    /// A node with `outputs` results; optional inputs may be `None`.
    pub fn emit(
        &mut self,
        op: Op,
        inputs: &[Option<ValueId>],
        outputs: usize,
    ) -> Result<Vec<ValueId>> {
        let outputs: Vec<ValueId> = (0..outputs).map(|_| self.new_value(None)).collect();
        let node = Node {
            name: format!("{}/{}", self.prefix, self.graph.nodes.len()),
            op,
            inputs: inputs.to_vec(),
            outputs: outputs.clone(),
        };
        if !infer_node(self.graph, &node, FOLD_LIMIT)? {
            self.graph.nodes.push(node);
        }
        Ok(outputs)
    }

    /// A node with one result and every input present.
    pub fn op(&mut self, op: Op, inputs: &[ValueId]) -> Result<ValueId> {
        let inputs: Vec<Option<ValueId>> = inputs.iter().map(|&i| Some(i)).collect();
        Ok(self.emit(op, &inputs, 1)?[0])
    }

    pub fn constant(&mut self, tensor: HostTensor) -> ValueId {
        self.new_value(Some(tensor))
    }

    pub fn scalar(&mut self, x: f32) -> ValueId {
        self.constant(HostTensor::f32(vec![], vec![x]))
    }

    pub fn ints(&mut self, values: &[i64]) -> ValueId {
        self.constant(HostTensor::i64(vec![values.len()], values.to_vec()))
    }

    pub fn unary(&mut self, op: UnaryOp, x: ValueId) -> Result<ValueId> {
        self.op(Op::Unary(op), &[x])
    }

    pub fn binary(&mut self, op: BinaryOp, a: ValueId, b: ValueId) -> Result<ValueId> {
        self.op(Op::Binary(op), &[a, b])
    }

    pub fn mul(&mut self, a: ValueId, b: ValueId) -> Result<ValueId> {
        self.binary(BinaryOp::Mul, a, b)
    }

    pub fn sub(&mut self, a: ValueId, b: ValueId) -> Result<ValueId> {
        self.binary(BinaryOp::Sub, a, b)
    }

    pub fn scale(&mut self, x: ValueId, factor: f32) -> Result<ValueId> {
        let factor = self.scalar(factor);
        self.mul(x, factor)
    }

    pub fn reduce(
        &mut self,
        op: ReduceOp,
        x: ValueId,
        axes: Vec<usize>,
        keep_dims: bool,
    ) -> Result<ValueId> {
        let op = Op::Reduce {
            op,
            axes: Some(axes.into_iter().map(|a| a as i64).collect()),
            keep_dims,
            noop_with_empty_axes: true,
        };
        self.op(op, &[x])
    }

    pub fn reshape(&mut self, x: ValueId, shape: &[usize]) -> Result<ValueId> {
        if self.shape(x) == shape {
            return Ok(x);
        }
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let dims = self.ints(&dims);
        self.op(Op::Reshape { allow_zero: true }, &[x, dims])
    }

    pub fn transpose(&mut self, x: ValueId, perm: &[usize]) -> Result<ValueId> {
        let perm = Some(perm.iter().map(|&p| p as i64).collect());
        self.op(Op::Transpose { perm }, &[x])
    }

    /// `x` with its last two axes swapped.
    pub fn swap_last_two(&mut self, x: ValueId) -> Result<ValueId> {
        let rank = self.shape(x).len();
        let mut perm: Vec<usize> = (0..rank).collect();
        perm.swap(rank - 2, rank - 1);
        self.transpose(x, &perm)
    }

    /// Pads (positive, with zeros) or crops (negative) each axis: a Slice for the crops,
    /// then a Pad.
    pub fn pad(&mut self, x: ValueId, begin: &[i64], end: &[i64]) -> Result<ValueId> {
        let mut x = x;
        if begin.iter().chain(end).any(|&p| p < 0) {
            let shape = self.shape(x).to_vec();
            let starts: Vec<i64> = begin.iter().map(|&b| (-b).max(0)).collect();
            let ends: Vec<i64> = (0..shape.len())
                .map(|a| shape[a] as i64 - (-end[a]).max(0))
                .collect();
            let (starts, ends) = (self.ints(&starts), self.ints(&ends));
            x = self.op(Op::Slice, &[x, starts, ends])?;
        }
        if begin.iter().chain(end).any(|&p| p > 0) {
            let pads: Vec<i64> = [begin, end].concat().iter().map(|&p| p.max(0)).collect();
            let pads = self.ints(&pads);
            x = self.op(Op::Pad, &[x, pads])?;
        }
        Ok(x)
    }

    pub fn expand(&mut self, x: ValueId, shape: &[usize]) -> Result<ValueId> {
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let dims = self.ints(&dims);
        self.op(Op::Expand, &[x, dims])
    }

    /// The gradient `g` of a broadcast result, summed back to an operand of `shape`.
    pub fn unbroadcast(&mut self, g: ValueId, shape: &[usize]) -> Result<ValueId> {
        let from = self.shape(g).to_vec();
        let offset = from.len() - shape.len();
        let axes: Vec<usize> = (0..from.len())
            .filter(|&i| i < offset || (shape[i - offset] == 1 && from[i] != 1))
            .collect();
        let summed = if axes.is_empty() {
            g
        } else {
            self.reduce(ReduceOp::Sum, g, axes, true)?
        };
        self.reshape(summed, shape)
    }
}
