// Fused attention for CPU adapters with 8-lane subgroups (llvmpipe on AVX2): the same
// result and operands as attention.wgsl (one thread per query row, an online softmax, the
// scores never stored), without workgroup memory. There, reading a staged key costs a
// scalar load per lane although every lane wants the same key; here the 8 lanes of a
// subgroup each read one key's (and value's) channel quad and take the other 7 from their
// neighbours by `subgroupBroadcast`, a register shuffle: one read per 8 keys' worth of dot
// products instead of 8. The head sizes are pipeline constants, so the channel loops have
// fixed trip counts and the query row and accumulator can live in registers.

const MAX_QUADS: u32 = 40u; // keep MAX_QUADS * 4 equal to kernels::ATTENTION_MAX_HEAD_DIM
const KEYS: u32 = 8u; // keys per step: one per lane of a subgroup

override D_QUADS: u32 = 40u; // channel quads of a query and key: ceil(d / 4)
override E_QUADS: u32 = 40u; // channel quads of a value: ceil(e / 4)

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

// Channels c4*4.. of the query row, key or value at `at` (element 0 of the quad, stepping
// `step`), zero past `size` channels or when not `live`. The loads are unconditional (from
// element 0 when out of range): a load under a branch costs masking per lane.
fn query_quad(at: u32, c4: u32, live: bool) -> vec4<f32> {
    var quad = vec4<f32>();
    for (var i = 0u; i < 4u; i++) {
        let inside = live && c4 * 4u + i < p.d;
        quad[i] = select(0.0, q[select(0u, at + (c4 * 4u + i) * p.q_col, inside)], inside);
    }
    return quad;
}

fn key_quad(at: u32, c4: u32, live: bool) -> vec4<f32> {
    var quad = vec4<f32>();
    for (var i = 0u; i < 4u; i++) {
        let inside = live && c4 * 4u + i < p.d;
        quad[i] = select(0.0, kt[select(0u, at + (c4 * 4u + i) * p.k_dim, inside)], inside);
    }
    return quad;
}

fn value_quad(at: u32, c4: u32, live: bool) -> vec4<f32> {
    var quad = vec4<f32>();
    for (var i = 0u; i < 4u; i++) {
        let inside = live && c4 * 4u + i < p.e;
        quad[i] = select(0.0, v[select(0u, at + (c4 * 4u + i) * p.v_col, inside)], inside);
    }
    return quad;
}

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) index: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let batch = wg.z;
    let row = wg.x * 64u + index;
    let live = row < p.n;
    var query: array<vec4<f32>, MAX_QUADS>;
    var acc: array<vec4<f32>, MAX_QUADS>;
    let q_at = batch * p.q_batch + row * p.q_row;
    for (var c4 = 0u; c4 < D_QUADS; c4++) {
        query[c4] = query_quad(q_at, c4, live) * p.scale;
    }
    var running_max = -3.4e38;
    var running_sum = 0.0;
    // Every lane runs every step, live or not: the broadcasts need the whole subgroup.
    for (var j0 = 0u; j0 < p.m; j0 += KEYS) {
        let key = j0 + lane;
        let key_live = key < p.m;
        let k_at = batch * p.k_batch + key * p.k_key;
        var s0 = 0.0; var s1 = 0.0; var s2 = 0.0; var s3 = 0.0;
        var s4 = 0.0; var s5 = 0.0; var s6 = 0.0; var s7 = 0.0;
        for (var c4 = 0u; c4 < D_QUADS; c4++) {
            let quad = query[c4];
            let mine = key_quad(k_at, c4, key_live);
            s0 += dot(quad, subgroupBroadcast(mine, 0u));
            s1 += dot(quad, subgroupBroadcast(mine, 1u));
            s2 += dot(quad, subgroupBroadcast(mine, 2u));
            s3 += dot(quad, subgroupBroadcast(mine, 3u));
            s4 += dot(quad, subgroupBroadcast(mine, 4u));
            s5 += dot(quad, subgroupBroadcast(mine, 5u));
            s6 += dot(quad, subgroupBroadcast(mine, 6u));
            s7 += dot(quad, subgroupBroadcast(mine, 7u));
        }
        // Keys past the end score nothing.
        let count = min(KEYS, p.m - j0);
        let scores = array(s0, s1, s2, s3, s4, s5, s6, s7);
        var tile_max = running_max;
        for (var j = 0u; j < KEYS; j++) {
            tile_max = max(tile_max, select(-3.4e38, scores[j], j < count));
        }
        var w = array<f32, KEYS>();
        var tile_sum = 0.0;
        for (var j = 0u; j < KEYS; j++) {
            w[j] = select(0.0, exp(scores[j] - tile_max), j < count);
            tile_sum += w[j];
        }
        let correction = exp(running_max - tile_max);
        running_sum = running_sum * correction + tile_sum;
        running_max = tile_max;
        let v_at = batch * p.v_batch + key * p.v_key;
        for (var c4 = 0u; c4 < E_QUADS; c4++) {
            let mine = value_quad(v_at, c4, key_live);
            acc[c4] = acc[c4] * correction
                + w[0] * subgroupBroadcast(mine, 0u) + w[1] * subgroupBroadcast(mine, 1u)
                + w[2] * subgroupBroadcast(mine, 2u) + w[3] * subgroupBroadcast(mine, 3u)
                + w[4] * subgroupBroadcast(mine, 4u) + w[5] * subgroupBroadcast(mine, 5u)
                + w[6] * subgroupBroadcast(mine, 6u) + w[7] * subgroupBroadcast(mine, 7u);
        }
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
