// Tiled GEMM core shared by MatMul/Gemm (matmul.wgsl) and Conv (conv.wgsl), which are
// put before this file (kernels.rs) and supply:
// - `begin(batch)`: per-batch offsets; `gemm_m()`, `gemm_n()`, `gemm_k()`: the sizes;
// - `load_a4(m, k)`: A[m, k..k+3], zero past `gemm_m()` or `gemm_k()`;
// - `begin_columns(n)`: per-thread setup for the 4 columns n..n+3 it stages of B (the
//   convolution resolves their pixel coordinates once, not per element);
// - `load_b4(k)`: B[k, n..n+3] for those columns, zero past `gemm_n()` or `gemm_k()`;
// - `store4(m, n, values)`: C[m, n..n+3], writing only columns below `gemm_n()`.
// (The readers load unconditionally, from element 0 when out of range, and select zero:
// on CPU adapters a load under a branch costs masking per lane.) gemm_subgroups.wgsl is
// another core over the same readers. A prelude before it (gemm_f32.wgsl or gemm_f16.wgsl)
// gives the arithmetic: `Stage`, the element type of the workgroup tiles, and `accumulate`,
// which adds a k-quad's products to an f32 accumulator.
//
// Each workgroup of 64 threads computes a 64x64 output tile, each thread an 8x8 block
// (rows 4y..4y+3 and 32+4y.., columns 4x.. and 32+4x..: split so that neighbouring threads
// read neighbouring workgroup words) held in sixteen vec4 accumulators. Named variables,
// not an array: dynamically indexed arrays spill to memory on CPU adapters (llvmpipe,
// SwiftShader). The K loop stages 16-deep slices of A and B in workgroup memory as vec4s,
// so the inner loop does 64 vector multiply-adds per 16 vector loads.
//
// NARROW tiles, 64 x TILE_N with TILE_N 16, 8 or 4, for products only a few columns wide
// (the deep, few-pixel levels of a UNet at small latents), where 64 columns would be mostly
// padding computed for nothing: each thread computes a 4x4 block, so 16 x TILE_N / 4 of
// the 64 threads compute and the others only help stage the operands.

const TILE: u32 = 64u; // rows of a tile
const DEPTH: u32 = 16u;
const A_STRIDE: u32 = 5u; // vec4s per staged row of A: DEPTH / 4, padded against bank conflicts

override TILE_N: u32 = 64u; // columns of a tile
override NARROW: bool = TILE_N < 64u;
override B_QUADS: u32 = TILE_N / 4u; // vec4s per staged row of B

