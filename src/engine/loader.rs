//! ONNX bytes -> [`Graph`]: protobuf decoding, initializers (typed fields, `raw_data`,
//! external data), `Constant` nodes and typed operators.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;

use super::error::{Error, Result};
use super::graph::{Dim, Graph, Node, Value, ValueId};
use super::onnx::{self, DATA_LOCATION_EXTERNAL};
use super::ops::{Attributes, Op};
use super::scan::{self, INLINE_LIMIT};
use super::source::FileSource;
use super::tensor::{DType, HostData, HostTensor, Storage, StoredTensor};

/// Decodes a model held whole in memory; external data is an error (see [`open_graph`]).
pub fn load_graph_bytes(bytes: Bytes) -> Result<Graph> {
    load_graph(decode_model(bytes)?, None)
}

/// Opens the model at `path` through `source` without reading its weights: the structure
/// and every small tensor are read now, each large initializer (inline or in an
/// external-data file) stays where it is as a [`StoredTensor`] that sessions upload from.
pub async fn open_graph(source: &dyn FileSource, path: &str) -> Result<Graph> {
    let (model, folder) = open_skeleton(source, path).await?;
    let references = references(&model)?;
    check_extents(source, &folder, &references)?;
    let read_ahead = read_ahead(source, &folder, &references).await?;
    load_graph(model, Some(&Split { folder, read_ahead }))
}

/// The external-data files the model at `path` names (to fetch before opening it), in
/// first-use order: initializers' and tensor attributes' (exporters move large `Constant`
/// values there too).
pub async fn external_data_locations(source: &dyn FileSource, path: &str) -> Result<Vec<String>> {
    let (model, _) = open_skeleton(source, path).await?;
    let own_name = path.rsplit('/').next().unwrap_or(path);
    let mut locations: Vec<String> = Vec::new();
    for reference in references(&model)? {
        let location = reference.location;
        if location != own_name && !locations.contains(&location) {
            locations.push(location);
        }
    }
    Ok(locations)
}

/// The model's structure, with large inline tensors turned into references to its own
/// file, and the folder its references are relative to (`unet/`).
async fn open_skeleton(source: &dyn FileSource, path: &str) -> Result<(onnx::ModelProto, String)> {
    let (folder, own_name) = match path.rfind('/') {
        Some(i) => (&path[..=i], &path[i + 1..]),
        None => ("", path),
    };
    let skeleton = scan::skeleton(source, path, own_name).await?;
    Ok((decode_model(skeleton.into())?, folder.to_string()))
}

fn decode_model(model_bytes: Bytes) -> Result<onnx::ModelProto> {
    onnx::ModelProto::decode(model_bytes).map_err(|e| {
        Error::parse(format!(
            "protobuf decoding failed ({e}); is this an .onnx file?"
        ))
    })
}

/// Where a tensor's bytes are in an external-data file.
struct Reference {
    tensor: String,
    location: String,
    offset: u64,
    length: u64,
    /// Initializers may stay in the file; `Constant` values are always read.
    initializer: bool,
}

/// Every external-data reference of the model.
fn references(model: &onnx::ModelProto) -> Result<Vec<Reference>> {
    let Some(graph) = &model.graph else {
        return Ok(Vec::new());
    };
    let attribute_tensors = graph
        .node
        .iter()
        .flat_map(|n| &n.attribute)
        .filter_map(|a| a.t.as_ref());
    let initializers = graph.initializer.iter().map(|t| (t, true));
    let mut found = Vec::new();
    for (tensor, initializer) in initializers.chain(attribute_tensors.map(|t| (t, false))) {
        if let Some((location, offset, length)) = external_place(tensor)? {
            found.push(Reference {
                tensor: tensor.name.clone(),
                location,
                offset,
                length,
                initializer,
            });
        }
    }
    Ok(found)
}

/// A reference past the end of its file is an error naming both, before anything is read.
fn check_extents(source: &dyn FileSource, folder: &str, references: &[Reference]) -> Result<()> {
    let mut sizes: HashMap<&str, u64> = HashMap::new();
    for r in references {
        let size = match sizes.get(r.location.as_str()) {
            Some(&size) => size,
            None => {
                let size = source
                    .size(&format!("{folder}{}", r.location))
                    .map_err(|e| Error::ExternalData {
                        tensor: r.tensor.clone(),
                        reason: format!("cannot read `{}`: {e}", r.location),
                    })?;
                *sizes.entry(&r.location).or_insert(size)
            }
        };
        if r.offset.checked_add(r.length).is_none_or(|end| end > size) {
            return Err(Error::ExternalData {
                tensor: r.tensor.clone(),
                reason: format!(
                    "`{}` has {size} bytes, the tensor needs bytes {}..{}",
                    r.location,
                    r.offset,
                    r.offset.saturating_add(r.length)
                ),
            });
        }
    }
    Ok(())
}

