//! Imagic on Glyph SD: a short edit optimised by websd reproduces the torch reference
//! (scripts/imagic_reference.py: same image, seed, steps; torch autograd, diffusers' UNet
//! and noise schedule, peft's LoRA), and edit files round-trip.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::path::Path;
use std::rc::Rc;

use websd::engine::HostTensor;
use websd::image::RgbaImage;
use websd::lora::Lora;
use websd::model::Directory;
use websd::pipeline::{
    Control, Edit, EditProgress, EditStage, Request, StableDiffusion, TuneLayers,
};
use websd::scheduler::SchedulerKind;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(common::fixtures().join("imagic").join(name)).unwrap()
}

fn largest_difference(a: &HostTensor, b: &HostTensor) -> f32 {
    assert_eq!(a.shape, b.shape);
    let (a, b) = (a.to_f32(), b.to_f32());
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn glyph_sd() -> StableDiffusion {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/glyph-sd");
    let files = Rc::new(Directory(folder));
    pollster::block_on(StableDiffusion::load(&common::gpu(), files, "glyph-sd")).unwrap()
}

/// Optimises the torch reference's edit (`edit{suffix}.safetensors`, its settings and
/// source) and checks every step's loss, both embeddings and the LoRA against torch's.
fn edit_matches_torch(pipeline: &mut StableDiffusion, suffix: &str) -> Edit {
    let name = format!("edit{suffix}.safetensors");
    let reference = Edit::from_bytes(&name, &fixture(&name)).unwrap();
    let losses = websd::npy::read(&fixture(&format!("losses{suffix}.npy"))).unwrap();
    let image = RgbaImage::decode(&fixture("source.png")).unwrap();

    let mut progress: Vec<EditProgress> = Vec::new();
    let mut on_step = |p: EditProgress| {
        progress.push(p);
        Control::Continue
    };
    let edit =
        pollster::block_on(pipeline.optimize_edit(&image, &reference.settings, &mut on_step))
            .unwrap();

    // Every step's loss, stage A then stage B, as torch computed it.
    let stages: Vec<EditStage> = progress.iter().map(|p| p.stage).collect();
    let settings = &reference.settings;
    assert_eq!(
        stages,
        [
            vec![EditStage::Embedding; settings.embed_steps],
            vec![EditStage::Tuning; settings.tune_steps]
        ]
        .concat()
    );
    for (p, expected) in progress.iter().zip(losses.to_f32().iter()) {
        assert!(
            (p.loss - expected).abs() <= 1e-4 * expected.max(1.0),
            "{:?} step {}: loss {} vs torch {expected}",
            p.stage,
            p.step,
            p.loss
        );
    }
    // The embeddings move by up to embed_lr per step; the two agree far within that.
    let target_error = largest_difference(&edit.target, &reference.target);
    assert!(
        target_error < 1e-4,
        "target embedding off by {target_error}"
    );
    let moved = largest_difference(&reference.optimized, &reference.target);
    let error = largest_difference(&edit.optimized, &reference.optimized);
    eprintln!("optimised embedding off by {error} (it moved {moved})");
    assert!(
        moved > 1e-2,
        "the reference embedding barely moved ({moved})"
    );
    assert!(
        error < 1e-3 * moved.max(1.0),
        "optimised embedding off by {error} (moved {moved})"
    );
    assert_eq!(edit.lora.len(), reference.lora.len());
    let mut lora_error = 0.0f32;
    for ours in &edit.lora {
        let theirs = reference.lora.iter().find(|l| l.module == ours.module);
        let theirs = theirs.unwrap_or_else(|| panic!("{} not in the reference", ours.module));
        assert_eq!(ours.scale, theirs.scale);
        let (oa, ob) = ours.weights.as_ref().unwrap();
        let (ta, tb) = theirs.weights.as_ref().unwrap();
        for (o, t, what) in [(oa, ta, "A"), (ob, tb, "B")] {
            let error = largest_difference(o, t);
            lora_error = lora_error.max(error);
            assert!(error < 1e-4, "{} {what} off by {error}", ours.module);
        }
    }

    eprintln!("LoRA weights off by {lora_error}");
    edit
}

#[test]
fn glyph_edit_matches_the_torch_reference_and_round_trips() {
    let mut pipeline = glyph_sd();
    let edit = edit_matches_torch(&mut pipeline, "");
    let settings = &edit.settings;

    // The file round-trips, and draws the same picture as the edit it came from.
    let read = Edit::from_bytes("ours", &edit.to_bytes().unwrap()).unwrap();
    assert_eq!(largest_difference(&read.optimized, &edit.optimized), 0.0);
    assert_eq!(read.settings.prompt, settings.prompt);
    let request = |edit: &Edit| Request {
        prompt_embeds: Some(edit.embedding(0.7)),
        steps: 4,
        seed: 1,
        ..Request::default()
    };
    let mut draw = |edit: &Edit| {
        pipeline.set_lora(&Lora::unet(edit.lora.clone())).unwrap();
        let mut on_step = |_: websd::pipeline::StepEvent| Control::Continue;
        pollster::block_on(pipeline.generate(&request(edit), &mut on_step))
            .unwrap()
            .image
    };
    let (a, b) = (draw(&edit), draw(&read));
    assert_eq!(common::max_pixel_difference(&a, &b), 0);
}

/// Stage C started from the picture noised to strength 0.5 (as image-to-image starts)
/// draws torch's picture of the same edit; from noise, the edit draws another.
#[test]
fn edit_drawn_from_the_picture_matches_torch() {
    let mut pipeline = glyph_sd();
    let edit = Edit::from_bytes("edit.safetensors", &fixture("edit.safetensors")).unwrap();
    let source = RgbaImage::decode(&fixture("source.png")).unwrap();
    let expected = RgbaImage::decode(&fixture("start.png")).unwrap();
    pipeline.set_lora(&Lora::unet(edit.lora.clone())).unwrap();
    let base = Request {
        steps: 4,
        guidance_scale: 7.5,
        scheduler: Some(SchedulerKind::Ddim),
        ..Request::default()
    };
    let mut draw = |strength: f64| {
        let request = pipeline
            .edit_request(&edit, 0.7, Some(&source), strength, &base)
            .unwrap();
        let mut on_step = |_: websd::pipeline::StepEvent| Control::Continue;
        pollster::block_on(pipeline.generate(&request, &mut on_step))
            .unwrap()
            .image
    };
    let diff = common::max_pixel_difference(&draw(0.5), &expected);
    eprintln!("from the picture: max pixel difference {diff} from torch's");
    assert!(
        diff <= 3,
        "max pixel difference {diff} from torch's picture"
    );
    let diff = common::max_pixel_difference(&draw(1.0), &expected);
    assert!(diff > 20, "from noise: max pixel difference only {diff}");

    let error = pipeline
        .edit_request(&edit, 0.7, None, 0.5, &base)
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("needs the edited picture"), "{error}");
}

