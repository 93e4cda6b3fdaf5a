//! Building a session: lowering every node, giving each value a buffer (weights uploaded,
//! intermediates placed in the shared slabs by lifetime), and binding every launch.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use super::super::error::{Error, Result};
use super::super::gpu::Gpu;
use super::super::graph::{Graph, ValueId};
use super::super::kernels::{KernelKey, Launch, Operand, bind_buffers};
use super::super::lower::{Lowered, Lowering, half_values};
use super::super::source::FileSource;
use super::super::tensor::{HostTensor, numel};
use super::arena::{self, Block};
use super::{BoundLaunch, Port, Session};

/// The most bytes a new slab of intermediates takes (fewer, larger slabs waste less at
/// their ends; one buffer much larger than this is harder for a browser to grant).
const NEW_SLAB_BYTES: u64 = 1 << 30;

/// Assigns buffers to values and turns launches into bind groups.
pub(super) struct Builder<'g> {
    gpu: &'g Gpu,
    graph: &'g Graph,
    /// Storage of each value after following aliases (Reshape and friends).
    root: Vec<ValueId>,
    /// Each stored value's buffer and byte offset (intermediates share slabs).
    buffers: HashMap<ValueId, (wgpu::Buffer, u64)>,
    /// Buffers of the constants lowering made (weight slices, zero bias), by their `Arc`:
    /// a constant shared by several launches (every image of a batch, every run of rows)
    /// is uploaded once.
    constants: HashMap<*const HostTensor, wgpu::Buffer>,
    /// Per value: kept as packed halves (`lower::half_values`).
    halves: Vec<bool>,
    memory_bytes: u64,
    scratch_bytes: u64,
    scratch: Vec<Arc<wgpu::Buffer>>,
}

impl<'g> Builder<'g> {
    /// `inference`: no gradients follow, so an fp16 model's activations may be stored as
    /// halves (`lower::half_values`), if `gpu` allows.
    pub(super) fn new(gpu: &'g Gpu, graph: &'g Graph, inference: bool) -> Self {
        Builder {
            gpu,
            graph,
            root: (0..graph.values.len()).collect(),
            buffers: HashMap::new(),
            constants: HashMap::new(),
            halves: half_values(graph, inference && gpu.half_activations),
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
            buffer: this.buffers[&this.root[v]].0.clone(),
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
    /// own; intermediates share slabs, each value's bytes free again after its last reader.
    async fn allocate(
        &mut self,
        per_node: &[Lowered],
        source: Option<&dyn FileSource>,
    ) -> Result<()> {
        let graph = self.graph;
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
            if value.is_computed() {
                continue;
            }
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
            self.buffers.insert(v, (buffer, 0));
        }
        for &v in graph.inputs.iter().chain(&graph.outputs) {
            let r = self.root[v];
            if !self.buffers.contains_key(&r) {
                self.check_buffer(r)?;
                let buffer = self
                    .gpu
                    .storage_buffer(&graph.values[r].name, self.bytes_of(r));
                self.memory_bytes += buffer.size();
                self.buffers.insert(r, (buffer, 0));
            }
        }

        self.place_intermediates(per_node, &last_use)
    }

    /// Gives every intermediate an offset in the slabs every session on this GPU shares
    /// (see `arena`), adding slabs where those are full.
    fn place_intermediates(
        &mut self,
        per_node: &[Lowered],
        last_use: &[Option<usize>],
    ) -> Result<()> {
        let mut values = Vec::new();
        let mut blocks = Vec::new();
        // Per root value: its block's index, if it is an intermediate.
        let mut block_of = vec![None; self.graph.values.len()];
        for (n, lowered) in per_node.iter().enumerate() {
            if !matches!(lowered, Lowered::Launches(_)) {
                continue;
            }
            for &out in &self.graph.nodes[n].outputs {
                let r = self.root[out];
                if self.buffers.contains_key(&r) || block_of[r].is_some() {
                    continue;
                }
                self.check_buffer(r)?;
                block_of[r] = Some(values.len());
                values.push(r);
                blocks.push(Block {
                    born: n,
                    // A node never writes into a buffer it reads: lifetimes are inclusive.
                    dies: last_use[r].unwrap_or(n).max(n),
                    bytes: self.bytes_of(r),
                });
            }
        }
        // What a launch writes and what it reads, when both are intermediates.
        let mut apart = Vec::new();
        for launch in per_node.iter().flat_map(|l| match l {
            Lowered::Launches(list) => list.as_slice(),
            Lowered::Alias(_) => &[],
        }) {
            let block = |op: &Operand| op.value().and_then(|v| block_of[self.root[v]]);
            if let Some(written) = block(&launch.output) {
                apart.extend(
                    launch
                        .inputs
                        .iter()
                        .filter_map(block)
                        .filter(|&read| read != written)
                        .map(|read| (written, read)),
                );
            }
        }
        apart.sort_unstable();
        apart.dedup();
        let slabs = self.gpu.scratch_buffers();
        let existing: Vec<u64> = slabs.iter().map(|b| b.size()).collect();
        let limits = &self.gpu.limits;
        let plan = arena::plan(
            &blocks,
            &apart,
            &existing,
            limits.max_buffer_size.min(NEW_SLAB_BYTES),
            u64::from(limits.min_storage_buffer_offset_alignment),
        );
        let mut slabs: Vec<Option<Arc<wgpu::Buffer>>> = slabs.into_iter().map(Some).collect();
        slabs.resize(plan.slab_bytes.len(), None);
        for (&r, place) in values.iter().zip(&plan.places) {
            let slab = slabs[place.slab].get_or_insert_with(|| {
                let bytes = plan.slab_bytes[place.slab];
                self.gpu.new_scratch_buffer("intermediates", bytes)
            });
            if !self.scratch.iter().any(|b| Arc::ptr_eq(b, slab)) {
                self.memory_bytes += slab.size();
                self.scratch_bytes += slab.size();
                self.scratch.push(slab.clone());
            }
            self.buffers.insert(r, ((**slab).clone(), place.offset));
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
                let (buffer, base) = &self.buffers[&self.root[v]];
                let bytes = base + size * range.start as u64
                    ..base + (size * range.end.max(range.start + 1) as u64).next_multiple_of(4);
                (buffer.clone(), Some(bytes), name)
            };
            bound.push(match op {
                // A slab holds many values: bind only this one.
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
