//! 2-D convolution (conv.wgsl), split by group and channels when a tensor exceeds one
//! binding.

use std::ops::Range;
use std::sync::Arc;

use super::super::graph::{Node, ValueId};
use super::super::infer::{self, ConvGeometry};
use super::super::kernels::{KernelKey, Launch, Operand, Params, Shader, gemm_tile_columns};
use super::super::ops::ConvAttrs;
use super::super::tensor::{HostTensor, numel};
use super::{LowerResult, Lowering};

/// conv.wgsl's parameters for `g`, reading and writing from `bases` elements into the
/// image and output bindings.
fn conv_params(g: &ConvGeometry, has_bias: bool, accumulate: bool, bases: [usize; 2]) -> Params {
    Params::default()
        .u(g.in_channels)
        .u(g.in_h)
        .u(g.in_w)
        .u(g.out_channels)
        .u(g.out_h)
        .u(g.out_w)
        .u(g.kernel[0])
        .u(g.kernel[1])
        .u(g.stride[0])
        .u(g.stride[1])
        .u(g.pad[0])
        .u(g.pad[1])
        .u(g.dilation[0])
        .u(g.dilation[1])
        .u(g.group)
        .u(has_bias as usize)
        .u(accumulate as usize)
        .u(bases[0])
        .u(bases[1])
}

impl Lowering<'_> {
    pub(super) fn conv(&self, node: &Node, attrs: &ConvAttrs) -> LowerResult<Vec<Launch>> {
        let (image, weight, out) = (
            Self::input(node, 0)?,
            Self::input(node, 1)?,
            node.outputs[0],
        );
        let g = infer::conv_geometry(attrs, self.shape(image), self.shape(weight))?;
        let bias = node.inputs.get(2).copied().flatten();
        let fits = [image, weight, out]
            .iter()
            .all(|&v| numel(self.shape(v)) <= self.max_binding);
        if !fits {
            return self.conv_in_parts(&g, image, weight, bias, out);
        }
        let params = conv_params(&g, bias.is_some(), false, [0, 0]);
        let (tile_columns, narrow) = gemm_tile_columns(g.out_h * g.out_w);
        let groups = [
            (g.out_h * g.out_w).div_ceil(tile_columns) as u32,
            (g.out_channels / g.group).div_ceil(64) as u32,
            (g.batch * g.group) as u32,
        ];
        let inputs = vec![
            Operand::Value(image),
            Operand::Value(weight),
            Operand::Value(bias.unwrap_or(weight)),
        ];
        let kernel = KernelKey {
            half_weights: self.halves[weight],
            narrow,
            ..Shader::Conv.into()
        };
        Ok(vec![self.launch(kernel, params, out, inputs, groups)])
    }

    /// A convolution whose image, output or weights exceed one binding (the VAE decoder's
    /// last blocks at 512 px and up): per image and group, runs of output channels times
    /// runs of input channels, each launch adding its input channels' share into the output
    /// run. The weight and bias slices become constants of their own.
    fn conv_in_parts(
        &self,
        g: &ConvGeometry,
        image: ValueId,
        weight: ValueId,
        bias: Option<ValueId>,
        out: ValueId,
    ) -> LowerResult<Vec<Launch>> {
        let constant = |v: ValueId, what: &str| {
            self.graph.values[v]
                .constant
                .as_ref()
                .map(|c| c.to_f32())
                .ok_or_else(|| format!("the {what} must be constant to split this convolution"))
        };
        let weights = constant(weight, "weight")?;
        let biases = bias.map(|b| constant(b, "bias")).transpose()?;
        let (in_plane, out_plane) = (g.in_h * g.in_w, g.out_h * g.out_w);
        let taps = g.kernel[0] * g.kernel[1];
        let (group_in, group_out) = (g.in_channels / g.group, g.out_channels / g.group);
        // Windows start at an aligned offset before their first element: leave that slack.
        let room = self.max_binding.saturating_sub(self.align);
        // Input runs leave room for one output channel's weight slice; output runs for
        // the whole slice of an input run.
        let in_per = (room / in_plane).min(self.max_binding / taps).min(group_in);
        let out_per = (room / out_plane)
            .min(self.max_binding / (in_per.max(1) * taps))
            .min(group_out);
        if in_per == 0 || out_per == 0 {
            return Err(format!(
                "one channel of {} x {} pixels exceeds the GPU's storage binding limit of {} bytes",
                g.in_h.max(g.out_h),
                g.in_w.max(g.out_w),
                4 * self.max_binding
            ));
        }
        let chunks = |n: usize, per: usize| -> Vec<Range<usize>> {
            (0..n).step_by(per).map(|s| s..(s + per).min(n)).collect()
        };
        let (in_runs, out_runs) = (chunks(group_in, in_per), chunks(group_out, out_per));
        // (output channels, input channels, weight, bias, whether it adds to an earlier
        // part) of every part, shared by every image of the batch. The first input run
        // of a group writes (with the bias), the others add to it.
        let mut parts = Vec::new();
        for group in 0..g.group {
            for co in &out_runs {
                let channels = group * group_out + co.start..group * group_out + co.end;
                for ci in &in_runs {
                    let values = channels
                        .clone()
                        .flat_map(|o| {
                            let row = o * group_in * taps;
                            weights[row + ci.start * taps..row + ci.end * taps]
                                .iter()
                                .copied()
                        })
                        .collect();
                    let shape = vec![co.len(), ci.len(), g.kernel[0], g.kernel[1]];
                    let weight = Operand::Constant(Arc::new(HostTensor::f32(shape, values)));
                    let bias = biases.as_ref().filter(|_| ci.start == 0).map(|b| {
                        Operand::Constant(Arc::new(HostTensor::f32(
                            vec![co.len()],
                            b[channels.clone()].to_vec(),
                        )))
                    });
                    let first_in = group * group_in + ci.start;
                    let inputs = first_in..first_in + ci.len();
                    parts.push((channels.clone(), inputs, weight, bias, ci.start > 0));
                }
            }
        }
        let (image_len, out_len) = (g.in_channels * in_plane, g.out_channels * out_plane);
        let mut launches = Vec::new();
        for n in 0..g.batch {
            for (co, ci, weight, bias, accumulate) in &parts {
                let part = ConvGeometry {
                    batch: 1,
                    group: 1,
                    in_channels: ci.len(),
                    out_channels: co.len(),
                    ..g.clone()
                };
                let (image_start, out_start) = (n * image_len, n * out_len);
                let (image_window, in_base) = self.windowed(
                    image,
                    &(image_start + ci.start * in_plane..image_start + ci.end * in_plane),
                );
                let (out_window, out_base) = self.windowed(
                    out,
                    &(out_start + co.start * out_plane..out_start + co.end * out_plane),
                );
                launches.push(Launch {
                    kernel: Shader::Conv.into(),
                    params: conv_params(&part, bias.is_some(), *accumulate, [in_base, out_base]).0,
                    output: out_window,
                    inputs: vec![
                        image_window,
                        weight.clone(),
                        bias.clone().unwrap_or_else(|| weight.clone()),
                    ],
                    workgroups: [
                        out_plane.div_ceil(64) as u32,
                        co.len().div_ceil(64) as u32,
                        1,
                    ],
                });
            }
        }
        Ok(launches)
    }
}
