//! A compiled model on the shared GPU: prepared graph, planned buffers, pipelines and bind
//! groups, all built once. `run` only records dispatches.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;

use super::error::{Error, Result};
use super::gpu::{Gpu, GpuTensor};
use super::grad::Objective;
use super::graph::{Dim, Graph};
use super::kernels::KernelKey;
use super::loader::{load_graph_bytes, open_graph};
use super::passes;
use super::source::FileSource;
use super::tensor::{DType, HostTensor, numel};

mod arena;
mod build;

use build::Builder;

/// A parsed model, not yet bound to dimensions or a device.
pub struct Model {
    graph: Graph,
    /// Where the weights left in the model's files are read from when a session uploads
    /// them (models opened with [`Model::open`]).
    source: Option<Rc<dyn FileSource>>,
    /// Set by [`Model::with_objective`]: sessions also compute the loss and its gradients.
    objective: Option<Objective>,
}

impl Model {
    /// Parses a model held whole in memory (one without external data).
    pub fn from_bytes(bytes: impl Into<Bytes>) -> Result<Model> {
        Ok(Model {
            graph: load_graph_bytes(bytes.into())?,
            source: None,
            objective: None,
        })
    }

    /// Opens the model at `path` of `source` (external data is looked up next to it),
    /// reading its structure and small tensors; its weights stay in the files and every
    /// session reads them as it uploads them, so the host never holds the model.
    pub async fn open(source: Rc<dyn FileSource>, path: &str) -> Result<Model> {
        Ok(Model {
            graph: open_graph(&*source, path).await?,
            source: Some(source),
            objective: None,
        })
    }

    /// The same model trained towards `objective`: its sessions take the objective's target
    /// as one more input and also output [`LOSS`](super::LOSS) and the loss's gradient
    /// with respect to each of `objective.wrt` (named by [`grad_name`](super::grad_name)).
    /// Initializers named in `wrt` become inputs of their stored shape, fed like any other
    /// (read their values with [`Model::initializer`]).
    pub fn with_objective(&self, objective: Objective) -> Result<Model> {
        let mut graph = self.graph.clone();
        for name in &objective.wrt {
            let id = graph
                .values
                .iter()
                .position(|v| v.name == *name)
                .ok_or_else(|| Error::Input {
                    name: name.clone(),
                    reason: "the model has no such input or initializer".into(),
                })?;
            if graph.inputs.contains(&id) {
                continue;
            }
            let value = &mut graph.values[id];
            if !value.dtype.is_float() {
                return Err(Error::Input {
                    name: name.clone(),
                    reason: format!("of type {:?}: only float tensors are trained", value.dtype),
                });
            }
            let shape = match (&value.constant, &value.stored) {
                (Some(c), _) => c.shape.clone(),
                (None, Some(s)) => s.shape.clone(),
                (None, None) => {
                    return Err(Error::Input {
                        name: name.clone(),
                        reason: "computed inside the graph, not an input or initializer".into(),
                    });
                }
            };
            value.dims = Some(shape.into_iter().map(Dim::Fixed).collect());
            (value.constant, value.stored) = (None, None);
            value.dtype = DType::F32;
            graph.inputs.push(id);
        }
        Ok(Model {
            objective: Some(objective),
            ..self.with_graph(graph)
        })
    }

    /// The values of an initializer, as f32 if it is floating point (read from the files
    /// if it was left there).
    pub async fn initializer(&self, name: &str) -> Result<HostTensor> {
        let value = self
            .graph
            .values
            .iter()
            .find(|v| v.name == name && (v.constant.is_some() || v.stored.is_some()))
            .ok_or_else(|| Error::Input {
                name: name.into(),
                reason: "the model has no such initializer".into(),
            })?;
        if let Some(c) = &value.constant {
            return Ok(c.as_ref().clone());
        }
        let stored = value.stored.as_ref().expect("checked above");
        let source = self
            .source
            .as_ref()
            .expect("stored tensors come with their source");
        stored.read(&**source).await
    }

    pub(super) fn graph(&self) -> &Graph {
        &self.graph
    }

    /// This model's files and objective with another graph (a rewrite of its own).
    pub(super) fn with_graph(&self, graph: Graph) -> Model {
        Model {
            graph,
            source: self.source.clone(),
            objective: self.objective.clone(),
        }
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
    /// `Gpu::scratch_bytes` for the slabs' total).
    pub scratch_bytes: u64,
    /// The shared slabs of intermediates it uses, kept alive (and shared) as long as it
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
        passes::prepare(&mut graph, dims, model.objective.as_ref())?;
        let oom_scope = gpu.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation_scope = gpu.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let inference = model.objective.is_none();
        let built = Builder::new(gpu, &graph, inference)
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
