//! Shared helpers of the native integration tests: fixture cases written by
//! `scripts/make_fixtures.py` (model.onnx, in_<name>.npy, out_<name>.npy) and comparison.
// Each test crate includes this module and uses a subset of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use websd::engine::{Directory, Gpu, HostTensor, Model, Session};
use websd::image::RgbaImage;
use websd::npy;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The tiny random-weight SD pipeline (optimum export) most tests run.
pub fn tiny_sd() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd")
}

pub fn gpu() -> Gpu {
    pollster::block_on(Gpu::new())
        .expect("a WebGPU adapter (install mesa-vulkan-drivers for lavapipe)")
}

/// Opens a model file the way the CLI does (weights read as sessions upload them).
pub fn load_model(path: &Path) -> Model {
    let folder = Directory(path.parent().unwrap().to_path_buf());
    let name = path.file_name().unwrap().to_str().unwrap();
    pollster::block_on(Model::open(Rc::new(folder), name))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `<prefix><name>.npy` files of a case folder, by name.
pub fn tensors(dir: &Path, prefix: &str) -> HashMap<String, HostTensor> {
    let mut out = HashMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_string_lossy().to_string();
        if let Some(name) = file
            .strip_prefix(prefix)
            .and_then(|f| f.strip_suffix(".npy"))
        {
            out.insert(
                name.to_string(),
                npy::read(&std::fs::read(&path).unwrap()).unwrap(),
            );
        }
    }
    out
}

/// Runs `model` on the case's inputs, binding dims from the inputs' shapes where given.
pub fn run_case(
    gpu: &Gpu,
    model: &Model,
    dims: &HashMap<String, usize>,
    dir: &Path,
) -> Result<HashMap<String, HostTensor>, String> {
    let inputs = tensors(dir, "in_");
    let session = pollster::block_on(Session::new(gpu, model, dims)).map_err(|e| e.to_string())?;
    let feeds: Vec<(&str, &HostTensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    pollster::block_on(session.run_host(&feeds)).map_err(|e| e.to_string())
}

/// Largest |actual - expected| beyond `tolerance * max(1, |expected|)`, or an error naming
/// the first mismatch.
pub fn compare(
    name: &str,
    actual: &HostTensor,
    expected: &HostTensor,
    tolerance: f32,
) -> Result<f32, String> {
    if actual.shape != expected.shape {
        return Err(format!(
            "{name}: shape {:?}, expected {:?}",
            actual.shape, expected.shape
        ));
    }
    let (a, e) = (actual.to_f32(), expected.to_f32());
    let mut worst = 0.0f32;
    for (i, (&x, &y)) in a.iter().zip(e.iter()).enumerate() {
        let diff = (x - y).abs();
        let both_nan = x.is_nan() && y.is_nan();
        if !both_nan && (diff.is_nan() || diff > tolerance * y.abs().max(1.0)) {
            return Err(format!("{name}[{i}]: {x}, expected {y} (|diff| {diff})"));
        }
        if !both_nan {
            worst = worst.max(diff);
        }
    }
    Ok(worst)
}

/// The largest difference of any channel of any pixel.
pub fn max_pixel_difference(a: &RgbaImage, b: &RgbaImage) -> u8 {
    assert_eq!((a.width, a.height), (b.width, b.height));
    a.pixels
        .iter()
        .zip(&b.pixels)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap()
}
