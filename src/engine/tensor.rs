//! Host-side tensors: initializers read from the model, constants produced by folding, and
//! inputs/outputs exchanged with the caller.
//!
//! The engine distinguishes three logical element types. Every floating-point ONNX type is
//! computed in f32 (f16 weights read by MatMul, Gemm, Conv and Gather stay packed f16 pairs
//! on the GPU, and so do an fp16 model's activations where the kernels allow, see
//! `lower::half_values`; other f16 tensors are upcast on upload), every integer type is an
//! `I64` on the host and an i32 on the GPU, and booleans are 32-bit words on the GPU.

use std::borrow::Cow;

use bytes::Bytes;

use super::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    I64,
    Bool,
}

impl DType {
    pub fn is_float(self) -> bool {
        self == DType::F32
    }
}

/// The element encodings of ONNX `TensorProto.DataType` that the engine reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    F32,
    F16,
    Bf16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Storage {
    pub fn from_onnx(data_type: i32) -> Option<Storage> {
        Some(match data_type {
            1 => Storage::F32,
            2 => Storage::U8,
            3 => Storage::I8,
            5 => Storage::I16,
            6 => Storage::I32,
            7 => Storage::I64,
            9 => Storage::Bool,
            10 => Storage::F16,
            11 => Storage::F64,
            16 => Storage::Bf16,
            _ => return None,
        })
    }

    pub fn dtype(self) -> DType {
        match self {
            Storage::F32 | Storage::F16 | Storage::Bf16 | Storage::F64 => DType::F32,
            Storage::I64 | Storage::I32 | Storage::I16 | Storage::I8 | Storage::U8 => DType::I64,
            Storage::Bool => DType::Bool,
        }
    }

    pub fn size(self) -> usize {
        match self {
            Storage::F64 | Storage::I64 => 8,
            Storage::F32 | Storage::I32 => 4,
            Storage::F16 | Storage::Bf16 | Storage::I16 => 2,
            Storage::I8 | Storage::U8 | Storage::Bool => 1,
        }
    }
}

/// Tensor contents. Large initializers stay as the model's little-endian bytes (`Raw`),
/// sliced from the model buffer without a copy; small computed constants are typed vectors.
#[derive(Clone, Debug)]
pub enum HostData {
    F32(Vec<f32>),
    I64(Vec<i64>),
    Bool(Vec<bool>),
    Raw { storage: Storage, bytes: Bytes },
}

/// A weight that stays in a model file: `numel(shape)` elements of `storage` at byte
/// `offset` of `path` (relative to the model's `FileSource`).
#[derive(Clone, Debug)]
pub struct StoredTensor {
    pub path: String,
    pub offset: u64,
    pub storage: Storage,
    pub shape: Vec<usize>,
}

impl StoredTensor {
    /// Reads the whole tensor from `source` onto the host (as f32 if it is floating point).
    pub async fn read(&self, source: &dyn super::source::FileSource) -> Result<HostTensor> {
        let bytes = (numel(&self.shape) * self.storage.size()) as u64;
        let error = |reason: String| Error::ExternalData {
            tensor: self.path.clone(),
            reason,
        };
        let raw = source
            .read(&self.path, self.offset..self.offset + bytes)
            .await
            .map_err(|e| error(format!("cannot read: {e}")))?;
        let tensor = HostTensor::raw(self.shape.clone(), self.storage, raw)
            .map_err(|_| error("the file ended early".into()))?;
        Ok(tensor.cast(tensor.dtype()))
    }
}

