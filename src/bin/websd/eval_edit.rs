//! `websd eval-edit`: edit a benchmark's real pictures with one method and score success
//! and fidelity (see `websd::eval::EditBenchmark`).

use std::path::{Path, PathBuf};
use std::rc::Rc;

use clap::Args;
use websd::eval::{Benchmark, EditBenchmark, EditMethod, EditOutcome};
use websd::image::RgbaImage;
use websd::model::Directory;
use websd::pipeline::Request;

use crate::edit::TrainingArgs;
use crate::eval::replace_entry;
use crate::generate::{load, read_image};

#[derive(Args)]
pub struct EvalEditArgs {
    /// The model folder (with a VAE encoder).
    #[arg(long)]
    model: PathBuf,
    /// The benchmark folder (classifier, labels.json, edits.json and its pictures).
    #[arg(long)]
    benchmark: PathBuf,
    /// imagic, img2img or txt2img; or `images` to score pictures made elsewhere (--images).
    #[arg(long, default_value = "imagic")]
    method: String,
    /// How much of the schedule runs over the source: img2img's (default 0.5), or where
    /// Imagic's sampling starts (default 1: from noise; see `websd edit --strength`).
    #[arg(long)]
    strength: Option<f64>,
    /// Imagic: the etas to draw each optimised edit at, and the optimisation settings
    /// (defaults: `websd edit`'s).
    #[arg(long, value_delimiter = ',', default_value = "0.7")]
    etas: Vec<f32>,
    #[command(flatten)]
    training: TrainingArgs,
    /// With --method images: the folder holding each case's picture under its source's
    /// file name.
    #[arg(long)]
    images: Option<PathBuf>,
    #[arg(long, default_value_t = 50)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    guidance_scale: f64,
    /// Only the first N edits.
    #[arg(long, default_value_t = usize::MAX)]
    limit: usize,
    /// Writes sources (top) and results (bottom) as one PNG.
    #[arg(long)]
    grid: Option<PathBuf>,
    /// Adds this run to a JSON list of results under --label (replacing one of that label).
    #[arg(long)]
    results: Option<PathBuf>,
    #[arg(long)]
    label: Option<String>,
}

impl EvalEditArgs {
    fn method(&self) -> Result<Option<EditMethod>, String> {
        Ok(Some(match self.method.as_str() {
            "imagic" => EditMethod::Imagic {
                settings: self.training.settings()?,
                etas: self.etas.clone(),
                strength: self.strength.unwrap_or(1.0),
            },
            "img2img" => EditMethod::ImageToImage {
                strength: self.strength.unwrap_or(0.5),
            },
            "txt2img" => EditMethod::TextToImage,
            "images" if self.images.is_some() => return Ok(None),
            "images" => return Err("--method images needs --images DIR".into()),
            other => {
                return Err(format!(
                    "unknown method `{other}` (imagic, img2img, txt2img, images)"
                ));
            }
        }))
    }
}

pub async fn eval_edit(args: EvalEditArgs) -> Result<(), String> {
    let method = args.method()?;
    let gpu = crate::open_gpu().await?;
    eprintln!("adapter: {}", gpu.describe());
    let mut pipeline = load(&gpu, &args.model).await?;
    let files = Rc::new(Directory(args.benchmark.clone()));
    let context = |e: websd::error::Error| format!("{}: {e}", args.benchmark.display());
    let mut classifier = Benchmark::load(files.clone()).await.map_err(context)?;
    let edits = EditBenchmark::load(files).await.map_err(context)?;
    let base = Request {
        steps: args.steps,
        guidance_scale: args.guidance_scale,
        ..Request::default()
    };
    // One list of outcomes per variant (each eta of one Imagic optimisation).
    let mut sources = Vec::new();
    let mut variants: Vec<Vec<EditOutcome>> = Vec::new();
    for (i, case) in edits.cases.iter().take(args.limit).enumerate() {
        let source = edits.source(case).await.map_err(|e| e.to_string())?;
        let outcomes = match &method {
            Some(method) => {
                edits
                    .run(&mut pipeline, &mut classifier, case, method, &base)
                    .await
            }
            None => {
                let name = Path::new(&case.source).file_name().unwrap_or_default();
                let dir = args.images.as_deref().expect("checked with the method");
                let image = read_image(&dir.join(name))?;
                let scored = edits.score(&gpu, &mut classifier, case, &source, image);
                scored.await.map(|o| vec![o])
            }
        }
        .map_err(|e| e.to_string())?;
        variants.resize_with(outcomes.len(), Vec::new);
        for (k, outcome) in outcomes.into_iter().enumerate() {
            eprintln!(
                "{:>3} {:<10} {:<36} {:<9} read {:<14} {} fidelity {:.2} ({:.0} ms)",
                i + 1,
                case.kind,
                case.prompt,
                variant_label(&args, k),
                outcome.read.join(" "),
                if outcome.success { "ok  " } else { "miss" },
                outcome.fidelity,
                outcome.ms
            );
            variants[k].push(outcome);
        }
        sources.push(source);
    }
    let mut rows = vec![sources];
    for (k, outcomes) in variants.iter().enumerate() {
        let label = format!(
            "{}{}",
            args.label.as_deref().unwrap_or(&args.method),
            variant_label(&args, k)
        );
        let n = outcomes.len().max(1) as f64;
        let successes = outcomes.iter().filter(|o| o.success).count();
        let fidelity = outcomes.iter().map(|o| o.fidelity).sum::<f64>() / n;
        let ms = outcomes.iter().map(|o| o.ms).sum::<f64>() / n;
        println!(
            "{label}: {successes}/{} edits succeed, mean fidelity {fidelity:.3}, {ms:.0} ms per edit",
            outcomes.len()
        );
        if let Some(path) = &args.results {
            let entry = serde_json::json!({
                "label": label,
                "edits": outcomes.len(),
                "successes": successes,
                "fidelity": fidelity,
                "ms_per_edit": ms.round(),
                "by_edit": outcomes.iter().map(|o| serde_json::json!({
                    "read": o.read, "success": o.success, "fidelity": o.fidelity,
                })).collect::<Vec<_>>(),
            });
            replace_entry(path, "label", &label, entry)?;
        }
        rows.push(outcomes.iter().map(|o| o.image.clone()).collect());
    }
    if let Some(path) = &args.grid {
        let rows: Result<Vec<RgbaImage>, _> = rows.iter().map(|r| RgbaImage::row(r)).collect();
        let grid = rows.and_then(|r| RgbaImage::column(&r)?.to_png(&[]));
        let png = grid.map_err(|e| e.to_string())?;
        std::fs::write(path, png.bytes)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

/// " eta=X" for each of several Imagic etas; nothing for a single variant.
fn variant_label(args: &EvalEditArgs, k: usize) -> String {
    match args.method.as_str() {
        "imagic" if args.etas.len() > 1 => format!(" eta={}", args.etas[k]),
        _ => String::new(),
    }
}
