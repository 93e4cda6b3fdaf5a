//! `websd edit`: Imagic on a model folder (see `websd::pipeline::imagic`): optimise an edit
//! of a picture towards a sentence, or load a saved one, then draw it at one or more etas.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use websd::image::RgbaImage;
use websd::lora::Lora;
use websd::pipeline::{Control, Edit, EditProgress, EditSettings, Request, StepEvent, TuneLayers};

use crate::generate::{load, parse_scheduler, read, read_image, write_png};
use crate::memory::report_memory;

#[derive(Args)]
pub struct EditArgs {
    /// The model folder (it needs a VAE encoder).
    #[arg(long)]
    model: PathBuf,
    /// The picture to edit (PNG or JPEG).
    #[arg(long, required_unless_present = "load_edit")]
    image: Option<PathBuf>,
    /// What the picture should become.
    #[arg(long, required_unless_present = "load_edit")]
    prompt: Option<String>,
    /// The edited picture, drawn at --eta.
    #[arg(long)]
    out: PathBuf,
    /// How far towards the prompt: 0 redraws the picture, 1 is the prompt's own embedding.
    #[arg(long, default_value_t = 0.7)]
    eta: f32,
    /// Below 1, sampling starts from the picture (needs --image) noised to this strength, as
    /// image-to-image does, keeping more of it; 1 starts from noise, as Imagic's paper does.
    #[arg(long, default_value_t = 1.0)]
    strength: f64,
    /// With --grid: a strip of the source and the edit at each of these etas.
    #[arg(long, value_delimiter = ',', requires = "grid")]
    etas: Vec<f32>,
    #[arg(long)]
    grid: Option<PathBuf>,
    #[command(flatten)]
    training: TrainingArgs,
    /// The size to optimise and draw at (default: the model's native size); the picture's
    /// centre is cropped to its aspect and resized to it.
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// Seeds the posterior sample, the training noise and timesteps, and the sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Saves the optimised edit (embeddings + LoRA, one .safetensors) to redraw it later.
    #[arg(long, conflicts_with = "load_edit")]
    save_edit: Option<PathBuf>,
    /// Draws a saved edit instead of optimising one.
    #[arg(long)]
    load_edit: Option<PathBuf>,
    /// Sampling: steps, guidance scale, scheduler (default: the folder's).
    #[arg(long, default_value_t = 50)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    guidance_scale: f64,
    #[arg(long)]
    scheduler: Option<String>,
}

/// How to optimise an edit (defaults: [`EditSettings::default`]).
#[derive(Args)]
pub struct TrainingArgs {
    /// Stage A: Adam steps on the text embedding, and their learning rate.
    #[arg(long)]
    embed_steps: Option<usize>,
    #[arg(long)]
    embed_lr: Option<f32>,
    /// Stage B: Adam steps on a LoRA of the UNet (0: none), their learning rate, its rank.
    #[arg(long)]
    tune_steps: Option<usize>,
    #[arg(long)]
    tune_lr: Option<f32>,
    #[arg(long)]
    lora_rank: Option<usize>,
    /// The UNet layers the LoRA adapts: `attention` (projections) or `all` (every linear
    /// and convolution layer).
    #[arg(long)]
    tune_layers: Option<String>,
}

impl TrainingArgs {
    /// The settings these flags give (prompt and seed left empty).
    pub fn settings(&self) -> Result<EditSettings, String> {
        let defaults = EditSettings::default();
        let tune_layers = match &self.tune_layers {
            Some(name) => TuneLayers::parse(name).map_err(|e| e.to_string())?,
            None => defaults.tune_layers,
        };
        Ok(EditSettings {
            embed_steps: self.embed_steps.unwrap_or(defaults.embed_steps),
            embed_lr: self.embed_lr.unwrap_or(defaults.embed_lr),
            tune_steps: self.tune_steps.unwrap_or(defaults.tune_steps),
            tune_lr: self.tune_lr.unwrap_or(defaults.tune_lr),
            lora_rank: self.lora_rank.unwrap_or(defaults.lora_rank),
            tune_layers,
            ..defaults
        })
    }
}

