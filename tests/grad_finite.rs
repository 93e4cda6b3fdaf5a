//! Finite-difference checks of every gradient rule: one small graph per rule family, its
//! analytic gradients (the engine's backward pass) against central differences of the
//! engine's own loss. These need no fixtures, so they also cover rules torch's exports
//! never produce (opset 18 GroupNormalization, Gather on inner axes, linear Resize,
//! grouped convolution).
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::collections::HashMap;

use websd::engine::{Attr, GraphBuilder, HostTensor, LOSS, Objective, Session, grad_name};

/// A graph from input `x` (and others) to output `y`, and the inputs to differentiate by.
struct Case {
    name: &'static str,
    graph: GraphBuilder,
    inputs: Vec<(&'static str, HostTensor)>,
    /// Inputs whose values must stay positive (Log, Sqrt, Pow's base...).
    positive: bool,
}

fn noise(shape: &[usize], seed: u64) -> HostTensor {
    let n = shape.iter().product();
    HostTensor::f32(shape.to_vec(), websd::bench::noise(n, seed, 1.0))
}

fn case(name: &'static str, graph: GraphBuilder, inputs: &[(&'static str, &[usize])]) -> Case {
    let inputs = inputs
        .iter()
        .enumerate()
        .map(|(k, (n, shape))| (*n, noise(shape, 10 + k as u64)))
        .collect();
    Case {
        name,
        graph,
        inputs,
        positive: false,
    }
}

fn unary(op: &'static str, positive: bool) -> Case {
    let graph = GraphBuilder::new(17)
        .input("x", &[2, 3, 4])
        .node(op, &["x"], &["y"], &[])
        .output("y");
    let mut c = case(op, graph, &[("x", &[2, 3, 4])]);
    c.positive = positive;
    c
}

fn binary(op: &'static str, positive: bool) -> Case {
    // b broadcasts against a, so the rule's sum over broadcast axes is checked too.
    let graph = GraphBuilder::new(17)
        .input("a", &[2, 3, 4])
        .input("b", &[3, 1])
        .node(op, &["a", "b"], &["y"], &[])
        .output("y");
    let mut c = case(op, graph, &[("a", &[2, 3, 4]), ("b", &[3, 1])]);
    c.positive = positive;
    c
}

fn conv(name: &'static str, group: i64, strides: i64, dilation: i64) -> Case {
    let graph = GraphBuilder::new(17)
        .input("x", &[2, 4, 7, 6])
        .input("w", &[8, (4 / group) as usize, 3, 3])
        .input("b", &[8])
        .node(
            "Conv",
            &["x", "w", "b"],
            &["y"],
            &[
                ("group", Attr::Int(group)),
                ("strides", Attr::Ints(vec![strides, strides])),
                ("dilations", Attr::Ints(vec![dilation, dilation])),
                ("pads", Attr::Ints(vec![1, 1, 1, 0])),
            ],
        )
        .output("y");
    case(
        name,
        graph,
        &[
            ("x", &[2, 4, 7, 6]),
            ("w", &[8, (4 / group) as usize, 3, 3]),
            ("b", &[8]),
        ],
    )
}

fn group_norm(name: &'static str, opset: i64) -> Case {
    // Opset 18 scales per group, 21 per channel.
    let affine = if opset >= 21 { 6 } else { 3 };
    let graph = GraphBuilder::new(opset)
        .input("x", &[2, 6, 3, 2])
        .input("s", &[affine])
        .input("b", &[affine])
        .node(
            "GroupNormalization",
            &["x", "s", "b"],
            &["y"],
            &[("num_groups", Attr::Int(3)), ("epsilon", Attr::Float(1e-5))],
        )
        .output("y");
    case(
        name,
        graph,
        &[("x", &[2, 6, 3, 2]), ("s", &[affine]), ("b", &[affine])],
    )
}

