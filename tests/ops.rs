//! Every operator case in tests/fixtures/ops against onnxruntime's outputs.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use std::collections::HashMap;
use std::path::Path;

use websd::bench::noise;
use websd::engine::{Attr, Gpu, GraphBuilder, HostTensor, Model, Session};

/// Runs a case folder's model on its inputs and compares every output within 2e-5.
fn matches_onnxruntime(gpu: &Gpu, model: &Model, dir: &Path) -> Result<(), String> {
    let outputs = common::run_case(gpu, model, &HashMap::new(), dir)?;
    for (name, expected) in common::tensors(dir, "out_") {
        let actual = outputs.get(&name).ok_or(format!("no output {name}"))?;
        common::compare(&name, actual, &expected, 2e-5)?;
    }
    Ok(())
}

#[test]
fn every_operator_case_matches_onnxruntime() {
    assert_every_case_matches(&common::gpu());
}

/// The same cases on the GEMM core the device does not run by default (the
/// workgroup-memory core where the subgroup core is the default, as on llvmpipe), so that
/// both stay checked wherever both can run.
#[test]
fn every_operator_case_matches_onnxruntime_on_the_other_gemm_core() {
    let gpu = common::gpu();
    match gpu.with_subgroup_kernels(!gpu.subgroup_kernels) {
        Ok(other) => assert_every_case_matches(&other),
        Err(e) => eprintln!("skipped: {e}"),
    }
}

