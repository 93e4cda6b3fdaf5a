//! Scoring image edits. A benchmark folder's `edits.json` lists real pictures (`source`,
//! relative to the folder), what they show (`source_labels`), a sentence describing them
//! with one attribute changed (`prompt`, `target_labels`) and a seed, plus the palette the
//! pictures were drawn in (`colors`). Each edit is scored twice:
//! - **success**: the benchmark's classifier reads every target label (the changed one and
//!   the two that should stay);
//! - **fidelity**: how much of the source's layout is kept: the glyph's pixel mask in the
//!   result (pixels nearer the target foreground colour than the target background) against
//!   the source's, as intersection over union at the best shift of up to two pixels.

use std::collections::HashMap;
use std::rc::Rc;

use serde::Deserialize;

use super::Benchmark;
use crate::clock::now_ms;
use crate::engine::Gpu;
use crate::error::{Result, bad_file};
use crate::image::RgbaImage;
use crate::lora::Lora;
use crate::model::{ModelFiles, read, read_json};
use crate::pipeline::{Control, EditSettings, Request, StableDiffusion, StepEvent};

/// How far the masks may be moved against each other, in pixels.
const MAX_SHIFT: i64 = 2;

#[derive(Clone, Debug, Deserialize)]
pub struct EditCase {
    pub source: String,
    /// Which attribute the edit changes.
    pub kind: String,
    pub seed: u64,
    pub prompt: String,
    pub source_labels: HashMap<String, String>,
    pub target_labels: HashMap<String, String>,
}

#[derive(Deserialize)]
struct EditsFile {
    colors: HashMap<String, [u8; 3]>,
    cases: Vec<EditCase>,
}

/// The ways of editing the benchmark compares.
#[derive(Clone, Debug)]
pub enum EditMethod {
    /// Imagic with these settings (prompt and seed are each case's), drawn at each eta
    /// from one optimisation, sampling from the source noised to `strength` (1: from noise).
    Imagic {
        settings: EditSettings,
        etas: Vec<f32>,
        strength: f64,
    },
    /// Image-to-image from the source with the target prompt.
    ImageToImage { strength: f64 },
    /// Text-to-image from the target prompt alone (the source unused).
    TextToImage,
}

/// One edit's result and scores.
pub struct EditOutcome {
    pub image: RgbaImage,
    /// What the classifier read, in the benchmark's attribute order.
    pub read: Vec<String>,
    pub success: bool,
    pub fidelity: f64,
    pub ms: f64,
}

pub struct EditBenchmark {
    files: Rc<dyn ModelFiles>,
    colors: HashMap<String, [u8; 3]>,
    pub cases: Vec<EditCase>,
}

impl EditBenchmark {
    pub async fn load(files: Rc<dyn ModelFiles>) -> Result<EditBenchmark> {
        let file: EditsFile = read_json(&*files, "edits.json").await?;
        for case in &file.cases {
            for labels in [&case.source_labels, &case.target_labels] {
                for key in ["foreground", "background"] {
                    let known = labels.get(key).is_some_and(|c| file.colors.contains_key(c));
                    if !known {
                        return Err(bad_file(
                            "edits.json",
                            format!("`{}`: no palette colour for its {key}", case.source),
                        ));
                    }
                }
            }
        }
        Ok(EditBenchmark {
            files,
            colors: file.colors,
            cases: file.cases,
        })
    }

    /// A case's source picture.
    pub async fn source(&self, case: &EditCase) -> Result<RgbaImage> {
        RgbaImage::decode(&read(&*self.files, &case.source).await?)
    }

