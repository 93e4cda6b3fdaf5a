//! Host memory while loading large weights: a model with 512 MiB of f32 weights in an
//! external-data file loads and runs with next to nothing on the host beyond the GPU's own
//! copy (which, on a software adapter such as lavapipe, is host memory too).
#![cfg(target_os = "linux")]

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::rc::Rc;

use websd::engine::{Directory, Model, Session};

const N: usize = 4096;
const LAYERS: usize = 8;

/// Layer k's weight, as scripts/make_fixtures.py's `large_weight` computes it.
fn weight_row(k: usize, i: usize) -> Vec<u8> {
    (0..N)
        .map(|j| (((i * 31 + j * 17 + k * 7) % 23) as f32 - 11.0) / 2048.0)
        .flat_map(f32::to_le_bytes)
        .collect()
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn half_a_gigabyte_of_weights_loads_without_host_copies() {
    let gpu = common::gpu();
    let fixture = common::fixtures().join("graphs/large_external_data");
    let dir = std::env::temp_dir().join(format!("websd-large-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture.join("model.onnx"), dir.join("model.onnx")).unwrap();
    let mut file = std::io::BufWriter::new(std::fs::File::create(dir.join("weights.bin")).unwrap());
    for k in 0..LAYERS {
        for i in 0..N {
            file.write_all(&weight_row(k, i)).unwrap();
        }
    }
    file.into_inner().unwrap().sync_all().unwrap();
    let weight_bytes = (LAYERS * N * N * 4) as u64;

    // Writing 5 to clear_refs resets the peak (VmHWM) to the current resident size.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = status_kib("VmHWM:") * 1024;
    let model =
        pollster::block_on(Model::open(Rc::new(Directory(dir.clone())), "model.onnx")).unwrap();
    let session = pollster::block_on(Session::new(&gpu, &model, &HashMap::new())).unwrap();
    let inputs = common::tensors(&fixture, "in_");
    let outputs = pollster::block_on(session.run_host(&[("x", &inputs["x"])])).unwrap();
    let peak = status_kib("VmHWM:") * 1024;
    std::fs::remove_dir_all(&dir).ok();

    // 1e-4 of the output's scale: eight products of 4096 terms accumulate in another order
    // than onnxruntime's.
    let expected = common::tensors(&fixture, "out_")["y"].to_f32().into_owned();
    let actual = outputs["y"].to_f32();
    let scale = expected.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let worst = actual
        .iter()
        .zip(&expected)
        .fold(0.0f32, |m, (a, e)| m.max((a - e).abs()));
    assert!(worst <= 1e-4 * scale, "max |diff| {worst}, scale {scale}");
    assert!(session.memory_bytes >= weight_bytes);
    let beyond_gpu = (peak - before).saturating_sub(session.memory_bytes);
    eprintln!(
        "{} MiB of weights: peak host memory +{} MiB, of which {} MiB beyond the GPU's copy",
        weight_bytes >> 20,
        (peak - before) >> 20,
        beyond_gpu >> 20
    );
    assert!(
        beyond_gpu < weight_bytes / 5,
        "peak host memory rose {} MiB beyond the GPU's {} MiB for {} MiB of weights",
        beyond_gpu >> 20,
        session.memory_bytes >> 20,
        weight_bytes >> 20
    );
}
