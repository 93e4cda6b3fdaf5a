// Softmax over one axis: the input is viewed as [outer, len, inner] and each workgroup
// handles one (outer, inner) row, reading with stride `inner`.

struct Params {
    rows: u32,
    len: u32,
    inner: u32,
}

@group(0) @binding(0) var<storage, read> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;

var<workgroup> partial: array<f32, 256>;

fn workgroup_reduce(value: f32, lane: u32, take_max: bool) -> f32 {
    partial[lane] = value;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride >>= 1u) {
        if lane < stride {
            let other = partial[lane + stride];
            partial[lane] = select(partial[lane] + other, max(partial[lane], other), take_max);
        }
        workgroupBarrier();
    }
    let result = partial[0];
    workgroupBarrier();
    return result;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
        @builtin(local_invocation_index) lane: u32) {
    let row = wg.y * groups.x + wg.x;
    if row >= p.rows {
        return;
    }
    let base = (row / p.inner) * p.len * p.inner + row % p.inner;
    var largest = -3.4e38;
    for (var i = lane; i < p.len; i += 256u) {
        largest = max(largest, x[base + i * p.inner]);
    }
    largest = workgroup_reduce(largest, lane, true);
    var sum = 0.0;
    for (var i = lane; i < p.len; i += 256u) {
        sum += exp(x[base + i * p.inner] - largest);
    }
    let inv = 1.0 / workgroup_reduce(sum, lane, false);
    for (var i = lane; i < p.len; i += 256u) {
        out[base + i * p.inner] = exp(x[base + i * p.inner] - largest) * inv;
    }
}
