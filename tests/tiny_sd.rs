//! The graphs of a tiny random-weight Stable Diffusion pipeline, exported by optimum, against
//! onnxruntime (fixtures from scripts/make_fixtures.py) within 1e-4.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::collections::HashMap;

fn check(graph: &str, case: &str, dims: &[(&str, usize)]) {
    let gpu = common::gpu();
    let model = common::load_model(&common::tiny_sd().join(graph).join("model.onnx"));
    let dims: HashMap<String, usize> = dims.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let dir = common::fixtures().join("tiny-sd-io").join(case);
    let outputs =
        common::run_case(&gpu, &model, &dims, &dir).unwrap_or_else(|e| panic!("{case}: {e}"));
    let expected = common::tensors(&dir, "out_");
    assert!(!expected.is_empty());
    for (name, want) in expected {
        let got = outputs
            .get(&name)
            .unwrap_or_else(|| panic!("{case}: no output {name}"));
        let worst =
            common::compare(&name, got, &want, 1e-4).unwrap_or_else(|e| panic!("{case}: {e}"));
        eprintln!("{case}/{name}: max abs diff {worst:e}");
    }
}

#[test]
fn text_encoder_matches_onnxruntime() {
    check(
        "text_encoder",
        "text_encoder",
        &[("batch_size", 2), ("sequence_length", 77)],
    );
}

#[test]
fn unet_batch_two_matches_onnxruntime() {
    check(
        "unet",
        "unet",
        &[
            ("batch_size", 2),
            ("height", 8),
            ("width", 8),
            ("sequence_length", 77),
        ],
    );
}

#[test]
fn unet_non_square_matches_onnxruntime() {
    check(
        "unet",
        "unet_nonsquare",
        &[
            ("batch_size", 1),
            ("height", 8),
            ("width", 12),
            ("sequence_length", 77),
        ],
    );
}

#[test]
fn vae_decoder_matches_onnxruntime() {
    check(
        "vae_decoder",
        "vae_decoder",
        &[("batch_size", 1), ("latent_height", 8), ("latent_width", 8)],
    );
}

#[test]
fn vae_encoder_matches_onnxruntime() {
    check(
        "vae_encoder",
        "vae_encoder",
        &[
            ("batch_size", 1),
            ("sample_height", 16),
            ("sample_width", 12),
        ],
    );
}
