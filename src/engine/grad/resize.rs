//! The gradient of Resize (the last two axes, as the forward kernel resizes). Each axis is
//! a linear map from input to output positions, so the input's gradient applies the
//! transposed maps: a block sum for nearest upsampling by whole factors, otherwise a
//! product with the interpolation matrix each axis is sampled with (nearest or linear,
//! every coordinate mode, computed here exactly as `resize.wgsl` samples).

use super::super::error::Result;
use super::super::graph::ValueId;
use super::super::ops::{CoordinateMode, NearestMode, Op, ReduceOp, ResizeMode};
use super::super::tensor::HostTensor;
use super::tape::Tape;

pub struct Resize {
    pub mode: ResizeMode,
    pub coordinates: CoordinateMode,
    /// The node's `scales` input, when given (else output size / input size).
    pub scales: Option<Vec<f32>>,
}

impl Resize {
    pub fn backward(
        &self,
        tape: &mut Tape,
        x: ValueId,
        g: ValueId,
    ) -> std::result::Result<ValueId, String> {
        let (x_shape, y_shape) = (tape.shape(x).to_vec(), tape.shape(g).to_vec());
        if x_shape.len() != 4 || x_shape[..2] != y_shape[..2] {
            return Err(format!(
                "only resizing the last two axes of a 4-D tensor ({x_shape:?} -> {y_shape:?})"
            ));
        }
        let traced = |r: Result<ValueId>| r.map_err(|e| e.to_string());
        if self.copies_whole_blocks(&x_shape, &y_shape) {
            return traced(block_sum(tape, g, &x_shape, &y_shape));
        }
        // g [N, C, Ho, Wo] · Mw [Wo, Wi], then Mh^T [Hi, Ho] · that.
        let matrix = |axis: usize, transposed: bool| {
            let (rows, columns) = (y_shape[axis], x_shape[axis]);
            let m = self.sampling_matrix(axis, rows, columns);
            let (shape, values) = if transposed {
                let t = (0..columns * rows)
                    .map(|k| m[(k % rows) * columns + k / rows])
                    .collect();
                (vec![columns, rows], t)
            } else {
                (vec![rows, columns], m)
            };
            HostTensor::f32(shape, values)
        };
        let by_width = tape.constant(matrix(3, false));
        let by_height = tape.constant(matrix(2, true));
        let narrowed = traced(tape.op(Op::MatMul, &[g, by_width]))?;
        traced(tape.op(Op::MatMul, &[by_height, narrowed]))
    }

    /// Nearest upsampling whose every output pixel copies the input pixel it lies in.
    fn copies_whole_blocks(&self, x_shape: &[usize], y_shape: &[usize]) -> bool {
        let floors = matches!(
            (self.mode, self.coordinates),
            (
                ResizeMode::Nearest(NearestMode::Floor),
                CoordinateMode::Asymmetric
            ) | (
                ResizeMode::Nearest(NearestMode::RoundPreferFloor | NearestMode::RoundPreferCeil),
                CoordinateMode::HalfPixel | CoordinateMode::PytorchHalfPixel
            )
        );
        let whole = x_shape
            .iter()
            .zip(y_shape)
            .all(|(&i, &o)| i > 0 && o.is_multiple_of(i));
        floors && whole && self.scales_match(x_shape, y_shape)
    }

    fn scales_match(&self, x_shape: &[usize], y_shape: &[usize]) -> bool {
        (2..4)
            .all(|a| self.scale(a, y_shape[a], x_shape[a]) == y_shape[a] as f32 / x_shape[a] as f32)
    }

    fn scale(&self, axis: usize, out_len: usize, in_len: usize) -> f32 {
        self.scales
            .as_ref()
            .map_or(out_len as f32 / in_len as f32, |s| s[axis])
    }

    /// Row o holds the weights output position o reads the input positions with.
    fn sampling_matrix(&self, axis: usize, out_len: usize, in_len: usize) -> Vec<f32> {
        let scale = self.scale(axis, out_len, in_len);
        let last = (in_len - 1) as f32;
        let mut m = vec![0.0f32; out_len * in_len];
        for o in 0..out_len {
            let c = self.source_coordinate(o, out_len, in_len, scale);
            let row = &mut m[o * in_len..(o + 1) * in_len];
            match self.mode {
                ResizeMode::Nearest(rounding) => {
                    let r = match rounding {
                        NearestMode::RoundPreferFloor if c.fract() == 0.5 => c.floor(),
                        NearestMode::RoundPreferCeil if c.fract() == 0.5 => c.ceil(),
                        NearestMode::RoundPreferFloor | NearestMode::RoundPreferCeil => c.round(),
                        NearestMode::Floor => c.floor(),
                        NearestMode::Ceil => c.ceil(),
                    };
                    row[r.clamp(0.0, last) as usize] += 1.0;
                }
                ResizeMode::Linear => {
                    let c = c.clamp(0.0, last);
                    let lower = c.floor() as usize;
                    let upper = (lower + 1).min(in_len - 1);
                    let f = c - lower as f32;
                    row[lower] += 1.0 - f;
                    row[upper] += f;
                }
            }
        }
        m
    }

    fn source_coordinate(&self, o: usize, out_len: usize, in_len: usize, scale: f32) -> f32 {
        let position = o as f32;
        match self.coordinates {
            CoordinateMode::HalfPixel => (position + 0.5) / scale - 0.5,
            CoordinateMode::PytorchHalfPixel if out_len > 1 => (position + 0.5) / scale - 0.5,
            CoordinateMode::AlignCorners if out_len > 1 => {
                position * (in_len - 1) as f32 / (out_len - 1) as f32
            }
            CoordinateMode::PytorchHalfPixel | CoordinateMode::AlignCorners => 0.0,
            CoordinateMode::Asymmetric => position / scale,
            CoordinateMode::TfHalfPixelForNearest => (position + 0.5) / scale,
        }
    }
}

/// Each input pixel's gradient is the sum over the block of output pixels that copied it:
/// each upsampled axis splits into (input size, factor) and the factors are summed away.
fn block_sum(tape: &mut Tape, g: ValueId, x_shape: &[usize], y_shape: &[usize]) -> Result<ValueId> {
    let mut blocks = Vec::new();
    let mut axes = Vec::new();
    for (&i, &o) in x_shape.iter().zip(y_shape) {
        blocks.push(i);
        if o > i {
            blocks.push(o / i);
            axes.push(blocks.len() - 1);
        }
    }
    let split = tape.reshape(g, &blocks)?;
    tape.reduce(ReduceOp::Sum, split, axes, false)
}
