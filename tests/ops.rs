//! Every operator case in tests/fixtures/ops against onnxruntime's outputs.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::collections::HashMap;

use websd::engine::{HostTensor, Session};

#[test]
fn every_operator_case_matches_onnxruntime() {
    let gpu = common::gpu();
    let mut failures = Vec::new();
    let mut dirs: Vec<_> = std::fs::read_dir(common::fixtures().join("ops"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() > 50,
        "fixtures missing: run scripts/make_fixtures.py"
    );
    for dir in dirs {
        let case = dir.file_name().unwrap().to_string_lossy().to_string();
        let model = common::load_model(&dir.join("model.onnx"));
        let result = common::run_case(&gpu, &model, &HashMap::new(), &dir).and_then(|outputs| {
            for (name, expected) in common::tensors(&dir, "out_") {
                let actual = outputs.get(&name).ok_or(format!("no output {name}"))?;
                common::compare(&name, actual, &expected, 2e-5)?;
            }
            Ok(())
        });
        if let Err(e) = result {
            failures.push(format!("{case}: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Past 65535 workgroups in one dimension: 17M elements need the folded 2-D grid.
#[test]
fn elementwise_past_the_workgroup_limit() {
    let gpu = common::gpu();
    let model = common::load_model(&common::fixtures().join("add_symbolic.onnx"));
    let n = 17 * 1024 * 1024;
    let session = pollster::block_on(Session::new(
        &gpu,
        &model,
        &HashMap::from([("n".to_string(), n)]),
    ))
    .unwrap();
    let a = HostTensor::f32(vec![n], (0..n).map(|i| (i % 1000) as f32).collect());
    let b = HostTensor::f32(vec![1], vec![1.5]);
    let out = pollster::block_on(session.run_host(&[("a", &a), ("b", &b)])).unwrap();
    let y = out["y"].to_f32();
    for i in [0, 1, 65535 * 256 - 1, 65535 * 256, 65535 * 256 + 1, n - 1] {
        assert_eq!(y[i], (i % 1000) as f32 + 1.5, "element {i}");
    }
}

/// fp16 initializers (raw_data) are upcast on load; a Cast to f32 then folds away.
#[test]
fn fp16_weights_match_onnxruntime() {
    let gpu = common::gpu();
    let dir = common::fixtures().join("graphs/fp16_weights");
    let model = common::load_model(&dir.join("model.onnx"));
    let outputs = common::run_case(&gpu, &model, &HashMap::new(), &dir).unwrap();
    for (name, expected) in common::tensors(&dir, "out_") {
        common::compare(&name, &outputs[&name], &expected, 2e-5).unwrap();
    }
}