/// Reads the referenced tensors that are loaded now (small initializers, every `Constant`
/// value), merging neighbours into one read: a model has hundreds of biases side by side.
async fn read_ahead(
    source: &dyn FileSource,
    folder: &str,
    references: &[Reference],
) -> Result<HashMap<(String, u64), Bytes>> {
    /// Gap up to which two neighbouring tensors are read together.
    const MERGE_GAP: u64 = 64 << 10;
    let mut wanted: Vec<&Reference> = references
        .iter()
        .filter(|r| !r.initializer || r.length < INLINE_LIMIT)
        .collect();
    wanted.sort_by(|a, b| (&a.location, a.offset).cmp(&(&b.location, b.offset)));
    let mut read = HashMap::new();
    let mut i = 0;
    while i < wanted.len() {
        let first = wanted[i];
        let mut end = first.offset + first.length;
        let mut j = i + 1;
        while j < wanted.len()
            && wanted[j].location == first.location
            && wanted[j].offset <= end + MERGE_GAP
        {
            end = end.max(wanted[j].offset + wanted[j].length);
            j += 1;
        }
        let path = format!("{folder}{}", first.location);
        let bytes =
            source
                .read(&path, first.offset..end)
                .await
                .map_err(|e| Error::ExternalData {
                    tensor: first.tensor.clone(),
                    reason: format!("cannot read `{}`: {e}", first.location),
                })?;
        for r in &wanted[i..j] {
            let at = (r.offset - first.offset) as usize;
            let part =
                bytes
                    .get(at..at + r.length as usize)
                    .ok_or_else(|| Error::ExternalData {
                        tensor: r.tensor.clone(),
                        reason: format!("`{}` ended early", r.location),
                    })?;
            read.insert((r.location.clone(), r.offset), bytes.slice_ref(part));
        }
        i = j;
    }
    Ok(read)
}

/// How a model opened through a [`FileSource`] resolves external data.
pub(crate) struct Split {
    /// Prefix of every location (`unet/`).
    folder: String,
    /// Tensors read by [`read_ahead`], by location and offset.
    read_ahead: HashMap<(String, u64), Bytes>,
}

