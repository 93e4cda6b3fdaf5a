//! 2-D convolution (conv.wgsl), split by channels when a tensor exceeds one binding.

use std::sync::Arc;

use super::super::graph::{Node, ValueId};
use super::super::infer::{self, ConvGeometry};
use super::super::kernels::{Launch, Operand, Params, Shader};
use super::super::ops::ConvAttrs;
use super::super::tensor::{HostTensor, numel};
use super::{LowerResult, Lowering};

/// conv.wgsl's parameters for `g`.
fn conv_params(g: &ConvGeometry, has_bias: bool, accumulate: bool) -> Params {
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
        let params = conv_params(&g, bias.is_some(), false);
        let groups = [
            (g.out_h * g.out_w).div_ceil(64) as u32,
            (g.out_channels / g.group).div_ceil(64) as u32,
            (g.batch * g.group) as u32,
        ];
        let inputs = vec![
            Operand::Value(image),
            Operand::Value(weight),
            Operand::Value(bias.unwrap_or(weight)),
        ];
        Ok(vec![self.launch(
            Shader::Conv.into(),
            params,
            out,
            inputs,
            groups,
        )])
    }

    /// A convolution whose image, output or weights exceed one binding (the VAE decoder's
    /// last blocks at 512 px and up): per image, runs of output channels times runs of input
    /// channels, each launch adding its input channels' share into the output run. The
    /// weight and bias slices become constants of their own.
    fn conv_in_parts(
        &self,
        g: &ConvGeometry,
        image: ValueId,
        weight: ValueId,
        bias: Option<ValueId>,
        out: ValueId,
    ) -> LowerResult<Vec<Launch>> {
        if g.group != 1 {
            return Err(
                "a grouped convolution past the storage binding limit is not supported".into(),
            );
        }
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
        // Input runs leave room for one output channel's weight slice; output runs for
        // the whole slice of an input run.
        let in_runs = self.runs(
            g.in_channels,
            &[in_plane],
            self.max_binding / taps,
            "input channel",
        )?;
        let out_runs = self.runs(
            g.out_channels,
            &[out_plane],
            self.max_binding / (in_runs[0].len() * taps),
            "output channel",
        )?;
        let image_len = g.in_channels * in_plane;
        let out_len = g.out_channels * out_plane;
        if g.batch > 1
            && !(image_len.is_multiple_of(self.align) && out_len.is_multiple_of(self.align))
        {
            return Err("images of this size cannot be split at aligned offsets".into());
        }
        // Weight slice [co, ci, kh, kw] and bias slice of each (output run, input run),
        // shared by every image of the batch.
        let slices: Vec<(Operand, Option<Operand>)> = out_runs
            .iter()
            .flat_map(|co| in_runs.iter().map(move |ci| (co.clone(), ci.clone())))
            .map(|(co, ci)| {
                let values = co
                    .clone()
                    .flat_map(|o| {
                        let row = o * g.in_channels * taps;
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
                        b[co.clone()].to_vec(),
                    )))
                });
                (weight, bias)
            })
            .collect();
        let mut launches = Vec::new();
        for n in 0..g.batch {
            for (k, (weight, bias)) in slices.iter().enumerate() {
                let (co, ci) = (&out_runs[k / in_runs.len()], &in_runs[k % in_runs.len()]);
                let part = ConvGeometry {
                    batch: 1,
                    in_channels: ci.len(),
                    out_channels: co.len(),
                    ..g.clone()
                };
                let (image_start, out_start) = (n * image_len, n * out_len);
                launches.push(Launch {
                    kernel: Shader::Conv.into(),
                    // The first input run writes (with the bias), the others add to it.
                    params: conv_params(&part, bias.is_some(), ci.start > 0).0,
                    output: Operand::Part(
                        out,
                        out_start + co.start * out_plane..out_start + co.end * out_plane,
                    ),
                    inputs: vec![
                        Operand::Part(
                            image,
                            image_start + ci.start * in_plane..image_start + ci.end * in_plane,
                        ),
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
