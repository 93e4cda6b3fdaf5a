// Instance, group and layer normalisation: each workgroup normalises one row of `len`
// elements (mean and variance in two passes for accuracy), then applies the affine
// parameters at index (row % row_mod) * row_mul + col / col_div, which expresses each op's
// parameter layout. `act` 1 applies SiLU after (fused GroupNorm -> SiLU). Past the binding
// limit, launches take runs of rows; `first_row` is the run's first row in the whole tensor.

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
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
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
        sum += x[base + i];
    }
    let mean = workgroup_sum(sum, lane) / f32(p.len);
    var squares = 0.0;
    for (var i = lane; i < p.len; i += 256u) {
        let d = x[base + i] - mean;
        squares += d * d;
    }
    let inv_std = inverseSqrt(workgroup_sum(squares, lane) / f32(p.len) + p.epsilon);
    let param_row = ((p.first_row + row) % p.row_mod) * p.row_mul;
    for (var i = lane; i < p.len; i += 256u) {
        let k = param_row + i / p.col_div;
        var v = (x[base + i] - mean) * inv_std * scale[k] + bias[k];
        if p.act == 1u {
            v = v / (1.0 + exp(-v));
        }
        out[base + i] = v;
    }
}
