// Fused attention for CPU adapters with 8-lane subgroups (llvmpipe on AVX2): the same
// result and operands as attention.wgsl (an online softmax, the scores never stored),
// without workgroup memory. There, reading a staged key costs a scalar load per lane
// although every lane wants the same key; here the 8 lanes of a subgroup each read one
// key's (and value's) channel quad and take the other 7 from their neighbours by
// `subgroupBroadcast`, a register shuffle, and each lane owns two query rows: one read
// per 16 dot products instead of one per dot product. (Parameters, bindings and head-size
// constants: attention_io.wgsl.)

const KEYS: u32 = 8u; // keys per step: one per lane of a subgroup

// Channels c4*4.. of the query row, key or value whose channel 0 is at `at`, zero past its
// channels or when not `live`. The loads are unconditional (from
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

// The quads the subgroup's 8 lanes hold, in lane order (broadcast ids must be constants).
fn lane_quads(mine: vec4<f32>) -> array<vec4<f32>, KEYS> {
    return array(
        subgroupBroadcast(mine, 0u), subgroupBroadcast(mine, 1u),
        subgroupBroadcast(mine, 2u), subgroupBroadcast(mine, 3u),
        subgroupBroadcast(mine, 4u), subgroupBroadcast(mine, 5u),
        subgroupBroadcast(mine, 6u), subgroupBroadcast(mine, 7u),
    );
}

// A query row's running softmax over the keys seen so far: its maximum score and the sum
// of exp(score - maximum).
struct Running {
    max: f32,
    sum: f32,
}

// A step's keys' weights, exp(score - new maximum) (zero past the keys that exist), and the
// factor that rescales what was accumulated before the step.
struct Step {
    weights: array<f32, KEYS>,
    correction: f32,
}

// Folds a step's scores into `running`.
fn fold_scores(running: ptr<function, Running>, scores: array<f32, KEYS>, count: u32) -> Step {
    var tile_max = (*running).max;
    for (var j = 0u; j < KEYS; j++) {
        tile_max = max(tile_max, select(-3.4e38, scores[j], j < count));
    }
    var step = Step();
    var tile_sum = 0.0;
    for (var j = 0u; j < KEYS; j++) {
        step.weights[j] = select(0.0, exp(scores[j] - tile_max), j < count);
        tile_sum += step.weights[j];
    }
    step.correction = exp((*running).max - tile_max);
    (*running).sum = (*running).sum * step.correction + tile_sum;
    (*running).max = tile_max;
    return step;
}

// Each lane owns two query rows, `index` and `index + 32` of the workgroup's 64, so every
// key and value read serves twice the multiply-adds.
@compute @workgroup_size(32)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) index: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let batch = wg.z;
    let row_a = wg.x * 64u + index;
    let row_b = row_a + 32u;
    let live_a = row_a < p.n;
    let live_b = row_b < p.n;
    var query_a: array<vec4<f32>, MAX_QUADS>;
    var query_b: array<vec4<f32>, MAX_QUADS>;
    var acc_a: array<vec4<f32>, MAX_QUADS>;
    var acc_b: array<vec4<f32>, MAX_QUADS>;
    for (var c4 = 0u; c4 < D_QUADS; c4++) {
        query_a[c4] = query_quad(batch * p.q_batch + row_a * p.q_row, c4, live_a) * p.scale;
        query_b[c4] = query_quad(batch * p.q_batch + row_b * p.q_row, c4, live_b) * p.scale;
    }
    var running_a = Running(-3.4e38, 0.0);
    var running_b = Running(-3.4e38, 0.0);
    // Every lane runs every step, live or not: the broadcasts need the whole subgroup.
    for (var j0 = 0u; j0 < p.m; j0 += KEYS) {
        let key = j0 + lane;
        let key_live = key < p.m;
        let k_at = batch * p.k_batch + key * p.k_key;
        var sa = array<f32, KEYS>();
        var sb = array<f32, KEYS>();
        for (var c4 = 0u; c4 < D_QUADS; c4++) {
            let mine = key_quad(k_at, c4, key_live);
            let qa = query_a[c4];
            let qb = query_b[c4];
            let k = lane_quads(mine);
            for (var j = 0u; j < KEYS; j++) {
                sa[j] += dot(qa, k[j]);
                sb[j] += dot(qb, k[j]);
            }
        }
        // Keys past the end weigh nothing.
        let count = min(KEYS, p.m - j0);
        let wa = fold_scores(&running_a, sa, count);
        let wb = fold_scores(&running_b, sb, count);
        let v_at = batch * p.v_batch + key * p.v_key;
        for (var c4 = 0u; c4 < E_QUADS; c4++) {
            let mine = value_quad(v_at, c4, key_live);
            var a = acc_a[c4] * wa.correction;
            var b = acc_b[c4] * wb.correction;
            let values = lane_quads(mine);
            for (var j = 0u; j < KEYS; j++) {
                a += wa.weights[j] * values[j];
                b += wb.weights[j] * values[j];
            }
            acc_a[c4] = a;
            acc_b[c4] = b;
        }
    }
    store_row(batch, row_a, live_a, running_a.sum, &acc_a);
    store_row(batch, row_b, live_b, running_b.sum, &acc_b);
}

fn store_row(batch: u32, row: u32, live: bool, sum: f32, acc: ptr<function, array<vec4<f32>, MAX_QUADS>>) {
    if !live {
        return;
    }
    let base = (batch * p.n + row) * p.e;
    let inv = 1.0 / sum;
    for (var c4 = 0u; c4 < E_QUADS; c4++) {
        let quad = (*acc)[c4] * inv;
        for (var i = 0u; i < 4u; i++) {
            let c = c4 * 4u + i;
            if c < p.e {
                out[base + c] = quad[i];
            }
        }
    }
}