fn resize(name: &'static str, attrs: &[(&'static str, &'static str)], out: [i64; 2]) -> Case {
    let attrs: Vec<(&str, Attr)> = attrs
        .iter()
        .map(|&(k, v)| (k, Attr::Str(v.into())))
        .collect();
    let graph = GraphBuilder::new(17)
        .input("x", &[1, 2, 3, 4])
        .ints("sizes", &[4], &[1, 2, out[0], out[1]])
        .node("Resize", &["x", "", "", "sizes"], &["y"], &attrs)
        .output("y");
    case(name, graph, &[("x", &[1, 2, 3, 4])])
}

fn reduce(op: &'static str) -> Case {
    let graph = GraphBuilder::new(18)
        .input("x", &[2, 3, 4])
        .ints("axes", &[2], &[0, 2])
        .node(op, &["x", "axes"], &["y"], &[("keepdims", Attr::Int(0))])
        .output("y");
    case(op, graph, &[("x", &[2, 3, 4])])
}

fn gather(name: &'static str, axis: i64) -> Case {
    // Index 1 is read twice and -1 counts from the end: both must add up.
    let graph = GraphBuilder::new(17)
        .input("x", &[4, 5, 3])
        .ints("i", &[2, 2], &[1, 2, -1, 1])
        .node("Gather", &["x", "i"], &["y"], &[("axis", Attr::Int(axis))])
        .output("y");
    case(name, graph, &[("x", &[4, 5, 3])])
}

