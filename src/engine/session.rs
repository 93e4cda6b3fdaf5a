//! A compiled model on the shared GPU: prepared graph, planned buffers, pipelines and bind
//! groups, all built once. `run` only records dispatches.

use std::collections::HashMap;
use std::ops::Range;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;

use super::error::{Error, Result};
use super::gpu::{Gpu, GpuTensor};
use super::graph::{Dim, Graph, ValueId};
use super::kernels::{KernelKey, Launch, Operand, bind_buffers};
use super::loader::{load_graph_bytes, open_graph};
use super::lower::{Lowered, Lowering, half_weights};
use super::passes;
use super::source::FileSource;
use super::tensor::{DType, HostTensor, numel};

/// A parsed model, not yet bound to dimensions or a device.
pub struct Model {
    graph: Graph,
    /// Where the weights left in the model's files are read from when a session uploads
    /// them (models opened with [`Model::open`]).
    source: Option<Rc<dyn FileSource>>,
}

impl Model {
    /// Parses a model held whole in memory (one without external data).
    pub fn from_bytes(bytes: impl Into<Bytes>) -> Result<Model> {
        Ok(Model {
            graph: load_graph_bytes(bytes.into())?,
            source: None,
        })
    }

    /// Opens the model at `path` of `source` (external data is looked up next to it),
    /// reading its structure and small tensors; its weights stay in the files and every
    /// session reads them as it uploads them, so the host never holds the model.
    pub async fn open(source: Rc<dyn FileSource>, path: &str) -> Result<Model> {
        Ok(Model {
            graph: open_graph(&*source, path).await?,
            source: Some(source),
        })
    }

    pub fn input_names(&self) -> Vec<&str> {
        self.graph.input_names()
    }

    pub fn output_names(&self) -> Vec<&str> {
        self.graph.output_names()
    }

    pub fn opset(&self) -> i64 {
        self.graph.opset
    }

    /// The declared rank of a graph input.
    pub fn input_rank(&self, name: &str) -> Option<usize> {
        self.graph
            .inputs
            .iter()
            .map(|&v| &self.graph.values[v])
            .find(|v| v.name == name)
            .and_then(|v| v.dims.as_ref())
            .map(Vec::len)
    }

    /// The element type of a graph input.
    pub fn input_dtype(&self, name: &str) -> Option<DType> {
        self.graph
            .inputs
            .iter()
            .map(|&v| &self.graph.values[v])
            .find(|v| v.name == name)
            .map(|v| v.dtype)
    }

    /// The shapes a session for `dims` would compute, without allocating or uploading
    /// anything: lets a caller refuse a size before trying it.
    pub fn plan(&self, dims: &HashMap<String, usize>) -> Result<ShapePlan> {
        let mut graph = self.graph.clone();
        passes::infer_shapes(&mut graph, dims)?;
        let outputs = graph
            .outputs
            .iter()
            .map(|&v| (graph.values[v].name.clone(), graph.values[v].shape.clone()))
            .collect();
        // Only what the inputs flow into: weights (and unfolded casts of them) do not grow
        // with the input sizes a caller checks.
        let mut from_inputs = vec![false; graph.values.len()];
        for &v in &graph.inputs {
            from_inputs[v] = true;
        }
        for node in &graph.nodes {
            if node.inputs.iter().flatten().any(|&v| from_inputs[v]) {
                for &v in &node.outputs {
                    from_inputs[v] = true;
                }
            }
        }
        let largest = (0..graph.values.len())
            .filter(|&v| from_inputs[v])
            .map(|v| &graph.values[v])
            .map(|v| (v.name.clone(), 4 * numel(&v.shape) as u64))
            .max_by_key(|(_, bytes)| *bytes)
            .unwrap_or_default();
        Ok(ShapePlan { outputs, largest })
    }

