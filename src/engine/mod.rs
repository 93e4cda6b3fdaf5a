//! A WebGPU inference engine for ONNX graphs. It knows nothing of diffusion: load a model
//! from bytes, bind its symbolic dimensions, run it on GPU-resident tensors.
//!
//! Flow: [`loader`] (protobuf -> [`graph::Graph`]) -> [`passes`] (bind, infer shapes, fold
//! constants, fuse) -> [`lower`] (nodes -> kernel launches) -> [`session`] (buffers, bind
//! groups, dispatch).

mod arith;
mod builder;
pub mod ceiling;
mod error;
mod fold;
mod gpu;
mod graph;
mod infer;
mod kernels;
mod loader;
mod lower;
mod onnx;
mod ops;
mod passes;
mod session;
mod tensor;

pub use builder::{Attr, GraphBuilder};
pub use error::{Error, Result};
pub use gpu::{Gpu, GpuTensor, SharedGpu};
pub use loader::{ExternalDataSource, external_data_locations};
pub use session::{Model, Session, ShapePlan};
pub use tensor::{DType, HostTensor, Storage};
