//! Pictures in and out of the pipeline: decoded VAE output to RGBA, PNG with the generation
//! parameters in text chunks, the grid of intermediate images, and a cheap latent preview.

use crate::engine::HostTensor;
use crate::error::{Error, Result, invalid};

/// An encoded PNG and what of its metadata had to be left out.
#[derive(Clone, Debug)]
pub struct Png {
    pub bytes: Vec<u8>,
    pub warnings: Vec<String>,
}

/// PNG keywords: 1-79 printable Latin-1 characters without leading, trailing or double
/// spaces (PNG spec 11.3.4.2).
fn is_png_keyword(key: &str) -> bool {
    let printable = |c: char| (' '..='~').contains(&c) || ('\u{a1}'..='\u{ff}').contains(&c);
    (1..=79).contains(&key.chars().count())
        && key.chars().all(printable)
        && !key.starts_with(' ')
        && !key.ends_with(' ')
        && !key.contains("  ")
}

/// An 8-bit RGBA image, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct RgbaImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

impl RgbaImage {
    /// A VAE output `[1, 3, H, W]` in [-1, 1] as diffusers post-processes it:
    /// `(x / 2 + 0.5).clamp(0, 1)`, then `round(x * 255)`.
    pub fn from_vae_output(tensor: &HostTensor) -> Result<RgbaImage> {
        let [1, 3, height, width] = tensor.shape[..] else {
            return invalid(format!(
                "expected a [1, 3, H, W] image, got {:?}",
                tensor.shape
            ));
        };
        let values = tensor.to_f32();
        let plane = height * width;
        let mut pixels = vec![255u8; plane * 4];
        for c in 0..3 {
            for i in 0..plane {
                let v = (values[c * plane + i] / 2.0 + 0.5).clamp(0.0, 1.0);
                pixels[i * 4 + c] = (v * 255.0).round_ties_even() as u8;
            }
        }
        Ok(RgbaImage {
            width,
            height,
            pixels,
        })
    }

    /// The image as the VAE encoder's input `[1, 3, H, W]` in [-1, 1].
    pub fn to_vae_input(&self) -> HostTensor {
        self.to_rgb_tensor(|v| v * 2.0 - 1.0)
    }

    /// The RGB planes `[1, 3, H, W]` in [0, 1] (what image classifiers usually take).
    pub fn to_unit_rgb(&self) -> HostTensor {
        self.to_rgb_tensor(|v| v)
    }

    fn to_rgb_tensor(&self, map: impl Fn(f32) -> f32) -> HostTensor {
        let plane = self.width * self.height;
        let mut values = vec![0.0f32; 3 * plane];
        for c in 0..3 {
            for i in 0..plane {
                values[c * plane + i] = map(self.pixels[i * 4 + c] as f32 / 255.0);
            }
        }
        HostTensor::f32(vec![1, 3, self.height, self.width], values)
    }

    /// Decodes PNG or JPEG bytes.
    pub fn decode(bytes: &[u8]) -> Result<RgbaImage> {
        let image = image::load_from_memory(bytes)
            .map_err(|e| Error::Invalid(format!("cannot read the image: {e}")))?;
        let rgba = image.to_rgba8();
        Ok(RgbaImage {
            width: rgba.width() as usize,
            height: rgba.height() as usize,
            pixels: rgba.into_raw(),
        })
    }

    /// Resized (bicubic, like PIL's default for diffusers' preprocessing) to `width` x `height`.
    pub fn resized(&self, width: usize, height: usize) -> RgbaImage {
        if (width, height) == (self.width, self.height) {
            return self.clone();
        }
        let buffer =
            image::RgbaImage::from_raw(self.width as u32, self.height as u32, self.pixels.clone())
                .expect("pixel count matches the size");
        let resized = image::imageops::resize(
            &buffer,
            width as u32,
            height as u32,
            image::imageops::FilterType::CatmullRom,
        );
        RgbaImage {
            width,
            height,
            pixels: resized.into_raw(),
        }
    }

    /// The largest centred part with the aspect ratio of `width` x `height`, resized to it
    /// (a photo is cropped, never stretched).
    pub fn cropped_to(&self, width: usize, height: usize) -> RgbaImage {
        // Compare width / height ratios without rounding: w * height vs h * width.
        let (w, h) = if self.width * height > self.height * width {
            (self.height * width / height, self.height)
        } else {
            (self.width, self.width * height / width)
        };
        let (x0, y0) = ((self.width - w) / 2, (self.height - h) / 2);
        let pixels = (y0..y0 + h)
            .flat_map(|y| {
                let row = (y * self.width + x0) * 4;
                self.pixels[row..row + w * 4].iter().copied()
            })
            .collect();
        RgbaImage {
            width: w,
            height: h,
            pixels,
        }
        .resized(width, height)
    }

