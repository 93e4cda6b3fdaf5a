//! The `.safetensors` format (an 8-byte little-endian header length, a JSON header naming
//! each tensor's dtype, shape and byte range, then the bytes): reading f32/f16/bf16 tensors
//! and writing f32 ones, with the header's `__metadata__` strings.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::engine::{HostTensor, Storage};

#[derive(Serialize, Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

/// Named tensors (as f32) and the metadata strings of a file.
#[derive(Default)]
pub struct SafeTensors {
    pub tensors: BTreeMap<String, HostTensor>,
    pub metadata: HashMap<String, String>,
}

pub fn read(bytes: &[u8]) -> Result<SafeTensors, String> {
    let length = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
        .ok_or("not a .safetensors file (shorter than its header)")?;
    let header = bytes
        .get(8..8usize.saturating_add(length))
        .ok_or("not a .safetensors file (its header runs past the end)")?;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| format!("header: {e}"))?;
    let data = &bytes[8 + length..];
    let mut file = SafeTensors::default();
    if let Some(meta) = header.remove("__metadata__") {
        file.metadata = serde_json::from_value(meta).map_err(|e| format!("metadata: {e}"))?;
    }
    for (name, entry) in header {
        let entry: Entry = serde_json::from_value(entry).map_err(|e| format!("{name}: {e}"))?;
        let storage = match entry.dtype.as_str() {
            "F32" => Storage::F32,
            "F16" => Storage::F16,
            "BF16" => Storage::Bf16,
            other => return Err(format!("{name}: dtype {other} (expected F32, F16 or BF16)")),
        };
        let [start, end] = entry.data_offsets;
        let raw = data
            .get(start..end)
            .ok_or_else(|| format!("{name}: bytes {start}..{end} past the end of the file"))?;
        let tensor = HostTensor::raw(entry.shape, storage, Bytes::copy_from_slice(raw))
            .map_err(|e| format!("{name}: {e}"))?;
        file.tensors.insert(name, tensor.cast(tensor.dtype()));
    }
    Ok(file)
}

pub fn write(file: &SafeTensors) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if !file.metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::json!(file.metadata));
    }
    let mut data = Vec::new();
    for (name, tensor) in &file.tensors {
        let start = data.len();
        data.extend(tensor.to_f32().iter().flat_map(|v| v.to_le_bytes()));
        let entry = Entry {
            dtype: "F32".into(),
            shape: tensor.shape.clone(),
            data_offsets: [start, data.len()],
        };
        header.insert(name.clone(), serde_json::to_value(entry).unwrap());
    }
    let mut json = serde_json::to_vec(&header).unwrap();
    // Data starts 8-byte aligned, as the reference writer keeps it.
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    out.extend(data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let mut file = SafeTensors::default();
        file.tensors.insert(
            "a.weight".into(),
            HostTensor::f32(vec![2, 3], vec![1., 2., 3., 4., 5., 6.]),
        );
        file.tensors
            .insert("b".into(), HostTensor::f32(vec![], vec![0.5]));
        file.metadata.insert("format".into(), "pt".into());
        let back = read(&write(&file)).unwrap();
        assert_eq!(back.metadata, file.metadata);
        for (name, t) in &file.tensors {
            assert_eq!(back.tensors[name].shape, t.shape);
            assert_eq!(back.tensors[name].to_f32(), t.to_f32());
        }
    }

    #[test]
    fn truncated_files_are_errors() {
        let mut file = SafeTensors::default();
        file.tensors
            .insert("a".into(), HostTensor::f32(vec![4], vec![1.0; 4]));
        let bytes = write(&file);
        for cut in [0, 4, 9, bytes.len() - 1] {
            assert!(read(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
}