impl EditArgs {
    fn settings(&self) -> Result<EditSettings, String> {
        Ok(EditSettings {
            prompt: self.prompt.clone().unwrap_or_default(),
            seed: self.seed,
            width: self.width,
            height: self.height,
            ..self.training.settings()?
        })
    }
}

pub async fn edit(args: EditArgs) -> Result<(), String> {
    let scheduler = parse_scheduler(args.scheduler.as_deref())?;
    let source = args.image.as_deref().map(read_image).transpose()?;
    let gpu = crate::open_gpu().await?;
    eprintln!("adapter: {}", gpu.describe());
    let mut pipeline = load(&gpu, &args.model).await?;

    let edit = match (&args.load_edit, &source) {
        (Some(path), _) => {
            let name = path.display().to_string();
            Edit::from_bytes(&name, &read(path)?).map_err(|e| e.to_string())?
        }
        (None, Some(image)) => {
            let settings = args.settings()?;
            let mut peak = 0;
            let mut on_step = |p: EditProgress| {
                peak = peak.max(p.gpu_bytes);
                stage_progress(&p);
                Control::Continue
            };
            let edit = pipeline
                .optimize_edit(image, &settings, &mut on_step)
                .await
                .map_err(|e| e.to_string())?;
            report_memory(peak);
            if let Some(path) = &args.save_edit {
                let bytes = edit.to_bytes().map_err(|e| e.to_string())?;
                std::fs::write(path, bytes)
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
            edit
        }
        (None, None) => unreachable!("clap requires --image without --load-edit"),
    };
    pipeline
        .set_lora(&Lora::unet(edit.lora.clone()))
        .map_err(|e| e.to_string())?;

    let base = Request {
        steps: args.steps,
        guidance_scale: args.guidance_scale,
        scheduler,
        ..Request::default()
    };
    let mut draw = async |eta: f32| -> Result<RgbaImage, String> {
        let request = pipeline
            .edit_request(&edit, eta, source.as_ref(), args.strength, &base)
            .map_err(|e| e.to_string())?;
        let mut on_step = |_: StepEvent| Control::Continue;
        let generated = pipeline
            .generate(&request, &mut on_step)
            .await
            .map_err(|e| e.to_string())?;
        eprintln!("eta {eta}: {:.0} ms", generated.timings.total_ms);
        Ok(generated.image)
    };
    let text = [
        ("prompt", edit.settings.prompt.clone()),
        ("eta", args.eta.to_string()),
        ("strength", args.strength.to_string()),
        ("seed", edit.settings.seed.to_string()),
        ("model", args.model.display().to_string()),
    ];
    let image = draw(args.eta).await?;
    write_png(&image, &text, &args.out)?;
    if let Some(grid) = &args.grid {
        let mut strip: Vec<RgbaImage> = source
            .iter()
            .map(|s| s.resized(image.width, image.height))
            .collect();
        for &eta in &args.etas {
            strip.push(if eta == args.eta {
                image.clone()
            } else {
                draw(eta).await?
            });
        }
        let strip = RgbaImage::row(&strip).map_err(|e| e.to_string())?;
        write_png(&strip, &text, grid)?;
    }
    Ok(())
}

/// One line per stage, redrawn in place: the stage's bar, its step and its loss.
fn stage_progress(p: &EditProgress) {
    let width = 30;
    let filled = p.step * width / p.total.max(1);
    eprint!(
        "\r{:>11} [{}{}] {}/{} loss {:.5} {:.0} ms/step ",
        p.stage.name(),
        "#".repeat(filled),
        " ".repeat(width - filled),
        p.step,
        p.total,
        p.loss,
        p.step_ms
    );
    if p.step == p.total {
        eprintln!();
    }
    let _ = std::io::stderr().flush();
}
