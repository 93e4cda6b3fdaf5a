//! websd: Stable Diffusion on WebGPU, from ONNX files, natively and in the browser.
//!
//! [`engine`] runs ONNX graphs on wgpu and knows nothing of diffusion; [`scheduler`],
//! [`rng`] and the pipeline modules know nothing of WebGPU.

pub mod bench;
pub mod clock;
pub mod engine;
pub mod error;
pub mod eval;
pub mod image;
pub mod lora;
pub mod model;
pub mod npy;
pub mod pipeline;
pub mod rng;
pub mod safetensors;
pub mod scheduler;
pub mod tokenizer;
pub mod train;
#[cfg(target_arch = "wasm32")]
pub mod web;

pub use error::{Error, Result};