    /// Values for the symbolic dimensions, read off concrete input shapes (as onnxruntime
    /// does when given tensors): `[("sample", [2, 4, 64, 64])]` binds `batch_size`, `height`
    /// and `width` of an optimum UNet. Inputs not listed bind nothing.
    pub fn dims_for_shapes(&self, shapes: &[(&str, &[usize])]) -> Result<HashMap<String, usize>> {
        let mut dims = HashMap::new();
        for (name, shape) in shapes {
            let value = self
                .graph
                .inputs
                .iter()
                .map(|&v| &self.graph.values[v])
                .find(|v| v.name == *name);
            let declared = value
                .and_then(|v| v.dims.as_ref())
                .ok_or_else(|| Error::Input {
                    name: name.to_string(),
                    reason: format!(
                        "the model has no such input (it has {})",
                        self.input_names().join(", ")
                    ),
                })?;
            if declared.len() != shape.len() {
                return Err(Error::Input {
                    name: name.to_string(),
                    reason: format!(
                        "rank {} given, the model declares {}",
                        shape.len(),
                        declared.len()
                    ),
                });
            }
            for (dim, &size) in declared.iter().zip(shape.iter()) {
                match dim {
                    Dim::Fixed(n) if *n != size => {
                        return Err(Error::Input {
                            name: name.to_string(),
                            reason: format!("shape {shape:?} does not fit {declared:?}"),
                        });
                    }
                    Dim::Named(symbol) => {
                        if let Some(previous) =
                            dims.insert(symbol.clone(), size).filter(|&p| p != size)
                        {
                            return Err(Error::Input {
                                name: name.to_string(),
                                reason: format!("`{symbol}` is {previous} elsewhere, {size} here"),
                            });
                        }
                    }
                    Dim::Fixed(_) => {}
                }
            }
        }
        Ok(dims)
    }
}

/// What a session for given dimensions would compute, found by shape inference alone.
#[derive(Clone, Debug)]
pub struct ShapePlan {
    /// Each graph output's shape, by name.
    pub outputs: HashMap<String, Vec<usize>>,
    /// The largest tensor computed from the inputs: its name and bytes.
    pub largest: (String, u64),
}

/// Where a launch finds each of its buffers.
struct BoundLaunch {
    pipeline: usize,
    kernel: KernelKey,
    bind_group: wgpu::BindGroup,
    workgroups: [u32; 3],
}

/// One graph input or output: its storage and declared type.
struct Port {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    buffer: wgpu::Buffer,
}

pub struct Session {
    gpu: Gpu,
    inputs: Vec<Port>,
    outputs: Vec<Port>,
    launches: Vec<BoundLaunch>,
    pipelines: Vec<wgpu::ComputePipeline>,
    /// Bytes of GPU memory the session uses (weights and activations).
    pub memory_bytes: u64,
    /// Of those, the intermediates it shares with the other sessions on its GPU (see
    /// `Gpu::scratch_bytes` for the pool's total).
    pub scratch_bytes: u64,
    /// The shared intermediate buffers it uses, kept alive (and in the pool) as long as it
    /// lives.
    _scratch: Vec<Arc<wgpu::Buffer>>,
    /// Kernel launches per run.
    pub launch_count: usize,
}

impl Session {
    /// Binds the named dimensions (`batch_size`, `height`...), prepares the graph and builds
    /// everything a run needs on `gpu`.
    pub async fn new(gpu: &Gpu, model: &Model, dims: &HashMap<String, usize>) -> Result<Session> {
        let mut graph = model.graph.clone();
        passes::prepare(&mut graph, dims)?;
        let oom_scope = gpu.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation_scope = gpu.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let built = Builder::new(gpu, &graph)
            .build(model.source.as_deref())
            .await;
        let validation = validation_scope.pop().await;
        let oom = oom_scope.pop().await;
        if let Some(e) = oom {
            return Err(Error::OutOfMemory(format!("creating the session: {e}")));
        }
        if let Some(e) = validation {
            return Err(Error::Device(format!("creating the session: {e}")));
        }
        built
    }

    pub fn input_names(&self) -> Vec<&str> {
        self.inputs.iter().map(|p| p.name.as_str()).collect()
    }

    pub fn output_names(&self) -> Vec<&str> {
        self.outputs.iter().map(|p| p.name.as_str()).collect()
    }

