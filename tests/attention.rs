//! Attention as exporters write it (MatMul -> scale -> Softmax -> MatMul) is fused into one
//! kernel that never stores the score matrix; results match onnxruntime, and at SD's
//! 64x64-latent size it runs in far less memory than the scores alone would take.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::collections::HashMap;

use websd::engine::{Gpu, HostTensor, Session};

fn attention_launches(session: &Session) -> usize {
    session
        .kernel_counts()
        .iter()
        .find(|(k, _)| k == "Attention")
        .map_or(0, |(_, n)| *n)
}

fn check_case(case: &str, fused: bool) {
    check_case_on(&common::gpu(), case, fused);
}

fn check_case_on(gpu: &Gpu, case: &str, fused: bool) {
    let dir = common::fixtures().join("graphs").join(case);
    let model = common::load_model(&dir.join("model.onnx"));
    let session = pollster::block_on(Session::new(gpu, &model, &HashMap::new())).unwrap();
    assert_eq!(
        attention_launches(&session),
        fused as usize,
        "{case}: kernels {:?}",
        session.kernel_counts()
    );
    let outputs = common::run_case(gpu, &model, &HashMap::new(), &dir).unwrap();
    for (name, expected) in common::tensors(&dir, "out_") {
        common::compare(&name, &outputs[&name], &expected, 2e-5)
            .unwrap_or_else(|e| panic!("{case}: {e}"));
    }
}

/// The fused cases on the attention kernel the device does not run by default (the
/// workgroup-memory one where the subgroup kernel is the default, as on llvmpipe).
#[test]
fn fused_attention_matches_onnxruntime_on_the_other_kernel() {
    let gpu = common::gpu();
    match gpu.with_subgroup_kernels(!gpu.subgroup_kernels) {
        Ok(other) => {
            check_case_on(&other, "attention_self", true);
            check_case_on(&other, "attention_cross", true);
        }
        Err(e) => eprintln!("skipped: {e}"),
    }
}

#[test]
fn self_attention_is_fused_and_matches_onnxruntime() {
    check_case("attention_self", true);
}

#[test]
fn cross_attention_over_77_tokens_is_fused_and_matches_onnxruntime() {
    check_case("attention_cross", true);
}

#[test]
fn heads_wider_than_the_kernel_run_unfused_and_match_onnxruntime() {
    check_case("attention_wide_heads", false);
}

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Runs attention_symbolic.onnx on `gpu` over deterministic inputs of [batch, n, d] and
/// checks sampled rows against a direct f64 evaluation; returns the session.
fn check_symbolic(gpu: &Gpu, batch: usize, n: usize, d: usize) -> Session {
    let model = common::load_model(&common::fixtures().join("attention_symbolic.onnx"));
    let dims = HashMap::from([
        ("batch".to_string(), batch),
        ("n".to_string(), n),
        ("d".to_string(), d),
    ]);
    let session = pollster::block_on(Session::new(gpu, &model, &dims)).unwrap();
    let shape = vec![batch, n, d];
    let (q, k, v) = (
        values(batch * n * d, 1),
        values(batch * n * d, 2),
        values(batch * n * d, 3),
    );
    let tensor = |x: &Vec<f32>| HostTensor::f32(shape.clone(), x.clone());
    let out = pollster::block_on(session.run_host(&[
        ("q", &tensor(&q)),
        ("k", &tensor(&k)),
        ("v", &tensor(&v)),
    ]))
    .unwrap();
    let y = out["y"].to_f32();
    for (b, i) in [(0, 0), (batch / 2, n / 3), (batch - 1, n - 1)] {
        let row = |j: usize| (b * n + j) * d;
        let scores: Vec<f64> = (0..n)
            .map(|j| {
                0.35 * (0..d)
                    .map(|c| q[row(i) + c] as f64 * k[row(j) + c] as f64)
                    .sum::<f64>()
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        for c in 0..d {
            let want = (0..n)
                .map(|j| weights[j] * v[row(j) + c] as f64)
                .sum::<f64>()
                / total;
            let got = y[row(i) + c] as f64;
            assert!(
                (got - want).abs() < 1e-5,
                "row {b}/{i} col {c}: {got} vs {want}"
            );
        }
    }
    session
}

/// N = 4096 queries and keys (64x64 latents): the scores of 3 heads alone would be 192 MiB,
/// past lavapipe's 128 MiB binding limit. (This size also caught llvmpipe's loop-iteration
/// guard silently truncating a loop.)
#[test]
fn attention_over_4096_tokens_runs_without_materialising_scores() {
    let (batch, n, d) = (3, 4096, 8);
    let session = check_symbolic(&common::gpu(), batch, n, d);
    let scores_bytes = (batch * n * n * 4) as u64;
    assert!(
        session.memory_bytes < scores_bytes / 100,
        "session holds {} bytes",
        session.memory_bytes
    );
}

/// Heads too wide for the fused kernel (the VAE's single 512-wide head) store their scores;
/// past the binding limit (the VAE's mid block at 768 px on a 128 MiB adapter) the score
/// MatMul, Softmax and weighted sum run in runs of rows. Here: 400 KB of scores, 256 KiB
/// bindings.
#[test]
fn unfused_attention_past_one_binding_runs_in_parts() {
    let gpu = common::gpu();
    let parts = check_symbolic(&gpu.with_binding_limit(256 * 1024), 1, 320, 192);
    let whole = check_symbolic(&gpu, 1, 320, 192);
    assert_eq!(attention_launches(&parts), 0);
    assert!(
        parts.launch_count > whole.launch_count,
        "{} launches in parts, {} whole",
        parts.launch_count,
        whole.launch_count
    );
}