fn assert_every_case_matches(gpu: &Gpu) {
    let mut failures = Vec::new();
    let mut dirs: Vec<_> = std::fs::read_dir(common::fixtures().join("ops"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() > 50,
        "fixtures missing: run scripts/make_fixtures.py"
    );
    for dir in dirs {
        let case = dir.file_name().unwrap().to_string_lossy().to_string();
        let model = common::load_model(&dir.join("model.onnx"));
        if let Err(e) = matches_onnxruntime(gpu, &model, &dir) {
            failures.push(format!("{case}: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// y = a + 1.5 over `n` elements (add_symbolic.onnx), checked at the `probes`.
fn check_long_add(n: usize, probes: &[usize]) {
    let gpu = common::gpu();
    let model = common::load_model(&common::fixtures().join("add_symbolic.onnx"));
    let session = pollster::block_on(Session::new(
        &gpu,
        &model,
        &HashMap::from([("n".to_string(), n)]),
    ))
    .unwrap();
    let a = HostTensor::f32(vec![n], (0..n).map(|i| (i % 1000) as f32).collect());
    let b = HostTensor::f32(vec![1], vec![1.5]);
    let out = pollster::block_on(session.run_host(&[("a", &a), ("b", &b)])).unwrap();
    let y = out["y"].to_f32();
    for &i in probes {
        assert_eq!(y[i], (i % 1000) as f32 + 1.5, "element {i}");
    }
}

/// Past 65535 workgroups in one dimension: 17M elements need the folded 2-D grid.
#[test]
fn elementwise_past_the_workgroup_limit() {
    let n = 17 * 1024 * 1024;
    check_long_add(
        n,
        &[0, 1, 65535 * 256 - 1, 65535 * 256, 65535 * 256 + 1, n - 1],
    );
}

/// A row longer than 64 threads can loop over on lavapipe (65535 iterations each, past
/// which it stops a loop silently): 2^22 + 2 elements alternating -1, +1 have mean 0 and
/// variance 1, so InstanceNormalization returns them divided by sqrt(1 + epsilon).
#[test]
fn rows_past_lavapipes_loop_limit_normalise_whole() {
    let n = (1 << 22) + 2;
    let model = GraphBuilder::new(17)
        .input("x", &[1, 1, n])
        .weight("scale", &[1], &[1.0])
        .weight("bias", &[1], &[0.0])
        .node(
            "InstanceNormalization",
            &["x", "scale", "bias"],
            &["y"],
            &[("epsilon", Attr::Float(0.25))],
        )
        .output("y")
        .build()
        .unwrap();
    let session =
        pollster::block_on(Session::new(&common::gpu(), &model, &HashMap::new())).unwrap();
    let x = HostTensor::f32(vec![1, 1, n], (0..n).map(|i| [-1.0, 1.0][i % 2]).collect());
    let outputs = pollster::block_on(session.run_host(&[("x", &x)])).unwrap();
    let y = outputs["y"].to_f32();
    let expected = 1.0 / 1.25f32.sqrt();
    for i in [0, 1, n / 2 + 1, n - 2, n - 1] {
        let want = [-expected, expected][i % 2];
        assert!(
            (y[i] - want).abs() < 1e-5,
            "element {i}: {} vs {want}",
            y[i]
        );
    }
}

/// fp16 initializers (raw_data) are upcast on load; a Cast to f32 then folds away.
#[test]
fn fp16_weights_match_onnxruntime() {
    let gpu = common::gpu();
    let dir = common::fixtures().join("graphs/fp16_weights");
    let model = common::load_model(&dir.join("model.onnx"));
    let outputs = common::run_case(&gpu, &model, &HashMap::new(), &dir).unwrap();
    for (name, expected) in common::tensors(&dir, "out_") {
        common::compare(&name, &outputs[&name], &expected, 2e-5).unwrap();
    }
}

/// How far from fp32 websd's result for an fp16 graph may be, in units of onnxruntime's
/// own fp16 error on it: websd rounds to f16 where it stores activations as halves, which
/// are other points than where onnxruntime rounds, so the errors differ in detail.
const FP16_SLACK: f32 = 1.5;

/// fp16 graphs, as optimum's `--dtype fp16` (fp16 inputs and outputs) and onnxruntime's
/// float16 converter (Casts at f32 edges; Casts appended after the Resize that reads them)
/// write them, computed in f32 with activations stored as f16 where kernels can
/// (`lower::half_values`): as close to onnxruntime's result on the same graph in fp32
/// (ref_y) as its own fp16 result (out_y) is, give or take `FP16_SLACK`.
#[test]
fn fp16_graphs_match_onnxruntime() {
    let gpu = common::gpu();
    for case in [
        "fp16_io",
        "fp16_cast_edges",
        "fp16_matmul",
        "fp16_converter_order",
        "fp16_activations",
    ] {
        let dir = common::fixtures().join("graphs").join(case);
        let model = common::load_model(&dir.join("model.onnx"));
        let y = &common::run_case(&gpu, &model, &HashMap::new(), &dir).unwrap()["y"];
        let reference = &common::tensors(&dir, "ref_")["y"];
        let fp16 = &common::tensors(&dir, "out_")["y"];
        let own_error = common::compare(case, fp16, reference, 1.0).unwrap();
        common::compare(case, y, reference, FP16_SLACK * own_error + 2e-5).unwrap();
    }
}

/// An fp16 model's largest activations (a VAE decoder's resnet and upsampler: the
/// upsampled image, 8 x 32 x 32) are stored as halves, 2 bytes an element less than in the
/// same graph in fp32, while the smaller ones stay f32; its result stays within
/// onnxruntime's own fp16 error, also when a small binding limit cuts every tensor into
/// parts.
#[test]
fn fp16_activations_are_stored_as_halves() {
    let dir = common::fixtures().join("graphs/fp16_activations");
    let intermediates = |file: &str, halves: bool| {
        // A device of its own: sessions on one device share their intermediates' slabs.
        let gpu = common::gpu().with_half_activations(halves);
        let model = common::load_model(&dir.join(file));
        let session = pollster::block_on(Session::new(&gpu, &model, &HashMap::new())).unwrap();
        session.scratch_bytes
    };
    let (half, full) = (
        intermediates("model.onnx", true),
        intermediates("reference.onnx", true),
    );
    assert_eq!(
        full - half,
        2 * 8 * 32 * 32,
        "intermediates of the fp16 graph {half} B, of the fp32 graph {full} B"
    );
    // `--f16-activations off`: as many bytes as in fp32.
    assert_eq!(intermediates("model.onnx", false), full);
    let model = common::load_model(&dir.join("model.onnx"));
    let reference = &common::tensors(&dir, "ref_")["y"];
    let fp16 = &common::tensors(&dir, "out_")["y"];
    let own_error = common::compare("onnxruntime fp16", fp16, reference, 1.0).unwrap();
    let cut = common::gpu().with_binding_limit(8 << 10);
    let y = &common::run_case(&cut, &model, &HashMap::new(), &dir).unwrap()["y"];
    common::compare("y in parts", y, reference, FP16_SLACK * own_error + 2e-5).unwrap();
}

/// f16 arithmetic (fp16 weights, on a device with `shader-f16`) keeps within its rounding
/// bound: an output differs from the exact sum of products by at most 5u sum |a b| (u =
/// 2^-11: the activation rounded to f16, the product and the three additions of a k-quad
/// rounded in f16; the f32 accumulation adds far less), on every GEMM tile shape (wide,
/// narrow, swapped) and for a convolution; and it is not the f32 path's result.
#[test]
fn f16_arithmetic_keeps_within_its_rounding_bound() {
    let Ok(gpu) = common::gpu().with_half_arithmetic(true) else {
        eprintln!("skipped: the adapter has no shader-f16");
        return;
    };
    let f32_gpu = common::gpu().with_half_arithmetic(false).unwrap();
    let halves = |n, seed, scale| -> Vec<f32> {
        noise(n, seed, scale)
            .into_iter()
            .map(|v| half::f16::from_f32(v).to_f32())
            .collect()
    };
    let run = |gpu: &Gpu, model: &Model, x: &HostTensor| {
        let session = pollster::block_on(Session::new(gpu, model, &HashMap::new())).unwrap();
        let mut outputs = pollster::block_on(session.run_host(&[("x", x)])).unwrap();
        outputs.remove("y").unwrap().to_f32().into_owned()
    };
    // (rows, k, columns): the wide 64x64 tiles, the narrow 64x16 ones, and few rows swapped.
    for (rows, k, n) in [(100, 1024, 200), (70, 960, 16), (4, 1280, 320)] {
        let (x, w) = (noise(rows * k, 11, 2.0), halves(k * n, 12, 0.05));
        let model = GraphBuilder::new(17)
            .input("x", &[rows, k])
            .weight_f16("w", &[k, n], &w)
            .node("MatMul", &["x", "w"], &["y"], &[])
            .output("y")
            .build()
            .unwrap();
        let input = HostTensor::f32(vec![rows, k], x.clone());
        let y = run(&gpu, &model, &input);
        assert!(
            y != run(&f32_gpu, &model, &input),
            "{rows}x{k}x{n}: computed in f32"
        );
        let (x, w) = (&x, &w);
        let terms = |o: usize| {
            let (r, c) = (o / n, o % n);
            (0..k).map(move |i| (x[r * k + i] as f64, w[i * n + c] as f64))
        };
        check_rounding_bound(&format!("MatMul {rows}x{k}x{n}"), &y, rows * n, terms);
    }
    let (c_in, c_out, size) = (48, 40, 12);
    let (x, w) = (
        noise(c_in * size * size, 13, 2.0),
        halves(c_out * c_in * 9, 14, 0.05),
    );
    let model = GraphBuilder::new(17)
        .input("x", &[1, c_in, size, size])
        .weight_f16("w", &[c_out, c_in, 3, 3], &w)
        .node(
            "Conv",
            &["x", "w"],
            &["y"],
            &[("pads", Attr::Ints(vec![1; 4]))],
        )
        .output("y")
        .build()
        .unwrap();
    let input = HostTensor::f32(vec![1, c_in, size, size], x.clone());
    let y = run(&gpu, &model, &input);
    assert!(y != run(&f32_gpu, &model, &input), "Conv: computed in f32");
    let taps = |o: usize| {
        let (channel, py, px) = (o / (size * size), o / size % size, o % size);
        let (x, w) = (&x, &w);
        (0..c_in * 9).filter_map(move |t| {
            let (ci, yy, xx) = (
                t / 9,
                (py + t / 3 % 3) as isize - 1,
                (px + t % 3) as isize - 1,
            );
            let inside = (0..size as isize).contains(&yy) && (0..size as isize).contains(&xx);
            inside.then(|| {
                let pixel = (ci * size + yy as usize) * size + xx as usize;
                (x[pixel] as f64, w[channel * c_in * 9 + t] as f64)
            })
        })
    };
    check_rounding_bound("Conv 3x3 48->40", &y, c_out * size * size, taps);
}

/// Checks each output `o` against the exact sum of its products `terms(o)`, within 5u times
/// the sum of their magnitudes (see above).
fn check_rounding_bound<I: Iterator<Item = (f64, f64)>>(
    case: &str,
    y: &[f32],
    outputs: usize,
    terms: impl Fn(usize) -> I,
) {
    const U: f64 = 1.0 / 2048.0;
    let mut worst: f64 = 0.0;
    for (o, &value) in y.iter().enumerate().take(outputs) {
        let (exact, magnitude) =
            terms(o).fold((0.0, 0.0), |(s, m), (a, b)| (s + a * b, m + (a * b).abs()));
        let ratio = (value as f64 - exact).abs() / (5.0 * U * magnitude);
        assert!(
            ratio <= 1.0,
            "{case}[{o}]: {value}, exact {exact}: {ratio:.2} of the bound"
        );
        worst = worst.max(ratio);
    }
    eprintln!("{case}: worst error {worst:.3} of the rounding bound");
}

/// An fp16 table read by Gather (a text encoder's token embeddings) stays packed halves:
/// half the bytes, the same rows as from an f32 table, also when a small binding limit
/// cuts the table into runs of rows.
#[test]
fn fp16_gather_tables_stay_halves() {
    let (rows, width) = (1000, 64);
    let table: Vec<f32> = noise(rows * width, 7, 1.0)
        .into_iter()
        .map(|v| half::f16::from_f32(v).to_f32())
        .collect();
    // Indices reach the graph as floats cast to int64, so that Gather is not folded.
    let picks = [0.0, 999.0, -1.0, 17.0, 500.0, 263.0, -1000.0, 640.0];
    let ids = HostTensor::f32(vec![2, 4], picks.to_vec());
    let run = |gpu: &Gpu, halves: bool| {
        let graph = GraphBuilder::new(17).input("picks", &[2, 4]);
        let graph = match halves {
            true => graph.weight_f16("table", &[rows, width], &table),
            false => graph.weight("table", &[rows, width], &table),
        };
        let model = graph
            .node("Cast", &["picks"], &["ids"], &[("to", Attr::Int(7))])
            .node("Gather", &["table", "ids"], &["y"], &[])
            .output("y")
            .build()
            .unwrap();
        let session = pollster::block_on(Session::new(gpu, &model, &HashMap::new())).unwrap();
        let y = pollster::block_on(session.run_host(&[("picks", &ids)]))
            .unwrap()
            .remove("y")
            .unwrap();
        (session.memory_bytes, y)
    };
    let gpu = common::gpu();
    let ((half_bytes, y_half), (full_bytes, y_full)) = (run(&gpu, true), run(&gpu, false));
    let table_bytes = (4 * rows * width) as u64;
    assert!(
        half_bytes <= full_bytes - table_bytes / 2,
        "GPU memory with an f16 table {half_bytes} B, with an f32 table {full_bytes} B"
    );
    common::compare("y", &y_half, &y_full, 0.0).unwrap();
    let cut = gpu.with_binding_limit(16 << 10);
    common::compare("y in runs", &run(&cut, true).1, &y_full, 0.0).unwrap();
}

/// Same-shape arithmetic between halves runs two elements per thread, also in runs of
/// pairs when the tensors exceed a binding: x cast to f16, doubled, squared (both kept as
/// halves, each result rounded to f16) and summed over channels by a 1x1 convolution gives
/// what the host computes with the same roundings, whole and cut into runs.
#[test]
fn half_arithmetic_runs_in_pairs_past_the_binding_limit() {
    let (channels, pixels) = (64, 8 * 8);
    let round = |v: f32| half::f16::from_f32(v).to_f32();
    let x: Vec<f32> = noise(channels * pixels, 8, 2.0)
        .into_iter()
        .map(round)
        .collect();
    let ones = vec![1.0; channels];
    let model = GraphBuilder::new(17)
        .input("x", &[1, channels, 8, 8])
        .weight("w", &[1, channels, 1, 1], &ones)
        .node("Cast", &["x"], &["x16"], &[("to", Attr::Int(10))])
        .node("Add", &["x16", "x16"], &["doubled"], &[])
        .node("Mul", &["doubled", "doubled"], &["squared"], &[])
        .node("Conv", &["squared", "w"], &["y"], &[])
        .output("y")
        .build()
        .unwrap();
    let expected: Vec<f32> = (0..pixels)
        .map(|p| {
            (0..channels)
                .map(|c| round(round(2.0 * x[c * pixels + p]).powi(2)))
                .sum()
        })
        .collect();
    let expected = HostTensor::f32(vec![1, 1, 8, 8], expected);
    let input = HostTensor::f32(vec![1, channels, 8, 8], x);
    let gpu = common::gpu();
    for (what, gpu) in [
        ("whole", gpu.clone()),
        ("in runs", gpu.with_binding_limit(1 << 10)),
    ] {
        let session = pollster::block_on(Session::new(&gpu, &model, &HashMap::new())).unwrap();
        let y = pollster::block_on(session.run_host(&[("x", &input)]))
            .unwrap()
            .remove("y")
            .unwrap();
        common::compare(what, &y, &expected, 1e-6).unwrap();
    }
}

/// Zero padding of the image axes read only by a Conv (SD's VAE encoder before each
/// downsampling) becomes the Conv's own padding: one launch fewer, the same result bit for
/// bit as convolving the padded copy (kept when the padded tensor is also an output).
#[test]
fn zero_padding_folds_into_the_convolution() {
    let x = HostTensor::f32(vec![2, 3, 9, 8], noise(2 * 3 * 72, 9, 1.0));
    let filter = noise(5 * 3 * 9, 10, 0.3);
    let run = |keep_padded: bool| {
        let graph = GraphBuilder::new(17)
            .input("x", &[2, 3, 9, 8])
            .weight("w", &[5, 3, 3, 3], &filter)
            .ints("pads", &[8], &[0, 0, 0, 0, 0, 0, 1, 1])
            .node("Pad", &["x", "pads"], &["padded"], &[])
            .node(
                "Conv",
                &["padded", "w"],
                &["y"],
                &[("strides", Attr::Ints(vec![2, 2]))],
            )
            .output("y");
        let graph = match keep_padded {
            true => graph.output("padded"),
            false => graph,
        };
        let model = graph.build().unwrap();
        let session =
            pollster::block_on(Session::new(&common::gpu(), &model, &HashMap::new())).unwrap();
        let mut outputs = pollster::block_on(session.run_host(&[("x", &x)])).unwrap();
        (session.launch_count, outputs.remove("y").unwrap())
    };
    let ((fused_launches, fused), (launches, y)) = (run(false), run(true));
    assert_eq!(y.shape, vec![2, 5, 4, 4]);
    assert!(
        fused_launches < launches,
        "{fused_launches} vs {launches} launches"
    );
    common::compare("y", &fused, &y, 0.0).unwrap();
}

/// A model that stores its weights as f16 and casts them up computes in f32 (Glyph SD is
/// one): its activations stay f32, as many bytes as with f32 weights, and the same result.
#[test]
fn weights_cast_up_from_f16_keep_f32_activations() {
    let filter: Vec<f32> = noise(8 * 8 * 9, 5, 0.2)
        .into_iter()
        .map(|v| half::f16::from_f32(v).to_f32())
        .collect();
    let x = HostTensor::f32(vec![1, 8, 16, 16], noise(8 * 256, 6, 1.0));
    let run = |stored_f16: bool| {
        let graph = GraphBuilder::new(17).input("x", &[1, 8, 16, 16]);
        let graph = match stored_f16 {
            true => graph.weight_f16("w16", &[8, 8, 3, 3], &filter).node(
                "Cast",
                &["w16"],
                &["w"],
                &[("to", Attr::Int(1))],
            ),
            false => graph.weight("w", &[8, 8, 3, 3], &filter),
        };
        let pads = [("pads", Attr::Ints(vec![1, 1, 1, 1]))];
        let model = graph
            .node("Conv", &["x", "w"], &["a"], &pads)
            .node("Conv", &["a", "w"], &["b"], &pads)
            .node("Add", &["a", "b"], &["c"], &[])
            .node("Conv", &["c", "w"], &["y"], &pads)
            .output("y")
            .build()
            .unwrap();
        let gpu = common::gpu();
        let session = pollster::block_on(Session::new(&gpu, &model, &HashMap::new())).unwrap();
        let y = pollster::block_on(session.run_host(&[("x", &x)]))
            .unwrap()
            .remove("y")
            .unwrap();
        (session.scratch_bytes, y)
    };
    let ((cast_bytes, y_cast), (f32_bytes, y_f32)) = (run(true), run(false));
    assert_eq!(cast_bytes, f32_bytes);
    common::compare("y", &y_cast, &y_f32, 0.0).unwrap();
}

/// fp16 weights read by MatMul stay packed halves on the GPU: the session holds about half
/// the bytes of the same weights in f32 and computes the same product.
#[test]
fn fp16_weights_take_half_the_gpu_memory() {
    let gpu = common::gpu();
    let (rows, k, n) = (4, 1024, 512);
    let w: Vec<f32> = noise(k * n, 3, 0.05)
        .into_iter()
        .map(|v| half::f16::from_f32(v).to_f32())
        .collect();
    let x = HostTensor::f32(vec![rows, k], noise(rows * k, 4, 1.0));
    let run = |halves: bool| {
        let graph = GraphBuilder::new(17).input("x", &[rows, k]);
        let graph = match halves {
            true => graph.weight_f16("w", &[k, n], &w),
            false => graph.weight("w", &[k, n], &w),
        };
        let model = graph
            .node("MatMul", &["x", "w"], &["y"], &[])
            .output("y")
            .build()
            .unwrap();
        let session = pollster::block_on(Session::new(&gpu, &model, &HashMap::new())).unwrap();
        let y = pollster::block_on(session.run_host(&[("x", &x)]))
            .unwrap()
            .remove("y")
            .unwrap();
        (session.memory_bytes, y)
    };
    let ((half_bytes, y_half), (full_bytes, y_full)) = (run(true), run(false));
    let weight_bytes = (4 * k * n) as u64;
    assert!(
        full_bytes >= weight_bytes && half_bytes <= full_bytes - weight_bytes / 2,
        "GPU memory with f16 weights {half_bytes} B, with f32 weights {full_bytes} B"
    );
    common::compare("y", &y_half, &y_full, 1e-6).unwrap();
}

/// A `Constant` whose value is external data (every fp32 SD UNet export has them) loads,
/// and the browser's fetch list names its file.
#[test]
fn constant_in_external_data_matches_onnxruntime() {
    let gpu = common::gpu();
    let dir = common::fixtures().join("graphs/constant_external_data");
    let folder = websd::engine::Directory(dir.clone());
    assert_eq!(
        pollster::block_on(websd::engine::external_data_locations(
            &folder,
            "model.onnx"
        ))
        .unwrap(),
        ["model.onnx_data"]
    );
    let model = common::load_model(&dir.join("model.onnx"));
    let outputs = common::run_case(&gpu, &model, &HashMap::new(), &dir).unwrap();
    for (name, expected) in common::tensors(&dir, "out_") {
        common::compare(&name, &outputs[&name], &expected, 2e-5).unwrap();
    }
}

/// The binding limit the split cases (ops/split_*, from scripts/make_fixtures.py) are sized
/// against: every one of them exceeds it.
const SPLIT_CASE_BINDING: u64 = 16 * 1024;

/// Past one storage binding: under a 16 KiB limit each split case runs as more launches over
/// parts of its tensors, and still matches onnxruntime.
#[test]
fn ops_past_one_binding_match_onnxruntime() {
    let gpu = common::gpu();
    let small = gpu.with_binding_limit(SPLIT_CASE_BINDING);
    let mut dirs: Vec<_> = std::fs::read_dir(common::fixtures().join("ops"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("split_")
        })
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 9,
        "split cases missing: run scripts/make_fixtures.py"
    );
    let mut failures = Vec::new();
    for dir in dirs {
        let case = dir.file_name().unwrap().to_string_lossy().to_string();
        let model = common::load_model(&dir.join("model.onnx"));
        let launches = |gpu| {
            pollster::block_on(Session::new(gpu, &model, &HashMap::new()))
                .map(|s| s.launch_count)
                .map_err(|e| e.to_string())
        };
        let result = launches(&gpu).and_then(|whole| {
            let parts = launches(&small)?;
            if parts <= whole {
                return Err(format!(
                    "{parts} launches under the small limit, {whole} without"
                ));
            }
            matches_onnxruntime(&small, &model, &dir)
        });
        if let Err(e) = result {
            failures.push(format!("{case}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Past the device's own binding limit (128 MiB on lavapipe): an element-wise op over one
/// element more than a binding holds runs in parts, with the seam in the right place.
#[test]
fn elementwise_past_the_device_binding_limit() {
    let limit = common::gpu().limits.max_storage_buffer_binding_size;
    let n = (limit / 4) as usize + 1;
    check_long_add(n, &[0, n / 2 - 1, n / 2, n - 2, n - 1]);
}

/// A reduction past the device's own binding limit runs in parts that combine: the index
/// of the maximum of one element more than a binding holds, wherever the maximum lies
/// (before, at and after the seams between parts).
#[test]
fn argmax_past_the_device_binding_limit() {
    let gpu = common::gpu();
    let model = common::load_model(&common::fixtures().join("argmax_symbolic.onnx"));
    let n = (gpu.limits.max_storage_buffer_binding_size / 4) as usize + 1;
    let session = pollster::block_on(Session::new(
        &gpu,
        &model,
        &HashMap::from([("n".to_string(), n)]),
    ))
    .unwrap();
    assert!(session.launch_count > 1, "one launch over {n} elements");
    let values: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 / 1000.0).collect();
    for peak in [3, n / 2 - 1, n / 2, n / 2 + 1, n - 1] {
        let mut values = values.clone();
        values[peak] = 2.0;
        let x = HostTensor::f32(vec![n], values);
        let out = pollster::block_on(session.run_host(&[("x", &x)])).unwrap();
        assert_eq!(out["y"].to_i64()[0], peak as i64, "maximum at {peak}");
    }
}
