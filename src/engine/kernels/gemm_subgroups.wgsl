// The GEMM core for CPU adapters with 8-lane subgroups (llvmpipe on AVX2), an alternative to
// gemm.wgsl with the same operand readers and 64x64 output tiles, used for its wide tiles.
// There every workgroup-memory or storage read costs one scalar load per lane, so
// gemm.wgsl's inner loop (64 vector multiply-adds per 64 such reads a thread) runs at a
// fraction of the adapter's FMA rate, while moving a value between the lanes of a
// subgroup is a register shuffle. Here each subgroup computes a 64x32 block: a lane owns
// 4 columns and all 64 rows (64 accumulators, which CPU adapters keep on the stack, where
// reading them is a plain vector load), reads its columns of B and 8 rows of A (rows
// `lane`, `lane + 8`, ...) straight from their bindings, and takes the other rows' A from
// the lanes that read them: 48 reads per 1024 multiply-adds, no workgroup memory and no
// barriers. (On llvmpipe, 16 rows: 26% of the FMA ceiling for a 3x3 conv; 32: 35%; 64:
// 45%.)

const TILE: u32 = 64u; // rows and columns of a workgroup's tile

// Two subgroups of 8 lanes, each 64 rows by 32 columns.
@compute @workgroup_size(16)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(subgroup_id) group: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    begin(wg.z);
    let m_size = gemm_m();
    let k_size = gemm_k();
    let row0 = wg.y * TILE;
    let n = wg.x * TILE + group * 32u + lane * 4u;
    begin_columns(n);
    var c0 = vec4<f32>(); var c1 = vec4<f32>(); var c2 = vec4<f32>(); var c3 = vec4<f32>();
    var c4 = vec4<f32>(); var c5 = vec4<f32>(); var c6 = vec4<f32>(); var c7 = vec4<f32>();
    var c8 = vec4<f32>(); var c9 = vec4<f32>(); var c10 = vec4<f32>(); var c11 = vec4<f32>();
    var c12 = vec4<f32>(); var c13 = vec4<f32>(); var c14 = vec4<f32>(); var c15 = vec4<f32>();
    var c16 = vec4<f32>(); var c17 = vec4<f32>(); var c18 = vec4<f32>(); var c19 = vec4<f32>();
    var c20 = vec4<f32>(); var c21 = vec4<f32>(); var c22 = vec4<f32>(); var c23 = vec4<f32>();
    var c24 = vec4<f32>(); var c25 = vec4<f32>(); var c26 = vec4<f32>(); var c27 = vec4<f32>();
    var c28 = vec4<f32>(); var c29 = vec4<f32>(); var c30 = vec4<f32>(); var c31 = vec4<f32>();
    var c32 = vec4<f32>(); var c33 = vec4<f32>(); var c34 = vec4<f32>(); var c35 = vec4<f32>();
    var c36 = vec4<f32>(); var c37 = vec4<f32>(); var c38 = vec4<f32>(); var c39 = vec4<f32>();
    var c40 = vec4<f32>(); var c41 = vec4<f32>(); var c42 = vec4<f32>(); var c43 = vec4<f32>();
    var c44 = vec4<f32>(); var c45 = vec4<f32>(); var c46 = vec4<f32>(); var c47 = vec4<f32>();
    var c48 = vec4<f32>(); var c49 = vec4<f32>(); var c50 = vec4<f32>(); var c51 = vec4<f32>();
    var c52 = vec4<f32>(); var c53 = vec4<f32>(); var c54 = vec4<f32>(); var c55 = vec4<f32>();
    var c56 = vec4<f32>(); var c57 = vec4<f32>(); var c58 = vec4<f32>(); var c59 = vec4<f32>();
    var c60 = vec4<f32>(); var c61 = vec4<f32>(); var c62 = vec4<f32>(); var c63 = vec4<f32>();
    for (var k = 0u; k < k_size; k += 4u) {
        let b0 = vec4<Stage>(load_b4(k));
        let b1 = vec4<Stage>(load_b4(k + 1u));
        let b2 = vec4<Stage>(load_b4(k + 2u));
        let b3 = vec4<Stage>(load_b4(k + 3u));
        let a0 = vec4<Stage>(load_a4(row0 + 0u + lane, k));
        let a1 = vec4<Stage>(load_a4(row0 + 8u + lane, k));
        let a2 = vec4<Stage>(load_a4(row0 + 16u + lane, k));
        let a3 = vec4<Stage>(load_a4(row0 + 24u + lane, k));
        let a4 = vec4<Stage>(load_a4(row0 + 32u + lane, k));
        let a5 = vec4<Stage>(load_a4(row0 + 40u + lane, k));
        let a6 = vec4<Stage>(load_a4(row0 + 48u + lane, k));
        let a7 = vec4<Stage>(load_a4(row0 + 56u + lane, k));
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
        c32 = accumulate(c32, subgroupBroadcast(a4, 0u), b0, b1, b2, b3);
        c33 = accumulate(c33, subgroupBroadcast(a4, 1u), b0, b1, b2, b3);
        c34 = accumulate(c34, subgroupBroadcast(a4, 2u), b0, b1, b2, b3);
        c35 = accumulate(c35, subgroupBroadcast(a4, 3u), b0, b1, b2, b3);
        c36 = accumulate(c36, subgroupBroadcast(a4, 4u), b0, b1, b2, b3);
        c37 = accumulate(c37, subgroupBroadcast(a4, 5u), b0, b1, b2, b3);
        c38 = accumulate(c38, subgroupBroadcast(a4, 6u), b0, b1, b2, b3);
        c39 = accumulate(c39, subgroupBroadcast(a4, 7u), b0, b1, b2, b3);
        c40 = accumulate(c40, subgroupBroadcast(a5, 0u), b0, b1, b2, b3);
        c41 = accumulate(c41, subgroupBroadcast(a5, 1u), b0, b1, b2, b3);
        c42 = accumulate(c42, subgroupBroadcast(a5, 2u), b0, b1, b2, b3);
        c43 = accumulate(c43, subgroupBroadcast(a5, 3u), b0, b1, b2, b3);
        c44 = accumulate(c44, subgroupBroadcast(a5, 4u), b0, b1, b2, b3);
        c45 = accumulate(c45, subgroupBroadcast(a5, 5u), b0, b1, b2, b3);
        c46 = accumulate(c46, subgroupBroadcast(a5, 6u), b0, b1, b2, b3);
        c47 = accumulate(c47, subgroupBroadcast(a5, 7u), b0, b1, b2, b3);
        c48 = accumulate(c48, subgroupBroadcast(a6, 0u), b0, b1, b2, b3);
        c49 = accumulate(c49, subgroupBroadcast(a6, 1u), b0, b1, b2, b3);
        c50 = accumulate(c50, subgroupBroadcast(a6, 2u), b0, b1, b2, b3);
        c51 = accumulate(c51, subgroupBroadcast(a6, 3u), b0, b1, b2, b3);
        c52 = accumulate(c52, subgroupBroadcast(a6, 4u), b0, b1, b2, b3);
        c53 = accumulate(c53, subgroupBroadcast(a6, 5u), b0, b1, b2, b3);
        c54 = accumulate(c54, subgroupBroadcast(a6, 6u), b0, b1, b2, b3);
        c55 = accumulate(c55, subgroupBroadcast(a6, 7u), b0, b1, b2, b3);
        c56 = accumulate(c56, subgroupBroadcast(a7, 0u), b0, b1, b2, b3);
        c57 = accumulate(c57, subgroupBroadcast(a7, 1u), b0, b1, b2, b3);
        c58 = accumulate(c58, subgroupBroadcast(a7, 2u), b0, b1, b2, b3);
        c59 = accumulate(c59, subgroupBroadcast(a7, 3u), b0, b1, b2, b3);
        c60 = accumulate(c60, subgroupBroadcast(a7, 4u), b0, b1, b2, b3);
        c61 = accumulate(c61, subgroupBroadcast(a7, 5u), b0, b1, b2, b3);
        c62 = accumulate(c62, subgroupBroadcast(a7, 6u), b0, b1, b2, b3);
        c63 = accumulate(c63, subgroupBroadcast(a7, 7u), b0, b1, b2, b3);
    }
    // Stored row by row, not through an array: a dynamically indexed array of accumulators
    // costs a chain of selects per access on CPU adapters (it made this epilogue the
    // bottleneck of products with K = 320).
    if row0 + 0u < m_size { store4(row0 + 0u, n, c0); }
    if row0 + 1u < m_size { store4(row0 + 1u, n, c1); }
    if row0 + 2u < m_size { store4(row0 + 2u, n, c2); }
    if row0 + 3u < m_size { store4(row0 + 3u, n, c3); }
    if row0 + 4u < m_size { store4(row0 + 4u, n, c4); }
    if row0 + 5u < m_size { store4(row0 + 5u, n, c5); }
    if row0 + 6u < m_size { store4(row0 + 6u, n, c6); }
    if row0 + 7u < m_size { store4(row0 + 7u, n, c7); }
    if row0 + 8u < m_size { store4(row0 + 8u, n, c8); }
    if row0 + 9u < m_size { store4(row0 + 9u, n, c9); }
    if row0 + 10u < m_size { store4(row0 + 10u, n, c10); }
    if row0 + 11u < m_size { store4(row0 + 11u, n, c11); }
    if row0 + 12u < m_size { store4(row0 + 12u, n, c12); }
    if row0 + 13u < m_size { store4(row0 + 13u, n, c13); }
    if row0 + 14u < m_size { store4(row0 + 14u, n, c14); }
    if row0 + 15u < m_size { store4(row0 + 15u, n, c15); }
    if row0 + 16u < m_size { store4(row0 + 16u, n, c16); }
    if row0 + 17u < m_size { store4(row0 + 17u, n, c17); }
    if row0 + 18u < m_size { store4(row0 + 18u, n, c18); }
    if row0 + 19u < m_size { store4(row0 + 19u, n, c19); }
    if row0 + 20u < m_size { store4(row0 + 20u, n, c20); }
    if row0 + 21u < m_size { store4(row0 + 21u, n, c21); }
    if row0 + 22u < m_size { store4(row0 + 22u, n, c22); }
    if row0 + 23u < m_size { store4(row0 + 23u, n, c23); }
    if row0 + 24u < m_size { store4(row0 + 24u, n, c24); }
    if row0 + 25u < m_size { store4(row0 + 25u, n, c25); }
    if row0 + 26u < m_size { store4(row0 + 26u, n, c26); }
    if row0 + 27u < m_size { store4(row0 + 27u, n, c27); }
    if row0 + 28u < m_size { store4(row0 + 28u, n, c28); }
    if row0 + 29u < m_size { store4(row0 + 29u, n, c29); }
    if row0 + 30u < m_size { store4(row0 + 30u, n, c30); }
    if row0 + 31u < m_size { store4(row0 + 31u, n, c31); }
    if row0 + 32u < m_size { store4(row0 + 32u, n, c32); }
    if row0 + 33u < m_size { store4(row0 + 33u, n, c33); }
    if row0 + 34u < m_size { store4(row0 + 34u, n, c34); }
    if row0 + 35u < m_size { store4(row0 + 35u, n, c35); }
    if row0 + 36u < m_size { store4(row0 + 36u, n, c36); }
    if row0 + 37u < m_size { store4(row0 + 37u, n, c37); }
    if row0 + 38u < m_size { store4(row0 + 38u, n, c38); }
    if row0 + 39u < m_size { store4(row0 + 39u, n, c39); }
    if row0 + 40u < m_size { store4(row0 + 40u, n, c40); }
    if row0 + 41u < m_size { store4(row0 + 41u, n, c41); }
    if row0 + 42u < m_size { store4(row0 + 42u, n, c42); }
    if row0 + 43u < m_size { store4(row0 + 43u, n, c43); }
    if row0 + 44u < m_size { store4(row0 + 44u, n, c44); }
    if row0 + 45u < m_size { store4(row0 + 45u, n, c45); }
    if row0 + 46u < m_size { store4(row0 + 46u, n, c46); }
    if row0 + 47u < m_size { store4(row0 + 47u, n, c47); }
    if row0 + 48u < m_size { store4(row0 + 48u, n, c48); }
    if row0 + 49u < m_size { store4(row0 + 49u, n, c49); }
    if row0 + 50u < m_size { store4(row0 + 50u, n, c50); }
    if row0 + 51u < m_size { store4(row0 + 51u, n, c51); }
    if row0 + 52u < m_size { store4(row0 + 52u, n, c52); }
    if row0 + 53u < m_size { store4(row0 + 53u, n, c53); }
    if row0 + 54u < m_size { store4(row0 + 54u, n, c54); }
    if row0 + 55u < m_size { store4(row0 + 55u, n, c55); }
    if row0 + 56u < m_size { store4(row0 + 56u, n, c56); }
    if row0 + 57u < m_size { store4(row0 + 57u, n, c57); }
    if row0 + 58u < m_size { store4(row0 + 58u, n, c58); }
    if row0 + 59u < m_size { store4(row0 + 59u, n, c59); }
    if row0 + 60u < m_size { store4(row0 + 60u, n, c60); }
    if row0 + 61u < m_size { store4(row0 + 61u, n, c61); }
    if row0 + 62u < m_size { store4(row0 + 62u, n, c62); }
    if row0 + 63u < m_size { store4(row0 + 63u, n, c63); }
}
