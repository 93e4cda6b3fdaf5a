// Softmax over one axis: the input is viewed as [outer, len, inner] and each (outer,
// inner) row, read with stride `inner` from `in_base` / `out_base` elements into the
// bindings, is a thread's or a workgroup's (rows.wgsl).
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

fn row_max(base: u32, first: u32, step: u32) -> f32 {
    var largest = -3.4e38;
    for (var i = first; i < p.len; i += step) {
        largest = max(largest, x[p.in_base + base + i * p.inner]);
    }
    return row_combine(0u, largest, first, true);
}

// Summed in runs of RUN, then the runs' sums (see rows.wgsl).
fn row_exp_sum(base: u32, first: u32, step: u32, largest: f32) -> f32 {
    var sum = 0.0;
    for (var run = first; run < p.len; run += RUN * step) {
        var run_sum = 0.0;
        for (var i = run; i < min(run + RUN * step, p.len); i += step) {
            run_sum += exp(x[p.in_base + base + i * p.inner] - largest);
        }
        sum += run_sum;
    }
    return row_combine(1u, sum, first, false);
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

@compute @workgroup_size(WORKGROUP)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
        @builtin(local_invocation_index) lane: u32) {
    let group = wg.y * groups.x + wg.x;
    if ROW_THREADS == 1u {
        // Every thread calls (the barriers' uniformity rule); those past the end redo the
        // last row without writing it.
        let row = group * WORKGROUP + lane;
        softmax_row(min(row, p.rows - 1u), 0u, 1u, row < p.rows);
    } else if group < p.rows { // uniform across the workgroup
        softmax_row(group, lane, ROW_THREADS, true);
    }
}

// `row`'s softmax (phase 0), statistics (1) or outputs from them (2), this thread taking
// elements first, first + step, ...; `store`: writes them.
fn softmax_row(row: u32, first: u32, step: u32, store: bool) {
    let base = (row / p.inner) * p.len * p.inner + row % p.inner;
    var largest: f32;
    var inv: f32;
    if p.phase == 2u {
        largest = stats[2u * row];
        inv = 1.0 / stats[2u * row + 1u];
    } else {
        largest = row_max(base, first, step);
        let sum = row_exp_sum(base, first, step, largest);
        if p.phase == 1u {
            if store && first == 0u {
                merge_stats(row, largest, sum);
            }
            return;
        }
        inv = 1.0 / sum;
    }
    if !store {
        return;
    }
    for (var i = first; i < p.len; i += step) {
        let at = base + i * p.inner;
        out[p.out_base + at] = exp(x[p.in_base + at] - largest) * inv;
    }
}
