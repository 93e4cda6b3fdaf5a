//! The native command-line shell over the websd core (in the browser, `web.rs` is the shell).
//!
//! - `websd bench [--filter TEXT] [--graph MODEL.onnx --dim NAME=N] [--json]`
//! - `websd run MODEL.onnx [--dim NAME=N]... [--input NAME=FILE.npy]... --output-dir DIR [--bench N]`
//! - `websd generate --model DIR --prompt P [...] --out OUT.png`
//! - `websd edit --model DIR --image IN.png --prompt P --out OUT.png [--etas A,B,.. --grid G.png]`
//! - `websd eval-edit --model DIR --benchmark DIR --method imagic|img2img|txt2img|images`
//! - `websd tokenize --model DIR TEXT`
//! - `websd eval --model DIR --benchmark DIR [--steps N] [--limit N]`

#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
mod bench;
#[cfg(not(target_arch = "wasm32"))]
mod edit;
#[cfg(not(target_arch = "wasm32"))]
mod eval;
#[cfg(not(target_arch = "wasm32"))]
mod eval_edit;
#[cfg(not(target_arch = "wasm32"))]
mod generate;
#[cfg(not(target_arch = "wasm32"))]
mod memory;
#[cfg(not(target_arch = "wasm32"))]
mod run;

#[cfg(not(target_arch = "wasm32"))]
fn main() -> std::process::ExitCode {
    cli::main()
}

/// Whether products with fp16 weights compute in f16 (`--f16-arithmetic`); `None`: the
/// device's default (see `Gpu::half_arithmetic`).
#[cfg(not(target_arch = "wasm32"))]
static HALF_ARITHMETIC: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();

/// Whether an fp16 model's activations are stored as halves (`--f16-activations`); `None`:
/// the default, on.
#[cfg(not(target_arch = "wasm32"))]
static HALF_ACTIVATIONS: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();

/// Whether GEMM tiles and attention run on subgroup kernels (`--subgroup-kernels`); `None`: the
/// device's default (see `Gpu::subgroup_kernels`).
#[cfg(not(target_arch = "wasm32"))]
static SUBGROUP_KERNELS: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();

