// The GEMM core's f16 arithmetic, for fp16 weights on devices with `shader-f16`: tiles
// staged as f16 (half the workgroup memory and its traffic), four products summed in f16
// (packed half-precision math runs at twice f32's rate on most GPUs), and that sum added to
// an f32 accumulator, so rounding error grows with K / 4 additions of f16 partial sums
// rather than with K additions in f16.

enable f16;

alias Stage = f16;

// c + A[m, k..k+3] . B[k..k+3, n..n+3], given the row's k-quad `a` and B's four rows.
fn accumulate(c: vec4<f32>, a: vec4<f16>, b0: vec4<f16>, b1: vec4<f16>, b2: vec4<f16>, b3: vec4<f16>) -> vec4<f32> {
    return c + vec4<f32>(a.x * b0 + a.y * b1 + a.z * b2 + a.w * b3);
}
