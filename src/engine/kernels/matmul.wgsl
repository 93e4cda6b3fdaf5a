// Batched, broadcasting MatMul and Gemm over strided operands (so transposed operands need
// no copy): out[b, m, n] = alpha * sum_k A[b, m, k] B[b, k, n] + beta * C[m, n].

struct Params {
    m: u32,
    n: u32,
    k: u32,
    batch_rank: u32,
    a_m: u32,
    a_k: u32,
    b_k: u32,
    b_n: u32,
    alpha: f32,
    beta: f32,
    has_bias: u32,
    bias_m: u32,
    bias_n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
    batch_shape: vec4<u32>,
    a_batch_strides: vec4<u32>,
    b_batch_strides: vec4<u32>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> a: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<u32>; // f32 bits, or f16 pairs
@group(0) @binding(4) var<storage, read> bias: array<f32>;

// B stored as packed f16 pairs (an fp16 model's weights, kept at half size on the GPU and
// read without the shader-f16 feature). Products and sums stay f32.
override HALF_WEIGHTS: bool = false;

fn b_at(i: u32) -> f32 {
    if HALF_WEIGHTS {
        return unpack2x16float(b[i >> 1u])[i & 1u];
    }
    return bitcast<f32>(b[i]);
}

var<private> a_base: u32;
var<private> b_base: u32;
var<private> out_base: u32;
// The first of the 4 columns of B this thread stages.
var<private> first_column: u32;

fn begin(batch: u32) {
    a_base = 0u;
    b_base = 0u;
    var rest = batch;
    for (var d = i32(p.batch_rank) - 1; d >= 0; d--) {
        let index = rest % p.batch_shape[d];
        rest /= p.batch_shape[d];
        a_base += index * p.a_batch_strides[d];
        b_base += index * p.b_batch_strides[d];
    }
    out_base = batch * p.m * p.n;
}

// SWAPPED: the product is computed transposed, out^T = B^T A^T, so that a product with few
// rows and many columns (a linear layer at a UNet's smallest levels, or its time embedding:
// 2-32 rows) runs its rows on the narrow tiles' 16 columns instead of padding 64-row tiles.
override SWAPPED: bool = false;

fn gemm_m() -> u32 { return select(p.m, p.n, SWAPPED); }
fn gemm_n() -> u32 { return select(p.n, p.m, SWAPPED); }
fn gemm_k() -> u32 { return p.k; }

// Elements of the logical operands, A[row, k] and B[k, column].
fn a_at(row: u32, k: u32) -> f32 { return a[a_base + row * p.a_m + k * p.a_k]; }
fn b_at_kn(k: u32, column: u32) -> f32 { return b_at(b_base + k * p.b_k + column * p.b_n); }

fn load_a4(m: u32, k: u32) -> vec4<f32> {
    var v = vec4<f32>();
    for (var j = 0u; j < 4u; j++) {
        let inside = m < gemm_m() && k + j < p.k;
        let row = select(0u, m, inside);
        let depth = select(0u, k + j, inside);
        var value: f32;
        if SWAPPED {
            value = b_at_kn(depth, row);
        } else {
            value = a_at(row, depth);
        }
        v[j] = select(0.0, value, inside);
    }
    return v;
}

fn begin_columns(n: u32) {
    first_column = n;
}

fn load_b4(k: u32) -> vec4<f32> {
    var v = vec4<f32>();
    for (var j = 0u; j < 4u; j++) {
        let inside = first_column + j < gemm_n() && k < p.k;
        let column = select(0u, first_column + j, inside);
        let depth = select(0u, k, inside);
        var value: f32;
        if SWAPPED {
            value = a_at(column, depth);
        } else {
            value = b_at_kn(depth, column);
        }
        v[j] = select(0.0, value, inside);
    }
    return v;
}

fn store4(m: u32, n: u32, values: vec4<f32>) {
    for (var j = 0u; j < 4u; j++) {
        if n + j < gemm_n() {
            // The output element this is: transposed back when SWAPPED.
            let row = select(m, n + j, SWAPPED);
            let column = select(n + j, m, SWAPPED);
            var v = p.alpha * values[j];
            if p.has_bias != 0u {
                v += p.beta * bias[row * p.bias_m + column * p.bias_n];
            }
            out[out_base + row * p.n + column] = v;
        }
    }
}
