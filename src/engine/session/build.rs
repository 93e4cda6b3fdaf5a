//! Building a session: lowering every node, giving each value a buffer (weights uploaded,
//! intermediates from the shared pool by lifetime), and binding every launch.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use super::super::error::{Error, Result};
use super::super::gpu::Gpu;
use super::super::graph::{Graph, ValueId};
use super::super::kernels::{KernelKey, Launch, Operand, bind_buffers};
use super::super::lower::{Lowered, Lowering, half_weights};
use super::super::source::FileSource;
use super::super::tensor::{HostTensor, numel};
use super::{BoundLaunch, Port, Session};

/// Assigns buffers to values and turns launches into bind groups.
pub(super) struct Builder<'g> {
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
    pub(super) fn new(gpu: &'g Gpu, graph: &'g Graph) -> Self {
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

    pub(super) async fn build(mut self, source: Option<&dyn FileSource>) -> Result<Session> {
        let lowering = Lowering::new(
            self.graph,
            &self.halves,
            self.gpu.half_arithmetic,
            &self.gpu.limits,
        );
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
