//! Whole generations against diffusers' torch pipelines with the same weights, seed and
//! parameters (scripts/make_pipeline_fixtures.py): every scheduler, non-square, negative
//! prompt, no guidance, v-prediction, img2img. Max pixel difference <= 3/255.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::collections::HashMap;
use std::rc::Rc;

use bytes::Bytes;
use websd::engine::Gpu;
use websd::image::RgbaImage;
use websd::lora::Lora;
use websd::pipeline::{Control, Request, StableDiffusion};
use websd::scheduler::SchedulerKind;

/// The tiny-sd folder as in-memory files (the path the browser takes), optionally with
/// another scheduler config.
fn model_files(scheduler_config: Option<&str>) -> HashMap<String, Bytes> {
    let root = common::tiny_sd();
    let mut files = HashMap::new();
    for part in std::fs::read_dir(&root).unwrap() {
        let part = part.unwrap().path();
        let entries: Vec<_> = if part.is_dir() {
            std::fs::read_dir(&part)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect()
        } else {
            vec![part]
        };
        for path in entries {
            let key = path
                .strip_prefix(&root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            files.insert(key, Bytes::from(std::fs::read(&path).unwrap()));
        }
    }
    if let Some(config) = scheduler_config {
        files.insert(
            "scheduler/scheduler_config.json".into(),
            Bytes::from(config.to_string()),
        );
    }
    files
}

fn load(gpu: &Gpu, scheduler_config: Option<&str>) -> StableDiffusion {
    pollster::block_on(StableDiffusion::load(
        gpu,
        Rc::new(model_files(scheduler_config)),
        "tiny-sd",
    ))
    .unwrap()
}

fn request(case: &serde_json::Value) -> Request {
    let init = case.get("strength").map(|_| {
        RgbaImage::decode(&std::fs::read(common::fixtures().join("pipeline/init.png")).unwrap())
            .unwrap()
    });
    Request {
        prompt: case["prompt"].as_str().unwrap().into(),
        negative_prompt: case["negative_prompt"].as_str().unwrap().into(),
        steps: case["steps"].as_u64().unwrap() as usize,
        guidance_scale: case["guidance_scale"].as_f64().unwrap(),
        seed: case["seed"].as_u64().unwrap(),
        scheduler: Some(SchedulerKind::parse(case["scheduler"].as_str().unwrap()).unwrap()),
        width: init
            .is_none()
            .then(|| case["width"].as_u64().unwrap() as usize),
        height: init
            .is_none()
            .then(|| case["height"].as_u64().unwrap() as usize),
        strength: case.get("strength").and_then(|s| s.as_f64()).unwrap_or(0.8),
        init_image: init,
        ..Request::default()
    }
}

#[test]
fn every_case_matches_diffusers_within_3_of_255() {
    let gpu = common::gpu();
    let dir = common::fixtures().join("pipeline");
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let v_config = std::fs::read_to_string(dir.join("v_prediction_scheduler_config.json")).unwrap();
    let mut epsilon = load(&gpu, None);
    let mut v_prediction = load(&gpu, Some(&v_config));
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let pipeline = if case.get("v_prediction").is_some() {
            &mut v_prediction
        } else {
            &mut epsilon
        };
        let generated =
            pollster::block_on(pipeline.generate(&request(case), &mut |_| Control::Continue))
                .unwrap();
        let expected =
            RgbaImage::decode(&std::fs::read(dir.join(format!("{name}.png"))).unwrap()).unwrap();
        let diff = common::max_pixel_difference(&generated.image, &expected);
        report.push(format!("{name}: {diff}"));
        if diff > 3 {
            failures.push(format!("{name}: max pixel difference {diff}"));
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn previews_cancel_and_bad_parameters() {
    let gpu = common::gpu();
    let mut pipeline = load(&gpu, None);
    let base = Request {
        prompt: "a cat".into(),
        steps: 4,
        preview_every: 2,
        ..Request::default()
    };

    let mut previews = 0;
    let mut steps = 0;
    pollster::block_on(pipeline.generate(&base, &mut |event| {
        steps += 1;
        previews += event.preview.is_some() as usize;
        Control::Continue
    }))
    .unwrap();
    assert_eq!(
        (steps, previews),
        (5, 3),
        "PNDM runs 5 model evaluations for 4 steps; previews at 0, 2, 4"
    );

    let cancelled = pollster::block_on(pipeline.generate(&base, &mut |event| {
        if event.step == 2 {
            Control::Cancel
        } else {
            Control::Continue
        }
    }));
    assert!(matches!(cancelled, Err(websd::Error::Cancelled)));

    for (bad, words) in [
        (
            Request {
                steps: 0,
                ..base.clone()
            },
            "steps",
        ),
        (
            Request {
                width: Some(15),
                ..base.clone()
            },
            "multiples",
        ),
        (
            Request {
                width: Some(65536),
                height: Some(65536),
                ..base.clone()
            },
            "too large for this GPU",
        ),
        (
            Request {
                guidance_scale: f64::NAN,
                ..base.clone()
            },
            "guidance",
        ),
        (
            Request {
                init_image: Some(RgbaImage {
                    width: 16,
                    height: 16,
                    pixels: vec![0; 1024],
                }),
                strength: 1.5,
                ..base.clone()
            },
            "strength",
        ),
    ] {
        let message = pollster::block_on(pipeline.generate(&bad, &mut |_| Control::Continue))
            .err()
            .unwrap()
            .to_string();
        assert!(message.contains(words), "{message}");
    }
    // Still usable after all of that.
    pollster::block_on(
        pipeline.generate(&Request { steps: 1, ..base }, &mut |_| Control::Continue),
    )
    .unwrap();
}

/// Low-memory mode frees each model after its stage: the same image (bit for bit), at a
/// lower peak of GPU memory, and nothing left on the GPU afterwards; `prepare` reports
/// the peak a generation reaches.
#[test]
fn low_memory_mode_holds_one_model_at_a_time() {
    let gpu = common::gpu();
    let mut pipeline = load(&gpu, None);
    let request = Request {
        prompt: "a red 7 on a blue background".into(),
        steps: 2,
        seed: 7,
        ..Request::default()
    };
    let generate = |pipeline: &mut StableDiffusion| {
        pollster::block_on(pipeline.generate(&request, &mut |_| Control::Continue)).unwrap()
    };
    let all = generate(&mut pipeline);
    pipeline.set_low_memory(true);
    let predicted = pollster::block_on(pipeline.prepare(&request)).unwrap();
    let one = generate(&mut pipeline);
    assert_eq!(common::max_pixel_difference(&one.image, &all.image), 0);
    assert!(
        one.timings.gpu_peak_bytes < all.timings.gpu_peak_bytes,
        "peak {} B one model at a time, {} B all",
        one.timings.gpu_peak_bytes,
        all.timings.gpu_peak_bytes
    );
    assert_eq!(predicted, one.timings.gpu_peak_bytes);
    assert_eq!(pipeline.gpu_memory_bytes(), 0);
}

/// For image-to-image too, `prepare` builds what a generation builds (the VAE encoder
/// included) and reports the peak it reaches, with sessions kept and one at a time.
#[test]
fn prepare_reports_the_peak_of_image_to_image() {
    let gpu = common::gpu();
    let request = Request {
        prompt: "a red 7 on a blue background".into(),
        steps: 2,
        seed: 7,
        init_image: Some(RgbaImage {
            width: 32,
            height: 32,
            pixels: (0..32 * 32 * 4).map(|i| (i * 7 % 251) as u8).collect(),
        }),
        strength: 0.5,
        ..Request::default()
    };
    for low_memory in [false, true] {
        let mut pipeline = load(&gpu, None);
        pipeline.set_low_memory(low_memory);
        let predicted = pollster::block_on(pipeline.prepare(&request)).unwrap();
        let generated =
            pollster::block_on(pipeline.generate(&request, &mut |_| Control::Continue)).unwrap();
        assert_eq!(
            predicted, generated.timings.gpu_peak_bytes,
            "low memory: {low_memory}"
        );
    }
}

#[test]
fn missing_files_are_listed() {
    let gpu = common::gpu();
    let mut files = model_files(None);
    files.remove("unet/model.onnx");
    files.remove("tokenizer/merges.txt");
    let message = pollster::block_on(StableDiffusion::load(&gpu, Rc::new(files), "tiny-sd"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        message.contains("unet/model.onnx") && message.contains("tokenizer/merges.txt"),
        "{message}"
    );
}

/// The native CLI end to end: `websd generate` writes the same picture diffusers made, a
/// preview grid, and a PNG that records the parameters.
#[test]
fn cli_generate_writes_the_image_and_grid() {
    let dir = std::env::temp_dir().join(format!("websd-generate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (out, grid) = (dir.join("out.png"), dir.join("grid.png"));
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_websd"))
        .args([
            "generate",
            "--prompt",
            "a red 7 on a blue background",
            "--steps",
            "4",
            "--seed",
            "9000",
        ])
        .args(["--scheduler", "euler-a", "--preview-every", "2", "--model"])
        .arg(common::tiny_sd())
        .arg("--out")
        .arg(&out)
        .arg("--grid")
        .arg(&grid)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let expected = RgbaImage::decode(
        &std::fs::read(common::fixtures().join("pipeline/txt2img_euler-a.png")).unwrap(),
    )
    .unwrap();
    let png = std::fs::read(&out).unwrap();
    assert!(common::max_pixel_difference(&RgbaImage::decode(&png).unwrap(), &expected) <= 3);
    let reader = png::Decoder::new(std::io::Cursor::new(&png))
        .read_info()
        .unwrap();
    let text: Vec<(String, String)> = reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for (key, value) in [
        ("scheduler", "euler-a"),
        ("seed", "9000"),
        ("steps", "4"),
        ("prompt", "a red 7 on a blue background"),
    ] {
        assert!(
            text.contains(&(key.to_string(), value.to_string())),
            "{key} missing from {text:?}"
        );
    }
    let grid = RgbaImage::decode(&std::fs::read(&grid).unwrap()).unwrap();
    assert_eq!(
        (grid.width, grid.height),
        (16 * 3, 16),
        "previews after steps 1 and 3, then the final image"
    );

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_websd"))
        .args([
            "generate",
            "--prompt",
            "x",
            "--scheduler",
            "heun",
            "--out",
            "x.png",
            "--model",
        ])
        .arg(common::tiny_sd())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown scheduler `heun`"));
    std::fs::remove_dir_all(&dir).ok();
}

/// A prompt outside Latin-1 keeps its image: the PNG carries it in a UTF-8 iTXt chunk.
#[test]
fn cli_unicode_prompt_writes_the_image_with_its_prompt() {
    let dir = std::env::temp_dir().join(format!("websd-unicode-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out.png");
    let prompt = "東京の夜景 🌃, ночь";
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_websd"))
        .args(["generate", "--prompt", prompt, "--steps", "1", "--model"])
        .arg(common::tiny_sd())
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let png = std::fs::read(&out).unwrap();
    let reader = png::Decoder::new(std::io::Cursor::new(&png))
        .read_info()
        .unwrap();
    let prompts: Vec<String> = reader
        .info()
        .utf8_text
        .iter()
        .filter(|t| t.keyword == "prompt")
        .map(|t| t.get_text().unwrap())
        .collect();
    assert_eq!(prompts, [prompt]);
    std::fs::remove_dir_all(&dir).ok();
}

/// Metadata never costs the picture: a chunk PNG cannot carry is left out with a warning.
#[test]
fn png_metadata_that_cannot_be_written_is_left_out() {
    let image = RgbaImage {
        width: 2,
        height: 1,
        pixels: vec![255; 8],
    };
    let png = image
        .to_png(&[("", "x".into()), ("seed", "7".into())])
        .unwrap();
    assert_eq!(RgbaImage::decode(&png.bytes).unwrap(), image);
    assert!(png.warnings[0].contains("left out"), "{:?}", png.warnings);
}

/// A guidance-distilled UNet (`timestep_cond`: the guidance scale is an input) runs one pass
/// per step and matches diffusers' LatentConsistencyModelPipeline.
#[test]
fn guidance_distilled_unet_matches_diffusers() {
    let dir = common::fixtures().join("pipeline/guidance-distilled");
    let mut files = model_files(Some(
        &std::fs::read_to_string(dir.join("scheduler_config.json")).unwrap(),
    ));
    for name in ["model.onnx", "config.json"] {
        files.insert(
            format!("unet/{name}"),
            Bytes::from(std::fs::read(dir.join(name)).unwrap()),
        );
    }
    let gpu = common::gpu();
    let mut pipeline =
        pollster::block_on(StableDiffusion::load(&gpu, Rc::new(files), "tiny-lcm")).unwrap();
    assert_eq!(pipeline.config.time_cond_proj_dim, Some(8));
    let request = Request {
        prompt: "a red 7 on a blue background".into(),
        steps: 4,
        guidance_scale: 8.5,
        seed: 21,
        ..Request::default()
    };
    let mut steps = 0;
    let generated = pollster::block_on(pipeline.generate(&request, &mut |_| {
        steps += 1;
        Control::Continue
    }))
    .unwrap();
    assert_eq!(steps, 4);
    let expected =
        RgbaImage::decode(&std::fs::read(dir.join("lcm_4_steps_w8.5_seed21.png")).unwrap())
            .unwrap();
    let diff = common::max_pixel_difference(&generated.image, &expected);
    assert!(diff <= 3, "max pixel difference {diff}");
}

/// A lost device fails the generation with an error, not a panic.
#[test]
fn lost_device_fails_generation_cleanly() {
    let gpu = common::gpu();
    let mut pipeline = load(&gpu, None);
    gpu.device.destroy();
    let request = Request {
        prompt: "a cat".into(),
        steps: 2,
        ..Request::default()
    };
    let error = pollster::block_on(pipeline.generate(&request, &mut |_| Control::Continue))
        .err()
        .expect("an error");
    assert!(matches!(error, websd::Error::Engine(_)), "{error}");
}

/// A peft LoRA (`unet.*.lora_A/B`) at strength 0.7: diffusers' `load_lora_weights` with
/// `cross_attention_kwargs={"scale": 0.7}` gives the same image; detaching restores the
/// plain model's bit for bit.
#[test]
fn lora_matches_diffusers() {
    let lora = read_lora_fixture("grads/tiny_unet_lora/initial.safetensors", 0.7);
    assert!(lora.text_encoder.is_empty());
    lora_draws("lora_euler_scale0.7_seed12.png", &lora);
}

/// A kohya LoRA (`lora_unet_*`/`lora_te_*`, fp16, per-layer alpha) on the UNet's attention,
/// feed-forwards, 1x1 and 3x3 convolutions and on the text encoder, as diffusers loads it.
#[test]
fn kohya_lora_matches_diffusers() {
    let lora = read_lora_fixture("pipeline/kohya_lora.safetensors", 0.8);
    assert_eq!((lora.unet.len(), lora.text_encoder.len()), (49, 12));
    lora_draws("kohya_lora_euler_scale0.8_seed12.png", &lora);
}

fn read_lora_fixture(path: &str, strength: f32) -> Lora {
    let bytes = std::fs::read(common::fixtures().join(path)).unwrap();
    websd::lora::read_lora(path, &bytes, strength).unwrap()
}

/// `lora` on the tiny SD draws diffusers' `expected` picture (Euler, 4 steps, seed 12).
fn lora_draws(expected: &str, lora: &Lora) {
    let gpu = common::gpu();
    let mut sd = load(&gpu, None);
    let request = Request {
        prompt: "a red 7 on a blue background".into(),
        steps: 4,
        guidance_scale: 7.5,
        seed: 12,
        scheduler: Some(SchedulerKind::parse("euler").unwrap()),
        width: Some(16),
        height: Some(16),
        ..Request::default()
    };
    let plain = pollster::block_on(sd.generate(&request, &mut |_| Control::Continue)).unwrap();
    sd.set_lora(lora).unwrap();
    let adapted = pollster::block_on(sd.generate(&request, &mut |_| Control::Continue)).unwrap();
    let dir = common::fixtures().join("pipeline");
    let expected = RgbaImage::decode(&std::fs::read(dir.join(expected)).unwrap()).unwrap();
    let diff = common::max_pixel_difference(&adapted.image, &expected);
    assert!(diff <= 3, "max pixel difference {diff}");
    assert!(
        common::max_pixel_difference(&plain.image, &expected) > 3,
        "the LoRA changes the image"
    );
    sd.set_lora(&Lora::default()).unwrap();
    let again = pollster::block_on(sd.generate(&request, &mut |_| Control::Continue)).unwrap();
    assert_eq!(again.image.pixels, plain.image.pixels);
}