    /// How many launches of each kernel family one run makes, most frequent first.
    pub fn kernel_counts(&self) -> Vec<(String, usize)> {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for launch in &self.launches {
            *counts
                .entry(format!("{:?}", launch.kernel.shader))
                .or_default() += 1;
        }
        let mut list: Vec<_> = counts.into_iter().collect();
        list.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        list
    }

    /// The element type of an input.
    pub fn input_dtype(&self, name: &str) -> Option<DType> {
        self.inputs.iter().find(|p| p.name == name).map(|p| p.dtype)
    }

    /// The bound shape of an input.
    pub fn input_shape(&self, name: &str) -> Option<&[usize]> {
        self.inputs
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.shape.as_slice())
    }

    /// Runs the graph on GPU-resident inputs and returns GPU-resident outputs, by name.
    /// Nothing is read back; see [`GpuTensor::to_host`].
    pub async fn run(&self, inputs: &[(&str, &GpuTensor)]) -> Result<HashMap<String, GpuTensor>> {
        let by_name: HashMap<&str, &GpuTensor> = inputs.iter().copied().collect();
        let missing: Vec<String> = self
            .inputs
            .iter()
            .filter(|p| !by_name.contains_key(p.name.as_str()))
            .map(|p| p.name.clone())
            .collect();
        if !missing.is_empty() {
            return Err(Error::MissingInputs(missing));
        }
        if let Some((name, _)) = inputs
            .iter()
            .find(|(n, _)| !self.inputs.iter().any(|p| p.name == *n))
        {
            return Err(Error::Input {
                name: name.to_string(),
                reason: format!(
                    "the model has no such input (it has {})",
                    self.input_names().join(", ")
                ),
            });
        }
        for port in &self.inputs {
            let t = by_name[port.name.as_str()];
            if t.shape != port.shape {
                return Err(Error::Input {
                    name: port.name.clone(),
                    reason: format!(
                        "shape {:?}, the session was built for {:?}",
                        t.shape, port.shape
                    ),
                });
            }
            if t.dtype != port.dtype {
                return Err(Error::Input {
                    name: port.name.clone(),
                    reason: format!("type {:?}, the model expects {:?}", t.dtype, port.dtype),
                });
            }
        }

        let device = &self.gpu.device;
        let oom_scope = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation_scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut encoder =
            device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("run") });
        for port in &self.inputs {
            let t = by_name[port.name.as_str()];
            if t.byte_len() > 0 {
                encoder.copy_buffer_to_buffer(&t.buffer, 0, &port.buffer, 0, t.byte_len());
            }
        }
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("graph"),
                timestamp_writes: None,
            });
            for launch in &self.launches {
                pass.set_pipeline(&self.pipelines[launch.pipeline]);
                pass.set_bind_group(0, &launch.bind_group, &[]);
                let [x, y, z] = launch.workgroups;
                pass.dispatch_workgroups(x, y, z);
            }
        }
        let mut results = HashMap::new();
        for port in &self.outputs {
            let bytes = 4 * numel(&port.shape) as u64;
            let buffer = self.gpu.storage_buffer(&port.name, bytes);
            if bytes > 0 {
                encoder.copy_buffer_to_buffer(&port.buffer, 0, &buffer, 0, bytes);
            }
            results.insert(
                port.name.clone(),
                GpuTensor {
                    gpu: self.gpu.clone(),
                    buffer,
                    dtype: port.dtype,
                    shape: port.shape.clone(),
                },
            );
        }
        self.gpu.queue.submit([encoder.finish()]);
        let validation = validation_scope.pop().await;
        if let Some(e) = oom_scope.pop().await {
            return Err(Error::OutOfMemory(e.to_string()));
        }
        if let Some(e) = validation {
            return Err(Error::Device(e.to_string()));
        }
        Ok(results)
    }

    /// Times each kernel family: every launch is submitted alone and waited for, so the
    /// sum exceeds a normal run; the shares show where the time goes. Native only (the
    /// browser has no blocking wait). Inputs must have been fed by a previous run.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn profile(&self) -> Vec<(String, std::time::Duration)> {
        let mut totals: HashMap<String, std::time::Duration> = HashMap::new();
        for launch in &self.launches {
            let mut encoder = self.gpu.device.create_command_encoder(&Default::default());
            {
                let mut pass = encoder.begin_compute_pass(&Default::default());
                pass.set_pipeline(&self.pipelines[launch.pipeline]);
                pass.set_bind_group(0, &launch.bind_group, &[]);
                let [x, y, z] = launch.workgroups;
                pass.dispatch_workgroups(x, y, z);
            }
            let started = std::time::Instant::now();
            self.gpu.queue.submit([encoder.finish()]);
            self.gpu.wait();
            *totals
                .entry(format!("{:?}", launch.kernel.shader))
                .or_default() += started.elapsed();
        }
        let mut list: Vec<_> = totals.into_iter().collect();
        list.sort_by_key(|entry| std::cmp::Reverse(entry.1));
        list
    }

    /// Uploads host inputs, runs, and reads every output back: the convenience path for
    /// tools and tests.
    pub async fn run_host(
        &self,
        inputs: &[(&str, &HostTensor)],
    ) -> Result<HashMap<String, HostTensor>> {
        let uploaded: Vec<(&str, GpuTensor)> = inputs
            .iter()
            .map(|(n, t)| (*n, GpuTensor::from_host(&self.gpu, t)))
            .collect();
        let refs: Vec<(&str, &GpuTensor)> = uploaded.iter().map(|(n, t)| (*n, t)).collect();
        let outputs = self.run(&refs).await?;
        let mut host = HashMap::new();
        for (name, tensor) in outputs {
            host.insert(name, tensor.to_host().await?);
        }
        Ok(host)
    }
}

