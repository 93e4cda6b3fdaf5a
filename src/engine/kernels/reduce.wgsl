// Reductions over any set of axes, one workgroup per output element: the kept axes locate
// the output's first input element, the 256 lanes walk the reduced axes from there in
// turn and combine their results in workgroup memory. (One thread per output would loop
// over every reduced element, and lavapipe stops loops after 65535 iterations.) `OP`:
// 0 sum, 1 mean, 2 max, 3 min, 4 prod, 5 argmax (first index of the maximum, or last with
// `select_last`).
//
// A tensor past one storage binding is reduced in parts (see lower/rows.rs): each launch
// reads a window of the input and writes a window of the output, starting `in_base` and
// `out_base` elements into their bindings. With `accumulate`, a launch combines its partial
// result with what earlier parts left in the output (sums add, maxima compare); argmax
// keeps the best value so far in `best_value` and offsets its indices by `index_offset`.

override OP: u32;

struct Params {
    n: u32,
    kept_rank: u32,
    reduced_rank: u32,
    reduced_count: u32,
    in_type: u32,      // 0 f32, otherwise integer
    select_last: u32,
    in_base: u32,
    out_base: u32,
    accumulate: u32,
    index_offset: u32,
    mean_count: f32,   // elements each output averages, over every part
    _pad: u32,
    kept_shape: array<u32, 6>,
    kept_strides: array<u32, 6>,
    reduced_shape: array<u32, 6>,
    reduced_strides: array<u32, 6>,
}

@group(0) @binding(0) var<storage, read> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<u32>;
@group(0) @binding(3) var<storage, read_write> best_value: array<f32>;

fn value_at(i: u32) -> f32 {
    if p.in_type == 0u {
        return bitcast<f32>(x[p.in_base + i]);
    }
    return f32(bitcast<i32>(x[p.in_base + i]));
}

fn output_at(o: u32) -> f32 {
    if p.in_type == 0u {
        return bitcast<f32>(out[p.out_base + o]);
    }
    return f32(bitcast<i32>(out[p.out_base + o]));
}

// `best_value` has one element per output when argmax runs in parts, else one unused.
fn store_argmax(o: u32, value: f32, index: u32) {
    if p.accumulate != 0u {
        let earlier = best_value[o];
        if !(value > earlier || (p.select_last != 0u && value == earlier)) {
            return;
        }
    }
    if o < arrayLength(&best_value) {
        best_value[o] = value;
    }
    out[p.out_base + o] = index + p.index_offset;
}

const LANES: u32 = 256u;
const NO_INDEX: u32 = 0xffffffffu;

var<workgroup> lane_value: array<f32, LANES>;
var<workgroup> lane_index: array<u32, LANES>;

// Whether argmax candidate (v, i) beats (best, best_i); NO_INDEX marks no candidate.
fn argmax_beats(v: f32, i: u32, best: f32, best_i: u32) -> bool {
    if i == NO_INDEX { return false; }
    if best_i == NO_INDEX || v > best { return true; }
    if v < best { return false; }
    return select((i < best_i), (i > best_i), p.select_last != 0u);
}

fn fold(acc: f32, v: f32) -> f32 {
    switch OP {
        case 2u: { return max(acc, v); }
        case 3u: { return min(acc, v); }
        case 4u: { return acc * v; }
        default: { return acc + v; }
    }
}

fn identity() -> f32 {
    switch OP {
        case 2u, 5u: { return -3.4e38; }
        case 3u: { return 3.4e38; }
        case 4u: { return 1.0; }
        default: { return 0.0; }
    }
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
        @builtin(local_invocation_index) lane: u32) {
    let o = wg.y * groups.x + wg.x;
    if o >= p.n {
        return;
    }
    var base = 0u;
    var rest = o;
    for (var d = i32(p.kept_rank) - 1; d >= 0; d--) {
        base += (rest % p.kept_shape[d]) * p.kept_strides[d];
        rest /= p.kept_shape[d];
    }
    var acc = identity();
    var best = NO_INDEX;
    for (var r = lane; r < p.reduced_count; r += LANES) {
        var offset = base;
        var rem = r;
        for (var d = i32(p.reduced_rank) - 1; d >= 0; d--) {
            offset += (rem % p.reduced_shape[d]) * p.reduced_strides[d];
            rem /= p.reduced_shape[d];
        }
        let v = value_at(offset);
        if OP == 5u {
            if argmax_beats(v, r, acc, best) {
                acc = v;
                best = r;
            }
        } else {
            acc = fold(acc, v);
        }
    }
    lane_value[lane] = acc;
    lane_index[lane] = best;
    workgroupBarrier();
    for (var stride = LANES / 2u; stride > 0u; stride >>= 1u) {
        if lane < stride {
            let v = lane_value[lane + stride];
            let i = lane_index[lane + stride];
            if OP == 5u {
                if argmax_beats(v, i, lane_value[lane], lane_index[lane]) {
                    lane_value[lane] = v;
                    lane_index[lane] = i;
                }
            } else {
                lane_value[lane] = fold(lane_value[lane], v);
            }
        }
        workgroupBarrier();
    }
    if lane != 0u {
        return;
    }
    if OP == 5u {
        store_argmax(o, lane_value[0], lane_index[0]);
        return;
    }
    var result = lane_value[0];
    if OP == 1u {
        result /= p.mean_count;
    }
    if p.accumulate != 0u {
        result = fold(output_at(o), result);
    }
    if p.in_type == 0u {
        out[p.out_base + o] = bitcast<u32>(result);
    } else {
        out[p.out_base + o] = bitcast<u32>(i32(result));
    }
}
