//! PyTorch's CPU generator, so that a seed means in websd what it means in diffusers:
//! `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))`.
//!
//! PyTorch draws from a 32-bit Mersenne Twister (mt19937). For a float tensor of 16 or
//! more elements, `normal_` first fills the tensor with uniforms `(x & (2^24 - 1)) / 2^24`,
//! then turns each block of 16 into normals by Box-Muller (element j pairs with j + 8); a
//! tail that is not a whole block redoes the last 16 elements with fresh uniforms. Smaller
//! tensors draw each normal from two 53-bit uniforms instead.

use crate::engine::HostTensor;

const N: usize = 624;
const M: usize = 397;

/// A seeded PyTorch-compatible CPU random number generator.
pub struct TorchRng {
    state: [u32; N],
    index: usize,
    /// The second normal of a pair drawn for small tensors, kept as PyTorch does.
    cached_normal: Option<f64>,
}

impl TorchRng {
    /// `torch.Generator("cpu").manual_seed(seed)`.
    pub fn new(seed: u64) -> TorchRng {
        let mut state = [0u32; N];
        state[0] = seed as u32;
        for i in 1..N {
            state[i] = 1_812_433_253u32
                .wrapping_mul(state[i - 1] ^ (state[i - 1] >> 30))
                .wrapping_add(i as u32);
        }
        TorchRng {
            state,
            index: N,
            cached_normal: None,
        }
    }

    /// The next 32-bit output of mt19937.
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    fn twist(&mut self) {
        for i in 0..N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % N] & 0x7fff_ffff);
            let mut next = self.state[(i + M) % N] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= 0x9908_b0df;
            }
            self.state[i] = next;
        }
        self.index = 0;
    }

    /// PyTorch's `random64`: the first draw is the high half.
    fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }

    /// A uniform float in [0, 1) with 24 random bits (PyTorch's float uniform).
    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & ((1 << 24) - 1)) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// A uniform double in [0, 1) with 53 random bits.
    fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() & ((1 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `torch.randint(high, (1,))`: one 32-bit draw reduced modulo `high` (PyTorch's
    /// path for ranges under 2^32).
    pub fn randint(&mut self, high: u32) -> u32 {
        self.next_u32() % high
    }

    /// `torch.randn(shape)` for float32.
    pub fn randn(&mut self, shape: &[usize]) -> HostTensor {
        let n: usize = shape.iter().product();
        let values = if n >= 16 {
            self.normal_blocks(n)
        } else {
            (0..n).map(|_| self.normal_f64() as f32).collect()
        };
        HostTensor::f32(shape.to_vec(), values)
    }

    fn normal_blocks(&mut self, n: usize) -> Vec<f32> {
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for start in (0..n - 15).step_by(16) {
            box_muller_16(&mut data[start..start + 16]);
        }
        if !n.is_multiple_of(16) {
            let tail = n - 16;
            for value in &mut data[tail..] {
                *value = self.uniform_f32();
            }
            box_muller_16(&mut data[tail..]);
        }
        data
    }

    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.cached_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let radius = (-2.0 * (1.0 - u2).ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.cached_normal = Some(radius * theta.sin());
        radius * theta.cos()
    }
}

/// Box-Muller over one block: uniforms u[j], u[j + 8] become two normals. (PyTorch's AVX2
/// build evaluates log/sin/cos with its own polynomial approximations, so values agree to
/// about 1e-6, not bit for bit; the uniforms, and so the stream, agree exactly.)
fn box_muller_16(block: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0 - block[j];
        let u2 = block[j + 8];
        let radius = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f32::consts::PI * u2;
        block[j] = radius * theta.cos();
        block[j + 8] = radius * theta.sin();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first outputs of mt19937 seeded with 5489 (the C++ standard's check value is
    /// the 10000th: 4123659995).
    #[test]
    fn mersenne_twister_matches_the_standard() {
        let mut rng = TorchRng::new(5489);
        let mut last = 0;
        for _ in 0..10000 {
            last = rng.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }
}
