//! Bad inputs of every kind are `Err` values with messages that say what is wrong.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::collections::HashMap;
use std::rc::Rc;

use bytes::Bytes;

use websd::engine::{HostTensor, Model, Session};

fn model_bytes(case: &str) -> Vec<u8> {
    std::fs::read(common::fixtures().join(case)).unwrap()
}

fn error_of<T>(result: Result<T, websd::engine::Error>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_and_garbage_files_are_parse_errors() {
    let bytes = std::fs::read(common::tiny_sd().join("vae_decoder/model.onnx")).unwrap();
    let message = error_of(Model::from_bytes(bytes[..bytes.len() / 2].to_vec()));
    assert!(message.contains("not a valid ONNX model"), "{message}");
    let message = error_of(Model::from_bytes(vec![0xff; 100]));
    assert!(message.contains("not a valid ONNX model"), "{message}");
}

/// The external-data case with its weights file replaced by `weights` (or left out).
fn open_with_weights(weights: Option<Vec<u8>>) -> Result<Model, websd::engine::Error> {
    let mut files = HashMap::new();
    files.insert(
        "model.onnx".to_string(),
        Bytes::from(model_bytes("ops/matmul_external_data/model.onnx")),
    );
    if let Some(weights) = weights {
        files.insert("weights.bin".to_string(), Bytes::from(weights));
    }
    pollster::block_on(Model::open(Rc::new(files), "model.onnx"))
}

#[test]
fn missing_external_data_names_the_file() {
    let message = error_of(open_with_weights(None));
    assert!(
        message.contains("weights.bin") && message.contains("not supplied"),
        "{message}"
    );
}

#[test]
fn short_external_data_is_an_error() {
    let message = error_of(open_with_weights(Some(vec![0u8; 7])));
    assert!(
        message.contains("weights.bin") && message.contains("7 bytes"),
        "{message}"
    );
}

#[test]
fn unsupported_operator_names_op_node_and_opset() {
    // Rewrite the op type inside an operator case's protobuf ("Erf" -> "Elu" keeps the length).
    let mut bytes = model_bytes("ops/erf/model.onnx");
    let at = bytes.windows(3).position(|w| w == b"Erf").unwrap();
    bytes[at..at + 3].copy_from_slice(b"Elu");
    let message = error_of(Model::from_bytes(bytes));
    assert!(
        message.contains("Elu") && message.contains("opset 18"),
        "{message}"
    );
}

#[test]
fn unbound_dimension_is_named() {
    let gpu = common::gpu();
    let model = common::load_model(&common::tiny_sd().join("unet/model.onnx"));
    let dims = HashMap::from([("batch_size".to_string(), 1)]);
    let message = error_of(pollster::block_on(Session::new(&gpu, &model, &dims)));
    assert!(
        message.contains("height")
            || message.contains("width")
            || message.contains("sequence_length"),
        "{message}"
    );
}

#[test]
fn wrong_inputs_are_named() {
    let gpu = common::gpu();
    let model = common::load_model(&common::fixtures().join("ops/add_broadcast/model.onnx"));
    let session = pollster::block_on(Session::new(&gpu, &model, &HashMap::new())).unwrap();
    let a = HostTensor::f32(vec![3, 1, 5], vec![0.0; 15]);
    let message = error_of(pollster::block_on(session.run_host(&[("a", &a)])));
    assert!(message.contains("missing inputs: b"), "{message}");

    let wrong_shape = HostTensor::f32(vec![4, 2], vec![0.0; 8]);
    let message = error_of(pollster::block_on(
        session.run_host(&[("a", &a), ("b", &wrong_shape)]),
    ));
    assert!(
        message.contains("`b`") && message.contains("[4, 2]"),
        "{message}"
    );

    let wrong_type = HostTensor::i64(vec![4, 1], vec![0; 4]);
    let message = error_of(pollster::block_on(
        session.run_host(&[("a", &a), ("b", &wrong_type)]),
    ));
    assert!(
        message.contains("`b`") && message.contains("I64"),
        "{message}"
    );

    let b = HostTensor::f32(vec![4, 1], vec![0.0; 4]);
    let message = error_of(pollster::block_on(session.run_host(&[
        ("a", &a),
        ("b", &b),
        ("c", &b),
    ])));
    assert!(
        message.contains("`c`") && message.contains("no such input"),
        "{message}"
    );

    // After all that, the session still runs.
    let ok = pollster::block_on(session.run_host(&[("a", &a), ("b", &b)])).unwrap();
    assert_eq!(ok["y0"].shape, vec![3, 4, 5]);
}

/// Kernels that are not split (fused attention) name the tensor past the binding limit.
#[test]
fn too_large_for_a_binding_is_an_error() {
    let gpu = common::gpu().with_binding_limit(16 * 1024);
    let model = common::load_model(&common::fixtures().join("attention_symbolic.onnx"));
    let dims = [("batch", 1), ("n", 128), ("d", 64)];
    let dims = dims.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let message = error_of(pollster::block_on(Session::new(&gpu, &model, &dims)));
    assert!(
        message.contains("bytes (`y`) exceeds this GPU's storage binding limit of 16384 bytes"),
        "{message}"
    );
}

#[test]
fn cli_reports_missing_inputs_and_writes_outputs() {
    let exe = env!("CARGO_BIN_EXE_websd");
    let case = common::fixtures().join("ops/add_broadcast");
    let out = std::env::temp_dir().join(format!("websd-cli-{}", std::process::id()));
    let model = case.join("model.onnx");
    let run = |extra: &[String]| {
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("run")
            .arg(&model)
            .arg("--output-dir")
            .arg(&out)
            .args(extra);
        cmd.output().unwrap()
    };
    let input = |name: &str| format!("{name}={}", case.join(format!("in_{name}.npy")).display());
    let failed = run(&["--input".into(), input("a")]);
    assert!(!failed.status.success());
    assert!(String::from_utf8_lossy(&failed.stderr).contains("missing inputs: b"));

    let ok = run(&["--input".into(), input("a"), "--input".into(), input("b")]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let written = websd::npy::read(&std::fs::read(out.join("y0.npy")).unwrap()).unwrap();
    let expected = websd::npy::read(&std::fs::read(case.join("out_y0.npy")).unwrap()).unwrap();
    common::compare("y0", &written, &expected, 2e-5).unwrap();
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn lost_device_is_an_error() {
    let gpu = common::gpu();
    let model = common::load_model(&common::fixtures().join("ops/add_broadcast/model.onnx"));
    let session = pollster::block_on(Session::new(&gpu, &model, &HashMap::new())).unwrap();
    gpu.device.destroy();
    let a = HostTensor::f32(vec![3, 1, 5], vec![0.0; 15]);
    let b = HostTensor::f32(vec![4, 1], vec![0.0; 4]);
    let message = error_of(pollster::block_on(
        session.run_host(&[("a", &a), ("b", &b)]),
    ));
    assert!(
        message.contains("GPU") || message.contains("device"),
        "{message}"
    );
}