    /// Edits `case` with `method` and scores the results (one per eta for Imagic).
    pub async fn run(
        &self,
        pipeline: &mut StableDiffusion,
        classifier: &mut Benchmark,
        case: &EditCase,
        method: &EditMethod,
        base: &Request,
    ) -> Result<Vec<EditOutcome>> {
        let started = now_ms();
        let source = self.source(case).await?;
        let request = Request {
            prompt: case.prompt.clone(),
            seed: case.seed,
            ..base.clone()
        };
        let requests = match method {
            EditMethod::Imagic {
                settings,
                etas,
                strength,
            } => {
                let settings = EditSettings {
                    prompt: case.prompt.clone(),
                    seed: case.seed,
                    ..settings.clone()
                };
                let mut on_step = |_| Control::Continue;
                let edit = pipeline
                    .optimize_edit(&source, &settings, &mut on_step)
                    .await?;
                pipeline.set_lora(&Lora::unet(edit.lora.clone()))?;
                etas.iter()
                    .map(|&eta| {
                        pipeline.edit_request(&edit, eta, Some(&source), *strength, &request)
                    })
                    .collect::<Result<_>>()?
            }
            EditMethod::ImageToImage { strength } => vec![Request {
                init_image: Some(source.clone()),
                strength: *strength,
                ..request
            }],
            EditMethod::TextToImage => vec![request],
        };
        // Each picture's time: the optimisation's (shared) and its own sampling's.
        let prepared_ms = now_ms() - started;
        let mut outcomes = Vec::new();
        for request in &requests {
            let t0 = now_ms();
            let mut on_step = |_: StepEvent| Control::Continue;
            let image = pipeline.generate(request, &mut on_step).await?.image;
            let ms = prepared_ms + now_ms() - t0;
            let outcome = self
                .score(pipeline.gpu(), classifier, case, &source, image)
                .await?;
            outcomes.push(EditOutcome { ms, ..outcome });
        }
        pipeline.set_lora(&Lora::default())?;
        Ok(outcomes)
    }

    /// Scores an edited picture of `case` (e.g. one made elsewhere).
    pub async fn score(
        &self,
        gpu: &Gpu,
        classifier: &mut Benchmark,
        case: &EditCase,
        source: &RgbaImage,
        image: RgbaImage,
    ) -> Result<EditOutcome> {
        let read = classifier.classify(gpu, &image).await?;
        let success = classifier
            .attributes()
            .zip(&read)
            .all(|(name, class)| case.target_labels.get(name) == Some(class));
        let mask = |image: &RgbaImage, labels: &HashMap<String, String>| {
            let color = |key: &str| self.colors[&labels[key]];
            glyph_mask(image, color("foreground"), color("background"))
        };
        let resized = image.resized(source.width, source.height);
        let fidelity = shifted_iou(
            &mask(source, &case.source_labels),
            &mask(&resized, &case.target_labels),
            source.width,
            source.height,
        );
        Ok(EditOutcome {
            image,
            read,
            success,
            fidelity,
            ms: 0.0,
        })
    }
}

/// The pixels nearer `foreground` than `background` (squared RGB distance).
pub fn glyph_mask(image: &RgbaImage, foreground: [u8; 3], background: [u8; 3]) -> Vec<bool> {
    let distance =
        |p: &[u8], c: [u8; 3]| -> i32 { (0..3).map(|i| (p[i] as i32 - c[i] as i32).pow(2)).sum() };
    image
        .pixels
        .chunks(4)
        .map(|p| distance(p, foreground) < distance(p, background))
        .collect()
}

/// Intersection over union of two `width` x `height` masks, at the best shift of one
/// against the other by up to [`MAX_SHIFT`] pixels each way; 1 for two empty masks.
pub fn shifted_iou(a: &[bool], b: &[bool], width: usize, height: usize) -> f64 {
    let (w, h) = (width as i64, height as i64);
    let at = |m: &[bool], x: i64, y: i64| {
        (0..w).contains(&x) && (0..h).contains(&y) && m[(y * w + x) as usize]
    };
    let mut best = 0.0f64;
    for dy in -MAX_SHIFT..=MAX_SHIFT {
        for dx in -MAX_SHIFT..=MAX_SHIFT {
            let (mut both, mut either) = (0usize, 0usize);
            for y in -MAX_SHIFT..h + MAX_SHIFT {
                for x in -MAX_SHIFT..w + MAX_SHIFT {
                    let (p, q) = (at(a, x, y), at(b, x + dx, y + dy));
                    both += usize::from(p && q);
                    either += usize::from(p || q);
                }
            }
            let iou = if either == 0 {
                1.0
            } else {
                both as f64 / either as f64
            };
            best = best.max(iou);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iou_finds_the_shift() {
        // A 2x2 square at (1, 1) and the same square at (3, 2) in 6x6.
        let square = |x0: usize, y0: usize| {
            (0..36)
                .map(|i| (x0..x0 + 2).contains(&(i % 6)) && (y0..y0 + 2).contains(&(i / 6)))
                .collect::<Vec<bool>>()
        };
        assert_eq!(shifted_iou(&square(1, 1), &square(3, 2), 6, 6), 1.0);
        // Three pixels apart: the best shift of two leaves one column overlapping.
        let iou = shifted_iou(&square(0, 0), &square(3, 0), 6, 6);
        assert!((iou - 2.0 / 6.0).abs() < 1e-12, "{iou}");
    }
}
