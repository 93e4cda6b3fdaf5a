//! ONNX bytes -> [`Graph`]: protobuf decoding, initializers (typed fields, `raw_data`,
//! external data), `Constant` nodes and typed operators.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;

use super::error::{Error, Result};
use super::graph::{Dim, Graph, Node, Value, ValueId};
use super::onnx::{self, DATA_LOCATION_EXTERNAL};
use super::ops::{Attributes, Op};
use super::tensor::{DType, HostData, HostTensor, Storage};

/// Supplies the bytes of an external-data file (`location` as written in the model, relative
/// to the model's folder). Natively this reads a file; in the browser, fetched bytes.
pub type ExternalDataSource<'a> = dyn FnMut(&str) -> std::result::Result<Bytes, String> + 'a;

/// The external-data files a model names (to fetch before loading), in first-use order:
/// initializers' and tensor attributes' (exporters move large `Constant` values there too).
pub fn external_data_locations(model_bytes: Bytes) -> Result<Vec<String>> {
    let model = decode_model(model_bytes)?;
    let graph = model.graph.unwrap_or_default();
    let attribute_tensors = graph
        .node
        .iter()
        .flat_map(|n| &n.attribute)
        .filter_map(|a| a.t.as_ref());
    let mut locations: Vec<String> = Vec::new();
    for tensor in graph.initializer.iter().chain(attribute_tensors) {
        if tensor.data_location == DATA_LOCATION_EXTERNAL {
            let location = tensor
                .external_data
                .iter()
                .find(|e| e.key == "location")
                .map(|e| e.value.clone());
            if let Some(location) = location.filter(|l| !locations.contains(l)) {
                locations.push(location);
            }
        }
    }
    Ok(locations)
}

fn decode_model(model_bytes: Bytes) -> Result<onnx::ModelProto> {
    onnx::ModelProto::decode(model_bytes).map_err(|e| {
        Error::parse(format!(
            "protobuf decoding failed ({e}); is this an .onnx file?"
        ))
    })
}

/// Decodes a model. `external` is asked once per distinct external-data file.
pub fn load_graph(model_bytes: Bytes, external: &mut ExternalDataSource) -> Result<Graph> {
    let model = decode_model(model_bytes)?;
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .ok_or_else(|| Error::parse("the model imports no ONNX opset"))?;
    let graph = model
        .graph
        .ok_or_else(|| Error::parse("the model has no graph"))?;
    let mut builder = Builder {
        values: Vec::new(),
        by_name: HashMap::new(),
    };
    let mut files = ExternalFiles {
        source: external,
        cache: HashMap::new(),
    };

    for init in &graph.initializer {
        let tensor = tensor_from_proto(init, Some(&mut files))?;
        let id = builder.define(&init.name, tensor.dtype());
        builder.values[id].constant = Some(Arc::new(tensor));
    }
    let mut inputs = Vec::new();
    for info in &graph.input {
        if builder.by_name.contains_key(&info.name) {
            continue; // an initializer also listed as an input (older exporters)
        }
        let (dtype, dims) = value_type(info)?;
        let id = builder.define(&info.name, dtype);
        builder.values[id].dims = Some(dims);
        inputs.push(id);
    }

    let mut nodes = Vec::new();
    for proto in &graph.node {
        if !(proto.domain.is_empty() || proto.domain == "ai.onnx") {
            return Err(Error::Unsupported {
                op_type: format!("{}::{}", proto.domain, proto.op_type),
                node: proto.name.clone(),
                opset,
                reason: "operators outside the default ONNX domain are not supported".into(),
            });
        }
        if proto.op_type == "Constant" {
            let tensor = constant_node_value(proto, &mut files)?;
            let output = proto
                .output
                .first()
                .ok_or_else(|| Error::parse("Constant without output"))?;
            let id = builder.define(output, tensor.dtype());
            builder.values[id].constant = Some(Arc::new(tensor));
            continue;
        }
        let op = Op::parse(proto, opset)?;
        let inputs = proto
            .input
            .iter()
            .map(|name| match name.as_str() {
                "" => Ok(None),
                name => builder.lookup(name, &proto.name).map(Some),
            })
            .collect::<Result<Vec<_>>>()?;
        // Dtypes of outputs are settled by shape inference; F32 is a placeholder.
        let outputs = proto
            .output
            .iter()
            .map(|name| builder.define(name, DType::F32))
            .collect();
        nodes.push(Node {
            name: proto.name.clone(),
            op,
            inputs,
            outputs,
        });
    }

    let mut outputs = Vec::new();
    for info in &graph.output {
        let id = builder.lookup(&info.name, "graph outputs")?;
        if let Ok((_, dims)) = value_type(info) {
            builder.values[id].dims = Some(dims);
        }
        outputs.push(id);
    }
    Ok(Graph {
        values: builder.values,
        nodes,
        inputs,
        outputs,
        opset,
    })
}

