//! Damaged model files give errors, never panics: single-bit flips across the graph part of
//! an optimum export (node list, attributes, shapes), each parsed (whole from memory, and
//! opened through a file source as the CLI and the page do) and built into a session.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::collections::HashMap;
use std::rc::Rc;

use bytes::Bytes;

use websd::engine::{Model, Session};

#[test]
fn bit_flipped_models_never_panic() {
    let gpu = common::gpu();
    let original = std::fs::read(common::tiny_sd().join("vae_decoder/model.onnx")).unwrap();
    let dims: HashMap<String, usize> =
        [("batch_size", 1), ("latent_height", 4), ("latent_width", 4)]
            .map(|(k, v)| (k.to_string(), v))
            .into();
    // The serialised graph starts with its nodes; the weights follow.
    let region = original.len().min(60_000);
    let mut state = 12_345u64;
    let mut panics = Vec::new();
    for _ in 0..200 {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let (at, bit) = ((state >> 33) as usize % region, (state >> 20) % 8);
        let mut bytes = original.clone();
        bytes[at] ^= 1 << bit;
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let file = HashMap::from([("model.onnx".to_string(), Bytes::from(bytes.clone()))]);
            let opened = pollster::block_on(Model::open(Rc::new(file), "model.onnx"));
            for model in [Model::from_bytes(bytes), opened].into_iter().flatten() {
                let _ = pollster::block_on(Session::new(&gpu, &model, &dims));
            }
        }));
        if outcome.is_err() {
            panics.push(format!("byte {at} bit {bit}"));
        }
    }
    assert!(panics.is_empty(), "panicked on: {}", panics.join(", "));
}