    /// PNG bytes with `text` (key, value) as text chunks: the generation parameters. Values
    /// that Latin-1 can hold go in tEXt chunks, others (most prompts outside Western
    /// European scripts) in UTF-8 iTXt chunks. Metadata never costs the picture: a chunk
    /// the encoder refuses is left out and named in `Png::warnings`.
    pub fn to_png(&self, text: &[(&str, String)]) -> Result<Png> {
        let mut warnings = Vec::new();
        let usable: Vec<&(&str, String)> = text
            .iter()
            .filter(|(key, _)| {
                let ok = is_png_keyword(key);
                if !ok {
                    warnings.push(format!(
                        "PNG text chunk `{key}` left out: not a PNG keyword"
                    ));
                }
                ok
            })
            .collect();
        match self.encode_png(&usable) {
            Ok(bytes) => Ok(Png { bytes, warnings }),
            Err(e) if !usable.is_empty() => {
                let keys: Vec<&str> = usable.iter().map(|(key, _)| *key).collect();
                warnings.push(format!(
                    "PNG text chunks left out ({}): {e}",
                    keys.join(", ")
                ));
                let bytes = self
                    .encode_png(&[])
                    .map_err(|e| Error::Invalid(format!("PNG: {e}")))?;
                Ok(Png { bytes, warnings })
            }
            Err(e) => Err(Error::Invalid(format!("PNG: {e}"))),
        }
    }

    fn encode_png(
        &self,
        text: &[&(&str, String)],
    ) -> std::result::Result<Vec<u8>, png::EncodingError> {
        let mut out = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut out, self.width as u32, self.height as u32);
            encoder.set_color(png::ColorType::Rgba);
            encoder.set_depth(png::BitDepth::Eight);
            for (key, value) in text {
                if value.chars().all(|c| (c as u32) < 0x100) {
                    encoder.add_text_chunk(key.to_string(), value.clone())?;
                } else {
                    encoder.add_itxt_chunk(key.to_string(), value.clone())?;
                }
            }
            encoder.write_header()?.write_image_data(&self.pixels)?;
        }
        Ok(out)
    }

    /// Images side by side, left to right (the seed notes' `image_grid` with one row).
    pub fn row(images: &[RgbaImage]) -> Result<RgbaImage> {
        let Some(first) = images.first() else {
            return invalid("a grid of no images");
        };
        if images
            .iter()
            .any(|i| i.height != first.height || i.width != first.width)
        {
            return invalid("grid images differ in size");
        }
        let (width, height) = (first.width * images.len(), first.height);
        let mut pixels = vec![0u8; width * height * 4];
        for (k, image) in images.iter().enumerate() {
            for y in 0..height {
                let src = &image.pixels[y * first.width * 4..(y + 1) * first.width * 4];
                let at = (y * width + k * first.width) * 4;
                pixels[at..at + first.width * 4].copy_from_slice(src);
            }
        }
        Ok(RgbaImage {
            width,
            height,
            pixels,
        })
    }

    /// Images of one width stacked top to bottom (rows of a grid).
    pub fn column(images: &[RgbaImage]) -> Result<RgbaImage> {
        let Some(first) = images.first() else {
            return invalid("a grid of no images");
        };
        if images.iter().any(|i| i.width != first.width) {
            return invalid("grid rows differ in width");
        }
        Ok(RgbaImage {
            width: first.width,
            height: images.iter().map(|i| i.height).sum(),
            pixels: images
                .iter()
                .flat_map(|i| i.pixels.iter().copied())
                .collect(),
        })
    }
}

/// A cheap look at SD 1.x/2.x latents without the VAE: each latent pixel's RGB is a fixed
/// linear map of its four channels (a least-squares fit published by the community for the
/// SD VAE). One pixel per latent: 1/8 of the image's size.
pub fn latent_preview(latents: &HostTensor) -> Result<RgbaImage> {
    const FACTORS: [[f32; 3]; 4] = [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ];
    let [_, 4, height, width] = latents.shape[..] else {
        return invalid(format!(
            "latent preview needs [N, 4, H, W] latents, got {:?}",
            latents.shape
        ));
    };
    let values = latents.to_f32();
    let plane = height * width;
    let mut pixels = vec![255u8; plane * 4];
    for i in 0..plane {
        for c in 0..3 {
            let v: f32 = (0..4).map(|k| FACTORS[k][c] * values[k * plane + i]).sum();
            pixels[i * 4 + c] = ((v + 1.0) / 2.0 * 255.0).clamp(0.0, 255.0) as u8;
        }
    }
    Ok(RgbaImage {
        width,
        height,
        pixels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `width` x `height` picture whose red channel is the column and green the row.
    fn coordinates(width: usize, height: usize) -> RgbaImage {
        let pixels = (0..width * height)
            .flat_map(|i| [(i % width) as u8, (i / width) as u8, 0, 255])
            .collect();
        RgbaImage {
            width,
            height,
            pixels,
        }
    }

    #[test]
    fn cropping_keeps_the_centre() {
        let wide = coordinates(4, 2).cropped_to(2, 2);
        let columns: Vec<u8> = wide.pixels.chunks(4).map(|p| p[0]).collect();
        assert_eq!(columns, [1, 2, 1, 2]);
        let rows: Vec<u8> = coordinates(2, 6)
            .cropped_to(2, 2)
            .pixels
            .chunks(4)
            .map(|p| p[1])
            .collect();
        assert_eq!(rows, [2, 2, 3, 3]);
    }
}
