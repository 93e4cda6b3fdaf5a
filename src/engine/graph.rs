//! The engine's graph IR: values (with dtype, declared dims and, for initializers and
//! folded results, constant contents) and nodes in topological order.

use std::sync::Arc;

use super::ops::Op;
use super::tensor::{DType, HostTensor, StoredTensor};

pub type ValueId = usize;

/// A dimension as declared by the model: fixed, or named and bound by the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dim {
    Fixed(usize),
    Named(String),
}

#[derive(Clone, Debug)]
pub struct Value {
    pub name: String,
    pub dtype: DType,
    /// Declared dims, known for graph inputs and outputs.
    pub dims: Option<Vec<Dim>>,
    /// Static shape, set by shape inference once every dimension is bound.
    pub shape: Vec<usize>,
    pub constant: Option<Arc<HostTensor>>,
    /// A weight left in the model's files (large initializers of a model opened through a
    /// `FileSource`): constant, but its values are never on the host, only uploaded.
    pub stored: Option<StoredTensor>,
}

#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub op: Op,
    /// `None` marks an omitted optional input.
    pub inputs: Vec<Option<ValueId>>,
    pub outputs: Vec<ValueId>,
}

#[derive(Clone, Debug)]
pub struct Graph {
    pub values: Vec<Value>,
    pub nodes: Vec<Node>,
    /// Runtime inputs (initializers excluded).
    pub inputs: Vec<ValueId>,
    pub outputs: Vec<ValueId>,
    pub opset: i64,
}

impl Graph {
    pub fn input_names(&self) -> Vec<&str> {
        self.inputs
            .iter()
            .map(|&v| self.values[v].name.as_str())
            .collect()
    }

    pub fn output_names(&self) -> Vec<&str> {
        self.outputs
            .iter()
            .map(|&v| self.values[v].name.as_str())
            .collect()
    }
}
