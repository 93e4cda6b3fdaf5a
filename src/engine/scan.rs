//! The structure of an ONNX file without its weights. A model saved without external data
//! (every fp16 optimum export under 2 GB) carries its weights inline as `raw_data`; this
//! walks the protobuf wire format through a [`FileSource`] a window at a time and rewrites
//! each large inline initializer into an external-data reference to the same bytes of the
//! same file. The result decodes like any model with external data, and the weights stay
//! in the file until a session uploads them.

use std::ops::Range;

use bytes::Bytes;
use prost::Message;

use super::error::{Error, Result};
use super::onnx::{self, DATA_LOCATION_EXTERNAL};
use super::source::FileSource;

/// Inline `raw_data` at least this long stays in the file.
pub const INLINE_LIMIT: u64 = 64 << 10;

/// Bytes read per request while walking the structure: a few after a jump over a weight
/// (enough for the next tensor's name and shape), doubling while reading on.
const FIRST_WINDOW: u64 = 4 << 10;
const LARGEST_WINDOW: u64 = 1 << 20;

/// `ModelProto.graph`, `GraphProto.initializer` and `TensorProto.raw_data`.
const MODEL_GRAPH: u64 = 7;
const GRAPH_INITIALIZER: u64 = 5;
const TENSOR_RAW_DATA: u64 = 9;

const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const LENGTH_DELIMITED: u64 = 2;
const FIXED32: u64 = 5;

/// The model at `path` with large inline tensors moved out; `location` is how the file
/// names itself in an external-data reference (its name within its folder).
pub async fn skeleton(source: &dyn FileSource, path: &str, location: &str) -> Result<Vec<u8>> {
    let mut reader = Reader::new(source, path);
    let mut out = Vec::new();
    while let Some((field, wire)) = reader.key().await? {
        if field == MODEL_GRAPH && wire == LENGTH_DELIMITED {
            let end = reader.end_of_message().await?;
            let graph = graph_skeleton(&mut reader, end, location).await?;
            put_key(&mut out, MODEL_GRAPH, LENGTH_DELIMITED);
            put_varint(&mut out, graph.len() as u64);
            out.extend(graph);
        } else {
            reader.copy_field(field, wire, &mut out).await?;
        }
    }
    Ok(out)
}

async fn graph_skeleton(reader: &mut Reader<'_>, end: u64, location: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    while reader.pos < end {
        let (field, wire) = reader.key().await?.ok_or_else(truncated)?;
        if field == GRAPH_INITIALIZER && wire == LENGTH_DELIMITED {
            let end = reader.end_of_message().await?;
            let tensor = tensor_skeleton(reader, end, location).await?;
            put_key(&mut out, GRAPH_INITIALIZER, LENGTH_DELIMITED);
            put_varint(&mut out, tensor.len() as u64);
            out.extend(tensor);
        } else {
            reader.copy_field(field, wire, &mut out).await?;
        }
    }
    Ok(out)
}

async fn tensor_skeleton(reader: &mut Reader<'_>, end: u64, location: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut moved = None;
    while reader.pos < end {
        let (field, wire) = reader.key().await?.ok_or_else(truncated)?;
        if field == TENSOR_RAW_DATA && wire == LENGTH_DELIMITED {
            let len = reader.length().await?;
            if len >= INLINE_LIMIT {
                moved = Some(reader.pos..reader.pos + len);
                reader.pos += len;
                continue;
            }
            put_key(&mut out, field, wire);
            put_varint(&mut out, len);
            out.extend_from_slice(&reader.take(len).await?);
        } else {
            reader.copy_field(field, wire, &mut out).await?;
        }
    }
    if let Some(range) = moved {
        // Appended fields merge into the message: the reference overrides nothing else.
        let entry = |key: &str, value: String| onnx::StringStringEntryProto {
            key: key.into(),
            value,
        };
        let reference = onnx::TensorProto {
            data_location: DATA_LOCATION_EXTERNAL,
            external_data: vec![
                entry("location", location.into()),
                entry("offset", range.start.to_string()),
                entry("length", (range.end - range.start).to_string()),
            ],
            ..Default::default()
        };
        out.extend(reference.encode_to_vec());
    }
    Ok(out)
}

fn truncated() -> Error {
    Error::parse("the file ends inside a message; is the download complete?")
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_key(out: &mut Vec<u8>, field: u64, wire: u64) {
    put_varint(out, field << 3 | wire);
}

/// A position in a file, with the window of bytes around it that was read last.
struct Reader<'s> {
    source: &'s dyn FileSource,
    path: &'s str,
    window: Bytes,
    window_start: u64,
    pos: u64,
}

impl<'s> Reader<'s> {
    fn new(source: &'s dyn FileSource, path: &'s str) -> Self {
        Reader {
            source,
            path,
            window: Bytes::new(),
            window_start: 0,
            pos: 0,
        }
    }

    async fn read(&self, range: Range<u64>) -> Result<Bytes> {
        self.source
            .read(self.path, range)
            .await
            .map_err(|e| Error::parse(format!("cannot read `{}`: {e}", self.path)))
    }

