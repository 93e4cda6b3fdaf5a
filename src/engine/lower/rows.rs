//! Ops that read whole rows: normalisations (norm.wgsl), softmax and reductions.

use std::sync::Arc;

use super::super::graph::{Node, ValueId};
use super::super::kernels::{KernelKey, Launch, Operand, Params, Shader, grid};
use super::super::ops::{contiguous_strides, normalize_axis};
use super::super::tensor::{DType, HostTensor, numel};
use super::{LowerResult, Lowering, MAX_RANK, check_rank};

impl Lowering<'_> {
    /// `layout` = [row_mod, row_mul, col_div] (see norm.wgsl); `silu` applies SiLU after.
    pub(super) fn norm(
        &self,
        node: &Node,
        rows: usize,
        len: usize,
        layout: [usize; 3],
        epsilon: f32,
        silu: bool,
    ) -> LowerResult<Vec<Launch>> {
        let (x, scale, out) = (
            Self::input(node, 0)?,
            Self::input(node, 1)?,
            node.outputs[0],
        );
        let bias = match node.inputs.get(2).copied().flatten() {
            Some(b) => Operand::Value(b),
            None => Operand::Constant(Arc::new(HostTensor::f32(vec![len], vec![0.0; len]))),
        };
        let runs = self.runs(rows, &[len], usize::MAX, "normalised row")?;
        let split = runs.len() > 1;
        let launches = runs
            .into_iter()
            .map(|run| {
                let params = Params::default()
                    .u(run.len())
                    .u(len)
                    .u(layout[0])
                    .u(layout[1])
                    .u(layout[2])
                    .f(epsilon)
                    .u(silu as usize)
                    .u(run.start);
                let elements = run.start * len..run.end * len;
                Launch {
                    kernel: Shader::Norm.into(),
                    params: params.0,
                    output: self.part(out, &elements, split),
                    inputs: vec![
                        self.part(x, &elements, split),
                        Operand::Value(scale),
                        bias.clone(),
                    ],
                    workgroups: grid(run.len(), self.max_groups),
                }
            })
            .collect();
        Ok(launches)
    }

    /// Rows over the last axis are contiguous: past the binding limit, launches take runs
    /// of them.
    pub(super) fn softmax(&self, node: &Node, axis: i64, legacy: bool) -> LowerResult<Vec<Launch>> {
        let (x, out) = (Self::input(node, 0)?, node.outputs[0]);
        let shape = self.shape(x);
        let axis = normalize_axis(axis, shape.len())?;
        let outer = numel(&shape[..axis]);
        let (len, inner) = match legacy {
            true => (numel(&shape[axis..]), 1),
            false => (shape[axis], numel(&shape[axis + 1..])),
        };
        let runs = match inner {
            1 => self.runs(outer, &[len], usize::MAX, "softmax row")?,
            _ => std::iter::once(0..outer * inner).collect(),
        };
        let split = runs.len() > 1;
        Ok(runs
            .into_iter()
            .map(|run| {
                let elements = run.start * len..run.end * len;
                Launch {
                    kernel: Shader::Softmax.into(),
                    params: Params::default().u(run.len()).u(len).u(inner).0,
                    output: self.part(out, &elements, split),
                    inputs: vec![self.part(x, &elements, split)],
                    workgroups: grid(run.len(), self.max_groups),
                }
            })
            .collect())
    }

    pub(super) fn reduce(
        &self,
        op: u32,
        out: ValueId,
        x: ValueId,
        axes: &[usize],
        select_last: bool,
    ) -> LowerResult<Launch> {
        let shape = self.shape(x);
        check_rank(shape.len())?;
        let strides = contiguous_strides(shape);
        let kept: Vec<usize> = (0..shape.len()).filter(|i| !axes.contains(i)).collect();
        let pick =
            |list: &[usize], of: &[usize]| list.iter().map(|&i| of[i] as isize).collect::<Vec<_>>();
        let n = numel(self.shape(out));
        let params = Params::default()
            .u(n)
            .u(kept.len())
            .u(axes.len())
            .u(axes.iter().map(|&a| shape[a]).product())
            .u((self.dtype(x) != DType::F32) as usize)
            .u(select_last as usize)
            .u(0)
            .u(0)
            .array(pick(&kept, shape), MAX_RANK)
            .array(pick(&kept, &strides), MAX_RANK)
            .array(pick(axes, shape), MAX_RANK)
            .array(pick(axes, &strides), MAX_RANK);
        let key = KernelKey {
            shader: Shader::Reduce,
            op: Some(op),
        };
        Ok(self.launch(key, params, out, vec![Operand::Value(x)], self.linear(n)))
    }
}
