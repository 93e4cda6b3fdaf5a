// The GEMM core for CPU adapters with 8-lane subgroups (llvmpipe on AVX2), an alternative to
// gemm.wgsl with the same operand readers and 64x64 output tiles, used for its wide tiles.
// There every workgroup-memory or storage read costs one scalar load per lane, so
// gemm.wgsl's inner loop (64 vector multiply-adds per 64 such reads a thread) runs at a
// fraction of the adapter's FMA rate, while moving a value between the lanes of a
// subgroup is a register shuffle. Here each subgroup computes a 16x32 block: a lane owns
// 4 columns and all 16 rows, reads its columns of B and two rows of A (rows `lane` and
// `lane + 8`) straight from their bindings, and takes the other rows' A from the lanes
// that read them. That is 24 reads per 256 multiply-adds, no workgroup memory and no
// barriers.

const TILE: u32 = 64u; // rows and columns of a workgroup's tile

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(subgroup_id) group: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    begin(wg.z);
    let m_size = gemm_m();
    let k_size = gemm_k();
    // 8 subgroups: 4 blocks of 16 rows by 2 blocks of 32 columns.
    let row0 = wg.y * TILE + (group / 2u) * 16u;
    let n = wg.x * TILE + (group % 2u) * 32u + lane * 4u;
    begin_columns(n);
    var c0 = vec4<f32>(); var c1 = vec4<f32>(); var c2 = vec4<f32>(); var c3 = vec4<f32>();
    var c4 = vec4<f32>(); var c5 = vec4<f32>(); var c6 = vec4<f32>(); var c7 = vec4<f32>();
    var c8 = vec4<f32>(); var c9 = vec4<f32>(); var c10 = vec4<f32>(); var c11 = vec4<f32>();
    var c12 = vec4<f32>(); var c13 = vec4<f32>(); var c14 = vec4<f32>(); var c15 = vec4<f32>();
    for (var k = 0u; k < k_size; k += 4u) {
        let lo = vec4<Stage>(load_a4(row0 + lane, k));
        let hi = vec4<Stage>(load_a4(row0 + 8u + lane, k));
        let b0 = vec4<Stage>(load_b4(k));
        let b1 = vec4<Stage>(load_b4(k + 1u));
        let b2 = vec4<Stage>(load_b4(k + 2u));
        let b3 = vec4<Stage>(load_b4(k + 3u));
        c0 = accumulate(c0, subgroupBroadcast(lo, 0u), b0, b1, b2, b3);
        c1 = accumulate(c1, subgroupBroadcast(lo, 1u), b0, b1, b2, b3);
        c2 = accumulate(c2, subgroupBroadcast(lo, 2u), b0, b1, b2, b3);
        c3 = accumulate(c3, subgroupBroadcast(lo, 3u), b0, b1, b2, b3);
        c4 = accumulate(c4, subgroupBroadcast(lo, 4u), b0, b1, b2, b3);
        c5 = accumulate(c5, subgroupBroadcast(lo, 5u), b0, b1, b2, b3);
        c6 = accumulate(c6, subgroupBroadcast(lo, 6u), b0, b1, b2, b3);
        c7 = accumulate(c7, subgroupBroadcast(lo, 7u), b0, b1, b2, b3);
        c8 = accumulate(c8, subgroupBroadcast(hi, 0u), b0, b1, b2, b3);
        c9 = accumulate(c9, subgroupBroadcast(hi, 1u), b0, b1, b2, b3);
        c10 = accumulate(c10, subgroupBroadcast(hi, 2u), b0, b1, b2, b3);
        c11 = accumulate(c11, subgroupBroadcast(hi, 3u), b0, b1, b2, b3);
        c12 = accumulate(c12, subgroupBroadcast(hi, 4u), b0, b1, b2, b3);
        c13 = accumulate(c13, subgroupBroadcast(hi, 5u), b0, b1, b2, b3);
        c14 = accumulate(c14, subgroupBroadcast(hi, 6u), b0, b1, b2, b3);
        c15 = accumulate(c15, subgroupBroadcast(hi, 7u), b0, b1, b2, b3);
    }
    let rows = array(c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15);
    for (var r = 0u; r < 16u; r++) {
        if row0 + r < m_size {
            store4(row0 + r, n, rows[r]);
        }
    }
}