#[test]
fn edits_refuse_bad_settings_and_files() {
    let mut pipeline = glyph_sd();
    let image = RgbaImage::decode(&fixture("source.png")).unwrap();
    let mut settings = Edit::from_bytes("edit", &fixture("edit.safetensors"))
        .unwrap()
        .settings;
    settings.embed_lr = -1.0;
    let mut on_step = |_: EditProgress| Control::Continue;
    let error = pollster::block_on(pipeline.optimize_edit(&image, &settings, &mut on_step))
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("learning rates must be positive"), "{error}");

    let lora =
        std::fs::read(common::fixtures().join("grads/tiny_unet_lora/initial.safetensors")).unwrap();
    let error = Edit::from_bytes("style.safetensors", &lora)
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("not an edit file"), "{error}");

    // Cancelling stops at the step it is asked to.
    settings.embed_lr = 1e-2;
    let mut steps = 0;
    let mut cancel_second = |_: EditProgress| {
        steps += 1;
        if steps == 2 {
            Control::Cancel
        } else {
            Control::Continue
        }
    };
    let result = pollster::block_on(pipeline.optimize_edit(&image, &settings, &mut cancel_second));
    assert!(matches!(result, Err(websd::error::Error::Cancelled)));
    assert_eq!(steps, 2);
}

/// Stage B on every layer (`TuneLayers::All`): LoCon factors on the convolutions too,
/// as torch's peft trains them, and the edit file keeps them as they were.
#[test]
fn every_layer_edit_matches_the_torch_reference_and_round_trips() {
    let mut pipeline = glyph_sd();
    let edit = edit_matches_torch(&mut pipeline, "_all");
    assert_eq!(edit.settings.tune_layers, TuneLayers::All);
    let convolutions = edit
        .lora
        .iter()
        .filter(|a| a.weights.as_ref().unwrap().0.shape.len() == 4)
        .count();
    assert!(convolutions > 10, "{convolutions} convolution adapters");
    let read = Edit::from_bytes("ours", &edit.to_bytes().unwrap()).unwrap();
    assert_eq!(read.settings.tune_layers, TuneLayers::All);
    assert_eq!(read.lora.len(), edit.lora.len());
    for ours in &edit.lora {
        let back = read.lora.iter().find(|a| a.module == ours.module).unwrap();
        let ((a, b), (a2, b2)) = (
            ours.weights.as_ref().unwrap(),
            back.weights.as_ref().unwrap(),
        );
        assert_eq!((&a.shape, &b.shape), (&a2.shape, &b2.shape));
        assert_eq!(largest_difference(a, a2) + largest_difference(b, b2), 0.0);
    }
}
