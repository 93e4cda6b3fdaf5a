// Backward pass of the fused attention (attention.wgsl), flash-style: with S = scale Q Kt,
// P = softmax(S) by rows, O = P V and G the gradient of O, the probabilities are recomputed
// tile by tile from each query row's log-sum-exp L and never stored, so the memory stays
// O((N + M) * D) however many keys there are:
//   OP 0, statistics, one thread per query row: L_i = log sum_j exp(S_ij) (streaming the
//         keys with a running maximum) and Dg_i = G_i . O_i (= sum_j P_ij dP_ij);
//   OP 1, dQ, one thread per query row, streaming keys and values:
//         dS_ij = P_ij (G_i . V_j - Dg_i), dQ_i = scale sum_j dS_ij K_j;
//   OP 2, dKt, one thread per key, streaming queries, their gradients and statistics:
//         dK_j = scale sum_i dS_ij Q_i, written in Kt's [D, M] layout;
//   OP 3, dV, one thread per key: dV_j = sum_i P_ij G_i.
// Rows are staged in workgroup memory TILE at a time as vec4 channel quads (channels past
// the width read as zero), as in the forward kernel. Operands are contiguous: Q [B, N, D],
// Kt [B, D, M], V [B, M, E], G and O [B, N, E], statistics [B, N, 2].

override OP: u32;

const ROWS: u32 = 64u;
const TILE: u32 = 16u;
const MAX_QUADS: u32 = 40u; // kernels::ATTENTION_MAX_HEAD_DIM / 4

