// Fused attention: out[b, i, :] = softmax_j(scale * Q[b, i, :] . Kt[b, :, j]) V[b, j, :],
// computed with a running (online) softmax so the [N, M] score matrix is never stored: the
// memory is O(N * E), which is what lets 64x64-latent SD (N = M = 4096) fit WebGPU limits.
// One thread owns one query row; the workgroup streams keys and values through workgroup
// memory 16 at a time. (Parameters and bindings: attention_io.wgsl.)
//
// The head dimension is walked 4 channels at a time: the query row, the accumulator and the
// staged keys and values are vec4 arrays (channels past d read as zero), so each dynamically
// indexed access (which spills to memory on CPU adapters and to local memory on GPUs) moves
// 4 channels, and a score is a chain of vec4 dot products.

const ROWS: u32 = 64u;
const KEYS: u32 = 16u;

var<workgroup> keys: array<vec4<f32>, KEYS * D_QUADS>;   // [KEYS][D_QUADS]
var<workgroup> values: array<vec4<f32>, KEYS * E_QUADS>; // [KEYS][E_QUADS]

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let batch = wg.z;
    let row = wg.x * ROWS + lane;
    let live = row < p.n;
    var query: array<vec4<f32>, MAX_QUADS>;
    var acc: array<vec4<f32>, MAX_QUADS>;
    if live {
        let base = batch * p.q_batch + row * p.q_row;
        for (var c4 = 0u; c4 < D_QUADS; c4++) {
            var quad = vec4<f32>();
            for (var i = 0u; i < 4u; i++) {
                let c = c4 * 4u + i;
                if c < p.d {
                    quad[i] = q[base + c * p.q_col] * p.scale;
                }
            }
            query[c4] = quad;
        }
    }
    var running_max = -3.4e38;
    var running_sum = 0.0;
    for (var j0 = 0u; j0 < p.m; j0 += KEYS) {
        let count = min(KEYS, p.m - j0);
        // Stage KEYS keys and values, one channel quad per thread per pass; keys past the
        // end and channels past d stage as zero.
        for (var t = lane; t < KEYS * D_QUADS; t += ROWS) {
            let j = t / D_QUADS;
            let c4 = t % D_QUADS;
            var quad = vec4<f32>();
            for (var i = 0u; i < 4u; i++) {
                let c = c4 * 4u + i;
                if j < count && c < p.d {
                    quad[i] = kt[batch * p.k_batch + c * p.k_dim + (j0 + j) * p.k_key];
                }
            }
            keys[j * D_QUADS + c4] = quad;
        }
        for (var t = lane; t < KEYS * E_QUADS; t += ROWS) {
            let j = t / E_QUADS;
            let c4 = t % E_QUADS;
            var quad = vec4<f32>();
            for (var i = 0u; i < 4u; i++) {
                let c = c4 * 4u + i;
                if j < count && c < p.e {
                    quad[i] = v[batch * p.v_batch + (j0 + j) * p.v_key + c * p.v_col];
                }
            }
            values[j * E_QUADS + c4] = quad;
        }
        workgroupBarrier();
        if live {
            // Channel-outer loops with a fixed 16-key inner loop: the inner loop unrolls,
            // scores stay in registers, and each lane reads the same workgroup word
            // (a broadcast). It also keeps the dynamic trip count per tile at (D + E) / 4,
            // under the loop-iteration guard of software rasterisers such as llvmpipe.
            // Explicitly zeroed: a bare `var` in a loop was not re-zeroed per iteration on
            // Chromium (SwiftShader), which summed scores across tiles.
            var scores = array<f32, KEYS>();
            for (var c4 = 0u; c4 < D_QUADS; c4++) {
                let quad = query[c4];
                for (var j = 0u; j < KEYS; j++) {
                    scores[j] += dot(quad, keys[j * D_QUADS + c4]);
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
            for (var c4 = 0u; c4 < E_QUADS; c4++) {
                var a = acc[c4] * correction;
                for (var j = 0u; j < KEYS; j++) {
                    a += weights[j] * values[j * E_QUADS + c4];
                }
                acc[c4] = a;
            }
            running_max = tile_max;
        }
        workgroupBarrier();
    }
    if live {
        let base = (batch * p.n + row) * p.e;
        let inv = 1.0 / running_sum;
        for (var c4 = 0u; c4 < E_QUADS; c4++) {
            let quad = acc[c4] * inv;
            for (var i = 0u; i < 4u; i++) {
                let c = c4 * 4u + i;
                if c < p.e {
                    out[base + c] = quad[i];
                }
            }
        }
    }
}
