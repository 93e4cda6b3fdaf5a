//! Builds ONNX models in memory (float inputs and weights, named values, any op the engine
//! reads), so benchmarks and tests can make a graph of any shape without a file or Python.

use prost::Message;

use super::error::Result;
use super::onnx;
use super::session::Model;

/// A node attribute.
#[derive(Clone, Debug)]
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
    Str(String),
}

/// An ONNX graph under construction: `input`s, `weight`s, `node`s, `output`s, then `build`.
#[derive(Default)]
pub struct GraphBuilder {
    graph: onnx::GraphProto,
    opset: i64,
}

fn float_info(name: &str, shape: Option<&[usize]>) -> onnx::ValueInfoProto {
    let shape = shape.map(|dims| onnx::TensorShapeProto {
        dim: dims
            .iter()
            .map(|&d| onnx::DimensionProto {
                dim_value: Some(d as i64),
                dim_param: None,
            })
            .collect(),
    });
    onnx::ValueInfoProto {
        name: name.into(),
        r#type: Some(onnx::TypeProto {
            tensor_type: Some(onnx::TensorTypeProto {
                elem_type: onnx::data_type::FLOAT,
                shape,
            }),
        }),
    }
}

impl GraphBuilder {
    /// An empty graph in the default ONNX domain at `opset`.
    pub fn new(opset: i64) -> Self {
        GraphBuilder {
            opset,
            ..Default::default()
        }
    }

    /// A float graph input of a fixed shape.
    pub fn input(mut self, name: &str, shape: &[usize]) -> Self {
        self.graph.input.push(float_info(name, Some(shape)));
        self
    }

    /// A float initializer, stored as f32.
    pub fn weight(self, name: &str, shape: &[usize], values: &[f32]) -> Self {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(name, shape, values.len(), onnx::data_type::FLOAT, raw)
    }

    /// A float initializer, stored as f16 (as fp16 exports store their weights).
    pub fn weight_f16(self, name: &str, shape: &[usize], values: &[f32]) -> Self {
        let raw = values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        self.initializer(name, shape, values.len(), onnx::data_type::FLOAT16, raw)
    }

    /// An int64 initializer (indices, shapes, axes).
    pub fn ints(self, name: &str, shape: &[usize], values: &[i64]) -> Self {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(name, shape, values.len(), onnx::data_type::INT64, raw)
    }

    fn initializer(
        mut self,
        name: &str,
        shape: &[usize],
        len: usize,
        data_type: i32,
        raw_data: bytes::Bytes,
    ) -> Self {
        assert_eq!(shape.iter().product::<usize>(), len, "{name}");
        self.graph.initializer.push(onnx::TensorProto {
            name: name.into(),
            dims: shape.iter().map(|&d| d as i64).collect(),
            data_type,
            raw_data,
            ..Default::default()
        });
        self
    }

    pub fn node(
        mut self,
        op_type: &str,
        inputs: &[&str],
        outputs: &[&str],
        attrs: &[(&str, Attr)],
    ) -> Self {
        let attribute = attrs
            .iter()
            .map(|(name, attr)| {
                let mut proto = onnx::AttributeProto {
                    name: name.to_string(),
                    ..Default::default()
                };
                match attr {
                    Attr::Int(i) => (proto.r#type, proto.i) = (onnx::attribute_type::INT, *i),
                    Attr::Ints(v) => {
                        (proto.r#type, proto.ints) = (onnx::attribute_type::INTS, v.clone())
                    }
                    Attr::Float(f) => (proto.r#type, proto.f) = (onnx::attribute_type::FLOAT, *f),
                    Attr::Str(s) => {
                        (proto.r#type, proto.s) =
                            (onnx::attribute_type::STRING, s.clone().into_bytes().into())
                    }
                }
                proto
            })
            .collect();
        self.graph.node.push(onnx::NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            name: format!("{op_type}_{}", self.graph.node.len()),
            op_type: op_type.into(),
            attribute,
            ..Default::default()
        });
        self
    }

    /// A float graph output (its shape is inferred).
    pub fn output(mut self, name: &str) -> Self {
        self.graph.output.push(float_info(name, None));
        self
    }

    /// The encoded model.
    pub fn to_bytes(self) -> Vec<u8> {
        onnx::ModelProto {
            ir_version: 8,
            opset_import: vec![onnx::OperatorSetIdProto {
                domain: String::new(),
                version: self.opset,
            }],
            producer_name: "websd".into(),
            graph: Some(self.graph),
        }
        .encode_to_vec()
    }

    /// Loads the model as if it had been read from a file.
    pub fn build(self) -> Result<Model> {
        Model::from_bytes(self.to_bytes())
    }
}