/// Assigns buffers to values and turns launches into bind groups.
struct Builder<'g> {
    gpu: &'g Gpu,
    graph: &'g Graph,
    /// Storage of each value after following aliases (Reshape and friends).
    root: Vec<ValueId>,
    buffers: HashMap<ValueId, wgpu::Buffer>,
    /// Buffers of the constants lowering made (weight slices, zero bias), by their `Arc`:
    /// a constant shared by several launches (every image of a batch, every run of rows)
    /// is uploaded once.
    constants: HashMap<*const HostTensor, wgpu::Buffer>,
    /// Per value: an fp16 weight kept as packed halves (`lower::half_weights`).
    halves: Vec<bool>,
    memory_bytes: u64,
    scratch_bytes: u64,
    scratch: Vec<Arc<wgpu::Buffer>>,
}

impl<'g> Builder<'g> {
    fn new(gpu: &'g Gpu, graph: &'g Graph) -> Self {
        Builder {
            gpu,
            graph,
            root: (0..graph.values.len()).collect(),
            buffers: HashMap::new(),
            constants: HashMap::new(),
            halves: half_weights(graph),
            memory_bytes: 0,
            scratch_bytes: 0,
            scratch: Vec::new(),
        }
    }

    /// Bytes per element of a value's buffer.
    fn element_bytes(&self, v: ValueId) -> u64 {
        if self.halves[v] { 2 } else { 4 }
    }

    fn bytes_of(&self, v: ValueId) -> u64 {
        self.element_bytes(v) * numel(&self.graph.values[v].shape) as u64
    }

    /// A value's buffer must fit the device's largest buffer; launches bind it whole or in
    /// parts that fit a binding (see `Lowering::runs`).
    fn check_buffer(&self, v: ValueId) -> Result<()> {
        let (bytes, limit) = (self.bytes_of(v), self.gpu.limits.max_buffer_size);
        if bytes > limit {
            return Err(Error::TooLarge {
                name: self.graph.values[v].name.clone(),
                bytes,
                limit,
                what: "buffer size",
            });
        }
        Ok(())
    }

