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

/// Where a launch's tensors start in their bindings: image, output and filter offsets in
/// elements, the filter's elements per output channel, and between its consecutive k.
struct Bases {
    image: usize,
    out: usize,
    weight: usize,
    weight_row: usize,
    weight_step: usize,
}

impl Bases {
    /// Every binding holds the whole tensor.
    fn whole(g: &ConvGeometry) -> Bases {
        Bases {
            image: 0,
            out: 0,
            weight: 0,
            weight_row: filter_row(g),
            weight_step: 1,
        }
    }
}

/// `g`'s padding before each axis, signed as conv.wgsl reads it.
fn padding(g: &ConvGeometry) -> [isize; 2] {
    g.pad.map(|p| p as isize)
}

/// Elements of one output channel's filter.
fn filter_row(g: &ConvGeometry) -> usize {
    g.in_channels / g.group * g.kernel[0] * g.kernel[1]
}

/// The one filter tap that lands inside the image, when every other tap reads only padding
/// (a 3x3 convolution of a 1x1 image: a UNet's deepest level at small latents). The product
/// then runs as a 1x1 convolution of that tap's weights, its K and the filter it reads
/// shrunk by the kernel's area, with the same result.
fn live_tap(g: &ConvGeometry) -> Option<[usize; 2]> {
    if g.kernel == [1, 1] {
        return None;
    }
    let extents = [(g.in_h, g.out_h), (g.in_w, g.out_w)];
    let mut tap = [0; 2];
    for (i, &(input, output)) in extents.iter().enumerate() {
        let lands = |t: usize| {
            (0..output).any(|o| {
                let at = (o * g.stride[i] + t * g.dilation[i]) as isize - g.pad[i] as isize;
                (0..input as isize).contains(&at)
            })
        };
        let mut live = (0..g.kernel[i]).filter(|&t| lands(t));
        tap[i] = live.next()?;
        if live.next().is_some() {
            return None;
        }
    }
    Some(tap)
}

