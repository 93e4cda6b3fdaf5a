//! Bounded memory for real checkpoints: opening a model through a `FileSource` leaves its
//! weights in the files (the structure is read without them, and each session reads every
//! weight once, as it uploads it), and sessions on one GPU share their intermediates.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::cell::Cell;
use std::collections::HashMap;
use std::ops::Range;
use std::rc::Rc;

use bytes::Bytes;
use websd::bench::noise;
use websd::engine::{Attr, FileSource, GraphBuilder, HostTensor, Model, ReadFuture, Session};

/// Files in memory that count the bytes read from them.
struct Counted {
    files: HashMap<String, Bytes>,
    read: Cell<u64>,
}

impl FileSource for Counted {
    fn read<'a>(&'a self, path: &'a str, range: Range<u64>) -> ReadFuture<'a> {
        let read = self.files.read(path, range);
        Box::pin(async move {
            let bytes = read.await?;
            self.read.set(self.read.get() + bytes.len() as u64);
            Ok(bytes)
        })
    }

    fn size(&self, path: &str) -> Result<u64, String> {
        self.files.size(path)
    }
}

/// Values rounded to f16, so f16 and f32 copies of a weight hold the same numbers.
fn f16_noise(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    noise(n, seed, scale)
        .into_iter()
        .map(|v| half::f16::from_f32(v).to_f32())
        .collect()
}

fn run(session: &Session, inputs: &[(&str, &HostTensor)]) -> HostTensor {
    pollster::block_on(session.run_host(inputs))
        .unwrap()
        .remove("y")
        .unwrap()
}

/// A model whose weights (512 KiB of f32, 256 KiB of f16, both inline as an fp16 optimum
/// export has them) are not read when it is opened; a session reads each once and computes
/// exactly what the same model decoded whole from memory computes, in the same GPU memory.
#[test]
fn inline_weights_stay_in_the_file_until_a_session_uploads_them() {
    let gpu = common::gpu();
    let (rows, k, n) = (4, 256, 512);
    let bytes = GraphBuilder::new(17)
        .input("x", &[rows, k])
        .weight("w1", &[k, n], &noise(k * n, 1, 0.05))
        .weight_f16("w2", &[n, k], &f16_noise(n * k, 2, 0.05))
        .node("MatMul", &["x", "w1"], &["h"], &[])
        .node("MatMul", &["h", "w2"], &["y"], &[])
        .output("y")
        .to_bytes();
    let weight_bytes = (4 * k * n + 2 * n * k) as u64;
    let source = Rc::new(Counted {
        files: HashMap::from([("m/model.onnx".to_string(), Bytes::from(bytes.clone()))]),
        read: Cell::new(0),
    });

    let opened = pollster::block_on(Model::open(source.clone(), "m/model.onnx")).unwrap();
    let read_opening = source.read.get();
    assert!(
        read_opening < (bytes.len() as u64 - weight_bytes) + (64 << 10),
        "opening read {read_opening} of {} bytes ({weight_bytes} of weights)",
        bytes.len()
    );
    let session = pollster::block_on(Session::new(&gpu, &opened, &HashMap::new())).unwrap();
    let read_uploading = source.read.get() - read_opening;
    assert_eq!(read_uploading, weight_bytes, "bytes read by the session");

    let whole = Model::from_bytes(bytes).unwrap();
    let reference = pollster::block_on(Session::new(&gpu, &whole, &HashMap::new())).unwrap();
    assert_eq!(session.memory_bytes, reference.memory_bytes);
    let x = HostTensor::f32(vec![rows, k], noise(rows * k, 3, 1.0));
    common::compare(
        "y",
        &run(&session, &[("x", &x)]),
        &run(&reference, &[("x", &x)]),
        0.0,
    )
    .unwrap();
}