    async fn build(mut self, source: Option<&dyn FileSource>) -> Result<Session> {
        let lowering = Lowering::new(self.graph, &self.halves, &self.gpu.limits);
        let mut per_node = Vec::with_capacity(self.graph.nodes.len());
        for node in &self.graph.nodes {
            let lowered = lowering.lower(node).map_err(|reason| Error::Node {
                node: node.name.clone(),
                op_type: node.op.name(),
                reason,
            })?;
            if let Lowered::Alias(src) = &lowered {
                self.root[node.outputs[0]] = self.root[*src];
            }
            per_node.push(lowered);
        }
        self.allocate(&per_node, source).await?;

        let mut pipelines = self.gpu.pipelines();
        let mut pipeline_index: HashMap<KernelKey, usize> = HashMap::new();
        let mut pipeline_list = Vec::new();
        let mut launches = Vec::new();
        for launch in per_node.iter().flat_map(|l| match l {
            Lowered::Launches(list) => list.as_slice(),
            Lowered::Alias(_) => &[],
        }) {
            let index = *pipeline_index.entry(launch.kernel).or_insert_with(|| {
                pipeline_list.push(pipelines.get(&self.gpu.device, launch.kernel).clone());
                pipeline_list.len() - 1
            });
            let bind_group = self.bind(launch, &pipeline_list[index])?;
            launches.push(BoundLaunch {
                pipeline: index,
                kernel: launch.kernel,
                bind_group,
                workgroups: launch.workgroups,
            });
        }
        let port = |v: ValueId, this: &Self| Port {
            name: this.graph.values[v].name.clone(),
            dtype: this.graph.values[v].dtype,
            shape: this.graph.values[v].shape.clone(),
            buffer: this.buffers[&this.root[v]].clone(),
        };
        Ok(Session {
            gpu: self.gpu.clone(),
            inputs: self.graph.inputs.iter().map(|&v| port(v, &self)).collect(),
            outputs: self.graph.outputs.iter().map(|&v| port(v, &self)).collect(),
            launch_count: launches.len(),
            launches,
            pipelines: pipeline_list,
            memory_bytes: self.memory_bytes,
            scratch_bytes: self.scratch_bytes,
            _scratch: self.scratch,
        })
    }

