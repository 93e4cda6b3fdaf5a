// Instance, group and layer normalisation of rows of `len` elements (mean and variance in
// two passes for accuracy), then the affine parameters at index (row % row_mod) * row_mul
// + col / col_div, which expresses each op's parameter layout. `act` 1 applies SiLU after
// (fused GroupNorm -> SiLU). Past the binding limit, launches take runs of rows;
// `first_row` is the run's first row in the whole tensor.
// A thread per row, or a workgroup per row: rows.wgsl.
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

@compute @workgroup_size(WORKGROUP)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
        @builtin(local_invocation_index) lane: u32) {
    let group = wg.y * groups.x + wg.x;
    if ROW_THREADS == 1u {
        // Every thread calls (the barriers' uniformity rule); those past the end redo the
        // last row without writing it.
        let row = group * WORKGROUP + lane;
        normalize_row(min(row, p.rows - 1u), 0u, 1u, row < p.rows);
    } else if group < p.rows { // uniform across the workgroup
        normalize_row(group, lane, ROW_THREADS, true);
    }
}

// Normalises `row`, this thread taking elements first, first + step, ...; `store`: writes
// them.
fn normalize_row(row: u32, first: u32, step: u32, store: bool) {
    let base = row * p.len;
    let sum = thread_sum(base, first, step, 0.0, false);
    let mean = row_combine(0u, sum, first, false) / f32(p.len);
    let squares = thread_sum(base, first, step, mean, true);
    let inv_std = inverseSqrt(row_combine(1u, squares, first, false) / f32(p.len) + p.epsilon);
    param_row = ((p.first_row + row) % p.row_mod) * p.row_mul;
    if !store {
        return;
    }
    if HALF_OUTPUT {
        for (var i = 2u * first; i < p.len; i += 2u * step) {
            let pair = vec2(normalized(base, i, mean, inv_std), normalized(base, i + 1u, mean, inv_std));
            out[(base + i) >> 1u] = pack2x16float(pair);
        }
        return;
    }
    for (var i = first; i < p.len; i += step) {
        out[base + i] = bitcast<u32>(normalized(base, i, mean, inv_std));
    }
}

// The sum of x (or with `squares`, of (x - mean)^2) over this thread's elements of the row
// at `base`: first, first + step, ...; summed in runs of RUN, then the runs' sums (see
// rows.wgsl).
fn thread_sum(base: u32, first: u32, step: u32, mean: f32, squares: bool) -> f32 {
    var total = 0.0;
    for (var run = first; run < p.len; run += RUN * step) {
        var run_sum = 0.0;
        for (var i = run; i < min(run + RUN * step, p.len); i += step) {
            let v = x_at(base + i);
            run_sum += select(v, (v - mean) * (v - mean), squares);
        }
        total += run_sum;
    }
    return total;
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
