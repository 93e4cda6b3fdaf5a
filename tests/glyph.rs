//! The bundled glyph models (onnx/glyph-sd*, trained by scripts/train_glyph_sd.py):
//! websd draws the same pictures as diffusers from the committed weights
//! (scripts/make_glyph_fixtures.py), and the benchmark, run through websd's own engine on
//! the first prompts, reproduces the recorded run (`websd eval --results
//! onnx/glyph-benchmark/results.json`) whose accuracies README reports.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use websd::engine::Gpu;
use websd::eval::Benchmark;
use websd::image::RgbaImage;
use websd::model::Directory;
use websd::pipeline::{Control, Request, StableDiffusion};

fn onnx_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx")
}

fn load(gpu: &Gpu, model: &str) -> StableDiffusion {
    let folder = onnx_dir().join(model);
    pollster::block_on(StableDiffusion::load(
        gpu,
        Rc::new(Directory(folder)),
        model,
    ))
    .unwrap()
}

#[test]
fn glyph_models_match_diffusers_within_3_of_255() {
    let gpu = common::gpu();
    let dir = common::fixtures().join("glyph");
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let mut failures = Vec::new();
    // Several cases share a model: each is loaded once.
    let mut loaded = HashMap::new();
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let model = case["model"].as_str().unwrap();
        let pipeline = loaded.entry(model).or_insert_with(|| load(&gpu, model));
        let request = Request {
            prompt: case["prompt"].as_str().unwrap().into(),
            negative_prompt: case["negative_prompt"].as_str().unwrap().into(),
            steps: case["steps"].as_u64().unwrap() as usize,
            guidance_scale: case["guidance_scale"].as_f64().unwrap(),
            seed: case["seed"].as_u64().unwrap(),
            ..Request::default()
        };
        let generated =
            pollster::block_on(pipeline.generate(&request, &mut |_| Control::Continue)).unwrap();
        let expected =
            RgbaImage::decode(&std::fs::read(dir.join(format!("{name}.png"))).unwrap()).unwrap();
        assert_eq!((generated.image.width, generated.image.height), (32, 32));
        let diff = common::max_pixel_difference(&generated.image, &expected);
        eprintln!("{name}: max pixel difference {diff}");
        if diff > 3 {
            failures.push(format!("{name}: max pixel difference {diff}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Each model on the first prompts: the classifier reads (nearly) the same classes as in the
/// recorded run, and every attribute's accuracy is within three binomial standard
/// deviations of the recorded run's (which README shows).
#[test]
fn benchmark_reproduces_the_reported_accuracy() {
    let gpu = common::gpu();
    let bench_dir = onnx_dir().join("glyph-benchmark");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bench_dir.join("results.json")).unwrap())
            .unwrap();
    let readme = std::fs::read_to_string(onnx_dir().join("../README.md")).unwrap();
    let mut benchmark = pollster::block_on(Benchmark::load(Rc::new(Directory(bench_dir)))).unwrap();
    let mut failures = Vec::new();
    for recorded in results.as_array().unwrap() {
        let model = recorded["model"].as_str().unwrap();
        let steps = recorded["steps"].as_u64().unwrap() as usize;
        // The 50-step teacher costs 12x a 4-step student on a software GPU.
        let prompts = if steps > 10 { 6 } else { 16 };
        let mut pipeline = load(&gpu, model);
        let base = Request {
            steps,
            guidance_scale: recorded["guidance_scale"].as_f64().unwrap(),
            ..Request::default()
        };
        let mut same = 0;
        let mut read = 0;
        let report = pollster::block_on(benchmark.run(&mut pipeline, &base, prompts, &mut |o| {
            let expected = &recorded["reads"][read];
            same += o
                .read
                .iter()
                .enumerate()
                .filter(|(k, (_, class, _))| expected[k] == class.as_str())
                .count();
            read += 1;
        }))
        .unwrap();
        let attributes = report.accuracy.len();
        if same * 10 < prompts * attributes * 9 {
            failures.push(format!(
                "{model}: {same} of {} readings as recorded",
                prompts * attributes
            ));
        }
        for (attribute, measured) in &report.accuracy {
            let full = recorded["accuracy"][attribute].as_f64().unwrap();
            let sigma = (full * (1.0 - full) / prompts as f64).sqrt().max(0.02);
            eprintln!(
                "{model} {attribute}: {measured:.3} on {prompts} prompts, {full:.3} recorded"
            );
            if (measured - full).abs() > 3.0 * sigma {
                failures.push(format!("{model} {attribute}: {measured:.3} vs {full:.3}"));
            }
            let shown = format!("{:.1}%", full * 100.0);
            if !readme.contains(&shown) {
                failures.push(format!(
                    "README does not show {model}'s {attribute} {shown}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
