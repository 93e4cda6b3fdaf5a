//! The graphs of a tiny random-weight Stable Diffusion pipeline, exported by optimum, against
//! onnxruntime (fixtures from scripts/make_fixtures.py) within 1e-4.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::collections::HashMap;

use websd::engine::{Gpu, Session};

fn check(graph: &str, case: &str, dims: &[(&str, usize)]) {
    check_on(&common::gpu(), graph, case, dims);
}

fn check_on(gpu: &Gpu, graph: &str, case: &str, dims: &[(&str, usize)]) {
    let model = common::load_model(&common::tiny_sd().join(graph).join("model.onnx"));
    let dims: HashMap<String, usize> = dims.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let dir = common::fixtures().join("tiny-sd-io").join(case);
    let outputs =
        common::run_case(gpu, &model, &dims, &dir).unwrap_or_else(|e| panic!("{case}: {e}"));
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

/// The decoder's image-sized tensors past a 16 KiB binding limit: its convolutions,
/// normalisations, upsampling and residual adds run in parts (as SD's VAE does at 512 px on
/// a 128 MiB adapter), with the same result.
#[test]
fn vae_decoder_past_one_binding_matches_onnxruntime() {
    let gpu = common::gpu();
    let small = gpu.with_binding_limit(16 * 1024);
    let dims = [("batch_size", 1), ("latent_height", 8), ("latent_width", 8)];
    let model = common::load_model(&common::tiny_sd().join("vae_decoder/model.onnx"));
    let bound: HashMap<String, usize> = dims.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let launches = |gpu| {
        pollster::block_on(Session::new(gpu, &model, &bound))
            .unwrap()
            .launch_count
    };
    let (whole, parts) = (launches(&gpu), launches(&small));
    assert!(
        parts > whole + 10,
        "{parts} launches in parts, {whole} whole"
    );
    check_on(&small, "vae_decoder", "vae_decoder", &dims);
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
