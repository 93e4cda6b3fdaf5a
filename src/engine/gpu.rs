//! The shared GPU: one `wgpu::Device` used by every session, and GPU-resident tensors.

use std::borrow::Cow;
use std::ops::{Deref, Range};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use super::error::{Error, Result};
use super::kernels::Pipelines;
use super::source::FileSource;
use super::tensor::{DType, HostTensor, Storage, StoredTensor, numel};

/// Elements converted and written per queue write when uploading a tensor (16 MiB).
const UPLOAD_CHUNK_ELEMENTS: usize = 4 << 20;

/// Bytes of uploads staged natively before they are submitted and waited for.
const UPLOAD_FLUSH_BYTES: usize = 32 << 20;

/// The subgroup width the subgroup kernels (gemm_subgroups.wgsl, attention_subgroups.wgsl)
/// are written for.
const SUBGROUP_LANES: u32 = 8;

/// The device every session runs on. Cheap to clone: clones share one device.
#[derive(Clone)]
pub struct Gpu(Arc<SharedGpu>);

pub struct SharedGpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub adapter_info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    /// Whether the device has `shader-f16` (WGSL's f16 type).
    pub shader_f16: bool,
    /// Whether products with fp16 weights compute in f16 (accumulating in f32): by default
    /// where the device has `shader-f16` and is a GPU; CPU adapters emulate f16 arithmetic,
    /// slower than f32 (see `with_half_arithmetic`).
    pub half_arithmetic: bool,
    /// Whether an fp16 model's largest activations are stored as halves where it computes
    /// in f16 and the kernels allow (`lower::half_values`): on by default, half the memory
    /// and traffic where a graph peaks; off keeps them f32 (see `with_half_activations`).
    pub half_activations: bool,
    /// Whether MatMul and Conv's wide tiles and fused attention run on their subgroup
    /// kernels (gemm_subgroups.wgsl, attention_subgroups.wgsl): by default on CPU adapters
    /// whose subgroups are always 8 lanes wide (llvmpipe on AVX2), where moving values
    /// between lanes is far cheaper than reading memory (see `with_subgroup_kernels`).
    pub subgroup_kernels: bool,
    /// Compiled kernels, shared by every session and by the arithmetic outside graphs
    /// (`arith.rs`): the text encoder, UNet and VAE use mostly the same ones, and a model
    /// loaded again compiles nothing.
    compiled: Mutex<Pipelines>,
    /// Slabs of intermediates of every live session, shared: each run writes an
    /// intermediate before it reads it, and runs execute one after another, so the text
    /// encoder, UNet and VAE place their intermediates in the same slabs rather than
    /// holding three sets (see `session::arena`). A slab lives as long as a session that
    /// uses it.
    scratch: Mutex<Vec<Weak<wgpu::Buffer>>>,
}

impl Deref for Gpu {
    type Target = SharedGpu;

    fn deref(&self) -> &SharedGpu {
        &self.0
    }
}

