// out = clamp(sum_k coefficient_k * x_k) over up to four f32 tensors of one shape: the
// update rules of samplers (scheduler steps, guidance) are all such linear combinations.

struct Params {
    n: u32,
    count: u32,
    clamp_output: u32,
    _pad: u32,
    low: f32,
    high: f32,
    _pad1: u32,
    _pad2: u32,
    coefficients: array<f32, 4>,
}

@group(0) @binding(0) var<storage, read> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> x0: array<f32>;
@group(0) @binding(3) var<storage, read> x1: array<f32>;
@group(0) @binding(4) var<storage, read> x2: array<f32>;
@group(0) @binding(5) var<storage, read> x3: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
        @builtin(local_invocation_index) lane: u32) {
    let i = (wg.y * groups.x + wg.x) * 256u + lane;
    if i >= p.n {
        return;
    }
    var v = p.coefficients[0] * x0[i];
    if p.count > 1u { v += p.coefficients[1] * x1[i]; }
    if p.count > 2u { v += p.coefficients[2] * x2[i]; }
    if p.count > 3u { v += p.coefficients[3] * x3[i]; }
    if p.clamp_output != 0u {
        v = clamp(v, p.low, p.high);
    }
    out[i] = v;
}
