// The GEMM core for CPU adapters with 8-lane subgroups (llvmpipe on AVX2), an alternative to
// gemm.wgsl with the same operand readers and 64x64 output tiles, used for its wide tiles.
// There every workgroup-memory or storage read costs one scalar load per lane, so
// gemm.wgsl's inner loop (64 vector multiply-adds per 64 such reads a thread) runs at a
// fraction of the adapter's FMA rate, while moving a value between the lanes of a
// subgroup is a register shuffle. Here each subgroup computes a 32x32 block: a lane owns
// 4 columns and all 32 rows, reads its columns of B and four rows of A (rows `lane`,
// `lane + 8`, ...) straight from their bindings, and takes the other rows' A from the
// lanes that read them. That is 32 reads per 512 multiply-adds, no workgroup memory and
// no barriers. (64 rows per subgroup was faster still for 3x3 convolutions, 42% of the FMA
// ceiling against 34%, but slower for linear layers with K = 320.)

const TILE: u32 = 64u; // rows and columns of a workgroup's tile

@compute @workgroup_size(32)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(subgroup_id) group: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    begin(wg.z);
    let m_size = gemm_m();
    let k_size = gemm_k();
    // 4 subgroups: 2 blocks of 32 rows by 2 blocks of 32 columns.
    let row0 = wg.y * TILE + (group / 2u) * 32u;
    let n = wg.x * TILE + (group % 2u) * 32u + lane * 4u;
    begin_columns(n);
    var c0 = vec4<f32>(); var c1 = vec4<f32>(); var c2 = vec4<f32>(); var c3 = vec4<f32>();
    var c4 = vec4<f32>(); var c5 = vec4<f32>(); var c6 = vec4<f32>(); var c7 = vec4<f32>();
    var c8 = vec4<f32>(); var c9 = vec4<f32>(); var c10 = vec4<f32>(); var c11 = vec4<f32>();
    var c12 = vec4<f32>(); var c13 = vec4<f32>(); var c14 = vec4<f32>(); var c15 = vec4<f32>();
    var c16 = vec4<f32>(); var c17 = vec4<f32>(); var c18 = vec4<f32>(); var c19 = vec4<f32>();
    var c20 = vec4<f32>(); var c21 = vec4<f32>(); var c22 = vec4<f32>(); var c23 = vec4<f32>();
    var c24 = vec4<f32>(); var c25 = vec4<f32>(); var c26 = vec4<f32>(); var c27 = vec4<f32>();
    var c28 = vec4<f32>(); var c29 = vec4<f32>(); var c30 = vec4<f32>(); var c31 = vec4<f32>();
    for (var k = 0u; k < k_size; k += 4u) {
        let a0 = vec4<Stage>(load_a4(row0 + lane, k));
        let a1 = vec4<Stage>(load_a4(row0 + 8u + lane, k));
        let a2 = vec4<Stage>(load_a4(row0 + 16u + lane, k));
        let a3 = vec4<Stage>(load_a4(row0 + 24u + lane, k));
        let b0 = vec4<Stage>(load_b4(k));
        let b1 = vec4<Stage>(load_b4(k + 1u));
        let b2 = vec4<Stage>(load_b4(k + 2u));
        let b3 = vec4<Stage>(load_b4(k + 3u));
        c0 = accumulate(c0, subgroupBroadcast(a0, 0u), b0, b1, b2, b3);
        c1 = accumulate(c1, subgroupBroadcast(a0, 1u), b0, b1, b2, b3);
        c2 = accumulate(c2, subgroupBroadcast(a0, 2u), b0, b1, b2, b3);
        c3 = accumulate(c3, subgroupBroadcast(a0, 3u), b0, b1, b2, b3);
        c4 = accumulate(c4, subgroupBroadcast(a0, 4u), b0, b1, b2, b3);
        c5 = accumulate(c5, subgroupBroadcast(a0, 5u), b0, b1, b2, b3);
        c6 = accumulate(c6, subgroupBroadcast(a0, 6u), b0, b1, b2, b3);
        c7 = accumulate(c7, subgroupBroadcast(a0, 7u), b0, b1, b2, b3);
        c8 = accumulate(c8, subgroupBroadcast(a1, 0u), b0, b1, b2, b3);
        c9 = accumulate(c9, subgroupBroadcast(a1, 1u), b0, b1, b2, b3);
        c10 = accumulate(c10, subgroupBroadcast(a1, 2u), b0, b1, b2, b3);
        c11 = accumulate(c11, subgroupBroadcast(a1, 3u), b0, b1, b2, b3);
        c12 = accumulate(c12, subgroupBroadcast(a1, 4u), b0, b1, b2, b3);
        c13 = accumulate(c13, subgroupBroadcast(a1, 5u), b0, b1, b2, b3);
        c14 = accumulate(c14, subgroupBroadcast(a1, 6u), b0, b1, b2, b3);
        c15 = accumulate(c15, subgroupBroadcast(a1, 7u), b0, b1, b2, b3);
        c16 = accumulate(c16, subgroupBroadcast(a2, 0u), b0, b1, b2, b3);
        c17 = accumulate(c17, subgroupBroadcast(a2, 1u), b0, b1, b2, b3);
        c18 = accumulate(c18, subgroupBroadcast(a2, 2u), b0, b1, b2, b3);
        c19 = accumulate(c19, subgroupBroadcast(a2, 3u), b0, b1, b2, b3);
        c20 = accumulate(c20, subgroupBroadcast(a2, 4u), b0, b1, b2, b3);
        c21 = accumulate(c21, subgroupBroadcast(a2, 5u), b0, b1, b2, b3);
        c22 = accumulate(c22, subgroupBroadcast(a2, 6u), b0, b1, b2, b3);
        c23 = accumulate(c23, subgroupBroadcast(a2, 7u), b0, b1, b2, b3);
        c24 = accumulate(c24, subgroupBroadcast(a3, 0u), b0, b1, b2, b3);
        c25 = accumulate(c25, subgroupBroadcast(a3, 1u), b0, b1, b2, b3);
        c26 = accumulate(c26, subgroupBroadcast(a3, 2u), b0, b1, b2, b3);
        c27 = accumulate(c27, subgroupBroadcast(a3, 3u), b0, b1, b2, b3);
        c28 = accumulate(c28, subgroupBroadcast(a3, 4u), b0, b1, b2, b3);
        c29 = accumulate(c29, subgroupBroadcast(a3, 5u), b0, b1, b2, b3);
        c30 = accumulate(c30, subgroupBroadcast(a3, 6u), b0, b1, b2, b3);
        c31 = accumulate(c31, subgroupBroadcast(a3, 7u), b0, b1, b2, b3);
    }
    let rows = array(c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15, c16, c17, c18, c19, c20, c21, c22, c23, c24, c25, c26, c27, c28, c29, c30, c31);
    for (var r = 0u; r < 32u; r++) {
        if row0 + r < m_size {
            store4(row0 + r, n, rows[r]);
        }
    }
}
