//! websd: Stable Diffusion on WebGPU, from ONNX files, natively and in the browser.

pub mod engine;
pub mod npy;
