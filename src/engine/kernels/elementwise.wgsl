// Every element-wise operator, with numpy broadcasting, in one kernel. `OP` selects the
// operation (the discriminants of UnaryOp/BinaryOp in ops.rs, 200 for Where); inputs and the
// output carry their own element types, so Cast is the identity op between two types.
// Values are computed in f32; integers are exact up to 2^24, which covers token ids and
// the index arithmetic that survives constant folding.
//
// A tensor past the binding limit runs as several launches, each over elements
// first..first+n of the output: inputs of the output's shape are bound as the same window
// (index = local index), broadcast inputs whole; `base` is the element each input's
// binding starts at.
//
// Type 3 is f16, stored as packed pairs (an fp16 model's activations): read one half of a
// word; an output of halves is written a word (two elements) per thread. Halves come only
// without broadcasting, every operand of the output's even size.

override OP: u32;

struct Params {
    n: u32,
    rank: u32,
    out_type: u32,      // 0 f32, 1 int, 2 bool, 3 f16
    a_type: u32,
    b_type: u32,
    c_type: u32,
    broadcast: u32,     // 0: every input has the output's shape, index = element index
    first: u32,         // global index of this launch's first output element
    shape: array<u32, 6>,
    a_strides: array<u32, 6>,
    b_strides: array<u32, 6>,
    c_strides: array<u32, 6>,
    base: array<u32, 3>,
    zero: u32,
}

@group(0) @binding(0) var<storage, read> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;
@group(0) @binding(2) var<storage, read> a: array<u32>;
@group(0) @binding(3) var<storage, read> b: array<u32>;
@group(0) @binding(4) var<storage, read> c: array<u32>;

fn decode(word: u32, kind: u32) -> f32 {
    if kind == 0u {
        return bitcast<f32>(word);
    }
    return f32(bitcast<i32>(word));
}

fn read_a(i: u32, kind: u32) -> f32 {
    if kind == 3u {
        return unpack2x16float(a[i >> 1u])[i & 1u];
    }
    return decode(a[i], kind);
}

fn read_b(i: u32, kind: u32) -> f32 {
    if kind == 3u {
        return unpack2x16float(b[i >> 1u])[i & 1u];
    }
    return decode(b[i], kind);
}

fn read_c(i: u32, kind: u32) -> f32 {
    if kind == 3u {
        return unpack2x16float(c[i >> 1u])[i & 1u];
    }
    return decode(c[i], kind);
}

fn encode(v: f32, kind: u32) -> u32 {
    switch kind {
        case 0u: { return bitcast<u32>(v); }
        case 1u: { return bitcast<u32>(i32(trunc(v))); }
        default: { return u32(v != 0.0); }
    }
}

// erf via Abramowitz & Stegun 7.1.26 refined: max abs error ~1.2e-7 over the real line.
fn erf_approx(x: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * abs(x));
    let y = 1.0 - t * exp(-x * x - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418
        + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587
        + t * (-0.82215223 + t * 0.17087277)))))))));
    return select(-y, y, x >= 0.0);
}

fn power(x: f32, y: f32) -> f32 {
    // WGSL's pow is undefined for x < 0; ONNX defines it for integral exponents.
    if y == 2.0 { return x * x; }
    if y == 1.0 { return x; }
    if y == 0.5 { return sqrt(x); }
    let r = pow(abs(x), y);
    if x < 0.0 && fract(y) == 0.0 && (i32(y) & 1) == 1 { return -r; }
    // NaN must be built at run time: WGSL rejects NaN constant expressions (p.zero is 0).
    if x < 0.0 && fract(y) != 0.0 { return bitcast<f32>(0x7fc00000u | p.zero); }
    return r;
}

fn unary(x: f32) -> f32 {
    switch OP {
        case 0u: { return x; }
        case 1u: { return -x; }
        case 2u: { return abs(x); }
        case 3u: { return sqrt(x); }
        case 4u: { return 1.0 / x; }
        case 5u: { return exp(x); }
        case 6u: { return log(x); }
        case 7u: { return sin(x); }
        case 8u: { return cos(x); }
        case 9u: { return tanh(clamp(x, -20.0, 20.0)); }
        case 10u: { return 1.0 / (1.0 + exp(-x)); }
        case 11u: { return max(x, 0.0); }
        case 12u: { return erf_approx(x); }
        case 13u: { return floor(x); }
        case 14u: { return ceil(x); }
        case 15u: { return f32(x == 0.0); }
        case 16u: { return x / (1.0 + exp(-x)); }
        default: { return x; }
    }
}

fn binary(x: f32, y: f32) -> f32 {
    switch OP {
        case 100u: { return x + y; }
        case 101u: { return x - y; }
        case 102u: { return x * y; }
        case 103u: { return x / y; }
        case 104u: { return power(x, y); }
        case 105u: { return max(x, y); }
        case 106u: { return min(x, y); }
        case 107u: { return f32(x == y); }
        case 108u: { return f32(x < y); }
        case 109u: { return f32(x > y); }
        case 110u: { return f32(x <= y); }
        case 111u: { return f32(x >= y); }
        case 112u: { return f32(x != 0.0 && y != 0.0); }
        case 113u: { return f32(x != 0.0 || y != 0.0); }
        case 114u: { return f32((x != 0.0) != (y != 0.0)); }
        default: { return x; }
    }
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
        @builtin(local_invocation_index) lane: u32) {
    let t = (wg.y * groups.x + wg.x) * 256u + lane;
    if p.out_type == 3u {
        let i = 2u * t;
        if i < p.n {
            out[t] = pack2x16float(vec2(element(i), element(i + 1u)));
        }
        return;
    }
    if t < p.n {
        out[t] = encode(element(t), p.out_type);
    }
}

// Output element i of this launch.
fn element(i: u32) -> f32 {
    var ia = i;
    var ib = i;
    var ic = i;
    if p.broadcast != 0u {
        ia = 0u - p.base[0];
        ib = 0u - p.base[1];
        ic = 0u - p.base[2];
        var rest = p.first + i;
        for (var d = i32(p.rank) - 1; d >= 0; d--) {
            let index = rest % p.shape[d];
            rest /= p.shape[d];
            ia += index * p.a_strides[d];
            ib += index * p.b_strides[d];
            ic += index * p.c_strides[d];
        }
    }
    let x = read_a(ia, p.a_type);
    if OP < 100u {
        return unary(x);
    } else if OP < 200u {
        return binary(x, read_b(ib, p.b_type));
    }
    return select(read_c(ic, p.c_type), read_b(ib, p.b_type), x != 0.0);
}
