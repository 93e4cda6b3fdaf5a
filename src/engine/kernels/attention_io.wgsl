// Fused attention's parameters and bindings, shared by attention.wgsl and
// attention_subgroups.wgsl: out[b, i, :] = softmax_j(scale * Q[b, i, :] . Kt[b, :, j]) V[b, j, :]
// over strided operands (so K may arrive transposed or not).

// Channel quads of the widest head the kernels hold; keep MAX_QUADS * 4 equal to
// kernels::ATTENTION_MAX_HEAD_DIM.
const MAX_QUADS: u32 = 40u;

// The head's sizes are pipeline constants: the channel loops have fixed trip counts, and
// attention.wgsl's staged tiles are no larger than the head (SwiftShader's compile time
// grows with a kernel's workgroup memory, which it zero-fills element by element).
override D_QUADS: u32 = MAX_QUADS; // channel quads of a query and key: ceil(d / 4)
override E_QUADS: u32 = MAX_QUADS; // channel quads of a value: ceil(e / 4)

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
