//! Training on the user's GPU: chosen inputs of a model (a text embedding, LoRA adapters'
//! factors) optimised against a mean squared error, all on the GPU.

use std::collections::HashMap;

use crate::engine::{
    AdamW, AdaptableLayer, Gpu, GpuTensor, HostTensor, LOSS, LoraAdapter, Model, Objective,
    Optimizer, Session, grad_name, lora_input_names,
};
use crate::error::{Error, Result};
use crate::rng::TorchRng;

/// The graph input holding the objective's target.
pub const TARGET: &str = "target";

/// The layers LoRAs for SD usually adapt: attention projections.
pub const ATTENTION_PROJECTIONS: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];

/// Those of `layers` whose module ends in one of `names` (`to_q`...).
pub fn layers_named(layers: Vec<AdaptableLayer>, names: &[&str]) -> Vec<AdaptableLayer> {
    layers
        .into_iter()
        .filter(|l| names.iter().any(|n| l.module.ends_with(&format!(".{n}"))))
        .collect()
}

/// New adapters on `layers` as peft's `init_lora_weights="gaussian"` makes them: A drawn
/// from N(0, 1/rank²), B zero (so the adapted model starts equal to the model), scaled by
/// `alpha / rank`.
pub fn fresh_adapters(
    layers: &[AdaptableLayer],
    rank: usize,
    alpha: f32,
    seed: u64,
) -> Vec<LoraAdapter> {
    let mut rng = TorchRng::new(seed);
    layers
        .iter()
        .map(|layer| {
            let [a_shape, b_shape] = layer.factor_shapes(rank);
            let a: Vec<f32> = rng
                .randn(&[a_shape.iter().product()])
                .to_f32()
                .iter()
                .map(|v| v / rank as f32)
                .collect();
            let zeros = vec![0.0; b_shape.iter().product()];
            LoraAdapter {
                module: layer.module.clone(),
                rank,
                scale: alpha / rank as f32,
                weights: Some((HostTensor::f32(a_shape, a), HostTensor::f32(b_shape, zeros))),
            }
        })
        .collect()
}

/// Trains named inputs of a model (embeddings, adapter factors...) against a mean squared
/// error on one of its outputs: forward and backward run in one session, AdamW updates the
/// tensors where they live, and only the loss is read back (for progress).
pub struct Trainer {
    session: Session,
    /// The trained inputs' names, and their current values.
    names: Vec<String>,
    params: Vec<GpuTensor>,
    optimizer: Optimizer,
}

impl Trainer {
    /// A session training the inputs `params` (names and starting values) of `model` towards
    /// targets for its `output`, at the given dimensions.
    pub async fn new(
        gpu: &Gpu,
        model: &Model,
        params: Vec<(String, GpuTensor)>,
        output: &str,
        dims: &HashMap<String, usize>,
        config: AdamW,
    ) -> Result<Trainer> {
        let (names, params): (Vec<String>, Vec<GpuTensor>) = params.into_iter().unzip();
        let objective = Objective {
            output: output.into(),
            target: TARGET.into(),
            wrt: names.clone(),
        };
        let session = Session::new(gpu, &model.with_objective(objective)?, dims).await?;
        let refs: Vec<&GpuTensor> = params.iter().collect();
        let optimizer = Optimizer::new(gpu, config, &refs)?;
        Ok(Trainer {
            session,
            names,
            params,
            optimizer,
        })
    }

    /// One step towards `target` from `inputs` (the model's other inputs); returns the loss
    /// before the step.
    pub async fn step(&mut self, inputs: &[(&str, &GpuTensor)], target: &GpuTensor) -> Result<f32> {
        let mut feeds: Vec<(&str, &GpuTensor)> = inputs.to_vec();
        feeds.push((TARGET, target));
        feeds.extend(self.names.iter().map(String::as_str).zip(&self.params));
        let out = self.session.run(&feeds).await?;
        let grads: Vec<&GpuTensor> = self.names.iter().map(|n| &out[&grad_name(n)]).collect();
        let params: Vec<&GpuTensor> = self.params.iter().collect();
        self.optimizer.step(&params, &grads)?;
        Ok(out[LOSS].to_host().await?.to_f32()[0])
    }

    /// The current values of the trained inputs, in the order given.
    pub fn params(&self) -> &[GpuTensor] {
        &self.params
    }

    /// The training session (for its inputs' shapes and types).
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// GPU memory one step holds: the session (weights, activations kept for the backward
    /// pass, gradients) and the optimizer's moments.
    pub fn memory_bytes(&self) -> u64 {
        let params: u64 = self.params.iter().map(|p| p.byte_len()).sum();
        self.session.memory_bytes + 3 * params
    }

    /// The global norm of the last step's gradients.
    pub async fn last_grad_norm(&self) -> Result<f32> {
        Ok(self.optimizer.last_grad_norm().await?)
    }
}

/// A [`Trainer`] of LoRA adapters.
pub struct LoraTrainer {
    trainer: Trainer,
    adapters: Vec<LoraAdapter>,
}

impl LoraTrainer {
    /// A session training `initial` (adapters with their starting weights) on `model`,
    /// towards targets for its `output`, at the given dimensions.
    pub async fn new(
        gpu: &Gpu,
        model: &Model,
        initial: &[LoraAdapter],
        output: &str,
        dims: &HashMap<String, usize>,
        config: AdamW,
    ) -> Result<LoraTrainer> {
        let mut params = Vec::new();
        for adapter in initial {
            let (a, b) = adapter.weights.as_ref().ok_or_else(|| {
                Error::Invalid(format!("`{}` has no starting weights", adapter.module))
            })?;
            let (name_a, name_b) = lora_input_names(&adapter.module);
            params.push((name_a, GpuTensor::from_host(gpu, a)));
            params.push((name_b, GpuTensor::from_host(gpu, b)));
        }
        let adapters: Vec<LoraAdapter> = initial
            .iter()
            .map(|a| LoraAdapter {
                weights: None,
                ..a.clone()
            })
            .collect();
        let adapted = model.with_lora(&adapters)?;
        let trainer = Trainer::new(gpu, &adapted, params, output, dims, config).await?;
        Ok(LoraTrainer { trainer, adapters })
    }

    /// One step towards `target` from `inputs` (the model's own inputs); returns the loss
    /// before the step.
    pub async fn step(&mut self, inputs: &[(&str, &GpuTensor)], target: &GpuTensor) -> Result<f32> {
        self.trainer.step(inputs, target).await
    }

    /// The underlying trainer (memory, gradient norm, session).
    pub fn trainer(&self) -> &Trainer {
        &self.trainer
    }

    /// The underlying trainer, to step it like any other.
    pub fn trainer_mut(&mut self) -> &mut Trainer {
        &mut self.trainer
    }

    /// The adapters with their current weights (read back from the GPU).
    pub async fn adapters(&self) -> Result<Vec<LoraAdapter>> {
        let mut out = Vec::with_capacity(self.adapters.len());
        for (adapter, pair) in self.adapters.iter().zip(self.trainer.params.chunks(2)) {
            out.push(LoraAdapter {
                weights: Some((pair[0].to_host().await?, pair[1].to_host().await?)),
                ..adapter.clone()
            });
        }
        Ok(out)
    }
}
