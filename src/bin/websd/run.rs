//! `websd run`: one ONNX graph on the GPU, inputs and outputs as .npy files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use websd::engine::Directory;
use websd::engine::{AdamW, Gpu, GpuTensor, HostTensor, Model, Session};
use websd::lora::write_unet_lora;
use websd::npy;
use websd::train::{ATTENTION_PROJECTIONS, LoraTrainer, fresh_adapters, layers_named};

use crate::memory::report_memory;

/// Opens an .onnx file (external data next to it); weights are read as sessions upload them.
pub async fn load_model(path: &Path) -> Result<Model, String> {
    let folder = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    Model::open(Rc::new(Directory(folder)), &name)
        .await
        .map_err(|e| format!("{}: {e}", path.display()))
}

pub struct RunOptions {
    pub bench: usize,
    pub profile: bool,
    /// Train a fresh LoRA of this rank instead (see `train_lora`).
    pub train_lora: Option<usize>,
    /// Where to save the trained LoRA (diffusers' layout).
    pub save_lora: Option<PathBuf>,
}

pub async fn run(
    model_path: &Path,
    dims: HashMap<String, usize>,
    inputs: &[(String, PathBuf)],
    out: &Path,
    options: RunOptions,
) -> Result<(), String> {
    let gpu = crate::open_gpu().await?;
    eprintln!("adapter: {}", gpu.describe());
    let model = load_model(model_path).await?;
    let mut tensors: Vec<(String, HostTensor)> = Vec::new();
    for (name, path) in inputs {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        tensors.push((
            name.clone(),
            npy::read(&bytes).map_err(|e| format!("{}: {e}", path.display()))?,
        ));
    }
    let missing: Vec<&str> = model
        .input_names()
        .into_iter()
        .filter(|name| !tensors.iter().any(|(n, _)| n == name))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "missing inputs: {} (give each with --input NAME=FILE.npy)",
            missing.join(", ")
        ));
    }
    // Dimensions follow from the inputs' shapes; --dim values win.
    let shapes: Vec<(&str, &[usize])> = tensors
        .iter()
        .filter(|(name, _)| model.input_names().contains(&name.as_str()))
        .map(|(n, t)| (n.as_str(), t.shape.as_slice()))
        .collect();
    let mut bound = model.dims_for_shapes(&shapes).map_err(|e| e.to_string())?;
    bound.extend(dims);
    if let Some(rank) = options.train_lora {
        let steps = options.bench.max(1);
        return train_lora(
            &gpu,
            &model,
            &bound,
            &tensors,
            rank,
            steps,
            options.save_lora,
        )
        .await;
    }
    let started = Instant::now();
    let session = Session::new(&gpu, &model, &bound)
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
    let feeds: Vec<(&str, &HostTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let outputs = session.run_host(&feeds).await.map_err(|e| e.to_string())?;
    for i in 0..options.bench {
        let started = Instant::now();
        session.run_host(&feeds).await.map_err(|e| e.to_string())?;
        eprintln!("run {}: {:.2?}", i + 1, started.elapsed());
    }
    report_memory(session.memory_bytes);
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
    std::fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    for (name, tensor) in &outputs {
        let path = out.join(format!("{name}.npy"));
        std::fs::write(&path, npy::write(tensor))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("wrote {} {:?}", path.display(), tensor.shape);
    }
    Ok(())
}

/// Trains a fresh LoRA of `rank` on the graph's attention projections for `steps` AdamW
/// steps, towards a random target for its first output, printing each step's loss and time
/// and the GPU memory a step holds: what fine-tuning costs at this model's size.
async fn train_lora(
    gpu: &Gpu,
    model: &Model,
    dims: &HashMap<String, usize>,
    tensors: &[(String, HostTensor)],
    rank: usize,
    steps: usize,
    save: Option<PathBuf>,
) -> Result<(), String> {
    let layers = layers_named(model.adaptable_layers(), &ATTENTION_PROJECTIONS);
    if layers.is_empty() {
        return Err(
            "the graph has no attention projections (to_q, to_k, to_v, to_out.0) to adapt".into(),
        );
    }
    let adapters = fresh_adapters(&layers, rank, rank as f32, 0);
    let output = model.output_names()[0].to_string();
    let started = Instant::now();
    let mut trainer = LoraTrainer::new(gpu, model, &adapters, &output, dims, AdamW::default())
        .await
        .map_err(|e| e.to_string())?;
    eprintln!(
        "LoRA of rank {rank} on {} layers: training session built in {:.2?}",
        layers.len(),
        started.elapsed()
    );
    let inputs: Vec<(&str, GpuTensor)> = tensors
        .iter()
        .map(|(n, t)| (n.as_str(), GpuTensor::from_host(gpu, t)))
        .collect();
    let feeds: Vec<(&str, &GpuTensor)> = inputs.iter().map(|(n, t)| (*n, t)).collect();
    let plan = model.plan(dims).map_err(|e| e.to_string())?;
    let shape = plan.outputs[&output].clone();
    let n = shape.iter().product();
    let target = GpuTensor::from_host(gpu, &HostTensor::f32(shape, websd::bench::noise(n, 7, 1.0)));
    for step in 1..=steps {
        let started = Instant::now();
        let loss = trainer
            .step(&feeds, &target)
            .await
            .map_err(|e| e.to_string())?;
        eprintln!("step {step}: loss {loss:.6}, {:.2?}", started.elapsed());
    }
    report_memory(trainer.trainer().memory_bytes());
    if let Some(path) = save {
        let adapters = trainer.adapters().await.map_err(|e| e.to_string())?;
        let bytes = write_unet_lora(&adapters).map_err(|e| e.to_string())?;
        std::fs::write(&path, bytes)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
