// The GEMM core's f32 arithmetic: tiles staged as f32, every product added in turn.

alias Stage = f32;

// c + A[m, k..k+3] . B[k..k+3, n..n+3], given the row's k-quad `a` and B's four rows.
fn accumulate(c: vec4<f32>, a: vec4<f32>, b0: vec4<f32>, b1: vec4<f32>, b2: vec4<f32>, b3: vec4<f32>) -> vec4<f32> {
    return c + a.x * b0 + a.y * b1 + a.z * b2 + a.w * b3;
}
