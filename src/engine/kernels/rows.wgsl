// Rows reduced by norm.wgsl and softmax.wgsl, which are put after this file. With
// `THREAD_PER_ROW` each thread owns a row (short rows: a transformer's LayerNorm, an
// attention's softmax), otherwise the WORKGROUP threads of a workgroup share one.
// Barriers are what short rows cost on CPU adapters: SwiftShader and llvmpipe run a
// workgroup with barriers as one coroutine per SIMD group, switched at each barrier, so a
// thread per row has none and a shared row one per reduction.

override THREAD_PER_ROW: bool = false;
const WORKGROUP: u32 = 64u;

// The threads' partial values of a row: two halves, one per reduction, so that the second
// needs no barrier before its writes.
var<workgroup> partial: array<f32, 2 * WORKGROUP>;

// The row's sum (or, with `take_max`, maximum) of its threads' `value`s: the value itself
// for a thread per row; otherwise each thread combines the workgroup's values through
// half `half` of `partial`. A kernel uses each half once.
fn row_combine(half: u32, value: f32, lane: u32, take_max: bool) -> f32 {
    if THREAD_PER_ROW {
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
