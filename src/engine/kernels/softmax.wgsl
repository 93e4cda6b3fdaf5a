// Softmax over one axis: the input is viewed as [outer, len, inner] and each workgroup
// handles one (outer, inner) row, reading with stride `inner`, from `in_base` / `out_base`
// elements into its bindings.
//
// A row too long for one binding runs in parts along `len` (see lower/rows.rs), in two
// phases: phase 1 folds each part's maximum and sum of exponentials into `stats` (the
// online-softmax rescaling, `first_part` starts afresh), phase 2 writes each part's
// outputs from them. Phase 0 is the whole row in one launch.

struct Params {
    rows: u32,
    len: u32,
    inner: u32,
    in_base: u32,
    out_base: u32,
    phase: u32,
    first_part: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
// Per row: running maximum, then running sum of exp(x - maximum). Phases 1 and 2 only.
@group(0) @binding(3) var<storage, read_write> stats: array<f32>;

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

fn row_max(base: u32, lane: u32) -> f32 {
    var largest = -3.4e38;
    for (var i = lane; i < p.len; i += 256u) {
        largest = max(largest, x[p.in_base + base + i * p.inner]);
    }
    return workgroup_reduce(largest, lane, true);
}

fn row_exp_sum(base: u32, lane: u32, largest: f32) -> f32 {
    var sum = 0.0;
    for (var i = lane; i < p.len; i += 256u) {
        sum += exp(x[p.in_base + base + i * p.inner] - largest);
    }
    return workgroup_reduce(sum, lane, false);
}

fn merge_stats(row: u32, largest: f32, sum: f32) {
    if p.first_part != 0u {
        stats[2u * row] = largest;
        stats[2u * row + 1u] = sum;
        return;
    }
    let earlier = stats[2u * row];
    let merged = max(earlier, largest);
    stats[2u * row + 1u] = stats[2u * row + 1u] * exp(earlier - merged) + sum * exp(largest - merged);
    stats[2u * row] = merged;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
        @builtin(local_invocation_index) lane: u32) {
    let row = wg.y * groups.x + wg.x;
    if row >= p.rows {
        return;
    }
    let base = (row / p.inner) * p.len * p.inner + row % p.inner;
    var largest: f32;
    var inv: f32;
    if p.phase == 2u {
        largest = stats[2u * row];
        inv = 1.0 / stats[2u * row + 1u];
    } else {
        largest = row_max(base, lane);
        let sum = row_exp_sum(base, lane, largest);
        if p.phase == 1u {
            if lane == 0u {
                merge_stats(row, largest, sum);
            }
            return;
        }
        inv = 1.0 / sum;
    }
    for (var i = lane; i < p.len; i += 256u) {
        let at = base + i * p.inner;
        out[p.out_base + at] = exp(x[p.in_base + at] - largest) * inv;
    }
}
