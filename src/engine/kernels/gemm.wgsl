// Tiled GEMM core shared by MatMul/Gemm (matmul.wgsl) and Conv (conv.wgsl), which are
// appended to this file and supply `load_a(m, k)`, `load_b(k, n)`, `store(m, n, value)` and
// `begin(batch)` (setting per-batch offsets) plus the sizes `gemm_m()`, `gemm_n()`, `gemm_k()`.
//
// Each workgroup computes a 64x64 output tile; each of its 16x16 threads a 4x4 block. The K
// loop stages 16-deep slices of A and B in workgroup memory.

const TILE: u32 = 64u;
const DEPTH: u32 = 16u;

var<workgroup> tile_a: array<f32, 1024>; // [DEPTH][TILE], k-major
var<workgroup> tile_b: array<f32, 1024>; // [DEPTH][TILE], k-major

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>,
        @builtin(local_invocation_index) lane: u32) {
    begin(wg.z);
    let m_size = gemm_m();
    let n_size = gemm_n();
    let k_size = gemm_k();
    let row0 = wg.y * TILE;
    let col0 = wg.x * TILE;
    var acc: array<f32, 16>;
    for (var k0 = 0u; k0 < k_size; k0 += DEPTH) {
        for (var e = lane; e < TILE * DEPTH; e += 256u) {
            // A: consecutive lanes walk k (contiguous in row-major A and in conv weights).
            let am = e / DEPTH;
            let ak = e % DEPTH;
            var va = 0.0;
            if row0 + am < m_size && k0 + ak < k_size {
                va = load_a(row0 + am, k0 + ak);
            }
            tile_a[ak * TILE + am] = va;
            // B: consecutive lanes walk n (contiguous in row-major B and in images).
            let bk = e / TILE;
            let bn = e % TILE;
            var vb = 0.0;
            if k0 + bk < k_size && col0 + bn < n_size {
                vb = load_b(k0 + bk, col0 + bn);
            }
            tile_b[bk * TILE + bn] = vb;
        }
        workgroupBarrier();
        for (var k = 0u; k < DEPTH; k++) {
            let a4 = vec4<f32>(tile_a[k * TILE + lid.y * 4u], tile_a[k * TILE + lid.y * 4u + 1u],
                               tile_a[k * TILE + lid.y * 4u + 2u], tile_a[k * TILE + lid.y * 4u + 3u]);
            let b4 = vec4<f32>(tile_b[k * TILE + lid.x * 4u], tile_b[k * TILE + lid.x * 4u + 1u],
                               tile_b[k * TILE + lid.x * 4u + 2u], tile_b[k * TILE + lid.x * 4u + 3u]);
            for (var i = 0u; i < 4u; i++) {
                acc[i * 4u] += a4[i] * b4.x;
                acc[i * 4u + 1u] += a4[i] * b4.y;
                acc[i * 4u + 2u] += a4[i] * b4.z;
                acc[i * 4u + 3u] += a4[i] * b4.w;
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        for (var j = 0u; j < 4u; j++) {
            let m = row0 + lid.y * 4u + i;
            let n = col0 + lid.x * 4u + j;
            if m < m_size && n < n_size {
                store(m, n, acc[i * 4u + j]);
            }
        }
    }
}