struct Params {
    n: u32,
    m: u32,
    d: u32,
    e: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<storage, read> q: array<f32>;
@group(0) @binding(3) var<storage, read> kt: array<f32>;
@group(0) @binding(4) var<storage, read> v: array<f32>;
@group(0) @binding(5) var<storage, read> g: array<f32>;
// The forward output O (OP 0) or the statistics (the gradient passes).
@group(0) @binding(6) var<storage, read> aux: array<f32>;

var<workgroup> staged_d: array<vec4<f32>, 640>; // [TILE][MAX_QUADS], D wide
var<workgroup> staged_e: array<vec4<f32>, 640>; // [TILE][MAX_QUADS], E wide
var<workgroup> staged_stats: array<vec2<f32>, TILE>;

// The operands a row is read from.
const Q: u32 = 0u;
const KT: u32 = 1u;
const V: u32 = 2u;
const G: u32 = 3u;

// Channels 4 c4 .. 4 c4 + 3 of row `row` of batch `b` of an operand (those past its width
// read as zero): Q and G rows are query rows, Kt columns and V rows are keys.
fn quad(operand: u32, b: u32, row: u32, c4: u32) -> vec4<f32> {
    let width = select(p.e, p.d, operand <= KT);
    var four = vec4<f32>();
    for (var k = 0u; k < 4u; k++) {
        let c = c4 * 4u + k;
        if c < width {
            switch operand {
                case Q: { four[k] = q[(b * p.n + row) * p.d + c]; }
                case KT: { four[k] = kt[(b * p.d + c) * p.m + row]; }
                case V: { four[k] = v[(b * p.m + row) * p.e + c]; }
                default: { four[k] = g[(b * p.n + row) * p.e + c]; }
            }
        }
    }
    return four;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    if OP <= 1u {
        query_rows(wg.z, wg.x * ROWS + lane, lane);
    } else {
        key_rows(wg.z, wg.x * ROWS + lane, lane);
    }
}

// OP 0 and 1: thread `lane` owns query row i and streams the keys (and values).
fn query_rows(b: u32, i: u32, lane: u32) {
    let live = i < p.n;
    let d_quads = (p.d + 3u) / 4u;
    let e_quads = (p.e + 3u) / 4u;
    var query: array<vec4<f32>, MAX_QUADS>;
    var grad: array<vec4<f32>, MAX_QUADS>;
    var acc: array<vec4<f32>, MAX_QUADS>;
    var stats = vec2<f32>();
    if live {
        for (var c4 = 0u; c4 < d_quads; c4++) {
            query[c4] = quad(Q, b, i, c4) * p.scale;
        }
        if OP == 1u {
            for (var c4 = 0u; c4 < e_quads; c4++) {
                grad[c4] = quad(G, b, i, c4);
            }
            stats = vec2<f32>(aux[(b * p.n + i) * 2u], aux[(b * p.n + i) * 2u + 1u]);
        }
    }
    var running_max = -3.4e38;
    var running_sum = 0.0;
    for (var j0 = 0u; j0 < p.m; j0 += TILE) {
        let count = min(TILE, p.m - j0);
        for (var t = lane; t < TILE * d_quads; t += ROWS) {
            let j = t / d_quads;
            let c4 = t % d_quads;
            staged_d[j * MAX_QUADS + c4] = select(vec4<f32>(), quad(KT, b, j0 + j, c4), j < count);
        }
        if OP == 1u {
            for (var t = lane; t < TILE * e_quads; t += ROWS) {
                let j = t / e_quads;
                let c4 = t % e_quads;
                staged_e[j * MAX_QUADS + c4] = select(vec4<f32>(), quad(V, b, j0 + j, c4), j < count);
            }
        }
        workgroupBarrier();
        if live {
            // Explicitly zeroed (see attention.wgsl: SwiftShader kept loop-local arrays).
            var scores = array<f32, TILE>();
            for (var c4 = 0u; c4 < d_quads; c4++) {
                let quad = query[c4];
                for (var j = 0u; j < TILE; j++) {
                    scores[j] += dot(quad, staged_d[j * MAX_QUADS + c4]);
                }
            }
            if OP == 0u {
                var tile_max = running_max;
                for (var j = 0u; j < TILE; j++) {
                    if j < count {
                        tile_max = max(tile_max, scores[j]);
                    }
                }
                var tile_sum = 0.0;
                for (var j = 0u; j < TILE; j++) {
                    tile_sum += select(0.0, exp(scores[j] - tile_max), j < count);
                }
                running_sum = running_sum * exp(running_max - tile_max) + tile_sum;
                running_max = tile_max;
            } else {
                var dp = array<f32, TILE>();
                for (var c4 = 0u; c4 < e_quads; c4++) {
                    let quad = grad[c4];
                    for (var j = 0u; j < TILE; j++) {
                        dp[j] += dot(quad, staged_e[j * MAX_QUADS + c4]);
                    }
                }
                var ds: array<f32, TILE>;
                for (var j = 0u; j < TILE; j++) {
                    ds[j] = select(0.0, exp(scores[j] - stats.x) * (dp[j] - stats.y), j < count);
                }
                for (var c4 = 0u; c4 < d_quads; c4++) {
                    var a = acc[c4];
                    for (var j = 0u; j < TILE; j++) {
                        a += ds[j] * staged_d[j * MAX_QUADS + c4];
                    }
                    acc[c4] = a;
                }
            }
        }
        workgroupBarrier();
    }
    if !live {
        return;
    }
    if OP == 0u {
        var along = 0.0;
        for (var c = 0u; c < p.e; c++) {
            let at = (b * p.n + i) * p.e + c;
            along += g[at] * aux[at];
        }
        out[(b * p.n + i) * 2u] = running_max + log(running_sum);
        out[(b * p.n + i) * 2u + 1u] = along;
        return;
    }
    for (var c4 = 0u; c4 < d_quads; c4++) {
        let quad = acc[c4] * p.scale;
        for (var k = 0u; k < 4u; k++) {
            let c = c4 * 4u + k;
            if c < p.d {
                out[(b * p.n + i) * p.d + c] = quad[k];
            }
        }
    }
}

// OP 2 and 3: thread `lane` owns key j and streams the queries, their output gradients and
// statistics.
fn key_rows(b: u32, j: u32, lane: u32) {
    let live = j < p.m;
    let d_quads = (p.d + 3u) / 4u;
    let e_quads = (p.e + 3u) / 4u;
    var key: array<vec4<f32>, MAX_QUADS>;
    var value: array<vec4<f32>, MAX_QUADS>;
    var acc: array<vec4<f32>, MAX_QUADS>;
    if live {
        for (var c4 = 0u; c4 < d_quads; c4++) {
            key[c4] = quad(KT, b, j, c4);
        }
        if OP == 2u {
            for (var c4 = 0u; c4 < e_quads; c4++) {
                value[c4] = quad(V, b, j, c4);
            }
        }
    }
    for (var i0 = 0u; i0 < p.n; i0 += TILE) {
        let count = min(TILE, p.n - i0);
        // Queries are staged scaled, so that scores and dK come out scaled.
        for (var t = lane; t < TILE * d_quads; t += ROWS) {
            let i = t / d_quads;
            let c4 = t % d_quads;
            staged_d[i * MAX_QUADS + c4] =
                select(vec4<f32>(), quad(Q, b, i0 + i, c4) * p.scale, i < count);
        }
        for (var t = lane; t < TILE * e_quads; t += ROWS) {
            let i = t / e_quads;
            let c4 = t % e_quads;
            staged_e[i * MAX_QUADS + c4] = select(vec4<f32>(), quad(G, b, i0 + i, c4), i < count);
        }
        if lane < count {
            let at = (b * p.n + i0 + lane) * 2u;
            staged_stats[lane] = vec2<f32>(aux[at], aux[at + 1u]);
        }
        workgroupBarrier();
        if live {
            var scores = array<f32, TILE>();
            for (var c4 = 0u; c4 < d_quads; c4++) {
                let quad = key[c4];
                for (var i = 0u; i < TILE; i++) {
                    scores[i] += dot(quad, staged_d[i * MAX_QUADS + c4]);
                }
            }
            var weights: array<f32, TILE>;
            for (var i = 0u; i < TILE; i++) {
                weights[i] = select(0.0, exp(scores[i] - staged_stats[i].x), i < count);
            }
            if OP == 2u {
                var dp = array<f32, TILE>();
                for (var c4 = 0u; c4 < e_quads; c4++) {
                    let quad = value[c4];
                    for (var i = 0u; i < TILE; i++) {
                        dp[i] += dot(quad, staged_e[i * MAX_QUADS + c4]);
                    }
                }
                for (var i = 0u; i < TILE; i++) {
                    weights[i] *= dp[i] - staged_stats[i].y;
                }
                for (var c4 = 0u; c4 < d_quads; c4++) {
                    var a = acc[c4];
                    for (var i = 0u; i < TILE; i++) {
                        a += weights[i] * staged_d[i * MAX_QUADS + c4];
                    }
                    acc[c4] = a;
                }
            } else {
                for (var c4 = 0u; c4 < e_quads; c4++) {
                    var a = acc[c4];
                    for (var i = 0u; i < TILE; i++) {
                        a += weights[i] * staged_e[i * MAX_QUADS + c4];
                    }
                    acc[c4] = a;
                }
            }
        }
        workgroupBarrier();
    }
    if !live {
        return;
    }
    let width = select(p.e, p.d, OP == 2u);
    for (var c4 = 0u; c4 < (width + 3u) / 4u; c4++) {
        let quad = acc[c4];
        for (var k = 0u; k < 4u; k++) {
            let c = c4 * 4u + k;
            if c < width {
                // dKt keeps Kt's [D, M] layout; dV is [M, E].
                let at = select((b * p.m + j) * p.e + c, (b * p.d + c) * p.m + j, OP == 2u);
                out[at] = quad[k];
            }
        }
    }
}
