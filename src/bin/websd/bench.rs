//! `websd bench`: the adapter's ceilings, each kernel family at SD 1.5's shapes as a
//! fraction of them, and whole graphs.

use std::collections::HashMap;
use std::path::PathBuf;

use clap::Args;
use serde_json::json;
use websd::bench::{Work, sd15_cases, time_case, time_session};
use websd::engine::{Session, ceiling};

use crate::run::load_model;

#[derive(Args)]
pub struct BenchArgs {
    /// Only the cases whose family or shape contains this text (e.g. conv, attention, 64x64).
    #[arg(long)]
    filter: Option<String>,
    /// Timed runs per case; the best is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Also times a whole graph with random inputs (repeatable), e.g. a UNet's model.onnx.
    #[arg(long)]
    graph: Vec<PathBuf>,
    /// Binds a symbolic dimension of the --graph models, e.g. --dim height=8.
    #[arg(long = "dim", value_parser = crate::cli::parse_pair::<usize>)]
    dims: Vec<(String, usize)>,
    /// Prints one JSON object (for tracking) instead of the table.
    #[arg(long)]
    json: bool,
    /// Stores the convolutions' and linear layers' weights as f16, as an fp16 export does
    /// (computed in f16 where the device does that: see --f16-arithmetic).
    #[arg(long)]
    f16: bool,
}

pub async fn bench(args: BenchArgs) -> Result<(), String> {
    let gpu = crate::open_gpu().await?;
    let ceilings = ceiling::measure(&gpu).await.map_err(|e| e.to_string())?;
    if !args.json {
        println!("adapter: {}", gpu.describe());
        println!(
            "weights: {}, products with f16 weights computed in {}",
            if args.f16 { "f16" } else { "f32" },
            if gpu.half_arithmetic { "f16" } else { "f32" }
        );
        println!(
            "ceilings: {:.1} GFLOP/s (vec4 FMA chains), {:.1} GB/s (copy)",
            ceilings.gflops, ceilings.gbytes_per_s
        );
        println!(
            "{:<16} {:<44} {:>10} {:>12} {:>8}  kernels",
            "family", "shape", "ms", "rate", "of peak"
        );
    }
    let mut cases = Vec::new();
    for case in sd15_cases() {
        let (family, shape) = (case.family(), case.describe());
        if let Some(filter) = &args.filter
            && !family.contains(filter.as_str())
            && !shape.contains(filter.as_str())
        {
            continue;
        }
        let timing = time_case(&gpu, &case, args.f16, &ceilings, args.repeat)
            .await
            .map_err(|e| format!("{family} {shape}: {e}"))?;
        let unit = match case.work() {
            Work::Flops(_) => "GFLOP/s",
            Work::Bytes(_) => "GB/s",
        };
        if !args.json {
            println!(
                "{family:<16} {shape:<44} {:>10.2} {:>4.1} {unit:<7} {:>7.1}%  {}",
                timing.seconds * 1e3,
                timing.rate,
                timing.fraction * 100.0,
                timing.kernels
            );
        }
        cases.push(json!({
            "family": family,
            "shape": shape,
            "ms": timing.seconds * 1e3,
            "rate": timing.rate,
            "unit": unit,
            "fraction_of_peak": timing.fraction,
            "kernels": timing.kernels,
        }));
    }
    let dims: HashMap<String, usize> = args.dims.into_iter().collect();
    let mut graphs = Vec::new();
    for path in &args.graph {
        let model = load_model(path).await?;
        let session = Session::new(&gpu, &model, &dims)
            .await
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let times = time_session(&gpu, &session, args.repeat)
            .await
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if !args.json {
            println!(
                "graph {}: {:.2} ms (first run {:.2} ms)",
                path.display(),
                times.best * 1e3,
                times.first * 1e3
            );
        }
        graphs.push(json!({
            "path": path.display().to_string(),
            "ms": times.best * 1e3,
            "first_ms": times.first * 1e3,
        }));
    }
    if args.json {
        let report = json!({
            "adapter": gpu.describe(),
            "f16_weights": args.f16,
            "f16_arithmetic": gpu.half_arithmetic,
            "subgroup_kernels": gpu.subgroup_kernels,
            "ceilings": { "gflops": ceilings.gflops, "gbytes_per_s": ceilings.gbytes_per_s },
            "cases": cases,
            "graphs": graphs,
        });
        println!("{report}");
    }
    Ok(())
}
