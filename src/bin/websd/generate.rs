//! `websd generate` and `websd tokenize`: the pipeline on a model folder.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use clap::Args;
use websd::engine::Gpu;
use websd::image::RgbaImage;
use websd::lora::Lora;
use websd::model::{self, Directory};

use crate::memory::report_memory;
use websd::pipeline::{Control, Request, StableDiffusion, StepEvent};
use websd::scheduler::SchedulerKind;

#[derive(Args)]
pub struct GenerateArgs {
    /// The model folder (optimum's `--task text-to-image` layout).
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[arg(long, default_value_t = 50)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    guidance_scale: f64,
    /// Seed of the PyTorch-compatible CPU generator (random when omitted).
    #[arg(long)]
    seed: Option<u64>,
    /// ddim, pndm, euler, euler-a, dpm++2m, dpm++2m-karras, lcm, ddpm (default: the folder's).
    #[arg(long)]
    scheduler: Option<String>,
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// img2img: the picture to start from (PNG or JPEG).
    #[arg(long)]
    init_image: Option<PathBuf>,
    #[arg(long, default_value_t = 0.8)]
    strength: f64,
    /// Start from these latents (.npy) instead of seeded noise.
    #[arg(long)]
    init_latents: Option<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    /// Decode the latents every K steps; with --grid, write them side by side.
    #[arg(long, default_value_t = 0)]
    preview_every: usize,
    #[arg(long)]
    grid: Option<PathBuf>,
    /// Build every session the request needs and report the GPU memory they take, without
    /// generating (will it fit?).
    #[arg(long)]
    dry_run: bool,
    /// Hold one model on the GPU at a time (text encoder, UNet, VAE), freeing each after its
    /// stage: the largest stage's memory instead of the sum, for weights uploaded again
    /// every generation.
    #[arg(long)]
    low_memory: bool,
    /// A LoRA (.safetensors, diffusers/peft or kohya layout; UNet and text encoder layers),
    /// optionally with its strength (default 1): `--lora style.safetensors:0.8`. May be
    /// given several times.
    #[arg(long, value_name = "FILE[:SCALE]")]
    lora: Vec<String>,
}

/// The adapters of every `--lora FILE[:SCALE]`.
fn read_loras(specs: &[String]) -> Result<Lora, String> {
    let mut adapters = Lora::default();
    for spec in specs {
        let (file, scale) = match spec.rsplit_once(':') {
            Some((file, scale)) if scale.parse::<f32>().is_ok() => (file, scale.parse().unwrap()),
            _ => (spec.as_str(), 1.0),
        };
        let bytes = read(Path::new(file))?;
        adapters.extend(websd::lora::read_lora(file, &bytes, scale).map_err(|e| e.to_string())?);
    }
    Ok(adapters)
}

pub fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// A picture file (PNG or JPEG), decoded; errors name the file.
pub fn read_image(path: &Path) -> Result<RgbaImage, String> {
    RgbaImage::decode(&read(path)?).map_err(|e| format!("{}: {e}", path.display()))
}

/// A `--scheduler` value; `None` keeps the model folder's own.
pub fn parse_scheduler(name: Option<&str>) -> Result<Option<SchedulerKind>, String> {
    name.map(SchedulerKind::parse)
        .transpose()
        .map_err(|e| e.to_string())
}

pub async fn load(gpu: &Gpu, folder: &Path) -> Result<StableDiffusion, String> {
    let files = Rc::new(Directory(folder.to_path_buf()));
    StableDiffusion::load(gpu, files, &folder.display().to_string())
        .await
        .map_err(|e| e.to_string())
}

pub async fn generate(args: GenerateArgs) -> Result<(), String> {
    if args.grid.is_some() && args.preview_every == 0 {
        return Err("--grid needs --preview-every K".into());
    }
    let scheduler = parse_scheduler(args.scheduler.as_deref())?;
    let init_image = args.init_image.as_deref().map(read_image).transpose()?;
    let init_latents = match &args.init_latents {
        Some(path) => {
            Some(websd::npy::read(&read(path)?).map_err(|e| format!("{}: {e}", path.display()))?)
        }
        None => None,
    };
    let adapters = read_loras(&args.lora)?;
    let seed = args.seed.unwrap_or_else(random_seed);
    let request = Request {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        steps: args.steps,
        guidance_scale: args.guidance_scale,
        seed,
        scheduler,
        width: args.width,
        height: args.height,
        init_image,
        strength: args.strength,
        init_latents,
        preview_every: args.preview_every,
        live_preview: false,
        ..Request::default()
    };

    let gpu = crate::open_gpu().await?;
    eprintln!("adapter: {}", gpu.describe());
    let mut pipeline = load(&gpu, &args.model).await?;
    pipeline.set_low_memory(args.low_memory);
    pipeline.set_lora(&adapters).map_err(|e| e.to_string())?;
    if !adapters.is_empty() {
        eprintln!(
            "LoRA: {} adapted layers in the UNet, {} in the text encoder",
            adapters.unet.len(),
            adapters.text_encoder.len()
        );
    }
    let kind = scheduler.unwrap_or(pipeline.config.default_scheduler);
    eprintln!(
        "seed {seed}, scheduler {}, {} steps, guidance {}",
        kind.name(),
        args.steps,
        args.guidance_scale
    );

    if args.dry_run {
        let bytes = pipeline
            .prepare(&request)
            .await
            .map_err(|e| e.to_string())?;
        report_memory(bytes);
        return Ok(());
    }
    let mut previews = Vec::new();
    let mut on_step = |event: StepEvent| {
        if let Some(image) = event.preview {
            previews.push(image.clone());
        }
        progress_bar(event.step, event.total, event.step_ms);
        Control::Continue
    };
    let generated = pipeline
        .generate(&request, &mut on_step)
        .await
        .map_err(|e| e.to_string())?;
    eprintln!();
    for warning in &generated.warnings {
        eprintln!("warning: {warning}");
    }
    let t = &generated.timings;
    report_memory(t.gpu_peak_bytes);
    let unet_total: f64 = t.unet_step_ms.iter().sum();
    eprintln!(
        "text encoder {:.0} ms, {} UNet steps {:.0} ms ({:.0} ms/step), VAE decode {:.0} ms, total {:.0} ms",
        t.text_encoder_ms,
        t.unet_step_ms.len(),
        unet_total,
        unet_total / t.unet_step_ms.len().max(1) as f64,
        t.vae_decoder_ms,
        t.total_ms
    );
    let text = [
        ("prompt", args.prompt.clone()),
        ("negative_prompt", args.negative_prompt.clone()),
        ("seed", seed.to_string()),
        ("steps", args.steps.to_string()),
        ("scheduler", kind.name().to_string()),
        ("guidance_scale", args.guidance_scale.to_string()),
        ("model", args.model.display().to_string()),
    ];
    write_png(&generated.image, &text, &args.out)?;
    if let Some(grid) = &args.grid {
        previews.push(generated.image.clone());
        let grid_image = RgbaImage::row(&previews).map_err(|e| e.to_string())?;
        write_png(&grid_image, &text, grid)?;
        eprintln!("({} images in the grid)", previews.len());
    }
    Ok(())
}

/// Writes `image` as a PNG with `text` in its metadata, warning about metadata left out.
pub fn write_png(image: &RgbaImage, text: &[(&str, String)], path: &Path) -> Result<(), String> {
    let png = image.to_png(text).map_err(|e| e.to_string())?;
    for warning in &png.warnings {
        eprintln!("warning: {warning}");
    }
    std::fs::write(path, png.bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

pub async fn tokenize(folder: &Path, text: &str) -> Result<(), String> {
    let files = Directory(folder.to_path_buf());
    let tokenizer = model::read_tokenizer(&files)
        .await
        .map_err(|e| e.to_string())?;
    let ids = tokenizer.encode(text).map_err(|e| e.to_string())?;
    println!("{}", serde_json::to_string(&ids).expect("ids serialise"));
    Ok(())
}

fn progress_bar(step: usize, total: usize, step_ms: f64) {
    let width = 30;
    let filled = step * width / total.max(1);
    eprint!(
        "\r[{}{}] {step}/{total} {step_ms:.0} ms/step ",
        "#".repeat(filled),
        " ".repeat(width - filled)
    );
    let _ = std::io::stderr().flush();
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish() % (1 << 32)
}