    /// The next byte, or `None` at the end of the file.
    async fn byte(&mut self) -> Result<Option<u8>> {
        let window_end = self.window_start + self.window.len() as u64;
        if !(self.window_start..window_end).contains(&self.pos) {
            let size = match self.pos == window_end {
                true => (2 * self.window.len() as u64).clamp(FIRST_WINDOW, LARGEST_WINDOW),
                false => FIRST_WINDOW,
            };
            self.window = self.read(self.pos..self.pos + size).await?;
            self.window_start = self.pos;
            if self.window.is_empty() {
                return Ok(None);
            }
        }
        let byte = self.window[(self.pos - self.window_start) as usize];
        self.pos += 1;
        Ok(Some(byte))
    }

    /// A varint, `None` if the file ends before its first byte.
    async fn varint_or_end(&mut self) -> Result<Option<u64>> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(byte) = self.byte().await? else {
                return if shift == 0 {
                    Ok(None)
                } else {
                    Err(truncated())
                };
            };
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(Some(value));
            }
        }
        Err(Error::parse(
            "a varint longer than 10 bytes; is this an .onnx file?",
        ))
    }

    async fn varint(&mut self) -> Result<u64> {
        self.varint_or_end().await?.ok_or_else(truncated)
    }

    /// The next field's number and wire type, or `None` at the end of the file.
    async fn key(&mut self) -> Result<Option<(u64, u64)>> {
        Ok(self.varint_or_end().await?.map(|k| (k >> 3, k & 7)))
    }

    /// A length prefix (of bytes that must lie within 2^48 of here).
    async fn length(&mut self) -> Result<u64> {
        let len = self.varint().await?;
        if len >= 1 << 48 {
            return Err(Error::parse(format!(
                "a field of {len} bytes; is this an .onnx file?"
            )));
        }
        Ok(len)
    }

    /// Reads a length prefix and returns where the message it announces ends.
    async fn end_of_message(&mut self) -> Result<u64> {
        let len = self.length().await?;
        Ok(self.pos + len)
    }

    /// The next `len` bytes.
    async fn take(&mut self, len: u64) -> Result<Bytes> {
        let range = self.pos..self.pos + len;
        let window_end = self.window_start + self.window.len() as u64;
        let bytes = if range.start >= self.window_start && range.end <= window_end {
            let at = (range.start - self.window_start) as usize;
            self.window.slice(at..at + len as usize)
        } else {
            self.read(range).await?
        };
        if bytes.len() as u64 != len {
            return Err(truncated());
        }
        self.pos += len;
        Ok(bytes)
    }

    /// Copies the rest of a field whose key was just read.
    async fn copy_field(&mut self, field: u64, wire: u64, out: &mut Vec<u8>) -> Result<()> {
        put_key(out, field, wire);
        let len = match wire {
            VARINT => {
                let value = self.varint().await?;
                put_varint(out, value);
                return Ok(());
            }
            FIXED64 => 8,
            FIXED32 => 4,
            LENGTH_DELIMITED => {
                let len = self.length().await?;
                put_varint(out, len);
                len
            }
            _ => {
                return Err(Error::parse(format!(
                    "field {field} has wire type {wire}, which ONNX files do not use; is this an .onnx file?"
                )));
            }
        };
        out.extend_from_slice(&self.take(len).await?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::engine::builder::GraphBuilder;

    fn scan(model: &[u8]) -> Vec<u8> {
        let files = HashMap::from([("m.onnx".to_string(), Bytes::copy_from_slice(model))]);
        pollster::block_on(skeleton(&files, "m.onnx", "m.onnx")).unwrap()
    }

    /// With nothing large inline, the skeleton is the file itself, byte for byte.
    #[test]
    fn small_models_scan_to_themselves() {
        let model = GraphBuilder::new(17)
            .input("x", &[2, 8])
            .weight("w", &[8, 4], &[0.5; 32])
            .weight_f16("b", &[4], &[0.25; 4])
            .node("MatMul", &["x", "w"], &["h"], &[])
            .node("Add", &["h", "b"], &["y"], &[])
            .output("y")
            .to_bytes();
        assert_eq!(scan(&model), model);
    }

    /// A large inline tensor becomes a reference to its own bytes in the same file.
    #[test]
    fn large_inline_tensors_become_references_to_their_bytes() {
        let values: Vec<f32> = (0..32 * 1024).map(|i| i as f32).collect();
        let model = GraphBuilder::new(17)
            .input("x", &[1, 32])
            .weight("w", &[32, 1024], &values)
            .node("MatMul", &["x", "w"], &["y"], &[])
            .output("y")
            .to_bytes();
        let skeleton = onnx::ModelProto::decode(scan(&model).as_slice()).unwrap();
        let tensor = &skeleton.graph.unwrap().initializer[0];
        assert!(tensor.raw_data.is_empty());
        assert_eq!(tensor.data_location, DATA_LOCATION_EXTERNAL);
        let entry = |key: &str| {
            let found = tensor.external_data.iter().find(|e| e.key == key);
            found.unwrap().value.clone()
        };
        assert_eq!(entry("location"), "m.onnx");
        let offset: usize = entry("offset").parse().unwrap();
        let length: usize = entry("length").parse().unwrap();
        let expected: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(&model[offset..offset + length], expected.as_slice());
    }
}
