//! Element-wise unary, binary and ternary ops over broadcast operands (elementwise.wgsl).

use super::super::graph::ValueId;
use super::super::kernels::{KernelKey, Launch, Operand, Params, Shader};
use super::super::ops::broadcast_strides;
use super::super::tensor::{DType, numel};
use super::{LowerResult, Lowering, MAX_RANK, check_rank};

/// elementwise.wgsl's element type codes.
const HALF_CODE: usize = 3;

fn dtype_code(d: DType) -> usize {
    match d {
        DType::F32 => 0,
        DType::I64 => 1,
        DType::Bool => 2,
    }
}

impl Lowering<'_> {
    /// One launch per run of output elements that fits a binding: inputs of the output's
    /// shape are windowed alike, broadcast inputs are bound whole.
    pub(super) fn elementwise(
        &self,
        op: u32,
        out: ValueId,
        inputs: &[ValueId],
    ) -> LowerResult<Vec<Launch>> {
        let shape = self.shape(out);
        check_rank(shape.len())?;
        let n = numel(shape);
        // Unused operand slots repeat the first input (read-only bindings may alias).
        let operand = |i: usize| inputs.get(i).copied().unwrap_or(inputs[0]);
        let strides = |i: usize| {
            broadcast_strides(self.shape(operand(i)), shape)
                .into_iter()
                .map(|s| s as isize)
        };
        let broadcast = inputs.iter().any(|&i| self.shape(i) != shape);
        let key = KernelKey {
            op: Some(op),
            ..Shader::Elementwise.into()
        };
        let code = |v: ValueId| match self.half(v) {
            true => HALF_CODE,
            false => dtype_code(self.dtype(v)),
        };
        // With halves, runs are of pairs (a word of halves), which a thread writes at once;
        // `half_values` gives them only operands of the output's (even) size.
        let pair = inputs.iter().chain([&out]).any(|&v| self.half(v));
        let unit = if pair { 2 } else { 1 };
        let words: Vec<usize> = inputs
            .iter()
            .chain([&out])
            .map(|&v| self.words(v, unit))
            .collect();
        let runs: Vec<_> = self
            .runs(n.div_ceil(unit), &words, usize::MAX, "element")?
            .into_iter()
            .map(|r| r.start * unit..(r.end * unit).min(n))
            .collect();
        let split = runs.len() > 1;
        let per_thread = if self.half(out) { 2 } else { 1 };
        Ok(runs
            .into_iter()
            .map(|run| {
                let windowed = |i: usize| split && self.shape(operand(i)) == shape;
                let base = |i: usize| if windowed(i) { run.start as isize } else { 0 };
                let params = Params::default()
                    .u(run.len())
                    .u(shape.len())
                    .u(code(out))
                    .u(code(operand(0)))
                    .u(code(operand(1)))
                    .u(code(operand(2)))
                    .u(broadcast as usize)
                    .u(run.start)
                    .array(shape.iter().map(|&d| d as isize), MAX_RANK)
                    .array(strides(0), MAX_RANK)
                    .array(strides(1), MAX_RANK)
                    .array(strides(2), MAX_RANK)
                    .array((0..3).map(base), 4);
                let operands = (0..3)
                    .map(|i| match windowed(i) {
                        true => Operand::Part(operand(i), run.clone()),
                        false => Operand::Value(operand(i)),
                    })
                    .collect();
                Launch {
                    kernel: key,
                    params: params.0,
                    output: self.part(out, &run, split),
                    inputs: operands,
                    workgroups: self.linear(run.len().div_ceil(per_thread)),
                }
            })
            .collect())
    }
}
