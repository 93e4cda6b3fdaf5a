//! Reading and writing NumPy `.npy` files (format 1.0-3.0, little-endian, C order): the
//! exchange format of the CLI and of the test fixtures.

use crate::engine::HostTensor;
use bytes::Bytes;

const MAGIC: &[u8] = b"\x93NUMPY";

/// Parses a `.npy` file into a host tensor.
pub fn read(bytes: &[u8]) -> Result<HostTensor, String> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not a .npy file".into());
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize,
            12,
        ),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = std::str::from_utf8(
        bytes
            .get(start..start + header_len)
            .ok_or("truncated header")?,
    )
    .map_err(|_| "header is not text")?;
    let field = |key: &str| -> Result<&str, String> {
        let at = header
            .find(&format!("'{key}'"))
            .ok_or(format!("header lacks `{key}`"))?;
        Ok(header[at + key.len() + 2..]
            .trim_start()
            .trim_start_matches(':')
            .trim_start())
    };
    let descr = field("descr")?;
    let descr = descr
        .trim_start_matches('\'')
        .split('\'')
        .next()
        .unwrap_or("");
    if field("fortran_order")?.starts_with("True") {
        return Err("Fortran-ordered arrays are not supported".into());
    }
    let shape_text = field("shape")?;
    let shape_text = &shape_text[1..shape_text.find(')').ok_or("bad shape")?];
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad dimension `{s}`"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let data = Bytes::copy_from_slice(&bytes[start + header_len..]);
    use crate::engine::Storage;
    let storage = match descr {
        "<f4" => Storage::F32,
        "<f2" => Storage::F16,
        "<f8" => Storage::F64,
        "<i8" => Storage::I64,
        "<i4" => Storage::I32,
        "|i1" => Storage::I8,
        "|u1" => Storage::U8,
        "|b1" => Storage::Bool,
        other => return Err(format!("unsupported dtype `{other}`")),
    };
    HostTensor::raw(shape, storage, data).map_err(|e| e.to_string())
}

/// Serialises a host tensor (f32, i64 or bool) as `.npy`.
pub fn write(tensor: &HostTensor) -> Vec<u8> {
    use crate::engine::DType;
    let (descr, body): (&str, Vec<u8>) = match tensor.dtype() {
        DType::F32 => (
            "<f4",
            tensor
                .to_f32()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::I64 => (
            "<i8",
            tensor
                .to_i64()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::Bool => ("|b1", tensor.to_bool().into_iter().map(u8::from).collect()),
    };
    let dims: Vec<String> = tensor.shape.iter().map(|d| d.to_string()).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Pad so that the data starts on a 64-byte boundary, ending the header with '\n'.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_each_type() {
        for t in [
            HostTensor::f32(vec![2, 3], vec![1.0, -2.5, 3.0, 0.0, 1e-8, 7.0]),
            HostTensor::i64(vec![4], vec![1, -2, i64::MAX, 0]),
            HostTensor::bool(vec![1, 2], vec![true, false]),
            HostTensor::f32(vec![], vec![4.0]),
        ] {
            let back = read(&write(&t)).unwrap();
            assert_eq!(back.shape, t.shape);
            assert_eq!(back.to_gpu_words(), t.to_gpu_words());
        }
    }

    #[test]
    fn rejects_garbage() {
        assert!(read(b"hello").is_err());
    }
}
