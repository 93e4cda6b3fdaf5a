//! Gradients of a mean-squared-error loss through the engine's backward pass against torch
//! autograd (tests/fixtures/grads, written by scripts/make_grad_fixtures.py).
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::collections::HashMap;
use std::path::Path;

use websd::engine::{
    AdamW, GpuTensor, GraphBuilder, HostTensor, LOSS, Model, Objective, Optimizer, Session,
    grad_name,
};

/// Within 1e-4 of each gradient's own scale (its largest magnitude).
fn compare_scaled(name: &str, actual: &HostTensor, expected: &HostTensor) -> Result<f32, String> {
    let scale = expected.to_f32().iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if actual.shape != expected.shape {
        return Err(format!(
            "{name}: shape {:?}, expected {:?}",
            actual.shape, expected.shape
        ));
    }
    let worst = actual
        .to_f32()
        .iter()
        .zip(expected.to_f32().iter())
        .map(|(a, e)| (a - e).abs())
        .fold(0.0f32, f32::max);
    if worst.is_nan() || worst > 1e-4 * scale.max(1e-6) {
        return Err(format!("{name}: max |diff| {worst:e}, scale {scale:e}"));
    }
    Ok(worst / scale.max(1e-6))
}

/// Runs a case's model trained towards its target; returns the worst relative difference.
fn matches_torch(model: &Model, output: &str, dir: &Path) -> Result<f32, String> {
    let gpu = common::gpu();
    let inputs = common::tensors(dir, "in_");
    let expected = common::tensors(dir, "grad_");
    let mut wrt: Vec<String> = expected.keys().cloned().collect();
    wrt.sort();
    let objective = Objective {
        output: output.into(),
        target: "target".into(),
        wrt: wrt.clone(),
    };
    let trained = model.with_objective(objective).map_err(|e| e.to_string())?;
    let shapes: Vec<(&str, &[usize])> = inputs
        .iter()
        .map(|(n, t)| (n.as_str(), t.shape.as_slice()))
        .collect();
    let dims = model.dims_for_shapes(&shapes).map_err(|e| e.to_string())?;
    let session =
        pollster::block_on(Session::new(&gpu, &trained, &dims)).map_err(|e| e.to_string())?;
    let target = common::tensors(dir, "target").remove("").unwrap();
    let mut feeds: Vec<(&str, &HostTensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    feeds.push(("target", &target));
    let out = pollster::block_on(session.run_host(&feeds)).map_err(|e| e.to_string())?;
    let loss = common::tensors(dir, "loss").remove("").unwrap();
    let mut worst = compare_scaled(LOSS, &out[LOSS], &loss)?;
    for name in &wrt {
        let grad = out
            .get(&grad_name(name))
            .ok_or(format!("no gradient for {name}"))?;
        worst = worst.max(compare_scaled(name, grad, &expected[name])?);
    }
    Ok(worst)
}

#[test]
fn every_gradient_case_matches_torch_autograd() {
    let mut dirs: Vec<_> = std::fs::read_dir(common::fixtures().join("grads"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|d| d.join("model.onnx").exists())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 10,
        "fixtures missing: run scripts/make_grad_fixtures.py"
    );
    let mut failures = Vec::new();
    for dir in dirs {
        let case = dir.file_name().unwrap().to_string_lossy().to_string();
        let model = common::load_model(&dir.join("model.onnx"));
        match matches_torch(&model, "out", &dir) {
            Ok(worst) => eprintln!("{case}: worst {worst:.1e} of scale"),
            Err(e) => failures.push(format!("{case}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The tiny SD UNet (optimum export): gradients with respect to the latents and the text
/// embeddings, as Imagic's first stage needs them.
#[test]
fn tiny_unet_gradients_match_torch_autograd() {
    let model = common::load_model(&common::tiny_sd().join("unet/model.onnx"));
    let dir = common::fixtures().join("grads/tiny_unet");
    let worst = matches_torch(&model, "out_sample", &dir).unwrap();
    eprintln!("tiny UNet: worst {worst:.1e} of scale");
}

/// Finite differences on a chain no fixture covers as a whole: a strided, padded Conv, a
/// SiLU and a Resize, differentiated by its weight (an initializer made trainable).
#[test]
fn weight_gradient_matches_finite_differences() {
    let noise = |n: usize, seed: u64| websd::bench::noise(n, seed, 1.0);
    let model = GraphBuilder::new(14)
        .input("x", &[1, 2, 5, 6])
        .weight("w", &[3, 2, 3, 3], &noise(54, 1))
        .node(
            "Conv",
            &["x", "w"],
            &["c"],
            &[
                ("strides", websd::engine::Attr::Ints(vec![2, 2])),
                ("pads", websd::engine::Attr::Ints(vec![1, 0, 1, 1])),
            ],
        )
        .node("Sigmoid", &["c"], &["s"], &[])
        .node("Mul", &["c", "s"], &["y"], &[])
        .output("y")
        .build()
        .unwrap();
    let w0 = pollster::block_on(model.initializer("w")).unwrap();
    let trained = model
        .with_objective(Objective {
            output: "y".into(),
            target: "t".into(),
            wrt: vec!["w".into()],
        })
        .unwrap();
    let gpu = common::gpu();
    let session = pollster::block_on(Session::new(&gpu, &trained, &HashMap::new())).unwrap();
    let x = HostTensor::f32(vec![1, 2, 5, 6], noise(60, 2));
    let t = HostTensor::f32(vec![1, 3, 3, 3], noise(27, 3));
    let run = |w: &HostTensor| {
        let out = pollster::block_on(session.run_host(&[("x", &x), ("w", w), ("t", &t)])).unwrap();
        (out[LOSS].to_f32()[0], out[&grad_name("w")].clone())
    };
    let (_, grad) = run(&w0);
    let grad = grad.to_f32();
    let h = 1e-2f32;
    for i in [0, 7, 20, 53] {
        let shifted = |delta: f32| {
            let mut w = w0.to_f32().into_owned();
            w[i] += delta;
            run(&HostTensor::f32(w0.shape.clone(), w)).0
        };
        let numeric = (shifted(h) - shifted(-h)) / (2.0 * h);
        let tolerance = 2e-3 * numeric.abs().max(grad[i].abs()).max(1e-2);
        assert!(
            (numeric - grad[i]).abs() <= tolerance,
            "w[{i}]: analytic {}, finite difference {numeric}",
            grad[i]
        );
    }
}

#[test]
fn an_integer_initializer_is_not_trainable() {
    let model = common::load_model(&common::tiny_sd().join("text_encoder/model.onnx"));
    let integer = model
        .with_objective(Objective {
            output: "last_hidden_state".into(),
            target: "t".into(),
            wrt: vec!["/text_model/Constant_output_0".into()],
        })
        .err()
        .map(|e| e.to_string());
    assert!(
        integer.as_ref().is_some_and(|e| e.contains("only float")),
        "{integer:?}"
    );
}

#[test]
fn an_input_the_loss_does_not_reach_is_a_clear_error() {
    let model = GraphBuilder::new(14)
        .input("a", &[4])
        .input("b", &[4])
        .node("Relu", &["a"], &["y"], &[])
        .output("y")
        .build()
        .unwrap();
    let trained = model
        .with_objective(Objective {
            output: "y".into(),
            target: "t".into(),
            wrt: vec!["b".into()],
        })
        .unwrap();
    let gpu = common::gpu();
    let error = pollster::block_on(Session::new(&gpu, &trained, &HashMap::new()))
        .err()
        .expect("no gradient for b")
        .to_string();
    assert!(error.contains("does not depend on `b`"), "{error}");
}

/// Three AdamW steps with clipping by global norm, against torch.optim.AdamW and
/// clip_grad_norm_ on the same gradients.
#[test]
fn adamw_matches_torch() {
    let gpu = common::gpu();
    let dir = common::fixtures().join("grads/adam");
    let tensor = |name: &str| common::tensors(&dir, name).remove("").unwrap();
    let params: Vec<GpuTensor> = ["a", "b"]
        .iter()
        .map(|k| GpuTensor::from_host(&gpu, &tensor(&format!("param_{k}"))))
        .collect();
    let config = AdamW {
        lr: 0.01,
        beta1: 0.8,
        beta2: 0.99,
        eps: 1e-6,
        weight_decay: 0.1,
        max_grad_norm: Some(2.0),
    };
    let refs: Vec<&GpuTensor> = params.iter().collect();
    let mut optimizer = Optimizer::new(&gpu, config, &refs).unwrap();
    for step in 0..3 {
        let grads: Vec<GpuTensor> = ["a", "b"]
            .iter()
            .map(|k| GpuTensor::from_host(&gpu, &tensor(&format!("step{step}_grad_{k}"))))
            .collect();
        let grad_refs: Vec<&GpuTensor> = grads.iter().collect();
        optimizer.step(&refs, &grad_refs).unwrap();
        let norm = pollster::block_on(optimizer.last_grad_norm()).unwrap();
        let expected_norm = tensor(&format!("step{step}_norm")).to_f32()[0];
        assert!(
            (norm - expected_norm).abs() < 1e-5 * expected_norm,
            "step {step}: norm {norm}, torch {expected_norm}"
        );
        for (k, p) in ["a", "b"].iter().zip(&params) {
            let actual = pollster::block_on(p.to_host()).unwrap();
            let expected = tensor(&format!("step{step}_param_{k}"));
            common::compare(&format!("step {step} {k}"), &actual, &expected, 1e-6).unwrap();
        }
    }
}

/// The tiny CLIP text encoder differentiated by its embedding tables (gathered rows: the
/// gradient sums over repeated token ids), initializers made trainable.
#[test]
fn text_encoder_gradients_match_torch_autograd() {
    let model = common::load_model(&common::tiny_sd().join("text_encoder/model.onnx"));
    let dir = common::fixtures().join("grads/tiny_text_encoder");
    let expected = common::tensors(&dir, "grad_");
    let mut wrt: Vec<String> = expected.keys().cloned().collect();
    wrt.sort();
    let initial: Vec<HostTensor> = wrt
        .iter()
        .map(|name| pollster::block_on(model.initializer(name)).unwrap())
        .collect();
    let trained = model
        .with_objective(Objective {
            output: "last_hidden_state".into(),
            target: "target".into(),
            wrt: wrt.clone(),
        })
        .unwrap();
    let ids = common::tensors(&dir, "in_").remove("input_ids").unwrap();
    let target = common::tensors(&dir, "target").remove("").unwrap();
    let dims = model.dims_for_shapes(&[("input_ids", &ids.shape)]).unwrap();
    let gpu = common::gpu();
    let session = pollster::block_on(Session::new(&gpu, &trained, &dims)).unwrap();
    let mut feeds: Vec<(&str, &HostTensor)> = vec![("input_ids", &ids), ("target", &target)];
    feeds.extend(wrt.iter().map(String::as_str).zip(&initial));
    let out = pollster::block_on(session.run_host(&feeds)).unwrap();
    let loss = common::tensors(&dir, "loss").remove("").unwrap();
    compare_scaled(LOSS, &out[LOSS], &loss).unwrap();
    for name in &wrt {
        let worst = compare_scaled(name, &out[&grad_name(name)], &expected[name]).unwrap();
        eprintln!("{name}: worst {worst:.1e} of scale");
    }
}

/// Training never stores attention's score matrices, neither for the backward pass nor in
/// it: a chain of eight self-attention layers (4 heads x 512 x 512 scores, 4 MiB each)
/// trains in less GPU memory than one such matrix.
#[test]
fn attention_scores_are_recomputed_not_kept() {
    let (heads, n, d, layers) = (4, 512, 8, 8);
    let mut builder = GraphBuilder::new(14).input("x0", &[heads, n, d]);
    builder = builder.weight("scale", &[], &[0.125]);
    for l in 0..layers {
        let (x, kt, s, ss, p, y) = (
            format!("x{l}"),
            format!("kt{l}"),
            format!("s{l}"),
            format!("ss{l}"),
            format!("p{l}"),
            format!("x{}", l + 1),
        );
        builder = builder
            .node(
                "Transpose",
                &[&x],
                &[&kt],
                &[("perm", websd::engine::Attr::Ints(vec![0, 2, 1]))],
            )
            .node("MatMul", &[&x, &kt], &[&s], &[])
            .node("Mul", &[&s, "scale"], &[&ss], &[])
            .node(
                "Softmax",
                &[&ss],
                &[&p],
                &[("axis", websd::engine::Attr::Int(-1))],
            )
            .node("MatMul", &[&p, &x], &[&y], &[]);
    }
    let model = builder.output(&format!("x{layers}")).build().unwrap();
    let trained = model
        .with_objective(Objective {
            output: format!("x{layers}"),
            target: "t".into(),
            wrt: vec!["x0".into()],
        })
        .unwrap();
    let gpu = common::gpu();
    let session = pollster::block_on(Session::new(&gpu, &trained, &HashMap::new())).unwrap();
    let scores = (heads * n * n * 4) as u64;
    eprintln!(
        "training session: {} MiB, one score matrix {} MiB",
        session.memory_bytes >> 20,
        scores >> 20
    );
    assert!(session.memory_bytes < scores);
}

/// The fused attention's backward kernels (attention_grad.wgsl) against the same graph
/// kept unfused (at opset 12, whose Softmax the fusion leaves alone; over the last axis it
/// means the same), whose gradients come from the MatMul and Softmax rules: several row workgroups and key tiles,
/// head widths that are not multiples of 4, and the widest head the kernel holds.
#[test]
fn fused_attention_gradients_match_the_unfused_graph() {
    let gpu = common::gpu();
    for (batch, n, d, m, e) in [(3, 150, 42, 130, 23), (1, 20, 160, 33, 160)] {
        let shapes = [
            ("q", [batch, n, d]),
            ("kt", [batch, d, m]),
            ("v", [batch, m, e]),
        ];
        let graph = |fused: bool| {
            let opset = if fused { 14 } else { 12 };
            let mut builder = GraphBuilder::new(opset).weight("scale", &[], &[0.3]);
            for (name, shape) in &shapes {
                builder = builder.input(name, shape);
            }
            builder = builder
                .node("MatMul", &["q", "kt"], &["s"], &[])
                .node("Mul", &["s", "scale"], &["scaled"], &[])
                .node(
                    "Softmax",
                    &["scaled"],
                    &["p"],
                    &[("axis", websd::engine::Attr::Int(-1))],
                );
            let model = builder
                .node("MatMul", &["p", "v"], &["y"], &[])
                .output("y")
                .build()
                .unwrap();
            let trained = model
                .with_objective(Objective {
                    output: "y".into(),
                    target: "t".into(),
                    wrt: vec!["q".into(), "kt".into(), "v".into()],
                })
                .unwrap();
            pollster::block_on(Session::new(&gpu, &trained, &HashMap::new())).unwrap()
        };
        let inputs: Vec<(&str, HostTensor)> = shapes
            .iter()
            .enumerate()
            .map(|(k, (name, shape))| {
                let values = websd::bench::noise(shape.iter().product(), k as u64, 1.0);
                (*name, HostTensor::f32(shape.to_vec(), values))
            })
            .chain(std::iter::once((
                "t",
                HostTensor::f32(
                    vec![batch, n, e],
                    websd::bench::noise(batch * n * e, 9, 1.0),
                ),
            )))
            .collect();
        let feeds: Vec<(&str, &HostTensor)> = inputs.iter().map(|(n, t)| (*n, t)).collect();
        let fused = pollster::block_on(graph(true).run_host(&feeds)).unwrap();
        let unfused = pollster::block_on(graph(false).run_host(&feeds)).unwrap();
        for name in ["q", "kt", "v"] {
            let grad = grad_name(name);
            let worst = compare_scaled(name, &fused[&grad], &unfused[&grad]).unwrap();
            eprintln!("{batch}x{n}x{d} / {m}x{e}: d{name} within {worst:.1e} of scale");
        }
    }
}