#[derive(Clone, Debug)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl HostTensor {
    pub fn f32(shape: Vec<usize>, values: Vec<f32>) -> Self {
        debug_assert_eq!(numel(&shape), values.len());
        HostTensor {
            shape,
            data: HostData::F32(values),
        }
    }

    pub fn i64(shape: Vec<usize>, values: Vec<i64>) -> Self {
        debug_assert_eq!(numel(&shape), values.len());
        HostTensor {
            shape,
            data: HostData::I64(values),
        }
    }

    pub fn bool(shape: Vec<usize>, values: Vec<bool>) -> Self {
        debug_assert_eq!(numel(&shape), values.len());
        HostTensor {
            shape,
            data: HostData::Bool(values),
        }
    }

    /// Wraps little-endian bytes, checking that their length matches the shape.
    pub fn raw(shape: Vec<usize>, storage: Storage, bytes: Bytes) -> Result<Self> {
        let expected = numel(&shape) * storage.size();
        if bytes.len() != expected {
            return Err(Error::parse(format!(
                "tensor data has {} bytes, shape {:?} of {:?} needs {}",
                bytes.len(),
                shape,
                storage,
                expected
            )));
        }
        Ok(HostTensor {
            shape,
            data: HostData::Raw { storage, bytes },
        })
    }

    /// A tensor of the given logical type whose values are all converted from `value`.
    pub fn filled(dtype: DType, shape: Vec<usize>, value: f64) -> Self {
        let n = numel(&shape);
        match dtype {
            DType::F32 => HostTensor::f32(shape, vec![value as f32; n]),
            DType::I64 => HostTensor::i64(shape, vec![value as i64; n]),
            DType::Bool => HostTensor::bool(shape, vec![value != 0.0; n]),
        }
    }

    pub fn dtype(&self) -> DType {
        match &self.data {
            HostData::F32(_) => DType::F32,
            HostData::I64(_) => DType::I64,
            HostData::Bool(_) => DType::Bool,
            HostData::Raw { storage, .. } => storage.dtype(),
        }
    }

    pub fn len(&self) -> usize {
        numel(&self.shape)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values as f32, converting from whatever the storage is.
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        match &self.data {
            HostData::F32(v) => Cow::Borrowed(v),
            HostData::I64(v) => Cow::Owned(v.iter().map(|&x| x as f32).collect()),
            HostData::Bool(v) => Cow::Owned(v.iter().map(|&x| x as u8 as f32).collect()),
            HostData::Raw { storage, bytes } => Cow::Owned(decode(*storage, bytes, |x| x as f32)),
        }
    }

    /// Values as i64 (floats truncate toward zero, like ONNX Cast).
    pub fn to_i64(&self) -> Cow<'_, [i64]> {
        match &self.data {
            HostData::I64(v) => Cow::Borrowed(v),
            HostData::F32(v) => Cow::Owned(v.iter().map(|&x| x as i64).collect()),
            HostData::Bool(v) => Cow::Owned(v.iter().map(|&x| x as i64).collect()),
            HostData::Raw { storage, bytes } => Cow::Owned(decode_int(*storage, bytes)),
        }
    }

    pub fn to_bool(&self) -> Vec<bool> {
        match &self.data {
            HostData::Bool(v) => v.clone(),
            _ => self.to_f32().iter().map(|&x| x != 0.0).collect(),
        }
    }

    /// Converts to the given logical type (ONNX Cast semantics).
    pub fn cast(&self, dtype: DType) -> HostTensor {
        let shape = self.shape.clone();
        match dtype {
            DType::F32 => HostTensor::f32(shape, self.to_f32().into_owned()),
            DType::I64 => HostTensor::i64(shape, self.to_i64().into_owned()),
            DType::Bool => HostTensor::bool(shape, self.to_bool()),
        }
    }

    /// The 32-bit words the GPU holds for this tensor: f32 bits, i32 values, or 0/1.
    pub fn to_gpu_words(&self) -> Vec<u32> {
        match self.dtype() {
            DType::F32 => self.to_f32().iter().map(|x| x.to_bits()).collect(),
            DType::I64 => self.to_i64().iter().map(|&x| gpu_int(x) as u32).collect(),
            DType::Bool => self.to_bool().into_iter().map(u32::from).collect(),
        }
    }

    /// The GPU's bytes of elements `range`: the model's own bytes when it stores f32 (no
    /// copy), else those elements converted. Uploads go through this a chunk at a time, so
    /// no whole converted copy of a large weight ever exists on the host.
    pub fn gpu_bytes(&self, range: std::ops::Range<usize>) -> Cow<'_, [u8]> {
        if let HostData::Raw {
            storage: Storage::F32,
            bytes,
        } = &self.data
        {
            return Cow::Borrowed(&bytes[4 * range.start..4 * range.end]);
        }
        let words: Vec<u32> = match &self.data {
            HostData::F32(v) => v[range].iter().map(|x| x.to_bits()).collect(),
            HostData::I64(v) => v[range].iter().map(|&x| gpu_int(x) as u32).collect(),
            HostData::Bool(v) => v[range].iter().map(|&x| u32::from(x)).collect(),
            HostData::Raw { storage, bytes } => {
                let size = storage.size();
                let part = &bytes[size * range.start..size * range.end];
                match storage.dtype() {
                    DType::F32 => decode(*storage, part, |x| (x as f32).to_bits()),
                    DType::I64 => decode_int(*storage, part)
                        .into_iter()
                        .map(|x| gpu_int(x) as u32)
                        .collect(),
                    DType::Bool => decode(*storage, part, |x| u32::from(x != 0.0)),
                }
            }
        };
        Cow::Owned(words.into_iter().flat_map(u32::to_le_bytes).collect())
    }

    /// Whether the tensor is an initializer stored as f16.
    pub fn is_stored_f16(&self) -> bool {
        matches!(
            self.data,
            HostData::Raw {
                storage: Storage::F16,
                ..
            }
        )
    }

    /// The model's own bytes of elements `range`, when the tensor is stored as read from
    /// the model (an initializer) rather than computed.
    pub fn stored_bytes(&self, range: std::ops::Range<usize>) -> Option<&[u8]> {
        match &self.data {
            HostData::Raw { storage, bytes } => {
                Some(&bytes[storage.size() * range.start..storage.size() * range.end])
            }
            _ => None,
        }
    }

    /// Rebuilds a host tensor from the GPU's 32-bit words.
    pub fn from_gpu_words(dtype: DType, shape: Vec<usize>, words: &[u32]) -> HostTensor {
        match dtype {
            DType::F32 => {
                HostTensor::f32(shape, words.iter().map(|&w| f32::from_bits(w)).collect())
            }
            DType::I64 => HostTensor::i64(shape, words.iter().map(|&w| w as i32 as i64).collect()),
            DType::Bool => HostTensor::bool(shape, words.iter().map(|&w| w != 0).collect()),
        }
    }

    /// Reads the value as a list of integers (shape arguments such as Reshape's `shape`).
    pub fn ints(&self) -> Vec<i64> {
        self.to_i64().into_owned()
    }
}