struct Builder {
    values: Vec<Value>,
    by_name: HashMap<String, ValueId>,
}

impl Builder {
    fn define(&mut self, name: &str, dtype: DType) -> ValueId {
        let id = self.values.len();
        self.values.push(Value {
            name: name.to_string(),
            dtype,
            dims: None,
            shape: Vec::new(),
            constant: None,
        });
        // A later definition of the same name shadows the earlier one (SSA violations are
        // rejected by onnx.checker, so this only matters for malformed files).
        self.by_name.insert(name.to_string(), id);
        id
    }

    fn lookup(&self, name: &str, user: &str) -> Result<ValueId> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| Error::parse(format!("`{user}` uses `{name}`, which nothing defines")))
    }
}

pub(crate) struct ExternalFiles<'s, 'a> {
    source: &'s mut ExternalDataSource<'a>,
    cache: HashMap<String, Bytes>,
}

impl ExternalFiles<'_, '_> {
    fn slice(
        &mut self,
        tensor: &str,
        location: &str,
        offset: usize,
        length: Option<usize>,
    ) -> Result<Bytes> {
        let err = |reason: String| Error::ExternalData {
            tensor: tensor.to_string(),
            reason,
        };
        if !self.cache.contains_key(location) {
            let bytes = (self.source)(location)
                .map_err(|e| err(format!("cannot read `{location}`: {e}")))?;
            self.cache.insert(location.to_string(), bytes);
        }
        let file = &self.cache[location];
        let end = match length {
            Some(len) => offset.checked_add(len),
            None => Some(file.len()),
        };
        match end {
            Some(end) if end <= file.len() && offset <= end => Ok(file.slice(offset..end)),
            _ => Err(err(format!(
                "`{location}` has {} bytes, the tensor needs bytes {offset}..{}",
                file.len(),
                end.map_or("overflow".into(), |e| e.to_string())
            ))),
        }
    }
}

