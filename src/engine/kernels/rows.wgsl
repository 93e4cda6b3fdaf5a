// Rows reduced by norm.wgsl and softmax.wgsl, which are put after this file. Either each
// thread owns a row (`ROW_THREADS` 1: short rows, a transformer's LayerNorm, an
// attention's softmax) or the ROW_THREADS threads of a workgroup share one. Barriers are
// what short rows cost on CPU adapters: SwiftShader and llvmpipe run a workgroup with
// barriers as one coroutine per SIMD group, switched at each barrier, so a thread per row
// has none, a shared row one per reduction, and rows are shared by 64 threads, or by 256
// past 64 * 32768 elements (a VAE decoder's GroupNorm at 1024 px: 4M), which keeps a
// thread's loop short of lavapipe's 65535 iterations, past which it stops a loop silently.

override ROW_THREADS: u32 = 64u;
override WORKGROUP: u32 = select(ROW_THREADS, 64u, ROW_THREADS == 1u); // a row's threads, or 64 rows

// A thread sums its elements of a row in runs of RUN, then the runs' sums: one running f32
// sum over the hundreds of elements a thread may own drifts by enough to show in a LoRA's
// gradients (tests/lora.rs: 1.8e-4 of their scale against torch's float64, 6.1e-5 this
// way). Compensated (Kahan) sums do not survive Mesa's float optimisations.
const RUN: u32 = 16u;

// The threads' partial values of a row: two halves, one per reduction, so that the second
// needs no barrier before its writes.
var<workgroup> partial: array<f32, 2 * WORKGROUP>;

// The row's sum (or, with `take_max`, maximum) of its threads' `value`s: the value itself
// for a thread per row; otherwise each thread combines the workgroup's values through
// half `half` of `partial`. A kernel uses each half once.
fn row_combine(half: u32, value: f32, lane: u32, take_max: bool) -> f32 {
    if ROW_THREADS == 1u {
        return value;
    }
    let at = half * WORKGROUP;
    partial[at + lane] = value;
    workgroupBarrier();
    var result = partial[at];
    for (var i = 1u; i < WORKGROUP; i++) {
        let other = partial[at + i];
        result = select(result + other, max(result, other), take_max);
    }
    return result;
}
