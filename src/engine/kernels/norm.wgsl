// Instance, group and layer normalisation: each workgroup normalises one row of `len`
// elements (mean and variance in two passes for accuracy), then applies the affine
// parameters at index (row % row_mod) * row_mul + col / col_div, which expresses each op's
// parameter layout. `act` 1 applies SiLU after (fused GroupNorm -> SiLU). Past the binding
// limit, launches take runs of rows; `first_row` is the run's first row in the whole tensor.
// `HALF_INPUT` / `HALF_OUTPUT`: x / out stored as packed f16 pairs (an fp16 model's
// activations); statistics and arithmetic stay f32. Rows of halves have an even length, so
// a thread writes a pair of elements to one word.

struct Params {
    rows: u32,
    len: u32,
    row_mod: u32,
    row_mul: u32,
    col_div: u32,
    epsilon: f32,
    act: u32,
    first_row: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<u32>; // f32 bits, or f16 pairs
@group(0) @binding(2) var<storage, read> x: array<u32>; // f32 bits, or f16 pairs
@group(0) @binding(3) var<storage, read> scale: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;

var<workgroup> partial: array<f32, 256>;

fn workgroup_sum(value: f32, lane: u32) -> f32 {
    partial[lane] = value;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride >>= 1u) {
        if lane < stride {
            partial[lane] += partial[lane + stride];
        }
        workgroupBarrier();
    }
    let total = partial[0];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
        @builtin(local_invocation_index) lane: u32) {
    let row = wg.y * groups.x + wg.x;
    if row >= p.rows {
        return; // uniform across the workgroup
    }
    let base = row * p.len;
    var sum = 0.0;
    for (var i = lane; i < p.len; i += 256u) {
        sum += x_at(base + i);
    }
    let mean = workgroup_sum(sum, lane) / f32(p.len);
    var squares = 0.0;
    for (var i = lane; i < p.len; i += 256u) {
        let d = x_at(base + i) - mean;
        squares += d * d;
    }
    let inv_std = inverseSqrt(workgroup_sum(squares, lane) / f32(p.len) + p.epsilon);
    param_row = ((p.first_row + row) % p.row_mod) * p.row_mul;
    if HALF_OUTPUT {
        for (var i = 2u * lane; i < p.len; i += 512u) {
            let pair = vec2(normalized(base, i, mean, inv_std), normalized(base, i + 1u, mean, inv_std));
            out[(base + i) >> 1u] = pack2x16float(pair);
        }
        return;
    }
    for (var i = lane; i < p.len; i += 256u) {
        out[base + i] = bitcast<u32>(normalized(base, i, mean, inv_std));
    }
}

var<private> param_row: u32;

// Element i of the row starting at `base`, normalised, scaled, shifted and activated.
fn normalized(base: u32, i: u32, mean: f32, inv_std: f32) -> f32 {
    let k = param_row + i / p.col_div;
    let v = (x_at(base + i) - mean) * inv_std * scale[k] + bias[k];
    if p.act == 1u {
        return v / (1.0 + exp(-v));
    }
    return v;
}
