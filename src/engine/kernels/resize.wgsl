// Resize of the last two axes (NCHW images) with nearest or bilinear sampling and the
// coordinate transforms torch exports. Out-of-range source coordinates clamp to the edge.
// `HALF_INPUT` / `HALF_OUTPUT`: x / out stored as packed f16 pairs; then each thread
// writes two neighbouring outputs (planes of halves have an even size).

struct Params {
    n: u32,
    in_h: u32,
    in_w: u32,
    out_h: u32,
    out_w: u32,
    linear: u32,
    coordinates: u32,  // 0 half_pixel, 1 pytorch_half_pixel, 2 align_corners, 3 asymmetric, 4 tf_half_pixel_for_nearest
    rounding: u32,     // 0 round_prefer_floor, 1 round_prefer_ceil, 2 floor, 3 ceil
    scale_h: f32,
    scale_w: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<u32>; // f32 bits, or f16 pairs
@group(0) @binding(2) var<storage, read> x: array<u32>; // f32 bits, or f16 pairs

fn source_coordinate(o: u32, out_len: u32, in_len: u32, scale: f32) -> f32 {
    let position = f32(o);
    switch p.coordinates {
        case 0u: { return (position + 0.5) / scale - 0.5; }
        case 1u: { return select(0.0, (position + 0.5) / scale - 0.5, out_len > 1u); }
        case 2u: { return select(0.0, position * f32(in_len - 1u) / f32(out_len - 1u), out_len > 1u); }
        case 3u: { return position / scale; }
        default: { return (position + 0.5) / scale; }
    }
}

fn nearest(c: f32, in_len: u32) -> u32 {
    var r: f32;
    switch p.rounding {
        case 0u: { r = select(round(c), floor(c), fract(c) == 0.5); }
        case 1u: { r = select(round(c), ceil(c), fract(c) == 0.5); }
        case 2u: { r = floor(c); }
        default: { r = ceil(c); }
    }
    return u32(clamp(r, 0.0, f32(in_len - 1u)));
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
        @builtin(local_invocation_index) lane: u32) {
    let t = (wg.y * groups.x + wg.x) * 256u + lane;
    if HALF_OUTPUT {
        let i = 2u * t;
        if i < p.n {
            out[t] = pack2x16float(vec2(resized(i), resized(i + 1u)));
        }
        return;
    }
    if t < p.n {
        out[t] = bitcast<u32>(resized(t));
    }
}

// Output element i.
fn resized(i: u32) -> f32 {
    let ox = i % p.out_w;
    let oy = (i / p.out_w) % p.out_h;
    let plane = (i / (p.out_w * p.out_h)) * p.in_h * p.in_w;
    let sy = source_coordinate(oy, p.out_h, p.in_h, p.scale_h);
    let sx = source_coordinate(ox, p.out_w, p.in_w, p.scale_w);
    if p.linear == 0u {
        return x_at(plane + nearest(sy, p.in_h) * p.in_w + nearest(sx, p.in_w));
    }
    let cy = clamp(sy, 0.0, f32(p.in_h - 1u));
    let cx = clamp(sx, 0.0, f32(p.in_w - 1u));
    let y0 = u32(floor(cy));
    let x0 = u32(floor(cx));
    let y1 = min(y0 + 1u, p.in_h - 1u);
    let x1 = min(x0 + 1u, p.in_w - 1u);
    let fy = cy - f32(y0);
    let fx = cx - f32(x0);
    let top = mix(x_at(plane + y0 * p.in_w + x0), x_at(plane + y0 * p.in_w + x1), fx);
    let bottom = mix(x_at(plane + y1 * p.in_w + x0), x_at(plane + y1 * p.in_w + x1), fx);
    return mix(top, bottom, fy);
}