/// An fp16 convolution too large for one binding runs in parts that read windows of the
/// packed filter in place (strided rows of output channels, from an input channel on), and
/// sums to what the whole convolution computes.
#[test]
fn fp16_convolution_in_parts_reads_its_filter_in_place() {
    let gpu = common::gpu();
    let small = gpu.with_binding_limit(16 << 10);
    let (out_c, in_c, size) = (128, 64, 16);
    let bytes = GraphBuilder::new(17)
        .input("x", &[1, in_c, size, size])
        .weight_f16(
            "w",
            &[out_c, in_c, 3, 3],
            &f16_noise(out_c * in_c * 9, 4, 0.05),
        )
        .weight("b", &[out_c], &noise(out_c, 5, 0.1))
        .node(
            "Conv",
            &["x", "w", "b"],
            &["y"],
            &[("pads", Attr::Ints(vec![1; 4]))],
        )
        .output("y")
        .to_bytes();
    let files = HashMap::from([("model.onnx".to_string(), Bytes::from(bytes))]);
    let model = pollster::block_on(Model::open(Rc::new(files), "model.onnx")).unwrap();
    let x = HostTensor::f32(vec![1, in_c, size, size], noise(in_c * size * size, 6, 1.0));
    let whole = pollster::block_on(Session::new(&gpu, &model, &HashMap::new())).unwrap();
    let parts = pollster::block_on(Session::new(&small, &model, &HashMap::new())).unwrap();
    assert!(
        parts.launch_count > whole.launch_count,
        "{} launches in parts, {} whole",
        parts.launch_count,
        whole.launch_count
    );
    // Halves: the split session holds no f32 copy of the filter.
    assert!(parts.memory_bytes <= whole.memory_bytes + (4 << 10));
    common::compare(
        "y",
        &run(&parts, &[("x", &x)]),
        &run(&whole, &[("x", &x)]),
        1e-5,
    )
    .unwrap();
}

/// Intermediates take bytes in shared slabs by lifetime: a session holds the most bytes
/// alive at one time, not a buffer per size it ever needed (whole buffers would take
/// 8 + 8 + 16 + 16 KiB here: neither freed 8 KiB buffer holds a 16 KiB value).
#[test]
fn intermediates_hold_the_most_bytes_alive_at_once() {
    let (rows, k) = (8, 256);
    let model = GraphBuilder::new(17)
        .input("x", &[rows, k])
        .weight("w1", &[k, k], &noise(k * k, 1, 0.05))
        .weight("w2", &[k, 2 * k], &noise(2 * k * k, 2, 0.05))
        .weight("w3", &[2 * k, k], &noise(2 * k * k, 3, 0.05))
        .node("MatMul", &["x", "w1"], &["h1"], &[])
        .node("Sin", &["h1"], &["h2"], &[])
        .node("MatMul", &["h2", "w2"], &["h3"], &[])
        .node("Sin", &["h3"], &["h4"], &[])
        .node("MatMul", &["h4", "w3"], &["y"], &[])
        .output("y")
        .build()
        .unwrap();
    let gpu = common::gpu();
    let session = pollster::block_on(Session::new(&gpu, &model, &HashMap::new())).unwrap();
    // h3 and h4, 16 KiB each, alive together while Sin reads one and writes the other.
    assert_eq!(session.scratch_bytes, 2 * (rows * 2 * k * 4) as u64);
}

/// Sessions on one GPU place their intermediates in the same slabs: a second model of the
/// same shapes adds no slab, and runs taking turns still compute what sessions
/// on a GPU of their own compute.
#[test]
fn sessions_share_intermediate_buffers() {
    let (rows, k) = (8, 256);
    let model = |seed: u64| {
        GraphBuilder::new(17)
            .input("x", &[rows, k])
            .weight("w1", &[k, k], &noise(k * k, seed, 0.05))
            .weight("w2", &[k, k], &noise(k * k, seed + 1, 0.05))
            .node("MatMul", &["x", "w1"], &["h"], &[])
            .node("Relu", &["h"], &["r"], &[])
            .node("MatMul", &["r", "w2"], &["y"], &[])
            .output("y")
            .build()
            .unwrap()
    };
    let (first, second) = (model(1), model(3));
    let session = |gpu: &websd::engine::Gpu, model: &Model| {
        pollster::block_on(Session::new(gpu, model, &HashMap::new())).unwrap()
    };
    let gpu = common::gpu();
    let (a, b) = (session(&gpu, &first), session(&gpu, &second));
    assert!(a.scratch_bytes > 0);
    assert_eq!(b.scratch_bytes, a.scratch_bytes);
    assert_eq!(gpu.scratch_bytes(), a.scratch_bytes, "the slabs' total");

    let alone = common::gpu();
    let x = HostTensor::f32(vec![rows, k], noise(rows * k, 5, 1.0));
    let inputs = [("x", &x)];
    let expected_a = run(&session(&alone, &first), &inputs);
    let expected_b = run(&session(&alone, &second), &inputs);
    for _ in 0..2 {
        common::compare("a", &run(&a, &inputs), &expected_a, 0.0).unwrap();
        common::compare("b", &run(&b, &inputs), &expected_b, 0.0).unwrap();
    }
    drop((a, b));
    assert_eq!(gpu.scratch_bytes(), 0, "buffers outlived their sessions");
}
