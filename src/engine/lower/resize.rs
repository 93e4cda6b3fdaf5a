//! Resize of the last two axes (resize.wgsl): nearest and linear, every ONNX coordinate mode.

use super::super::graph::Node;
use super::super::infer;
use super::super::kernels::{KernelKey, Launch, Params, Shader};
use super::super::ops::{CoordinateMode, NearestMode, ResizeMode};
use super::{LowerResult, Lowering};

impl Lowering<'_> {
    pub(super) fn resize(
        &self,
        node: &Node,
        mode: ResizeMode,
        coordinates: CoordinateMode,
    ) -> LowerResult<Vec<Launch>> {
        let (x, out) = (Self::input(node, 0)?, node.outputs[0]);
        let (ins, outs) = (self.shape(x), self.shape(out));
        if ins.len() != 4 || ins[0] != outs[0] || ins[1] != outs[1] {
            return Err(format!(
                "only resizing the last two axes of a 4-D tensor is supported ({ins:?} -> {outs:?})"
            ));
        }
        let infos = self.infos(node);
        let scales = infer::const_input(&infos, 2, "scales")?
            .filter(|t| !t.is_empty())
            .map(|t| t.to_f32().into_owned());
        let scale = |axis: usize| {
            scales
                .as_ref()
                .map_or(outs[axis] as f32 / ins[axis] as f32, |s| s[axis])
        };
        let (linear, rounding) = match mode {
            ResizeMode::Linear => (1, 0),
            ResizeMode::Nearest(NearestMode::RoundPreferFloor) => (0, 0),
            ResizeMode::Nearest(NearestMode::RoundPreferCeil) => (0, 1),
            ResizeMode::Nearest(NearestMode::Floor) => (0, 2),
            ResizeMode::Nearest(NearestMode::Ceil) => (0, 3),
        };
        let coordinates = match coordinates {
            CoordinateMode::HalfPixel => 0,
            CoordinateMode::PytorchHalfPixel => 1,
            CoordinateMode::AlignCorners => 2,
            CoordinateMode::Asymmetric => 3,
            CoordinateMode::TfHalfPixelForNearest => 4,
        };
        // Each output plane reads only its own input plane: runs of planes window both.
        let (in_plane, out_plane) = (ins[2] * ins[3], outs[2] * outs[3]);
        let words = [self.words(x, in_plane), self.words(out, out_plane)];
        let runs = self.runs(outs[0] * outs[1], &words, usize::MAX, "image plane")?;
        let split = runs.len() > 1;
        let kernel = KernelKey {
            half_input: self.half(x),
            half_output: self.half(out),
            ..Shader::Resize.into()
        };
        // Halves are written in pairs, one thread each.
        let per_thread = if kernel.half_output { 2 } else { 1 };
        let launches = runs
            .into_iter()
            .map(|run| {
                let n = run.len() * out_plane;
                let params = Params::default()
                    .u(n)
                    .u(ins[2])
                    .u(ins[3])
                    .u(outs[2])
                    .u(outs[3])
                    .u(linear)
                    .u(coordinates)
                    .u(rounding)
                    .f(scale(2))
                    .f(scale(3));
                Launch {
                    kernel,
                    params: params.0,
                    output: self.part(out, &(run.start * out_plane..run.end * out_plane), split),
                    inputs: vec![self.part(x, &(run.start * in_plane..run.end * in_plane), split)],
                    workgroups: self.linear(n.div_ceil(per_thread)),
                }
            })
            .collect();
        Ok(launches)
    }
}