fn load_graph(model: onnx::ModelProto, split: Option<&Split>) -> Result<Graph> {
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

    for init in &graph.initializer {
        let id = match split.map(|s| stored_tensor(init, s)).transpose()?.flatten() {
            Some(stored) => {
                let id = builder.define(&init.name, stored.storage.dtype());
                builder.values[id].stored = Some(stored);
                id
            }
            None => {
                let tensor = tensor_from_proto(init, split)?;
                let id = builder.define(&init.name, tensor.dtype());
                builder.values[id].constant = Some(Arc::new(tensor));
                id
            }
        };
        builder.values[id].declared_f16 = init.data_type == FLOAT16;
    }
    let mut inputs = Vec::new();
    for info in &graph.input {
        if builder.by_name.contains_key(&info.name) {
            continue; // an initializer also listed as an input (older exporters)
        }
        let (storage, dims) = value_type(info)?;
        let id = builder.define(&info.name, storage.dtype());
        builder.values[id].dims = Some(dims);
        builder.values[id].declared_f16 = storage == Storage::F16;
        inputs.push(id);
    }

    let mut nodes = Vec::new();
    for proto in topological_order(&graph.node) {
        if !(proto.domain.is_empty() || proto.domain == "ai.onnx") {
            return Err(Error::Unsupported {
                op_type: format!("{}::{}", proto.domain, proto.op_type),
                node: proto.name.clone(),
                opset,
                reason: "operators outside the default ONNX domain are not supported".into(),
            });
        }
        if proto.op_type == "Constant" {
            let tensor = constant_node_value(proto, split)?;
            let output = proto
                .output
                .first()
                .ok_or_else(|| Error::parse("Constant without output"))?;
            let id = builder.define(output, tensor.dtype());
            builder.values[id].constant = Some(Arc::new(tensor));
            builder.values[id].declared_f16 = Attributes::new(proto)
                .tensor("value")
                .is_some_and(|t| t.data_type == FLOAT16);
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
        let outputs: Vec<ValueId> = proto
            .output
            .iter()
            .map(|name| builder.define(name, DType::F32))
            .collect();
        if proto.op_type == "Cast" {
            let to = Attributes::new(proto).int("to", 0);
            builder.values[outputs[0]].declared_f16 = to == FLOAT16 as i64;
        }
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

/// The nodes in an order where each follows the producers of its inputs. ONNX asks files
/// for that order but onnxruntime runs any (its float16 converter appends the Casts it
/// inserts at the end of the graph, after their readers), so a model it runs loads here
/// too. Stable: a graph already in order keeps it. Nodes left in a cycle come last, in file
/// order, for the builder to report what they use that nothing defines first.
fn topological_order(nodes: &[onnx::NodeProto]) -> Vec<&onnx::NodeProto> {
    let producer: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .flat_map(|(i, node)| node.output.iter().map(move |o| (o.as_str(), i)))
        .collect();
    let mut waiting = vec![0usize; nodes.len()];
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (i, node) in nodes.iter().enumerate() {
        for input in &node.input {
            if let Some(&p) = producer.get(input.as_str()).filter(|&&p| p != i) {
                waiting[i] += 1;
                readers[p].push(i);
            }
        }
    }
    // The ready node earliest in the file goes next.
    let mut ready: BinaryHeap<Reverse<usize>> = (0..nodes.len())
        .filter(|&i| waiting[i] == 0)
        .map(Reverse)
        .collect();
    let mut order = Vec::with_capacity(nodes.len());
    while let Some(Reverse(i)) = ready.pop() {
        order.push(&nodes[i]);
        for &r in &readers[i] {
            waiting[r] -= 1;
            if waiting[r] == 0 {
                ready.push(Reverse(r));
            }
        }
    }
    // Every node whose inputs were all placed was placed itself.
    order.extend(
        (0..nodes.len())
            .filter(|&i| waiting[i] > 0)
            .map(|i| &nodes[i]),
    );
    order
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
            stored: None,
            declared_f16: false,
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

/// `TensorProto.DataType` of float16.
const FLOAT16: i32 = 10;

fn value_type(info: &onnx::ValueInfoProto) -> Result<(Storage, Vec<Dim>)> {
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
    Ok((storage, dims))
}

fn constant_node_value(node: &onnx::NodeProto, split: Option<&Split>) -> Result<HostTensor> {
    let a = Attributes::new(node);
    if let Some(t) = a.tensor("value") {
        return tensor_from_proto(t, split);
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

/// Element storage and shape of a `TensorProto`.
fn storage_and_shape(t: &onnx::TensorProto) -> Result<(Storage, Vec<usize>)> {
    let bad = |reason: String| Error::parse(format!("tensor `{}`: {reason}", t.name));
    let storage = Storage::from_onnx(t.data_type)
        .ok_or_else(|| bad(format!("unsupported data type {}", t.data_type)))?;
    let shape = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| bad(format!("negative dimension {d}"))))
        .collect::<Result<Vec<_>>>()?;
    Ok((storage, shape))
}

/// `(location, offset, length)` of a tensor stored as external data, `None` for one stored
/// in the protobuf.
fn external_place(t: &onnx::TensorProto) -> Result<Option<(String, u64, u64)>> {
    if t.data_location != DATA_LOCATION_EXTERNAL {
        return Ok(None);
    }
    let bad = |reason: String| Error::parse(format!("tensor `{}`: {reason}", t.name));
    let entry = |key: &str| {
        t.external_data
            .iter()
            .rev()
            .find(|e| e.key == key)
            .map(|e| e.value.as_str())
    };
    let location =
        entry("location").ok_or_else(|| bad("external data without a location".into()))?;
    let number = |key: &str| -> Result<Option<u64>> {
        entry(key)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| bad(format!("external data {key} `{v}`")))
            })
            .transpose()
    };
    let (storage, shape) = storage_and_shape(t)?;
    let expected = shape
        .iter()
        .fold(storage.size() as u64, |n, &d| n.saturating_mul(d as u64));
    let length = number("length")?.unwrap_or(expected);
    if length != expected {
        return Err(bad(format!(
            "external data of {length} bytes, shape {shape:?} of {storage:?} needs {expected}"
        )));
    }
    Ok(Some((
        location.to_string(),
        number("offset")?.unwrap_or(0),
        length,
    )))
}

/// An initializer a session reads from the files at upload: large and not read ahead.
fn stored_tensor(t: &onnx::TensorProto, split: &Split) -> Result<Option<StoredTensor>> {
    let Some((location, offset, _)) = external_place(t)? else {
        return Ok(None);
    };
    if split.read_ahead.contains_key(&(location.clone(), offset)) {
        return Ok(None);
    }
    let (storage, shape) = storage_and_shape(t)?;
    Ok(Some(StoredTensor {
        path: format!("{}{location}", split.folder),
        offset,
        storage,
        shape,
    }))
}

/// Converts a `TensorProto` to a host tensor. External data must have been read ahead
/// (`split`); without it, externally stored tensors are an error.
pub(crate) fn tensor_from_proto(
    t: &onnx::TensorProto,
    split: Option<&Split>,
) -> Result<HostTensor> {
    let bad = |reason: String| Error::parse(format!("tensor `{}`: {reason}", t.name));
    let (storage, shape) = storage_and_shape(t)?;
    let n: usize = shape.iter().product();
    if let Some((location, offset, _)) = external_place(t)? {
        let split = split.ok_or_else(|| bad("external data is not allowed here".into()))?;
        let bytes = split
            .read_ahead
            .get(&(location.clone(), offset))
            .ok_or_else(|| bad(format!("external data in `{location}` was not read")))?;
        return HostTensor::raw(shape, storage, bytes.clone());
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
