//! Scoring a text-to-image model with an image classifier, all on websd's own engine.
//!
//! A benchmark folder holds:
//! - `classifier/model.onnx`: an RGB image `[N, 3, H, W]` in [0, 1] -> one logits output per
//!   attribute (for the glyph model: `glyph`, `foreground`, `background`);
//! - `labels.json`: `{"<output>": ["<class name>", ...], ...}`;
//! - `prompts.json`: `[{"prompt": ..., "seed": ..., "<output>": "<class name>", ...}, ...]`.
//!
//! Each prompt is generated with its seed, classified, and every attribute counts as right
//! when the classifier's top class is the one the prompt asked for.

use std::collections::HashMap;
use std::rc::Rc;

use serde::Deserialize;

use crate::engine::{Gpu, Session};
use crate::error::{Result, bad_file};
use crate::image::RgbaImage;
use crate::model::{ModelFiles, read_graph, read_json};
use crate::pipeline::{Control, Request, StableDiffusion, StepEvent};

mod edits;
pub use edits::{EditBenchmark, EditCase, EditMethod, EditOutcome, glyph_mask, shifted_iou};

/// One benchmark prompt and the classes it asks for, by attribute.
#[derive(Clone, Debug, Deserialize)]
pub struct Case {
    pub prompt: String,
    pub seed: u64,
    #[serde(flatten)]
    pub expected: HashMap<String, serde_json::Value>,
}

/// What the classifier read in one generated image.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub case: Case,
    /// (attribute, class read, right?) in the order of `Benchmark::attributes`.
    pub read: Vec<(String, String, bool)>,
    pub generate_ms: f64,
    pub image: RgbaImage,
}

/// Accuracy per attribute over the cases run, and the mean time per image.
#[derive(Clone, Debug)]
pub struct Report {
    pub cases: usize,
    pub accuracy: Vec<(String, f64)>,
    pub ms_per_image: f64,
}

pub struct Benchmark {
    pub cases: Vec<Case>,
    /// (classifier output name, class names), in the classifier's output order.
    attributes: Vec<(String, Vec<String>)>,
    classifier: crate::engine::Model,
    sessions: HashMap<[usize; 2], Session>,
}

impl Benchmark {
    pub async fn load(files: Rc<dyn ModelFiles>) -> Result<Benchmark> {
        let classifier = read_graph(&files, "classifier").await?;
        let mut labels: HashMap<String, Vec<String>> = read_json(&*files, "labels.json").await?;
        let cases: Vec<Case> = read_json(&*files, "prompts.json").await?;
        let mut attributes = Vec::new();
        for name in classifier.output_names() {
            let classes = labels.remove(name).ok_or_else(|| {
                bad_file("labels.json", format!("no class names for output `{name}`"))
            })?;
            attributes.push((name.to_string(), classes));
        }
        for case in &cases {
            for (name, classes) in &attributes {
                let wanted = case.expected.get(name).and_then(|v| v.as_str());
                if !wanted.is_some_and(|w| classes.iter().any(|c| c == w)) {
                    return Err(bad_file(
                        "prompts.json",
                        format!("`{}` has no known `{name}` class", case.prompt),
                    ));
                }
            }
        }
        Ok(Benchmark {
            cases,
            attributes,
            classifier,
            sessions: HashMap::new(),
        })
    }

    pub fn attributes(&self) -> impl Iterator<Item = &str> {
        self.attributes.iter().map(|(name, _)| name.as_str())
    }

    /// The classifier's top class for each attribute.
    pub async fn classify(&mut self, gpu: &Gpu, image: &RgbaImage) -> Result<Vec<String>> {
        let shape = [image.height, image.width];
        if !self.sessions.contains_key(&shape) {
            let input = self.classifier.input_names()[0].to_string();
            let dims = self
                .classifier
                .dims_for_shapes(&[(&input, &[1, 3, image.height, image.width])])?;
            let session = Session::new(gpu, &self.classifier, &dims).await?;
            self.sessions.insert(shape, session);
        }
        let session = &self.sessions[&shape];
        let input = session.input_names()[0].to_string();
        let pixels = image.to_unit_rgb();
        let outputs = session.run_host(&[(&input, &pixels)]).await?;
        Ok(self
            .attributes
            .iter()
            .map(|(name, classes)| classes[argmax(&outputs[name].to_f32())].clone())
            .collect())
    }

    /// Generates and classifies the first `limit` cases with `base`'s settings (prompt and
    /// seed replaced by each case's), calling `on_outcome` after each.
    pub async fn run(
        &mut self,
        pipeline: &mut StableDiffusion,
        base: &Request,
        limit: usize,
        on_outcome: &mut dyn FnMut(&Outcome),
    ) -> Result<Report> {
        let cases: Vec<Case> = self.cases.iter().take(limit).cloned().collect();
        let mut right = vec![0usize; self.attributes.len()];
        let mut total_ms = 0.0;
        for case in &cases {
            let request = Request {
                prompt: case.prompt.clone(),
                seed: case.seed,
                ..base.clone()
            };
            let generated = pipeline
                .generate(&request, &mut |_: StepEvent| Control::Continue)
                .await?;
            let classes = self.classify(pipeline.gpu(), &generated.image).await?;
            let read: Vec<(String, String, bool)> = self
                .attributes
                .iter()
                .zip(classes)
                .map(|((name, _), class)| {
                    let ok = case.expected[name].as_str() == Some(class.as_str());
                    (name.clone(), class, ok)
                })
                .collect();
            for (count, (_, _, ok)) in right.iter_mut().zip(&read) {
                *count += usize::from(*ok);
            }
            total_ms += generated.timings.total_ms;
            on_outcome(&Outcome {
                case: case.clone(),
                read,
                generate_ms: generated.timings.total_ms,
                image: generated.image,
            });
        }
        let n = cases.len().max(1) as f64;
        Ok(Report {
            cases: cases.len(),
            accuracy: self
                .attributes
                .iter()
                .zip(right)
                .map(|((name, _), r)| (name.clone(), r as f64 / n))
                .collect(),
            ms_per_image: total_ms / n,
        })
    }
}

fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 { (i, v) } else { best }
        })
        .0
}