var<workgroup> tile_a: array<vec4<Stage>, 320>; // [TILE m][A_STRIDE]: 4 consecutive k per vector
var<workgroup> tile_b: array<vec4<Stage>, DEPTH * B_QUADS>; // [DEPTH k][B_QUADS]: 4 consecutive n per vector

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    begin(wg.z);
    let m_size = gemm_m();
    let k_size = gemm_k();
    let row0 = wg.y * TILE;
    let col0 = wg.x * TILE_N;
    // What this thread stages per slice: 4 k of rows a_m + 16r, 4 n of rows b_k + b_step r.
    let a_k = (lane % 4u) * 4u;
    let a_m = lane / 4u;
    let b_k = lane / B_QUADS;
    let b_n = (lane % B_QUADS) * 4u;
    let b_step = 64u / B_QUADS;
    begin_columns(col0 + b_n);
    // The thread's block: column quad x (and x + 8 unless NARROW), row quad y (and y + 8).
    let x = lane % select(8u, B_QUADS, NARROW);
    let y = lane / select(8u, B_QUADS, NARROW);
    let computes = !NARROW || y < TILE / 4u;
    var c00 = vec4<f32>(); var c01 = vec4<f32>();
    var c10 = vec4<f32>(); var c11 = vec4<f32>();
    var c20 = vec4<f32>(); var c21 = vec4<f32>();
    var c30 = vec4<f32>(); var c31 = vec4<f32>();
    var c40 = vec4<f32>(); var c41 = vec4<f32>();
    var c50 = vec4<f32>(); var c51 = vec4<f32>();
    var c60 = vec4<f32>(); var c61 = vec4<f32>();
    var c70 = vec4<f32>(); var c71 = vec4<f32>();
    for (var k0 = 0u; k0 < k_size; k0 += DEPTH) {
        for (var r = 0u; r < 4u; r++) {
            let m = a_m + 16u * r;
            tile_a[m * A_STRIDE + a_k / 4u] = vec4<Stage>(load_a4(row0 + m, k0 + a_k));
        }
        for (var kb = b_k; kb < DEPTH; kb += b_step) {
            tile_b[kb * B_QUADS + b_n / 4u] = vec4<Stage>(load_b4(k0 + kb));
        }
        workgroupBarrier();
        for (var q = 0u; q < select(0u, DEPTH / 4u, computes); q++) {
            let r0 = y * 4u * A_STRIDE + q;
            let a0 = tile_a[r0];
            let a1 = tile_a[r0 + A_STRIDE];
            let a2 = tile_a[r0 + 2u * A_STRIDE];
            let a3 = tile_a[r0 + 3u * A_STRIDE];
            // B's four rows of this k-quad, at the thread's first column quad.
            let b = q * 4u * B_QUADS + x;
            let b0 = tile_b[b];
            let b1 = tile_b[b + B_QUADS];
            let b2 = tile_b[b + 2u * B_QUADS];
            let b3 = tile_b[b + 3u * B_QUADS];
            c00 = accumulate(c00, a0, b0, b1, b2, b3);
            c10 = accumulate(c10, a1, b0, b1, b2, b3);
            c20 = accumulate(c20, a2, b0, b1, b2, b3);
            c30 = accumulate(c30, a3, b0, b1, b2, b3);
            if !NARROW {
                let r4 = (32u + y * 4u) * A_STRIDE + q;
                let a4 = tile_a[r4];
                let a5 = tile_a[r4 + A_STRIDE];
                let a6 = tile_a[r4 + 2u * A_STRIDE];
                let a7 = tile_a[r4 + 3u * A_STRIDE];
                c40 = accumulate(c40, a4, b0, b1, b2, b3);
                c50 = accumulate(c50, a5, b0, b1, b2, b3);
                c60 = accumulate(c60, a6, b0, b1, b2, b3);
                c70 = accumulate(c70, a7, b0, b1, b2, b3);
                // The second column quad, 32 columns on.
                let e0 = tile_b[b + 8u];
                let e1 = tile_b[b + 8u + B_QUADS];
                let e2 = tile_b[b + 8u + 2u * B_QUADS];
                let e3 = tile_b[b + 8u + 3u * B_QUADS];
                c01 = accumulate(c01, a0, e0, e1, e2, e3);
                c11 = accumulate(c11, a1, e0, e1, e2, e3);
                c21 = accumulate(c21, a2, e0, e1, e2, e3);
                c31 = accumulate(c31, a3, e0, e1, e2, e3);
                c41 = accumulate(c41, a4, e0, e1, e2, e3);
                c51 = accumulate(c51, a5, e0, e1, e2, e3);
                c61 = accumulate(c61, a6, e0, e1, e2, e3);
                c71 = accumulate(c71, a7, e0, e1, e2, e3);
            }
        }
        workgroupBarrier();
    }
    if !computes {
        return;
    }
    let m = row0 + y * 4u;
    let n = col0 + x * 4u;
    if m < m_size { store4(m, n, c00); }
    if m + 1u < m_size { store4(m + 1u, n, c10); }
    if m + 2u < m_size { store4(m + 2u, n, c20); }
    if m + 3u < m_size { store4(m + 3u, n, c30); }
    if NARROW {
        return;
    }
    let m2 = m + 32u;
    let n2 = n + 32u;
    if m < m_size { store4(m, n2, c01); }
    if m + 1u < m_size { store4(m + 1u, n2, c11); }
    if m + 2u < m_size { store4(m + 2u, n2, c21); }
    if m + 3u < m_size { store4(m + 3u, n2, c31); }
    if m2 < m_size { store4(m2, n, c40); store4(m2, n2, c41); }
    if m2 + 1u < m_size { store4(m2 + 1u, n, c50); store4(m2 + 1u, n2, c51); }
    if m2 + 2u < m_size { store4(m2 + 2u, n, c60); store4(m2 + 2u, n2, c61); }
    if m2 + 3u < m_size { store4(m2 + 3u, n, c70); store4(m2 + 3u, n2, c71); }
}