impl Gpu {
    /// Opens the default adapter with its own limits (not WebGPU's defaults, whose 128 MiB
    /// binding limit is below what Stable Diffusion's activations need on most GPUs).
    pub async fn new() -> Result<Gpu> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: wgpu::Backends::all(),
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::NoAdapter(e.to_string()))?;
        let limits = adapter.limits();
        let adapter_info = adapter.get_info();
        let subgroup_kernels = adapter.features().contains(wgpu::Features::SUBGROUP)
            && adapter_info.device_type == wgpu::DeviceType::Cpu
            && adapter_info.subgroup_min_size == SUBGROUP_LANES
            && adapter_info.subgroup_max_size == SUBGROUP_LANES;
        let mut features = adapter.features() & wgpu::Features::SHADER_F16;
        if subgroup_kernels {
            features |= wgpu::Features::SUBGROUP;
        }
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("websd"),
                required_features: features,
                required_limits: limits.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Device(e.to_string()))?;
        // Errors are collected through error scopes; never let wgpu's default handler panic.
        device.on_uncaptured_error(Arc::new(|e| log::error!("uncaptured GPU error: {e}")));
        device.set_device_lost_callback(|reason, message| {
            log::error!("GPU device lost ({reason:?}): {message}")
        });
        let shader_f16 = features.contains(wgpu::Features::SHADER_F16);
        let half_arithmetic = shader_f16 && adapter_info.device_type != wgpu::DeviceType::Cpu;
        // On wasm32 WebGPU handles are single-threaded (not Send/Sync); natively they are both.
        #[allow(clippy::arc_with_non_send_sync)]
        Ok(Gpu(Arc::new(SharedGpu {
            device,
            queue,
            adapter_info,
            limits,
            shader_f16,
            half_arithmetic,
            half_activations: true,
            subgroup_kernels,
            compiled: Mutex::new(Pipelines::new(subgroup_kernels)),
            scratch: Mutex::default(),
        })))
    }

    /// The shared cache of compiled kernels (usable even if a panic poisoned its lock).
    pub(crate) fn pipelines(&self) -> MutexGuard<'_, Pipelines> {
        self.compiled
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The same device, with sessions planned as if a storage binding held at most `bytes`
    /// (never more than the adapter allows) and binding offsets needed WebGPU's default
    /// 256-byte alignment (what browsers report): tensors past the limit are split across
    /// launches as on an adapter with that limit. Lets tests reach the split paths with
    /// small tensors.
    pub fn with_binding_limit(&self, bytes: u64) -> Gpu {
        let mut limits = self.limits.clone();
        limits.max_storage_buffer_binding_size = bytes.min(limits.max_storage_buffer_binding_size);
        limits.min_storage_buffer_offset_alignment =
            limits.min_storage_buffer_offset_alignment.max(256);
        self.derived(|gpu| gpu.limits = limits)
    }

    /// The same device, with products that read fp16 weights computed in f16 (`on`) or in
    /// f32. Sessions built later follow it. f16 needs the device's `shader-f16`.
    pub fn with_half_arithmetic(&self, on: bool) -> Result<Gpu> {
        if on && !self.shader_f16 {
            return Err(Error::Device(format!(
                "{} has no shader-f16, so it cannot compute in f16",
                self.describe()
            )));
        }
        Ok(self.derived(|gpu| gpu.half_arithmetic = on))
    }

    /// The same device, storing an fp16 model's activations as halves (`on`, the default)
    /// or as f32. Sessions built later follow it.
    pub fn with_half_activations(&self, on: bool) -> Gpu {
        self.derived(|gpu| gpu.half_activations = on)
    }

    /// The same device, running MatMul and Conv's wide tiles and fused attention on their
    /// subgroup kernels (`on`) or the workgroup-memory ones. Sessions built later follow
    /// it. The subgroup kernels need a CPU adapter with 8-lane subgroups.
    pub fn with_subgroup_kernels(&self, on: bool) -> Result<Gpu> {
        if on && !self.device.features().contains(wgpu::Features::SUBGROUP) {
            return Err(Error::Device(format!(
                "{} has no {SUBGROUP_LANES}-lane subgroups on a CPU adapter",
                self.describe()
            )));
        }
        Ok(self.derived(|gpu| gpu.subgroup_kernels = on))
    }

    /// Another handle on this device with some of its settings changed (limits,
    /// arithmetic, storage, kernels), and its own compiled kernels and intermediates.
    fn derived(&self, change: impl FnOnce(&mut SharedGpu)) -> Gpu {
        let mut gpu = SharedGpu {
            device: self.device.clone(),
            queue: self.queue.clone(),
            adapter_info: self.adapter_info.clone(),
            limits: self.limits.clone(),
            shader_f16: self.shader_f16,
            half_arithmetic: self.half_arithmetic,
            half_activations: self.half_activations,
            subgroup_kernels: self.subgroup_kernels,
            compiled: Mutex::default(),
            scratch: Mutex::default(),
        };
        change(&mut gpu);
        // Kernels compiled for the old settings may not suit the new ones.
        gpu.compiled = Mutex::new(Pipelines::new(gpu.subgroup_kernels));
        #[allow(clippy::arc_with_non_send_sync)]
        Gpu(Arc::new(gpu))
    }

    /// "name (backend, device type)", for logs and the UI. Browsers often hide the name;
    /// then the vendor and architecture they do report stand in.
    pub fn describe(&self) -> String {
        let info = &self.adapter_info;
        let name = [info.name.as_str(), info.driver_info.as_str()]
            .into_iter()
            .find(|s| !s.is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| match info.vendor {
                0 => "unnamed adapter".to_string(),
                vendor => format!("vendor {vendor:#x}"),
            });
        let max_binding = self.limits.max_storage_buffer_binding_size >> 20;
        let arithmetic = match self.half_arithmetic {
            true => ", fp16 weights computed in f16",
            false => "",
        };
        let activations = match self.half_activations {
            true => "",
            false => ", fp16 activations kept as f32",
        };
        let kernels = match self.subgroup_kernels {
            true => ", subgroup kernels",
            false => "",
        };
        format!(
            "{name} ({:?}, {:?}, {max_binding} MiB per binding{arithmetic}{activations}{kernels})",
            info.backend, info.device_type
        )
    }

    /// Blocks natively until submitted work has finished; a no-op in the browser, where the
    /// event loop drives the GPU.
    pub fn wait(&self) {
        let _ = self.device.poll(wgpu::PollType::Wait {
            submission_index: None,
            timeout: None,
        });
    }

    /// Resolves when all work submitted so far has finished on the GPU (for timing stages).
    pub async fn finish(&self) -> Result<()> {
        let (sender, receiver) = futures_channel::oneshot::channel();
        self.queue.on_submitted_work_done(move || {
            let _ = sender.send(());
        });
        self.wait();
        receiver
            .await
            .map_err(|_| Error::Device("the device was lost".into()))
    }

    pub(crate) fn storage_buffer(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(4).next_multiple_of(4),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// The shared intermediate buffers that live sessions hold.
    pub(crate) fn scratch_buffers(&self) -> Vec<Arc<wgpu::Buffer>> {
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        scratch.retain(|b| b.strong_count() > 0);
        scratch.iter().filter_map(Weak::upgrade).collect()
    }

    /// A new intermediate buffer, shared with sessions built later.
    pub(crate) fn new_scratch_buffer(&self, label: &str, bytes: u64) -> Arc<wgpu::Buffer> {
        // Shared like the device itself, which is Send and Sync natively only.
        #[allow(clippy::arc_with_non_send_sync)]
        let buffer = Arc::new(self.storage_buffer(label, bytes));
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        scratch.push(Arc::downgrade(&buffer));
        buffer
    }

    /// Bytes of the shared intermediate buffers that live sessions hold.
    pub fn scratch_bytes(&self) -> u64 {
        self.scratch_buffers().iter().map(|b| b.size()).sum()
    }

    /// A storage buffer holding `tensor`, written a chunk at a time (see `write_chunk`).
    ///
    /// With `halves`, an f16 tensor is uploaded as it is stored: packed f16 pairs.
    pub(crate) fn upload(&self, label: &str, tensor: &HostTensor, halves: bool) -> wgpu::Buffer {
        debug_assert!(!halves || tensor.is_stored_f16());
        let n = tensor.len();
        let buffer = self.storage_buffer(label, (element_size(halves) * n) as u64);
        let mut staged = 0;
        for start in (0..n).step_by(UPLOAD_CHUNK_ELEMENTS) {
            let end = (start + UPLOAD_CHUNK_ELEMENTS).min(n);
            self.write_chunk(&buffer, start, tensor, start..end, halves, &mut staged);
        }
        self.flush(&mut staged);
        buffer
    }

    /// A storage buffer holding a weight that is still in the model's files, read from
    /// `source` a chunk at a time: the host never holds more than one chunk of it.
    pub(crate) async fn upload_stored(
        &self,
        label: &str,
        stored: &StoredTensor,
        halves: bool,
        source: &dyn FileSource,
    ) -> Result<wgpu::Buffer> {
        debug_assert!(!halves || stored.storage == Storage::F16);
        let n = numel(&stored.shape);
        let width = stored.storage.size() as u64;
        let buffer = self.storage_buffer(label, (element_size(halves) * n) as u64);
        let mut staged = 0;
        for start in (0..n).step_by(UPLOAD_CHUNK_ELEMENTS) {
            let end = (start + UPLOAD_CHUNK_ELEMENTS).min(n);
            let range = stored.offset + width * start as u64..stored.offset + width * end as u64;
            let bytes =
                source
                    .read(&stored.path, range)
                    .await
                    .map_err(|e| Error::ExternalData {
                        tensor: label.to_string(),
                        reason: format!("cannot read `{}`: {e}", stored.path),
                    })?;
            let chunk =
                HostTensor::raw(vec![end - start], stored.storage, bytes).map_err(|_| {
                    Error::ExternalData {
                        tensor: label.to_string(),
                        reason: format!("`{}` ended early", stored.path),
                    }
                })?;
            self.write_chunk(&buffer, start, &chunk, 0..end - start, halves, &mut staged);
        }
        self.flush(&mut staged);
        Ok(buffer)
    }

    /// Writes elements `range` of `tensor` into `buffer` from element `first` on. Natively
    /// the queue stages every write until the next submission, so once `UPLOAD_FLUSH_BYTES`
    /// are staged they are submitted and waited for: a multi-gigabyte model never has a
    /// second copy of its weights on the host. (The browser copies each write out of
    /// WebAssembly memory at once.)
    fn write_chunk(
        &self,
        buffer: &wgpu::Buffer,
        first: usize,
        tensor: &HostTensor,
        range: Range<usize>,
        halves: bool,
        staged: &mut usize,
    ) {
        let bytes = match tensor.stored_bytes(range.clone()).filter(|_| halves) {
            // Queue writes are whole words: an odd count of halves gets a zero pad.
            Some(raw) if raw.len() % 4 != 0 => Cow::Owned([raw, &[0, 0]].concat()),
            Some(raw) => Cow::Borrowed(raw),
            None => tensor.gpu_bytes(range),
        };
        let offset = (element_size(halves) * first) as u64;
        self.queue.write_buffer(buffer, offset, &bytes);
        *staged += bytes.len();
        if *staged >= UPLOAD_FLUSH_BYTES {
            self.flush(staged);
        }
    }

    fn flush(&self, staged: &mut usize) {
        if *staged > 0 {
            self.queue.submit([]);
            self.wait();
            *staged = 0;
        }
    }

    /// A kernel's parameters: usable as a uniform buffer (the kernels whose parameters are
    /// all scalars or vec4s read them as uniforms, which every adapter caches and CPU
    /// adapters load once per workgroup rather than per lane) or as a storage buffer.
    pub(crate) fn params_buffer(&self, words: &[u32]) -> wgpu::Buffer {
        // Uniform bindings are read in 16-byte rows.
        let mut padded = words.to_vec();
        padded.resize(words.len().next_multiple_of(4).max(4), 0);
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params"),
            size: 4 * padded.len() as u64,
            usage: wgpu::BufferUsages::UNIFORM
                | wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.queue.write_buffer(&buffer, 0, words_as_bytes(&padded));
        buffer
    }

    /// A storage buffer holding `words`. Written through the queue rather than mapped at
    /// creation: mapping panics in wgpu when the device has been lost, a queue write reports
    /// an error instead.
    pub(crate) fn storage_buffer_with(&self, label: &str, words: &[u32]) -> wgpu::Buffer {
        let buffer = self.storage_buffer(label, 4 * words.len() as u64);
        if !words.is_empty() {
            self.queue.write_buffer(&buffer, 0, words_as_bytes(words));
        }
        buffer
    }
}

