// The adapter's ceilings, for reading kernel timings as a fraction of them.
// OP 0: multiply-add throughput. Each thread runs 4 independent chains of vec4 multiply-adds
//       (16 independent lanes: enough to hide latency without spilling on CPU adapters),
//       two rounds per iteration: 64 flops per iteration.
// OP 1: memory bandwidth. Each thread copies one vec4 (16 bytes read, 16 written).

override OP: u32 = 0u;

struct Params {
    iterations: u32,
    len: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> src: array<vec4<f32>>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let index = id.x + id.y * groups.x * 64u;
    if index >= p.len {
        return;
    }
    if OP == 0u {
        // Multiplier and addend come from memory, so the compiler cannot fold the chains.
        let x = src[0];
        let y = src[1];
        var a0 = vec4<f32>(f32(index));
        var a1 = a0 + 1.0;
        var a2 = a0 + 2.0;
        var a3 = a0 + 3.0;
        // Read once: in a loop condition it would be a memory load per iteration.
        let iterations = p.iterations;
        for (var i = 0u; i < iterations; i++) {
            a0 = a0 * x + y;
            a1 = a1 * x + y;
            a2 = a2 * x + y;
            a3 = a3 * x + y;
            a0 = a0 * x + y;
            a1 = a1 * x + y;
            a2 = a2 * x + y;
            a3 = a3 * x + y;
        }
        out[index] = a0 + a1 + a2 + a3;
    } else {
        out[index] = src[index];
    }
}
