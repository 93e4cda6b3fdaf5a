// Sets every word of the output to one value (the background of Pad).

struct Params {
    n: u32,
    value: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
        @builtin(local_invocation_index) lane: u32) {
    let i = (wg.y * groups.x + wg.x) * 256u + lane;
    if i < p.n {
        out[i] = p.value;
    }
}