fn value_type(info: &onnx::ValueInfoProto) -> Result<(DType, Vec<Dim>)> {
    let tensor = info
        .r#type
        .as_ref()
        .and_then(|t| t.tensor_type.as_ref())
        .ok_or_else(|| Error::parse(format!("`{}` is not a tensor", info.name)))?;
    let storage = Storage::from_onnx(tensor.elem_type).ok_or_else(|| {
        Error::parse(format!(
            "`{}` has unsupported element type {}",
            info.name, tensor.elem_type
        ))
    })?;
    let dims = tensor
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .enumerate()
                .map(|(i, d)| match (&d.dim_value, &d.dim_param) {
                    (Some(v), _) if *v >= 0 => Dim::Fixed(*v as usize),
                    (_, Some(p)) if !p.is_empty() => Dim::Named(p.clone()),
                    _ => Dim::Named(format!("{}:{i}", info.name)),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((storage.dtype(), dims))
}

fn constant_node_value(node: &onnx::NodeProto, files: &mut ExternalFiles) -> Result<HostTensor> {
    let a = Attributes::new(node);
    if let Some(t) = a.tensor("value") {
        return tensor_from_proto(t, Some(files));
    }
    if let Some(v) = a.floats("value_floats") {
        return Ok(HostTensor::f32(vec![v.len()], v));
    }
    if let Some(v) = a.ints("value_ints") {
        return Ok(HostTensor::i64(vec![v.len()], v));
    }
    let attr = node
        .attribute
        .first()
        .map(|a| a.name.as_str())
        .unwrap_or("");
    match attr {
        "value_float" => Ok(HostTensor::f32(vec![], vec![a.float("value_float", 0.0)])),
        "value_int" => Ok(HostTensor::i64(vec![], vec![a.int("value_int", 0)])),
        _ => Err(Error::Unsupported {
            op_type: "Constant".into(),
            node: node.name.clone(),
            opset: 0,
            reason: format!("constant given as `{attr}`"),
        }),
    }
}

/// Converts a `TensorProto` to a host tensor. `files` resolves external data; without it,
/// externally stored tensors are an error.
pub(crate) fn tensor_from_proto(
    t: &onnx::TensorProto,
    files: Option<&mut ExternalFiles>,
) -> Result<HostTensor> {
    let bad = |reason: String| Error::parse(format!("tensor `{}`: {reason}", t.name));
    let storage = Storage::from_onnx(t.data_type)
        .ok_or_else(|| bad(format!("unsupported data type {}", t.data_type)))?;
    let shape = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| bad(format!("negative dimension {d}"))))
        .collect::<Result<Vec<_>>>()?;
    let n: usize = shape.iter().product();

    if t.data_location == DATA_LOCATION_EXTERNAL {
        let files = files.ok_or_else(|| bad("external data is not allowed here".into()))?;
        let entry = |key: &str| {
            t.external_data
                .iter()
                .find(|e| e.key == key)
                .map(|e| e.value.as_str())
        };
        let location =
            entry("location").ok_or_else(|| bad("external data without a location".into()))?;
        let number = |key: &str| -> Result<Option<usize>> {
            entry(key)
                .map(|v| {
                    v.parse::<usize>()
                        .map_err(|_| bad(format!("external data {key} `{v}`")))
                })
                .transpose()
        };
        let offset = number("offset")?.unwrap_or(0);
        let length = number("length")?.or(Some(n * storage.size()));
        let bytes = files.slice(&t.name, location, offset, length)?;
        return HostTensor::raw(shape, storage, bytes);
    }
    if !t.raw_data.is_empty() || n == 0 {
        return HostTensor::raw(shape, storage, t.raw_data.clone());
    }
    let typed = |len: usize| -> Result<()> {
        if len == n {
            Ok(())
        } else {
            Err(bad(format!("{len} values for shape {shape:?}")))
        }
    };
    let data = match storage {
        Storage::F32 => {
            typed(t.float_data.len())?;
            HostData::F32(t.float_data.clone())
        }
        Storage::F64 => {
            typed(t.double_data.len())?;
            HostData::F32(t.double_data.iter().map(|&x| x as f32).collect())
        }
        Storage::I64 => {
            typed(t.int64_data.len())?;
            HostData::I64(t.int64_data.clone())
        }
        // Narrow ints, bools and 16-bit floats are all carried in int32_data.
        Storage::F16 | Storage::Bf16 => {
            typed(t.int32_data.len())?;
            let bits = t.int32_data.iter().map(|&x| x as u16);
            HostData::F32(if storage == Storage::F16 {
                bits.map(|b| half::f16::from_bits(b).to_f32()).collect()
            } else {
                bits.map(|b| half::bf16::from_bits(b).to_f32()).collect()
            })
        }
        Storage::Bool => {
            typed(t.int32_data.len())?;
            HostData::Bool(t.int32_data.iter().map(|&x| x != 0).collect())
        }
        Storage::I32 | Storage::I16 | Storage::I8 | Storage::U8 => {
            typed(t.int32_data.len())?;
            HostData::I64(t.int32_data.iter().map(|&x| x as i64).collect())
        }
    };
    Ok(HostTensor { shape, data })
}
