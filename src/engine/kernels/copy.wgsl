// Data movement as strided copies: out[out_base + sum(i_d * out_stride_d)] =
// src[src_base + sum(i_d * src_stride_d)] over a copy shape of rank <= 6. Transpose, Slice
// (any step sign), Expand (stride 0), Concat and Split (offset windows) and Pad are all this.
// Words are copied verbatim, so the element type does not matter. Past the binding limit a
// copy runs as launches over elements first..first+n, each binding the spans of `out` and
// `src` they touch (bases are relative to those spans).

struct Params {
    n: u32,
    rank: u32,
    src_base: i32,
    out_base: i32,
    first: u32,
    shape: array<u32, 6>,
    src_strides: array<i32, 6>,
    out_strides: array<i32, 6>,
}

@group(0) @binding(0) var<storage, read> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;
@group(0) @binding(2) var<storage, read> src: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
        @builtin(local_invocation_index) lane: u32) {
    let i = (wg.y * groups.x + wg.x) * 256u + lane;
    if i >= p.n {
        return;
    }
    var s = p.src_base;
    var o = p.out_base;
    var rest = p.first + i;
    for (var d = i32(p.rank) - 1; d >= 0; d--) {
        let index = rest % p.shape[d];
        rest /= p.shape[d];
        s += i32(index) * p.src_strides[d];
        o += i32(index) * p.out_strides[d];
    }
    out[u32(o)] = src[u32(s)];
}
