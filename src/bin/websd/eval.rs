//! `websd eval`: generate a benchmark's prompts with a model folder and score the images with
//! the benchmark's classifier (see `websd::eval`).

use std::path::{Path, PathBuf};
use std::rc::Rc;

use clap::Args;
use websd::eval::{Benchmark, Outcome, Report};
use websd::image::RgbaImage;
use websd::model::Directory;
use websd::pipeline::Request;

use crate::generate::{load, parse_scheduler};

#[derive(Args)]
pub struct EvalArgs {
    /// The model folder to measure.
    #[arg(long)]
    model: PathBuf,
    /// The benchmark folder (classifier/model.onnx, labels.json, prompts.json).
    #[arg(long)]
    benchmark: PathBuf,
    #[arg(long, default_value_t = 50)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    guidance_scale: f64,
    /// Default: the model folder's scheduler.
    #[arg(long)]
    scheduler: Option<String>,
    /// Only the first N prompts.
    #[arg(long, default_value_t = usize::MAX)]
    limit: usize,
    /// Records the report in this JSON file (a list with one entry per model folder name;
    /// this model's entry is replaced).
    #[arg(long)]
    results: Option<PathBuf>,
    /// Writes every image, side by side, as one PNG.
    #[arg(long)]
    grid: Option<PathBuf>,
}

pub async fn eval(args: EvalArgs) -> Result<(), String> {
    let scheduler = parse_scheduler(args.scheduler.as_deref())?;
    let gpu = crate::open_gpu().await?;
    eprintln!("adapter: {}", gpu.describe());
    let folder = args.model.display().to_string();
    let mut pipeline = load(&gpu, &args.model).await?;
    let mut benchmark = Benchmark::load(Rc::new(Directory(args.benchmark.clone())))
        .await
        .map_err(|e| format!("{}: {e}", args.benchmark.display()))?;
    let base = Request {
        steps: args.steps,
        guidance_scale: args.guidance_scale,
        scheduler,
        ..Request::default()
    };
    let mut images = Vec::new();
    let mut reads = Vec::new();
    let mut on_outcome = |o: &Outcome| {
        let read: Vec<String> = o
            .read
            .iter()
            .map(|(name, class, ok)| format!("{name}={class}{}", if *ok { "" } else { " (wrong)" }))
            .collect();
        eprintln!(
            "{:>4} {:<45} {} ({:.0} ms)",
            images.len() + 1,
            o.case.prompt,
            read.join(" "),
            o.generate_ms
        );
        images.push(o.image.clone());
        reads.push(
            o.read
                .iter()
                .map(|(_, class, _)| class.clone())
                .collect::<Vec<_>>(),
        );
    };
    let report = benchmark
        .run(&mut pipeline, &base, args.limit, &mut on_outcome)
        .await
        .map_err(|e| e.to_string())?;
    let accuracy: Vec<String> = report
        .accuracy
        .iter()
        .map(|(name, acc)| format!("{name} {:.1}%", acc * 100.0))
        .collect();
    println!(
        "{}: {} prompts, {} steps, guidance {}: {}; {:.0} ms per image",
        folder,
        report.cases,
        args.steps,
        args.guidance_scale,
        accuracy.join(", "),
        report.ms_per_image
    );
    if let Some(path) = &args.results {
        record(path, &args, &report, &reads)?;
    }
    if let Some(path) = &args.grid {
        let png = RgbaImage::row(&images)
            .and_then(|g| g.to_png(&[]))
            .map_err(|e| e.to_string())?;
        std::fs::write(path, png.bytes)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Replaces (or adds) this model's entry in the results file: the settings, the accuracy
/// and what the classifier read in each image, in prompt order.
fn record(
    path: &Path,
    args: &EvalArgs,
    report: &Report,
    reads: &[Vec<String>],
) -> Result<(), String> {
    let model = args.model.file_name().map_or_else(
        || args.model.display().to_string(),
        |n| n.to_string_lossy().to_string(),
    );
    // Unrounded, so that what README shows (one decimal, as printed) follows from the file.
    let accuracy: serde_json::Map<String, serde_json::Value> = report
        .accuracy
        .iter()
        .map(|(name, acc)| (name.clone(), (*acc).into()))
        .collect();
    let entry = serde_json::json!({
        "model": model,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "prompts": report.cases,
        "accuracy": accuracy,
        "ms_per_image": report.ms_per_image.round(),
        "reads": reads,
    });
    replace_entry(path, "model", &model, entry)
}

/// Replaces (or adds) the entry whose `key` is `value` in the JSON list of results at
/// `path`.
pub fn replace_entry(
    path: &Path,
    key: &str,
    value: &str,
    entry: serde_json::Value,
) -> Result<(), String> {
    let mut entries: Vec<serde_json::Value> = match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?,
        Err(_) => Vec::new(),
    };
    entries.retain(|e| e[key] != value);
    entries.push(entry);
    let text = serde_json::to_string_pretty(&entries).expect("results serialise");
    std::fs::write(path, text + "\n").map_err(|e| format!("cannot write {}: {e}", path.display()))
}
