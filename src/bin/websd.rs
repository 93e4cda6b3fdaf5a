//! The native command-line shell over the websd core.
//!
//! `websd run MODEL.onnx [--dim NAME=N]... [--input NAME=FILE.npy]... --output-dir DIR [--bench N]`
//!
//! Native only: in the browser, `web.rs` is the shell.

#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
fn main() -> std::process::ExitCode {
    cli::main()
}

#[cfg(not(target_arch = "wasm32"))]
mod cli {

    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::process::ExitCode;
    use std::time::Instant;

    use clap::{Parser, Subcommand};
    use websd::engine::{Gpu, HostTensor, Model, Session};
    use websd::npy;

    #[derive(Parser)]
    #[command(
        name = "websd",
        version,
        about = "Stable Diffusion on WebGPU, from ONNX files"
    )]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Subcommand)]
    enum Command {
        /// Runs one ONNX graph on the GPU and writes every output as DIR/<name>.npy.
        Run {
            /// The .onnx file; external data is read from the files it names, next to it.
            model: PathBuf,
            /// Binds a symbolic dimension, e.g. --dim batch_size=2.
            #[arg(long = "dim", value_parser = parse_dim)]
            dims: Vec<(String, usize)>,
            /// Feeds an input from a .npy file, e.g. --input sample=latents.npy.
            #[arg(long = "input", value_parser = parse_input)]
            inputs: Vec<(String, PathBuf)>,
            #[arg(long)]
            output_dir: PathBuf,
            /// Runs N more times after the first and prints each run's time.
            #[arg(long, default_value_t = 0)]
            bench: usize,
            /// Prints the time spent in each kernel family (launches timed one by one).
            #[arg(long)]
            profile: bool,
        },
    }

    fn parse_dim(s: &str) -> Result<(String, usize), String> {
        let (name, value) = s.split_once('=').ok_or("expected NAME=N")?;
        let value = value
            .parse()
            .map_err(|_| format!("`{value}` is not a non-negative integer"))?;
        Ok((name.to_string(), value))
    }

    fn parse_input(s: &str) -> Result<(String, PathBuf), String> {
        let (name, path) = s.split_once('=').ok_or("expected NAME=FILE.npy")?;
        Ok((name.to_string(), PathBuf::from(path)))
    }

    pub fn main() -> ExitCode {
        env_logger_lite();
        let cli = Cli::parse();
        let result = match cli.command {
            Command::Run {
                model,
                dims,
                inputs,
                output_dir,
                bench,
                profile,
            } => {
                let options = RunOptions { bench, profile };
                let dims = dims.into_iter().collect();
                pollster::block_on(run(&model, dims, &inputs, &output_dir, options))
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

    /// Logs warnings and errors to stderr without pulling in a logging framework.
    fn env_logger_lite() {
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

    /// Reads an .onnx file and, on demand, the external-data files it names.
    pub fn load_model(path: &Path) -> Result<Model, String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let folder = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        Model::from_bytes(bytes, &mut |location| {
            std::fs::read(folder.join(location))
                .map(Into::into)
                .map_err(|e| e.to_string())
        })
        .map_err(|e| format!("{}: {e}", path.display()))
    }

    struct RunOptions {
        bench: usize,
        profile: bool,
    }

    async fn run(
        model_path: &Path,
        dims: HashMap<String, usize>,
        inputs: &[(String, PathBuf)],
        out: &Path,
        options: RunOptions,
    ) -> Result<(), String> {
        let gpu = Gpu::new().await.map_err(|e| e.to_string())?;
        eprintln!("adapter: {}", gpu.describe());
        let model = load_model(model_path)?;
        let started = Instant::now();
        let session = Session::new(&gpu, &model, &dims)
            .await
            .map_err(|e| e.to_string())?;
        eprintln!(
            "session: {} kernel launches, {:.1} MiB of GPU memory, built in {:.2?}",
            session.launch_count,
            session.memory_bytes as f64 / (1 << 20) as f64,
            started.elapsed()
        );
        let counts: Vec<String> = session
            .kernel_counts()
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        eprintln!("kernels: {}", counts.join(", "));
        let mut tensors: Vec<(String, HostTensor)> = Vec::new();
        for (name, path) in inputs {
            let bytes =
                std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            tensors.push((
                name.clone(),
                npy::read(&bytes).map_err(|e| format!("{}: {e}", path.display()))?,
            ));
        }
        let feeds: Vec<(&str, &HostTensor)> =
            tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let outputs = session.run_host(&feeds).await.map_err(|e| e.to_string())?;
        for i in 0..options.bench {
            let started = Instant::now();
            session.run_host(&feeds).await.map_err(|e| e.to_string())?;
            eprintln!("run {}: {:.2?}", i + 1, started.elapsed());
        }
        if options.profile {
            let times = session.profile();
            let total: f64 = times.iter().map(|(_, t)| t.as_secs_f64()).sum();
            for (kernel, time) in times {
                eprintln!(
                    "  {kernel:<12} {:>9.2?} {:>5.1}%",
                    time,
                    100.0 * time.as_secs_f64() / total
                );
            }
        }
        std::fs::create_dir_all(out)
            .map_err(|e| format!("cannot create {}: {e}", out.display()))?;
        for (name, tensor) in &outputs {
            let path = out.join(format!("{name}.npy"));
            std::fs::write(&path, npy::write(tensor))
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            eprintln!("wrote {} {:?}", path.display(), tensor.shape);
        }
        Ok(())
    }
}