fn cases() -> Vec<Case> {
    let mut cases = vec![
        unary("Abs", false),
        unary("Neg", false),
        unary("Sqrt", true),
        unary("Reciprocal", true),
        unary("Exp", false),
        unary("Log", true),
        unary("Sin", false),
        unary("Cos", false),
        unary("Tanh", false),
        unary("Sigmoid", false),
        unary("Relu", false),
        unary("Erf", false),
        binary("Add", false),
        binary("Sub", false),
        binary("Mul", false),
        binary("Div", true),
        binary("Pow", true),
        binary("Max", false),
        binary("Min", false),
        conv("Conv", 1, 1, 1),
        conv("Conv strided, dilated", 1, 2, 2),
        conv("Conv grouped", 2, 1, 1),
        conv("Conv depthwise, strided", 4, 2, 1),
        group_norm("GroupNormalization opset 18", 18),
        group_norm("GroupNormalization opset 21", 21),
        resize(
            "Resize nearest x2 (block sums)",
            &[
                ("mode", "nearest"),
                ("coordinate_transformation_mode", "asymmetric"),
                ("nearest_mode", "floor"),
            ],
            [6, 8],
        ),
        resize(
            "Resize nearest 3 -> 5",
            &[
                ("mode", "nearest"),
                ("coordinate_transformation_mode", "half_pixel"),
            ],
            [5, 3],
        ),
        resize(
            "Resize linear",
            &[
                ("mode", "linear"),
                ("coordinate_transformation_mode", "half_pixel"),
            ],
            [5, 7],
        ),
        resize(
            "Resize linear, aligned corners",
            &[
                ("mode", "linear"),
                ("coordinate_transformation_mode", "align_corners"),
            ],
            [7, 2],
        ),
        reduce("ReduceSum"),
        reduce("ReduceMean"),
        reduce("ReduceMax"),
        reduce("ReduceMin"),
        gather("Gather rows", 0),
        gather("Gather axis 1", 1),
        gather("Gather last axis", -1),
    ];
    cases.push(case(
        "MatMul broadcast",
        GraphBuilder::new(17)
            .input("a", &[2, 1, 3, 4])
            .input("b", &[3, 4, 5])
            .node("MatMul", &["a", "b"], &["y"], &[])
            .output("y"),
        &[("a", &[2, 1, 3, 4]), ("b", &[3, 4, 5])],
    ));
    cases.push(case(
        "Gemm transposed",
        GraphBuilder::new(17)
            .input("a", &[4, 3])
            .input("b", &[5, 4])
            .input("c", &[5])
            .node(
                "Gemm",
                &["a", "b", "c"],
                &["y"],
                &[
                    ("transA", Attr::Int(1)),
                    ("transB", Attr::Int(1)),
                    ("alpha", Attr::Float(0.7)),
                    ("beta", Attr::Float(1.3)),
                ],
            )
            .output("y"),
        &[("a", &[4, 3]), ("b", &[5, 4]), ("c", &[5])],
    ));
    cases.push(case(
        "attention (fused, scores recomputed)",
        GraphBuilder::new(17)
            .input("q", &[2, 5, 4])
            .input("kt", &[2, 4, 6])
            .input("v", &[2, 6, 3])
            .weight("scale", &[], &[0.5])
            .node("MatMul", &["q", "kt"], &["s"], &[])
            .node("Mul", &["s", "scale"], &["scaled"], &[])
            .node("Softmax", &["scaled"], &["p"], &[("axis", Attr::Int(-1))])
            .node("MatMul", &["p", "v"], &["y"], &[])
            .output("y"),
        &[("q", &[2, 5, 4]), ("kt", &[2, 4, 6]), ("v", &[2, 6, 3])],
    ));
    // Several workgroups of rows and several tiles of keys and queries, odd head widths.
    cases.push(case(
        "attention, many tiles",
        GraphBuilder::new(17)
            .input("q", &[2, 70, 6])
            .input("kt", &[2, 6, 37])
            .input("v", &[2, 37, 5])
            .weight("scale", &[], &[0.4])
            .node("MatMul", &["q", "kt"], &["s"], &[])
            .node("Mul", &["s", "scale"], &["scaled"], &[])
            .node("Softmax", &["scaled"], &["p"], &[("axis", Attr::Int(-1))])
            .node("MatMul", &["p", "v"], &["y"], &[])
            .output("y"),
        &[("q", &[2, 70, 6]), ("kt", &[2, 6, 37]), ("v", &[2, 37, 5])],
    ));
    cases.push(case(
        "Softmax, inner axis",
        GraphBuilder::new(17)
            .input("x", &[2, 5, 3])
            .node("Softmax", &["x"], &["y"], &[("axis", Attr::Int(1))])
            .output("y"),
        &[("x", &[2, 5, 3])],
    ));
    cases.push(case(
        "LayerNormalization",
        GraphBuilder::new(17)
            .input("x", &[2, 3, 8])
            .input("s", &[8])
            .input("b", &[8])
            .node("LayerNormalization", &["x", "s", "b"], &["y"], &[])
            .output("y"),
        &[("x", &[2, 3, 8]), ("s", &[8]), ("b", &[8])],
    ));
    cases.push(case(
        "InstanceNormalization",
        GraphBuilder::new(17)
            .input("x", &[2, 3, 4, 2])
            .input("s", &[3])
            .input("b", &[3])
            .node("InstanceNormalization", &["x", "s", "b"], &["y"], &[])
            .output("y"),
        &[("x", &[2, 3, 4, 2]), ("s", &[3]), ("b", &[3])],
    ));
    cases.push(case(
        "Where",
        GraphBuilder::new(17)
            .input("a", &[3, 4])
            .input("b", &[4])
            .weight("zero", &[], &[0.0])
            .node("Greater", &["a", "zero"], &["c"], &[])
            .node("Where", &["c", "a", "b"], &["y"], &[])
            .output("y"),
        &[("a", &[3, 4]), ("b", &[4])],
    ));
    cases.push(case(
        "Transpose, Reshape, Expand",
        GraphBuilder::new(17)
            .input("x", &[2, 1, 3])
            .ints("shape", &[3], &[2, 4, 3])
            .ints("flat", &[2], &[6, 4])
            .node("Expand", &["x", "shape"], &["e"], &[])
            .node(
                "Transpose",
                &["e"],
                &["t"],
                &[("perm", Attr::Ints(vec![2, 0, 1]))],
            )
            .node("Reshape", &["t", "flat"], &["y"], &[])
            .output("y"),
        &[("x", &[2, 1, 3])],
    ));
    cases.push(case(
        "Concat, Split, Slice, Pad",
        GraphBuilder::new(17)
            .input("a", &[2, 3])
            .input("b", &[2, 4])
            .ints("sizes", &[2], &[5, 2])
            .ints("starts", &[1], &[1])
            .ints("ends", &[1], &[4])
            .ints("axes", &[1], &[1])
            .ints("pads", &[4], &[1, 0, 0, 2])
            .node("Concat", &["a", "b"], &["c"], &[("axis", Attr::Int(1))])
            .node(
                "Split",
                &["c", "sizes"],
                &["s0", "s1"],
                &[("axis", Attr::Int(1))],
            )
            .node("Slice", &["s0", "starts", "ends", "axes"], &["sl"], &[])
            .node("Pad", &["sl", "pads"], &["p"], &[])
            .node("Mul", &["p", "p"], &["y"], &[])
            .output("y"),
        &[("a", &[2, 3]), ("b", &[2, 4])],
    ));
    cases
}

