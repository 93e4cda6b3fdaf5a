// 2-D convolution as an implicit GEMM per group: M = output channels of the group, N = the
// output pixels of every image (the batch folded into the columns, so a filter is staged
// once for all images: at a UNet's 1-4 pixel levels, per-image columns would be mostly
// padding), K = input channels of the group x kernel taps. Input patches are read straight
// from the images (no im2col buffer); padding reads as zero. Bias is fused.
// `accumulate` adds to what the output holds: a convolution too large for one binding runs
// as launches over runs of input channels that sum into the output, each reading its
// window of the filter in place. `weight_step` > 1 reads one tap of a larger filter as a
// 1x1 kernel (lower/conv.rs: a filter wider than its image, where only that tap can land
// inside it). `HALF_INPUT` / `HALF_OUTPUT`: the image / output stored as packed f16 pairs
// (an fp16 model's activations); a thread's four output columns are then four neighbouring
// pixels of one image (lowering: a multiple of 4 pixels per image), two words.

struct Params {
    images: u32,
    in_channels: u32,
    in_h: u32,
    in_w: u32,
    out_channels: u32,
    out_h: u32,
    out_w: u32,
    kernel_h: u32,
    kernel_w: u32,
    stride_h: u32,
    stride_w: u32,
    pad_h: i32,
    pad_w: i32,
    dilation_h: u32,
    dilation_w: u32,
    groups: u32,
    has_bias: u32,
    accumulate: u32,
    in_base: u32,
    out_base: u32,
    // Where the filter of output channel 0 starts in the weight binding, and the elements
    // between two output channels' filters (a run of input channels reads a strided
    // window of the whole filter).
    weight_base: u32,
    weight_row: u32,
    // Elements between consecutive k of a filter row.
    weight_step: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<u32>; // f32 bits, or f16 pairs
@group(0) @binding(2) var<storage, read> x: array<u32>; // the image: f32 bits, or f16 pairs
@group(0) @binding(3) var<storage, read> weight: array<u32>; // f32 bits, or f16 pairs
@group(0) @binding(4) var<storage, read> bias: array<f32>;

// The filter stored as packed f16 pairs (an fp16 model's weights, kept at half size on the
// GPU and read without the shader-f16 feature). Products and sums stay f32.
override HALF_WEIGHTS: bool = false;

fn weight_at(i: u32) -> f32 {
    if HALF_WEIGHTS {
        return unpack2x16float(weight[i >> 1u])[i & 1u];
    }
    return bitcast<f32>(weight[i]);
}

var<private> image_start: u32;
var<private> out_start: u32;
var<private> first_out_channel: u32;

fn group_out_channels() -> u32 { return p.out_channels / p.groups; }
fn group_in_channels() -> u32 { return p.in_channels / p.groups; }

fn begin(group: u32) {
    image_start = p.in_base + group * group_in_channels() * p.in_h * p.in_w;
    first_out_channel = group * group_out_channels();
    out_start = p.out_base + first_out_channel * p.out_h * p.out_w;
}

fn gemm_m() -> u32 { return group_out_channels(); }
fn gemm_n() -> u32 { return p.images * p.out_h * p.out_w; }
fn gemm_k() -> u32 { return group_in_channels() * p.kernel_h * p.kernel_w; }

fn load_a4(m: u32, k: u32) -> vec4<f32> {
    var v = vec4<f32>();
    let row = p.weight_base + (first_out_channel + m) * p.weight_row;
    let row_inside = m < gemm_m();
    for (var j = 0u; j < 4u; j++) {
        let inside = row_inside && k + j < gemm_k();
        v[j] = select(0.0, weight_at(select(0u, row + (k + j) * p.weight_step, inside)), inside);
    }
    return v;
}

// The 4 staged output columns: where their image starts, the top-left input coordinates
// of their patch (before the tap offset), and which of them exist.
var<private> column_image: vec4<u32>;
var<private> column_y: vec4<i32>;
var<private> column_x: vec4<i32>;
var<private> column_live: vec4<bool>;

fn begin_columns(n: u32) {
    let pixels = p.out_h * p.out_w;
    for (var j = 0u; j < 4u; j++) {
        let column = n + j;
        let pixel = column % pixels;
        column_live[j] = column < gemm_n();
        column_image[j] = (column / pixels) * p.in_channels * p.in_h * p.in_w;
        column_y[j] = i32((pixel / p.out_w) * p.stride_h) - p.pad_h;
        column_x[j] = i32((pixel % p.out_w) * p.stride_w) - p.pad_w;
    }
}

fn load_b4(k: u32) -> vec4<f32> {
    let taps = p.kernel_h * p.kernel_w;
    let channel = k / taps;
    let tap = k % taps;
    let dy = i32((tap / p.kernel_w) * p.dilation_h);
    let dx = i32((tap % p.kernel_w) * p.dilation_w);
    let plane = image_start + channel * p.in_h * p.in_w;
    let k_inside = k < gemm_k();
    var v = vec4<f32>();
    for (var j = 0u; j < 4u; j++) {
        let row = column_y[j] + dy;
        let col = column_x[j] + dx;
        let inside = k_inside && column_live[j] && row >= 0 && col >= 0 && row < i32(p.in_h)
            && col < i32(p.in_w);
        let value = x_at(select(0u, column_image[j] + plane + u32(row) * p.in_w + u32(col), inside));
        v[j] = select(0.0, value, inside);
    }
    return v;
}

fn store4(m: u32, n: u32, values: vec4<f32>) {
    var bias_value = 0.0;
    if p.has_bias != 0u {
        bias_value = bias[first_out_channel + m];
    }
    let pixels = p.out_h * p.out_w;
    let row = out_start + m * pixels;
    if HALF_OUTPUT {
        if n < gemm_n() {
            let word = (row + (n / pixels) * p.out_channels * pixels + n % pixels) >> 1u;
            var v = values + bias_value;
            if p.accumulate != 0u {
                v += vec4(unpack2x16float(out[word]), unpack2x16float(out[word + 1u]));
            }
            out[word] = pack2x16float(v.xy);
            out[word + 1u] = pack2x16float(v.zw);
        }
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        let column = n + j;
        if column < gemm_n() {
            let at = row + (column / pixels) * p.out_channels * pixels + column % pixels;
            var v = values[j] + bias_value;
            if p.accumulate != 0u {
                v += bitcast<f32>(out[at]);
            }
            out[at] = bitcast<u32>(v);
        }
    }
}