/// Integers live on the GPU as i32; values past its range saturate (they only occur as
/// "to the end" sentinels, which folding resolves on the host).
fn gpu_int(x: i64) -> i32 {
    x.clamp(i32::MIN as i64, i32::MAX as i64) as i32
}

fn decode<T>(storage: Storage, bytes: &[u8], from_f64: impl Fn(f64) -> T) -> Vec<T> {
    let n = bytes.len() / storage.size();
    let mut out = Vec::with_capacity(n);
    for chunk in bytes.chunks_exact(storage.size()) {
        let value = match storage {
            Storage::F32 => f32::from_le_bytes(chunk.try_into().unwrap()) as f64,
            Storage::F16 => half::f16::from_le_bytes(chunk.try_into().unwrap()).to_f64(),
            Storage::Bf16 => half::bf16::from_le_bytes(chunk.try_into().unwrap()).to_f64(),
            Storage::F64 => f64::from_le_bytes(chunk.try_into().unwrap()),
            Storage::I64 => i64::from_le_bytes(chunk.try_into().unwrap()) as f64,
            Storage::I32 => i32::from_le_bytes(chunk.try_into().unwrap()) as f64,
            Storage::I16 => i16::from_le_bytes(chunk.try_into().unwrap()) as f64,
            Storage::I8 => chunk[0] as i8 as f64,
            Storage::U8 | Storage::Bool => chunk[0] as f64,
        };
        out.push(from_f64(value));
    }
    out
}

/// Integer decoding kept exact for i64 (f64 cannot hold every i64).
fn decode_int(storage: Storage, bytes: &[u8]) -> Vec<i64> {
    if storage == Storage::I64 {
        bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    } else {
        decode(storage, bytes, |x| x as i64)
    }
}
