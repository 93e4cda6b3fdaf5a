// Reductions over any set of axes, one thread per output element. The kept axes locate the
// output's first input element; the reduced axes are walked from there. `OP`: 0 sum, 1 mean,
// 2 max, 3 min, 4 prod, 5 argmax (first index of the maximum, or last with `select_last`).

override OP: u32;

struct Params {
    n: u32,
    kept_rank: u32,
    reduced_rank: u32,
    reduced_count: u32,
    in_type: u32,      // 0 f32, otherwise integer
    select_last: u32,
    _pad0: u32,
    _pad1: u32,
    kept_shape: array<u32, 6>,
    kept_strides: array<u32, 6>,
    reduced_shape: array<u32, 6>,
    reduced_strides: array<u32, 6>,
}

@group(0) @binding(0) var<storage, read> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<u32>;

fn value_at(i: u32) -> f32 {
    if p.in_type == 0u {
        return bitcast<f32>(x[i]);
    }
    return f32(bitcast<i32>(x[i]));
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
        @builtin(local_invocation_index) lane: u32) {
    let o = (wg.y * groups.x + wg.x) * 256u + lane;
    if o >= p.n {
        return;
    }
    var base = 0u;
    var rest = o;
    for (var d = i32(p.kept_rank) - 1; d >= 0; d--) {
        base += (rest % p.kept_shape[d]) * p.kept_strides[d];
        rest /= p.kept_shape[d];
    }
    var acc = select(0.0, 1.0, OP == 4u);
    if OP == 2u || OP == 5u { acc = -3.4e38; }
    if OP == 3u { acc = 3.4e38; }
    var best = 0u;
    for (var r = 0u; r < p.reduced_count; r++) {
        var offset = base;
        var rem = r;
        for (var d = i32(p.reduced_rank) - 1; d >= 0; d--) {
            offset += (rem % p.reduced_shape[d]) * p.reduced_strides[d];
            rem /= p.reduced_shape[d];
        }
        let v = value_at(offset);
        switch OP {
            case 0u, 1u: { acc += v; }
            case 2u: { acc = max(acc, v); }
            case 3u: { acc = min(acc, v); }
            case 4u: { acc *= v; }
            default: {
                if v > acc || (p.select_last != 0u && v == acc) || r == 0u {
                    acc = v;
                    best = r;
                }
            }
        }
    }
    if OP == 5u {
        out[o] = best;
    } else if OP == 1u {
        out[o] = bitcast<u32>(acc / f32(p.reduced_count));
    } else if p.in_type == 0u {
        out[o] = bitcast<u32>(acc);
    } else {
        out[o] = bitcast<u32>(i32(acc));
    }
}