    /// Gives every root value a buffer. Constants, graph inputs and graph outputs get their
    /// own; intermediates share buffers from a pool, each returned after its last reader.
    async fn allocate(
        &mut self,
        per_node: &[Lowered],
        source: Option<&dyn FileSource>,
    ) -> Result<()> {
        let graph = self.graph;
        let mut pinned = vec![false; graph.values.len()];
        for &v in graph.inputs.iter().chain(&graph.outputs) {
            pinned[self.root[v]] = true;
        }
        // Last node index reading each root (None: no launch reads it).
        let mut last_use: Vec<Option<usize>> = vec![None; graph.values.len()];
        for (n, lowered) in per_node.iter().enumerate() {
            if let Lowered::Launches(list) = lowered {
                for v in list
                    .iter()
                    .flat_map(|launch| &launch.inputs)
                    .filter_map(Operand::value)
                {
                    last_use[self.root[v]] = Some(n);
                }
            }
        }
        let is_output = |v: ValueId| graph.outputs.iter().any(|&o| self.root[o] == v);
        for (v, value) in graph.values.iter().enumerate() {
            if value.constant.is_none() && value.stored.is_none() {
                continue;
            }
            pinned[v] = true;
            if self.root[v] != v || (last_use[v].is_none() && !is_output(v)) {
                continue;
            }
            self.check_buffer(v)?;
            let buffer = if let Some(c) = &value.constant {
                self.gpu.upload(&value.name, c, self.halves[v])
            } else {
                let (Some(stored), Some(source)) = (&value.stored, source) else {
                    return Err(Error::ExternalData {
                        tensor: value.name.clone(),
                        reason: "the model was not opened from its files".into(),
                    });
                };
                self.gpu
                    .upload_stored(&value.name, stored, self.halves[v], source)
                    .await?
            };
            self.memory_bytes += buffer.size();
            self.buffers.insert(v, buffer);
        }
        for &v in graph.inputs.iter().chain(&graph.outputs) {
            let r = self.root[v];
            if !self.buffers.contains_key(&r) {
                self.check_buffer(r)?;
                let buffer = self
                    .gpu
                    .storage_buffer(&graph.values[r].name, self.bytes_of(r));
                self.memory_bytes += buffer.size();
                self.buffers.insert(r, buffer);
            }
        }

        // Intermediates come from the pool every session on this GPU shares, best fit
        // first, else a new buffer joins it.
        let mut free = self.gpu.scratch_buffers();
        let mut holding: HashMap<ValueId, Arc<wgpu::Buffer>> = HashMap::new();
        for (n, lowered) in per_node.iter().enumerate() {
            let Lowered::Launches(list) = lowered else {
                continue;
            };
            for &out in &graph.nodes[n].outputs {
                let r = self.root[out];
                if self.buffers.contains_key(&r) {
                    continue;
                }
                self.check_buffer(r)?;
                let need = self.bytes_of(r).max(4);
                let best = free
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| b.size() >= need)
                    .min_by_key(|(_, b)| b.size())
                    .map(|(i, _)| i);
                let buffer = match best {
                    Some(i) => free.swap_remove(i),
                    None => self.gpu.new_scratch_buffer(&graph.values[r].name, need),
                };
                if !self.scratch.iter().any(|b| Arc::ptr_eq(b, &buffer)) {
                    self.memory_bytes += buffer.size();
                    self.scratch_bytes += buffer.size();
                    self.scratch.push(buffer.clone());
                }
                self.buffers.insert(r, (*buffer).clone());
                holding.insert(r, buffer);
            }
            // Return buffers whose last reader is this node (after outputs were assigned,
            // so a node never writes into a buffer it reads).
            let mut released: Vec<ValueId> = list
                .iter()
                .flat_map(|l| l.inputs.iter())
                .filter_map(|op| op.value().map(|v| self.root[v]))
                .filter(|&r| !pinned[r] && last_use[r] == Some(n))
                .collect();
            released.sort_unstable();
            released.dedup();
            free.extend(released.iter().filter_map(|r| holding.remove(r)));
        }
        Ok(())
    }

    /// Bind group of one launch; a binding past the device's limit is a `TooLarge` error
    /// naming the tensor (lowering splits the ops that can be split).
    fn bind(
        &mut self,
        launch: &Launch,
        pipeline: &wgpu::ComputePipeline,
    ) -> Result<wgpu::BindGroup> {
        let params = self.gpu.params_buffer(&launch.params);
        let mut bound = vec![(params, None, "parameters".to_string())];
        for op in std::iter::once(&launch.output).chain(&launch.inputs) {
            let value = |v: ValueId, range: Range<usize>| {
                let name = self.graph.values[v].name.clone();
                let size = self.element_bytes(self.root[v]);
                // Bindings are whole words (an odd count of halves takes the pad word).
                let bytes = (size * range.start as u64)
                    ..(size * range.end.max(range.start + 1) as u64).next_multiple_of(4);
                (self.buffers[&self.root[v]].clone(), Some(bytes), name)
            };
            bound.push(match op {
                // A pooled buffer may be larger than the value it holds: bind only the value.
                Operand::Value(v) => value(*v, 0..numel(&self.graph.values[*v].shape)),
                Operand::Part(v, range) => value(*v, range.clone()),
                Operand::Constant(c) => {
                    let buffer = match self.constants.get(&Arc::as_ptr(c)) {
                        Some(buffer) => buffer.clone(),
                        None => {
                            let buffer = self.gpu.upload("constant", c, false);
                            self.memory_bytes += buffer.size();
                            self.constants.insert(Arc::as_ptr(c), buffer.clone());
                            buffer
                        }
                    };
                    (buffer, None, "a constant".to_string())
                }
            });
        }
        let limit = self.gpu.limits.max_storage_buffer_binding_size;
        let mut bindings = Vec::with_capacity(bound.len());
        for (buffer, range, name) in &bound {
            let (offset, bytes) = match range {
                Some(r) => (r.start, r.end - r.start),
                None => (0, buffer.size()),
            };
            if bytes > limit {
                return Err(Error::TooLarge {
                    name: name.clone(),
                    bytes,
                    limit,
                    what: "storage binding limit",
                });
            }
            bindings.push(wgpu::BufferBinding {
                buffer,
                offset,
                size: std::num::NonZeroU64::new(bytes),
            });
        }
        Ok(bind_buffers(&self.gpu.device, pipeline, &bindings))
    }
}
