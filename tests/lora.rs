//! LoRA: a diffusers/peft LoRA file loads onto the tiny SD UNet, trains on the GPU as torch
//! trains it (scripts/make_grad_fixtures.py), and saves back in the same layout.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::collections::HashMap;

use websd::engine::{
    AdamW, GpuTensor, HostTensor, LoraAdapter, Model, Objective, Session, grad_name,
    lora_input_names,
};
use websd::lora::{read_unet_lora, write_unet_lora};
use websd::train::LoraTrainer;

fn lora_fixture(file: &str) -> Vec<LoraAdapter> {
    let path = common::fixtures().join("grads/tiny_unet_lora").join(file);
    read_unet_lora(file, &std::fs::read(path).unwrap(), 1.0).unwrap()
}

/// The largest difference between two sets of adapters' weights.
fn largest_difference(a: &[LoraAdapter], b: &[LoraAdapter]) -> f32 {
    let mut worst = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.module, y.module);
        let ((xa, xb), (ya, yb)) = (weights(x), weights(y));
        for (p, q) in [(xa, ya), (xb, yb)] {
            for (u, v) in p.to_f32().iter().zip(q.to_f32().iter()) {
                worst = worst.max((u - v).abs());
            }
        }
    }
    worst
}

/// The tiny UNet, its inputs and target (tests/fixtures/grads/tiny_unet) and the peft
/// LoRA torch trained from them.
fn tiny_unet_case() -> (
    Model,
    HashMap<String, HostTensor>,
    HostTensor,
    Vec<LoraAdapter>,
) {
    let model = common::load_model(&common::tiny_sd().join("unet/model.onnx"));
    let dir = common::fixtures().join("grads/tiny_unet");
    let inputs = common::tensors(&dir, "in_");
    let target = common::tensors(&dir, "target").remove("").unwrap();
    (model, inputs, target, lora_fixture("initial.safetensors"))
}

fn weights(adapter: &LoraAdapter) -> (&HostTensor, &HostTensor) {
    let (a, b) = adapter.weights.as_ref().unwrap();
    (a, b)
}

#[test]
fn lora_training_matches_torch_and_saves_as_diffusers_does() {
    let gpu = common::gpu();
    let (model, inputs, target, initial) = tiny_unet_case();
    assert_eq!(
        initial.len(),
        32,
        "4 projections x 2 attentions x 4 transformer blocks"
    );
    assert!(initial.iter().all(|a| a.rank == 2 && a.scale == 2.0));

    let shapes: Vec<(&str, &[usize])> = inputs
        .iter()
        .map(|(n, t)| (n.as_str(), t.shape.as_slice()))
        .collect();
    let dims = model.dims_for_shapes(&shapes).unwrap();
    let config = AdamW {
        lr: 1e-2,
        max_grad_norm: Some(1.0),
        ..AdamW::default()
    };
    let mut trainer = pollster::block_on(LoraTrainer::new(
        &gpu,
        &model,
        &initial,
        "out_sample",
        &dims,
        config,
    ))
    .unwrap();
    let uploaded: Vec<(String, GpuTensor)> = inputs
        .iter()
        .map(|(n, t)| (n.clone(), GpuTensor::from_host(&gpu, t)))
        .collect();
    let feeds: Vec<(&str, &GpuTensor)> = uploaded.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let target = GpuTensor::from_host(&gpu, &target);
    let torch_losses = common::tensors(&common::fixtures().join("grads/tiny_unet_lora"), "losses")
        .remove("")
        .unwrap()
        .to_f32()
        .into_owned();
    for (step, expected) in torch_losses.iter().enumerate() {
        let loss = pollster::block_on(trainer.step(&feeds, &target)).unwrap();
        assert!(
            (loss - expected).abs() < 1e-5 * expected,
            "step {step}: loss {loss}, torch {expected}"
        );
    }
    assert!(torch_losses[2] < torch_losses[0], "the loss goes down");

    // Adam moves each weight by about the learning rate per step whatever its gradient's
    // size, so where a gradient is near zero, float32 rounding in it shows in the update.
    // The reference is the same training in float64; websd's float32 result must land as
    // close to it as torch's own float32 training does (measured: 2.8e-4 against torch's
    // 1.4e-4, for movements of up to 3e-2; the test allows three times torch's).
    let trained = pollster::block_on(trainer.adapters()).unwrap();
    let exact = lora_fixture("trained_f64.safetensors");
    let (ours, torch32) = (
        largest_difference(&trained, &exact),
        largest_difference(&lora_fixture("trained.safetensors"), &exact),
    );
    eprintln!("trained LoRA vs float64 training: websd {ours:e}, torch float32 {torch32:e}");
    assert!(
        ours <= 2.0 * torch32,
        "websd {ours}, torch float32 {torch32}"
    );

    // Saved and read back: the same adapters.
    let saved = write_unet_lora(&trained).unwrap();
    let back = read_unet_lora("saved", &saved, 1.0).unwrap();
    for (ours, again) in trained.iter().zip(&back) {
        assert_eq!(
            (ours.module.as_str(), ours.rank, ours.scale),
            (again.module.as_str(), again.rank, again.scale)
        );
        assert_eq!(weights(ours).0.to_f32(), weights(again).0.to_f32());
        assert_eq!(weights(ours).1.to_f32(), weights(again).1.to_f32());
    }
}