/// conv.wgsl's parameters for `g` (`pad`: before each axis, negative when a single tap of
/// a larger filter runs as a 1x1 kernel).
fn conv_params(
    g: &ConvGeometry,
    pad: [isize; 2],
    has_bias: bool,
    accumulate: bool,
    bases: Bases,
) -> Params {
    Params::default()
        .u(g.batch)
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
        .i(pad[0])
        .i(pad[1])
        .u(g.dilation[0])
        .u(g.dilation[1])
        .u(g.group)
        .u(has_bias as usize)
        .u(accumulate as usize)
        .u(bases.image)
        .u(bases.out)
        .u(bases.weight)
        .u(bases.weight_row)
        .u(bases.weight_step)
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
        let columns = g.batch * g.out_h * g.out_w;
        let tile_columns = gemm_tile_columns(columns);
        // One launch for the whole batch, unless a tensor exceeds a binding or the batch's
        // pixels need more column tiles than a launch may have (then image by image).
        let fits = [image, weight, out]
            .iter()
            .all(|&v| self.words(v, numel(self.shape(v))) <= self.max_binding)
            && columns.div_ceil(tile_columns as usize) <= self.max_groups as usize;
        if !fits {
            return self.conv_in_parts(&g, image, weight, bias, out);
        }
        let params = match live_tap(&g) {
            Some(tap) => {
                let one_tap = ConvGeometry {
                    kernel: [1, 1],
                    ..g.clone()
                };
                let pad = [0, 1].map(|i| g.pad[i] as isize - (tap[i] * g.dilation[i]) as isize);
                let bases = Bases {
                    weight: tap[0] * g.kernel[1] + tap[1],
                    weight_step: g.kernel[0] * g.kernel[1],
                    ..Bases::whole(&g)
                };
                conv_params(&one_tap, pad, bias.is_some(), false, bases)
            }
            None => conv_params(&g, padding(&g), bias.is_some(), false, Bases::whole(&g)),
        };
        let groups = [
            columns.div_ceil(tile_columns as usize) as u32,
            (g.out_channels / g.group).div_ceil(64) as u32,
            g.group as u32,
        ];
        let inputs = vec![
            Operand::Value(image),
            Operand::Value(weight),
            Operand::Value(bias.unwrap_or(weight)),
        ];
        let kernel = KernelKey {
            tile_columns,
            ..self.conv_kernel(image, weight, out)
        };
        Ok(vec![self.launch(kernel, params, out, inputs, groups)])
    }

    /// conv.wgsl reading `weight` (`gemm_kernel`), with the image and output stored as
    /// they are (f32 or halves).
    fn conv_kernel(&self, image: ValueId, weight: ValueId, out: ValueId) -> KernelKey {
        KernelKey {
            half_input: self.half(image),
            half_output: self.half(out),
            ..self.gemm_kernel(Shader::Conv, weight)
        }
    }

    /// A convolution whose image, output or weights exceed one binding (the VAE decoder's
    /// last blocks at 512 px and up), or whose batch has more pixels than one launch's
    /// column tiles: per image and group, runs of output channels times
    /// runs of input channels, each launch adding its input channels' share into the output
    /// run. Each part binds a window of the filter in place (rows of its output channels,
    /// read from its input channels on); bias slices become constants of their own.
    fn conv_in_parts(
        &self,
        g: &ConvGeometry,
        image: ValueId,
        weight: ValueId,
        bias: Option<ValueId>,
        out: ValueId,
    ) -> LowerResult<Vec<Launch>> {
        let biases = bias
            .map(|b| {
                self.graph.values[b]
                    .constant
                    .as_ref()
                    .map(|c| c.to_f32())
                    .ok_or("the bias must be constant to split this convolution")
            })
            .transpose()?;
        let (in_plane, out_plane) = (g.in_h * g.in_w, g.out_h * g.out_w);
        let (taps, row) = (g.kernel[0] * g.kernel[1], filter_row(g));
        let (group_in, group_out) = (g.in_channels / g.group, g.out_channels / g.group);
        // Windows start at an aligned offset before their first element: leave that slack.
        let room = self.max_binding.saturating_sub(2 * self.align);
        // A filter window spans whole rows of its output channels.
        let in_per = (room / in_plane).min(room / taps).min(group_in);
        let out_per = (room / out_plane).min(room / row).min(group_out);
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
        // Every part, shared by every image of the batch. The first input run of a group
        // writes (with the bias), the others add to it.
        let mut parts = Vec::new();
        for group in 0..g.group {
            for co in &out_runs {
                let channels = group * group_out + co.start..group * group_out + co.end;
                for ci in &in_runs {
                    let bias = biases.as_ref().filter(|_| ci.start == 0).map(|b| {
                        Operand::Constant(Arc::new(HostTensor::f32(
                            vec![co.len()],
                            b[channels.clone()].to_vec(),
                        )))
                    });
                    let first_in = group * group_in + ci.start;
                    parts.push(Part {
                        filter: channels.start * row + ci.start * taps
                            ..(channels.end - 1) * row + ci.end * taps,
                        channels: channels.clone(),
                        inputs: first_in..first_in + ci.len(),
                        bias,
                        accumulate: ci.start > 0,
                    });
                }
            }
        }
        let (image_len, out_len) = (g.in_channels * in_plane, g.out_channels * out_plane);
        let kernel = self.conv_kernel(image, weight, out);
        let mut launches = Vec::new();
        for n in 0..g.batch {
            for part in &parts {
                let (co, ci) = (&part.channels, &part.inputs);
                let geometry = ConvGeometry {
                    batch: 1,
                    group: 1,
                    in_channels: ci.len(),
                    out_channels: co.len(),
                    ..g.clone()
                };
                let (image_start, out_start) = (n * image_len, n * out_len);
                let (image_window, image_base) = self.windowed(
                    image,
                    &(image_start + ci.start * in_plane..image_start + ci.end * in_plane),
                );
                let (out_window, out_base) = self.windowed(
                    out,
                    &(out_start + co.start * out_plane..out_start + co.end * out_plane),
                );
                let (filter_window, filter_base) = self.windowed(weight, &part.filter);
                let bases = Bases {
                    image: image_base,
                    out: out_base,
                    weight: filter_base,
                    weight_row: row,
                    weight_step: 1,
                };
                let params = conv_params(
                    &geometry,
                    padding(g),
                    part.bias.is_some(),
                    part.accumulate,
                    bases,
                );
                launches.push(Launch {
                    kernel,
                    params: params.0,
                    output: out_window,
                    inputs: vec![
                        image_window,
                        filter_window.clone(),
                        part.bias.clone().unwrap_or(filter_window),
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

/// One launch of a split convolution: output and input channel runs, the filter elements
/// it reads, its bias slice (first input run only) and whether it adds to the output.
struct Part {
    channels: Range<usize>,
    inputs: Range<usize>,
    filter: Range<usize>,
    bias: Option<Operand>,
    accumulate: bool,
}
