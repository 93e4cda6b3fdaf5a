//! Random access to the files a model is read from. A large model is never held whole: the
//! loader reads its structure and small tensors, and a session reads each weight as it
//! uploads it, a chunk at a time. Natively the files are on disk; in the browser they are
//! Blobs (cached downloads or picked files), which live outside WebAssembly memory.

use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;

use bytes::Bytes;

pub type ReadResult = std::result::Result<Bytes, String>;
pub type ReadFuture<'a> = Pin<Box<dyn Future<Output = ReadResult> + 'a>>;

/// Files by path relative to a folder (`unet/model.onnx`).
pub trait FileSource {
    /// Bytes `range` of `path`: fewer than asked when the file ends inside the range.
    fn read<'a>(&'a self, path: &'a str, range: Range<u64>) -> ReadFuture<'a>;

    /// The length of `path` in bytes.
    fn size(&self, path: &str) -> std::result::Result<u64, String>;
}

/// Files in memory (tests, graphs built in code).
impl FileSource for HashMap<String, Bytes> {
    fn read<'a>(&'a self, path: &'a str, range: Range<u64>) -> ReadFuture<'a> {
        let result = match self.get(path) {
            Some(file) => {
                let len = file.len() as u64;
                let (start, end) = (range.start.min(len), range.end.min(len));
                Ok(file.slice(start as usize..end.max(start) as usize))
            }
            None => Err(format!("`{path}` was not supplied")),
        };
        Box::pin(std::future::ready(result))
    }

    fn size(&self, path: &str) -> std::result::Result<u64, String> {
        self.get(path)
            .map(|f| f.len() as u64)
            .ok_or_else(|| format!("`{path}` was not supplied"))
    }
}

/// A folder on the local file system.
#[cfg(not(target_arch = "wasm32"))]
pub struct Directory(pub std::path::PathBuf);

#[cfg(not(target_arch = "wasm32"))]
impl FileSource for Directory {
    fn read<'a>(&'a self, path: &'a str, range: Range<u64>) -> ReadFuture<'a> {
        Box::pin(std::future::ready(read_range(&self.0.join(path), range)))
    }

    fn size(&self, path: &str) -> std::result::Result<u64, String> {
        std::fs::metadata(self.0.join(path))
            .map(|m| m.len())
            .map_err(|e| e.to_string())
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn read_range(path: &std::path::Path, range: Range<u64>) -> ReadResult {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let (start, end) = (
        range.start.min(len),
        range.end.min(len).max(range.start.min(len)),
    );
    let mut bytes = vec![0; (end - start) as usize];
    file.seek(SeekFrom::Start(start))
        .and_then(|_| file.read_exact(&mut bytes))
        .map_err(|e| e.to_string())?;
    Ok(Bytes::from(bytes))
}

/// The whole of a (small) file.
pub async fn read_all(source: &dyn FileSource, path: &str) -> ReadResult {
    source.read(path, 0..u64::MAX).await
}
