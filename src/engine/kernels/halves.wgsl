// Activations stored as packed f16 pairs (an fp16 model's, see lower/halves.rs), for the
// kernels appended after this file that read one: their input binding is `x`, an
// array<u32> of f32 bits, or of f16 pairs with `HALF_INPUT`. With `HALF_OUTPUT` they write
// their output two elements to a word (`pack2x16float`). Arithmetic stays f32; no
// `shader-f16` is needed.

override HALF_INPUT: bool = false;
override HALF_OUTPUT: bool = false;

// Element i of `x`.
fn x_at(i: u32) -> f32 {
    if HALF_INPUT {
        return unpack2x16float(x[i >> 1u])[i & 1u];
    }
    return bitcast<f32>(x[i]);
}