/// Adapters with zero B leave the model's output unchanged; a loaded adapter changes it.
#[test]
fn adapters_attach_where_their_modules_are() {
    let gpu = common::gpu();
    let model = common::load_model(&common::tiny_sd().join("unet/model.onnx"));
    let layers = model.adaptable_layers();
    assert!(
        layers
            .iter()
            .any(|l| l.module == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    );
    let dir = common::fixtures().join("tiny-sd-io/unet");
    let inputs = common::tensors(&dir, "in_");
    let feeds: Vec<(&str, &HostTensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let shapes: Vec<(&str, &[usize])> = inputs
        .iter()
        .map(|(n, t)| (n.as_str(), t.shape.as_slice()))
        .collect();
    let dims = model.dims_for_shapes(&shapes).unwrap();
    let run = |adapters: &[LoraAdapter]| {
        let adapted = model.with_lora(adapters).unwrap();
        let session = pollster::block_on(Session::new(&gpu, &adapted, &dims)).unwrap();
        pollster::block_on(session.run_host(&feeds)).unwrap()["out_sample"].clone()
    };
    let plain = common::tensors(&dir, "out_").remove("out_sample").unwrap();
    let fresh = websd::train::fresh_adapters(&layers, 4, 4.0, 1);
    let same = run(&fresh);
    common::compare("zero-B adapters", &same, &plain, 1e-5).unwrap();
    let changed = run(&lora_fixture("initial.safetensors"));
    assert!(common::compare("loaded adapters", &changed, &plain, 1e-3).is_err());
}

/// The loss's gradients with respect to every LoRA factor, against torch autograd through
/// peft's layers in float64 (torch's own float32 gradients differ from those by up to 9e-5
/// of a tensor's scale here; the test allows websd 1e-4).
#[test]
fn lora_gradients_match_torch_autograd() {
    let gpu = common::gpu();
    let (model, inputs, target, initial) = tiny_unet_case();
    let trainable: Vec<LoraAdapter> = initial
        .iter()
        .map(|a| LoraAdapter {
            weights: None,
            ..a.clone()
        })
        .collect();
    let mut wrt = Vec::new();
    let mut feeds: Vec<(String, HostTensor)> = inputs.into_iter().collect();
    for adapter in &initial {
        let (name_a, name_b) = lora_input_names(&adapter.module);
        let (a, b) = weights(adapter);
        feeds.push((name_a.clone(), a.clone()));
        feeds.push((name_b.clone(), b.clone()));
        wrt.extend([name_a, name_b]);
    }
    feeds.push(("target".into(), target));
    let trained = model
        .with_lora(&trainable)
        .unwrap()
        .with_objective(Objective {
            output: "out_sample".into(),
            target: "target".into(),
            wrt,
        })
        .unwrap();
    let shapes: Vec<(&str, &[usize])> = feeds
        .iter()
        .filter(|(n, _)| n == "sample" || n == "encoder_hidden_states")
        .map(|(n, t)| (n.as_str(), t.shape.as_slice()))
        .collect();
    let dims = model.dims_for_shapes(&shapes).unwrap();
    let session = pollster::block_on(Session::new(&gpu, &trained, &dims)).unwrap();
    let refs: Vec<(&str, &HostTensor)> = feeds.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let out = pollster::block_on(session.run_host(&refs)).unwrap();
    let path = common::fixtures().join("grads/tiny_unet_lora/first_grads_f64.safetensors");
    let torch = websd::safetensors::read(&std::fs::read(path).unwrap()).unwrap();
    let mut worst = 0.0f32;
    for adapter in &initial {
        for (factor, name) in ["lora_A", "lora_B"]
            .iter()
            .zip(<[String; 2]>::from(lora_input_names(&adapter.module)))
        {
            let expected = &torch.tensors[&format!("{}.{factor}.default.weight", adapter.module)];
            let actual = &out[&grad_name(&name)];
            // torch's layout is [out, in]; ours [in, out].
            let (rows, cols) = (actual.shape[0], actual.shape[1]);
            let (a, e) = (actual.to_f32(), expected.to_f32());
            let scale = e.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let mut tensor_worst = 0.0f32;
            for r in 0..rows {
                for c in 0..cols {
                    let diff = (a[r * cols + c] - e[c * rows + r]).abs();
                    tensor_worst = tensor_worst.max(diff / scale);
                }
            }
            assert!(
                tensor_worst <= 1e-4,
                "{name}: {tensor_worst:e} of its scale"
            );
            worst = worst.max(tensor_worst);
        }
    }
    eprintln!("LoRA gradients: worst {worst:.1e} of scale");
}

/// peft's per-module `alpha_pattern` overrides `lora_alpha` for the modules whose path ends
/// with its key; text-encoder layers are read apart from the UNet's; a layer the model does
/// not have is refused by name when attached.
#[test]
fn alpha_patterns_components_and_unknown_layers() {
    let factor =
        |shape: &[usize]| HostTensor::f32(shape.to_vec(), vec![0.5; shape.iter().product()]);
    let mut file = websd::safetensors::SafeTensors::default();
    for stem in [
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    ] {
        file.tensors
            .insert(format!("{stem}.lora_A.weight"), factor(&[2, 16]));
        file.tensors
            .insert(format!("{stem}.lora_B.weight"), factor(&[16, 2]));
    }
    let metadata = serde_json::json!({
        "unet.lora_alpha": 4,
        "unet.alpha_pattern": {"attn1.to_q": 8},
        "text_encoder.lora_alpha": 1,
    });
    file.metadata
        .insert("lora_adapter_metadata".into(), metadata.to_string());
    let lora = websd::lora::read_lora("patterns", &websd::safetensors::write(&file), 0.5).unwrap();
    let scales: Vec<(&str, f32)> = lora
        .unet
        .iter()
        .map(|a| (a.module.rsplit('.').next().unwrap(), a.scale))
        .collect();
    assert_eq!(
        scales,
        [("to_k", 4.0 / 2.0 * 0.5), ("to_q", 8.0 / 2.0 * 0.5)]
    );
    assert_eq!(lora.text_encoder.len(), 1);
    assert_eq!(lora.text_encoder[0].scale, 1.0 / 2.0 * 0.5);

    let model = common::load_model(&common::tiny_sd().join("unet/model.onnx"));
    let mut stray = lora.unet.clone();
    stray[0].module = "lora_unet_mid_block_attentions_9_proj_out".into();
    let error = websd::lora::Lora::resolve(&stray, &model.adaptable_layers(), "UNet")
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("mid_block_attentions_9_proj_out") && error.contains("UNet"),
        "{error}"
    );
}
