// Gather along one axis: data viewed as [outer, axis, inner], indices flattened to [count].
// Negative indices count from the end, as ONNX specifies. A table past the binding limit
// (SD's token embeddings on a 128 MiB adapter) runs as launches over runs of its rows, each
// bound as `data` and writing only the outputs whose index falls in its rows. A table of
// fp16 weights is read as packed halves (HALF_WEIGHTS) and written as f32.

struct Params {
    n: u32,
    inner: u32,
    count: u32,
    axis_len: u32,
    first_row: u32,     // the run of rows `data` holds
    rows: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;
@group(0) @binding(2) var<storage, read> data: array<u32>;
@group(0) @binding(3) var<storage, read> indices: array<i32>;

override HALF_WEIGHTS: bool = false;

fn element(k: u32) -> u32 {
    if HALF_WEIGHTS {
        return bitcast<u32>(unpack2x16float(data[k >> 1u])[k & 1u]);
    }
    return data[k];
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
        @builtin(local_invocation_index) lane: u32) {
    let i = (wg.y * groups.x + wg.x) * 256u + lane;
    if i >= p.n {
        return;
    }
    let inner = i % p.inner;
    let j = (i / p.inner) % p.count;
    let outer = i / (p.inner * p.count);
    var index = indices[j];
    if index < 0 {
        index += i32(p.axis_len);
    }
    let row = u32(clamp(index, 0, i32(p.axis_len) - 1));
    if row < p.first_row || row >= p.first_row + p.rows {
        return;
    }
    out[i] = element((outer * p.rows + row - p.first_row) * p.inner + inner);
}