/// Bytes per element of an uploaded tensor: halves, or 32-bit words.
fn element_size(halves: bool) -> usize {
    if halves { 2 } else { 4 }
}

pub(crate) fn words_as_bytes(words: &[u32]) -> &[u8] {
    // SAFETY: u32 has no padding and any byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), std::mem::size_of_val(words)) }
}

/// A tensor in GPU memory: 32-bit words (f32 bits, i32, or 0/1 for booleans), row-major.
#[derive(Clone)]
pub struct GpuTensor {
    pub(crate) gpu: Gpu,
    pub(crate) buffer: wgpu::Buffer,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl GpuTensor {
    /// Uploads a host tensor.
    pub fn from_host(gpu: &Gpu, tensor: &HostTensor) -> GpuTensor {
        let buffer = gpu.upload("tensor", tensor, false);
        GpuTensor {
            gpu: gpu.clone(),
            buffer,
            dtype: tensor.dtype(),
            shape: tensor.shape.clone(),
        }
    }

    pub fn len(&self) -> usize {
        numel(&self.shape)
    }

    /// The device the tensor lives on.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn byte_len(&self) -> u64 {
        4 * self.len() as u64
    }

    /// Copies the tensor back to the host. This is the only way data leaves the GPU.
    pub async fn to_host(&self) -> Result<HostTensor> {
        let gpu = &self.gpu;
        let bytes = self.byte_len().max(4);
        let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = gpu.device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(&self.buffer, 0, &staging, 0, bytes);
        gpu.queue.submit([encoder.finish()]);
        let (sender, receiver) = futures_channel::oneshot::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |result| {
            let _ = sender.send(result);
        });
        gpu.wait();
        receiver
            .await
            .map_err(|_| Error::Device("the device was lost during readback".into()))?
            .map_err(|e| Error::Device(format!("readback failed: {e}")))?;
        let view = staging
            .get_mapped_range(..)
            .map_err(|e| Error::Device(format!("readback failed: {e}")))?;
        let words: Vec<u32> = view
            .chunks_exact(4)
            .take(self.len())
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        drop(view);
        staging.unmap();
        Ok(HostTensor::from_gpu_words(
            self.dtype,
            self.shape.clone(),
            &words,
        ))
    }
}
