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
    /// The model declares it float16: an input, initializer or constant of that type, or
    /// what a Cast to it makes (`lower::half_values` infers what other ops make from these).
    pub declared_f16: bool,
}

impl Value {
    /// Whether the graph computes it (an input or an activation): neither a constant nor
    /// a weight left in the files.
    pub fn is_computed(&self) -> bool {
        self.constant.is_none() && self.stored.is_none()
    }
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
    /// A new f32 value: an intermediate whose shape inference sets, or with `constant`, a
    /// constant.
    pub fn add_value(&mut self, name: &str, constant: Option<HostTensor>) -> ValueId {
        self.values.push(Value {
            name: name.into(),
            dtype: constant.as_ref().map_or(DType::F32, HostTensor::dtype),
            dims: None,
            shape: constant.as_ref().map_or(vec![], |c| c.shape.clone()),
            constant: constant.map(Arc::new),
            stored: None,
            declared_f16: false,
        });
        self.values.len() - 1
    }

    /// A new f32 graph input of a fixed shape.
    pub fn add_input(&mut self, name: &str, shape: &[usize]) -> ValueId {
        let id = self.add_value(name, None);
        let value = &mut self.values[id];
        value.dims = Some(shape.iter().map(|&d| Dim::Fixed(d)).collect());
        value.shape = shape.to_vec();
        self.inputs.push(id);
        id
    }

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
