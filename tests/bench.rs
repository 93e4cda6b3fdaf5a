//! `websd bench`: the adapter's ceilings are measured and each case is reported against them.

#[test]
fn bench_reports_cases_against_the_measured_ceilings() {
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_websd"))
        .args([
            "bench",
            "--filter",
            "[2, 64, 1280]",
            "--repeat",
            "1",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let gflops = report["ceilings"]["gflops"].as_f64().unwrap();
    assert!(gflops > 0.0 && report["ceilings"]["gbytes_per_s"].as_f64().unwrap() > 0.0);
    let cases = report["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 1, "the filter keeps one case: {cases:?}");
    let case = &cases[0];
    assert_eq!(case["family"], "linear");
    assert_eq!(case["kernels"], "MatMul 1");
    // 2 x 64 x 1280 x 1280 multiply-adds.
    let flops = 2.0 * 2.0 * 64.0 * 1280.0 * 1280.0;
    let (ms, rate) = (case["ms"].as_f64().unwrap(), case["rate"].as_f64().unwrap());
    assert!((rate - flops / (ms / 1e3) / 1e9).abs() <= 1e-6 * rate);
    assert!((case["fraction_of_peak"].as_f64().unwrap() - rate / gflops).abs() <= 1e-9);
}
