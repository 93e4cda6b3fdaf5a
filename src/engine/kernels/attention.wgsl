// Fused attention: out[b, i, :] = softmax_j(scale * Q[b, i, :] . Kt[b, :, j]) V[b, j, :],
// computed with a running (online) softmax so the [N, M] score matrix is never stored: the
// memory is O(N * E), which is what lets 64x64-latent SD (N = M = 4096) fit WebGPU limits.
// One thread owns one query row; the workgroup streams keys and values through workgroup
// memory 16 at a time. Operands are strided, so K may arrive transposed or not.

const ROWS: u32 = 64u;
const KEYS: u32 = 16u;
const MAX_DIM: u32 = 160u; // keep equal to kernels::ATTENTION_MAX_HEAD_DIM

struct Params {
    n: u32,
    m: u32,
    d: u32,
    e: u32,
    scale: f32,
    q_batch: u32,
    q_row: u32,
    q_col: u32,
    k_batch: u32,
    k_dim: u32,   // stride of Kt along the head dimension
    k_key: u32,   // stride of Kt along the keys
    v_batch: u32,
    v_key: u32,
    v_col: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> q: array<f32>;
@group(0) @binding(3) var<storage, read> kt: array<f32>;
@group(0) @binding(4) var<storage, read> v: array<f32>;

var<workgroup> keys: array<f32, 2560>;   // [KEYS][MAX_DIM]
var<workgroup> values: array<f32, 2560>; // [KEYS][MAX_DIM]

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let batch = wg.z;
    let row = wg.x * ROWS + lane;
    let live = row < p.n;
    var query: array<f32, MAX_DIM>;
    var acc: array<f32, MAX_DIM>;
    if live {
        let base = batch * p.q_batch + row * p.q_row;
        for (var c = 0u; c < p.d; c++) {
            query[c] = q[base + c * p.q_col] * p.scale;
        }
    }
    var running_max = -3.4e38;
    var running_sum = 0.0;
    for (var j0 = 0u; j0 < p.m; j0 += KEYS) {
        let count = min(KEYS, p.m - j0);
        for (var t = lane; t < count * p.d; t += ROWS) {
            let j = t / p.d;
            let c = t % p.d;
            keys[j * MAX_DIM + c] = kt[batch * p.k_batch + c * p.k_dim + (j0 + j) * p.k_key];
        }
        for (var t = lane; t < count * p.e; t += ROWS) {
            let j = t / p.e;
            let c = t % p.e;
            values[j * MAX_DIM + c] = v[batch * p.v_batch + (j0 + j) * p.v_key + c * p.v_col];
        }
        workgroupBarrier();
        if live {
            // Channel-outer loops with a fixed 16-key inner loop: the inner loop unrolls,
            // scores stay in registers, and each lane reads the same workgroup word
            // (a broadcast). It also keeps the dynamic trip count per tile at D + E, under
            // the loop-iteration guard of software rasterisers such as llvmpipe.
            // Explicitly zeroed: a bare `var` in a loop was not re-zeroed per iteration on
            // Chromium (SwiftShader), which summed scores across tiles.
            var scores = array<f32, KEYS>();
            for (var c = 0u; c < p.d; c++) {
                let qc = query[c];
                for (var j = 0u; j < KEYS; j++) {
                    scores[j] += qc * keys[j * MAX_DIM + c];
                }
            }
            var tile_max = running_max;
            for (var j = 0u; j < KEYS; j++) {
                if j < count {
                    tile_max = max(tile_max, scores[j]);
                }
            }
            let correction = exp(running_max - tile_max);
            var weights: array<f32, KEYS>;
            var tile_sum = 0.0;
            for (var j = 0u; j < KEYS; j++) {
                weights[j] = select(0.0, exp(scores[j] - tile_max), j < count);
                tile_sum += weights[j];
            }
            running_sum = running_sum * correction + tile_sum;
            for (var c = 0u; c < p.e; c++) {
                var a = acc[c] * correction;
                for (var j = 0u; j < KEYS; j++) {
                    a += weights[j] * values[j * MAX_DIM + c];
                }
                acc[c] = a;
            }
            running_max = tile_max;
        }
        workgroupBarrier();
    }
    if live {
        let base = (batch * p.n + row) * p.e;
        let inv = 1.0 / running_sum;
        for (var c = 0u; c < p.e; c++) {
            out[base + c] = acc[c] * inv;
        }
    }
}
