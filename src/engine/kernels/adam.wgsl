// AdamW on GPU-resident parameters, with gradients clipped by their global norm, in three
// phases chosen by `OP`:
//   0 (squares): each workgroup sums the squares of up to 256 x 16 gradient elements into
//                `out[first_partial + workgroup]`;
//   1 (clip):    one workgroup adds up `partials` of them: out[0] = the factor gradients
//                are scaled by (min(1, max_norm / (norm + 1e-6)), or 1 without clipping),
//                out[1] = the norm;
//   2 (update):  per element, torch.optim.AdamW's step: decay, moments, bias-corrected
//                update, with the gradient scaled by `clip[0]`.
// Loops stay far below lavapipe's 65535-iteration cap: 16 per thread in phase 0, and in
// phase 1 one per 256 partials.

override OP: u32;

const CHUNK: u32 = 16u;

struct Params {
    n: u32,
    first_partial: u32,
    partials: u32,
    _pad: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    max_norm: f32,
    correction1: f32,   // 1 - beta1^step
    correction2: f32,   // 1 - beta2^step
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;
@group(0) @binding(5) var<storage, read> clip: array<f32>;

var<workgroup> sums: array<f32, 256>;

fn workgroup_sum(lane: u32, value: f32) -> f32 {
    sums[lane] = value;
    workgroupBarrier();
    for (var half = 128u; half > 0u; half = half / 2u) {
        if lane < half {
            sums[lane] += sums[lane + half];
        }
        workgroupBarrier();
    }
    return sums[0];
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>,
        @builtin(local_invocation_index) lane: u32) {
    let group = wg.y * groups.x + wg.x;
    if OP == 0u {
        var total = 0.0;
        let base = group * 256u * CHUNK + lane;
        for (var k = 0u; k < CHUNK; k++) {
            let i = base + k * 256u;
            if i < p.n {
                total += grad[i] * grad[i];
            }
        }
        let sum = workgroup_sum(lane, total);
        if lane == 0u {
            out[p.first_partial + group] = sum;
        }
    } else if OP == 1u {
        var total = 0.0;
        for (var i = lane; i < p.partials; i += 256u) {
            total += grad[i];
        }
        let norm = sqrt(workgroup_sum(lane, total));
        if lane == 0u {
            var factor = 1.0;
            if p.max_norm > 0.0 {
                factor = min(1.0, p.max_norm / (norm + 1e-6));
            }
            out[0] = factor;
            out[1] = norm;
        }
    } else {
        let i = group * 256u + lane;
        if i >= p.n {
            return;
        }
        let g = grad[i] * clip[0];
        let mi = p.beta1 * m[i] + (1.0 - p.beta1) * g;
        let vi = p.beta2 * v[i] + (1.0 - p.beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        let decayed = out[i] * (1.0 - p.lr * p.weight_decay);
        let step = (mi / p.correction1) / (sqrt(vi / p.correction2) + p.eps);
        out[i] = decayed - p.lr * step;
    }
}