/// Opens the default adapter, with the arithmetic, storage and kernels the command line
/// chose.
#[cfg(not(target_arch = "wasm32"))]
async fn open_gpu() -> Result<websd::engine::Gpu, String> {
    let gpu = websd::engine::Gpu::new().await.map_err(|e| e.to_string())?;
    let gpu = match HALF_ACTIVATIONS.get().copied().flatten() {
        Some(on) => gpu.with_half_activations(on),
        None => gpu,
    };
    let gpu = match HALF_ARITHMETIC.get().copied().flatten() {
        Some(on) => gpu.with_half_arithmetic(on).map_err(|e| e.to_string())?,
        None => gpu,
    };
    match SUBGROUP_KERNELS.get().copied().flatten() {
        Some(on) => gpu.with_subgroup_kernels(on).map_err(|e| e.to_string()),
        None => Ok(gpu),
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod cli {
    use std::path::PathBuf;
    use std::process::ExitCode;

    use clap::{Parser, Subcommand};

    use crate::bench::BenchArgs;
    use crate::edit::EditArgs;
    use crate::eval::EvalArgs;
    use crate::eval_edit::EvalEditArgs;
    use crate::generate::GenerateArgs;
    use crate::run::RunOptions;

    #[derive(Parser)]
    #[command(
        name = "websd",
        version,
        about = "Stable Diffusion on WebGPU, from ONNX files"
    )]
    struct Cli {
        #[command(subcommand)]
        command: Command,
        /// Products with fp16 weights (MatMul, Conv) computed in f16, accumulated in f32:
        /// `on` or `off`; by default on where the device has shader-f16 and is a GPU.
        #[arg(long, global = true, value_name = "on|off", value_parser = parse_on_off)]
        f16_arithmetic: Option<bool>,
        /// An fp16 model's largest activations stored as f16 where it computes in f16 (`on`,
        /// the default: half the memory where it peaks) or as f32 (`off`).
        #[arg(long, global = true, value_name = "on|off", value_parser = parse_on_off)]
        f16_activations: Option<bool>,
        /// MatMul and Conv's wide tiles and attention on their subgroup kernels (`on`) or
        /// the workgroup-memory ones (`off`); by default on for CPU adapters with 8-lane
        /// subgroups.
        #[arg(long, global = true, value_name = "on|off", value_parser = parse_on_off)]
        subgroup_kernels: Option<bool>,
    }

    fn parse_on_off(s: &str) -> Result<bool, String> {
        match s {
            "on" => Ok(true),
            "off" => Ok(false),
            _ => Err(format!("expected on or off, not `{s}`")),
        }
    }

    #[derive(Subcommand)]
    enum Command {
        /// Runs one ONNX graph on the GPU and writes every output as DIR/<name>.npy.
        Run {
            /// The .onnx file; external data is read from the files it names, next to it.
            model: PathBuf,
            /// Binds a symbolic dimension, e.g. --dim batch_size=2 (by default, dimensions
            /// are read off the inputs' shapes).
            #[arg(long = "dim", value_parser = parse_pair::<usize>)]
            dims: Vec<(String, usize)>,
            /// Feeds an input from a .npy file, e.g. --input sample=latents.npy.
            #[arg(long = "input", value_parser = parse_pair::<PathBuf>)]
            inputs: Vec<(String, PathBuf)>,
            #[arg(long)]
            output_dir: PathBuf,
            /// Runs N more times after the first and prints each run's time.
            #[arg(long, default_value_t = 0)]
            bench: usize,
            /// Prints the time spent in each kernel family (launches timed one by one).
            #[arg(long)]
            profile: bool,
            /// Instead of running once, trains a fresh LoRA of rank R on the graph's
            /// attention projections (toward a random target for its first output) for
            /// --bench N steps, printing loss, time and memory per step.
            #[arg(long, value_name = "R")]
            train_lora: Option<usize>,
            /// With --train-lora: saves the trained LoRA (diffusers/peft .safetensors).
            #[arg(long, value_name = "FILE", requires = "train_lora")]
            save_lora: Option<PathBuf>,
        },
        /// Measures the adapter's peak throughput and bandwidth, then times each kernel
        /// family at Stable Diffusion 1.5's shapes (512x512, guidance) against them.
        Bench(BenchArgs),
        /// Generates an image from a prompt with a Stable Diffusion model folder.
        Generate(GenerateArgs),
        /// Edits a picture from a sentence (Imagic): optimises a text embedding and a LoRA
        /// that reconstruct it, then draws it moved towards the sentence.
        Edit(EditArgs),
        /// Scores a model on a benchmark: generates its prompts and classifies the images.
        Eval(EvalArgs),
        /// Scores an editing method on a benchmark's real pictures: success (the classifier
        /// reads the target labels) and fidelity (the glyph's mask kept).
        EvalEdit(EvalEditArgs),
        /// Prints the token ids of TEXT as the model's tokenizer makes them (a JSON array).
        Tokenize {
            #[arg(long)]
            model: PathBuf,
            text: String,
        },
    }

    pub fn parse_pair<T: std::str::FromStr>(s: &str) -> Result<(String, T), String> {
        let (name, value) = s.split_once('=').ok_or("expected NAME=VALUE")?;
        let value = value
            .parse()
            .map_err(|_| format!("`{value}` is not a valid value for `{name}`"))?;
        Ok((name.to_string(), value))
    }

    pub fn main() -> ExitCode {
        stderr_logger();
        let cli = Cli::parse();
        let _ = crate::HALF_ARITHMETIC.set(cli.f16_arithmetic);
        let _ = crate::HALF_ACTIVATIONS.set(cli.f16_activations);
        let _ = crate::SUBGROUP_KERNELS.set(cli.subgroup_kernels);
        let result = match cli.command {
            Command::Run {
                model,
                dims,
                inputs,
                output_dir,
                bench,
                profile,
                train_lora,
                save_lora,
            } => {
                let options = RunOptions {
                    bench,
                    profile,
                    train_lora,
                    save_lora,
                };
                pollster::block_on(crate::run::run(
                    &model,
                    dims.into_iter().collect(),
                    &inputs,
                    &output_dir,
                    options,
                ))
            }
            Command::Bench(args) => pollster::block_on(crate::bench::bench(args)),
            Command::Generate(args) => pollster::block_on(crate::generate::generate(args)),
            Command::Edit(args) => pollster::block_on(crate::edit::edit(args)),
            Command::EvalEdit(args) => pollster::block_on(crate::eval_edit::eval_edit(args)),
            Command::Eval(args) => pollster::block_on(crate::eval::eval(args)),
            Command::Tokenize { model, text } => {
                pollster::block_on(crate::generate::tokenize(&model, &text))
            }
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("error: {message}");
                ExitCode::FAILURE
            }
        }
    }

    /// Logs websd's warnings and errors to stderr without a logging framework.
    fn stderr_logger() {
        struct Stderr;
        impl log::Log for Stderr {
            fn enabled(&self, m: &log::Metadata) -> bool {
                m.level() <= log::Level::Warn && m.target().starts_with("websd")
            }
            fn log(&self, r: &log::Record) {
                if self.enabled(r.metadata()) {
                    eprintln!("{}: {}", r.level(), r.args());
                }
            }
            fn flush(&self) {}
        }
        let _ = log::set_logger(&Stderr).map(|()| log::set_max_level(log::LevelFilter::Warn));
    }
}
