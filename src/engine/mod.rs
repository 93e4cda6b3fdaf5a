//! A WebGPU inference engine for ONNX graphs. It knows nothing of diffusion: open a model
//! from its files (or bytes), bind its symbolic dimensions, run it on GPU-resident tensors.
//!
//! Flow: [`loader`] (protobuf -> [`graph::Graph`]; [`scan`] leaves weights in the files) -> [`passes`] (bind, infer shapes, fold
//! constants, fuse) -> [`lower`] (nodes -> kernel launches) -> [`session`] (buffers, bind
//! groups, dispatch).

mod arith;
mod builder;
pub mod ceiling;
mod error;
mod fold;
mod gpu;
mod grad;
mod graph;
mod infer;
mod kernels;
mod loader;
mod lora;
mod lower;
mod onnx;
mod ops;
mod optim;
mod passes;
mod scan;
mod session;
mod source;
mod tensor;

pub use builder::{Attr, GraphBuilder};
pub use error::{Error, Result};
pub use gpu::{Gpu, GpuTensor, SharedGpu};
pub use grad::{LOSS, Objective, grad_name};
pub use loader::external_data_locations;
pub use lora::{AdaptableLayer, LoraAdapter, lora_input_names};
pub use optim::{AdamW, Optimizer};
pub use session::{Model, Session, ShapePlan};
#[cfg(not(target_arch = "wasm32"))]
pub use source::Directory;
pub use source::{FileSource, ReadFuture, ReadResult, read_all};
pub use tensor::{DType, HostTensor, Storage};