/// The worst relative disagreement between the analytic gradients and central
/// differences at a few elements of each input; an error names the element.
fn check(gpu: &websd::engine::Gpu, case: Case) -> Result<f32, String> {
    let failed = |e: websd::engine::Error| e.to_string();
    let model = case.graph.build().map_err(failed)?;
    let mut inputs = case.inputs;
    if case.positive {
        for (_, t) in inputs.iter_mut() {
            let lifted = t.to_f32().iter().map(|v| v.abs() + 0.5).collect();
            *t = HostTensor::f32(t.shape.clone(), lifted);
        }
    }
    let plain = pollster::block_on(Session::new(gpu, &model, &HashMap::new())).map_err(failed)?;
    let feeds: Vec<(&str, &HostTensor)> = inputs.iter().map(|(n, t)| (*n, t)).collect();
    let y = pollster::block_on(plain.run_host(&feeds)).map_err(failed)?["y"].clone();
    let target = noise(&y.shape, 99);

    let wrt: Vec<String> = inputs.iter().map(|(n, _)| n.to_string()).collect();
    let trained = model
        .with_objective(Objective {
            output: "y".into(),
            target: "t".into(),
            wrt: wrt.clone(),
        })
        .map_err(failed)?;
    let session =
        pollster::block_on(Session::new(gpu, &trained, &HashMap::new())).map_err(failed)?;
    let run = |inputs: &[(&'static str, HostTensor)]| {
        let mut feeds: Vec<(&str, &HostTensor)> = inputs.iter().map(|(n, t)| (*n, t)).collect();
        feeds.push(("t", &target));
        pollster::block_on(session.run_host(&feeds)).map_err(failed)
    };
    let analytic = run(&inputs)?;
    let h = 1e-2f32;
    let mut worst = 0.0f32;
    for (k, name) in wrt.iter().enumerate() {
        let grad = analytic[&grad_name(name)].to_f32().into_owned();
        let scale = grad.iter().fold(0.0f32, |m, g| m.max(g.abs()));
        let n = grad.len();
        for i in [0, n / 3, 2 * n / 3, n - 1] {
            let shifted = |delta: f32| -> Result<f32, String> {
                let mut moved = inputs.clone();
                let mut values = moved[k].1.to_f32().into_owned();
                values[i] += delta;
                moved[k].1 = HostTensor::f32(moved[k].1.shape.clone(), values);
                Ok(run(&moved)?[LOSS].to_f32()[0])
            };
            let numeric = (shifted(h)? - shifted(-h)?) / (2.0 * h);
            // 1% of the element's gradient, floored at 0.1% of the tensor's largest.
            let reference = grad[i].abs().max(1e-1 * scale).max(1e-6);
            let error = (numeric - grad[i]).abs() / reference;
            if error > 1e-2 {
                return Err(format!(
                    "{name}[{i}]: analytic {}, finite difference {numeric}",
                    grad[i]
                ));
            }
            worst = worst.max(error);
        }
    }
    Ok(worst)
}

#[test]
fn every_rule_matches_finite_differences() {
    let gpu = common::gpu();
    let mut failures = Vec::new();
    for case in cases() {
        let name = case.name;
        match check(&gpu, case) {
            Ok(worst) => eprintln!("{name}: worst {worst:.1e}"),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} rules disagree with finite differences:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
