//! Ops that read whole rows: normalisations (norm.wgsl), softmax and reductions.

use std::ops::Range;
use std::sync::Arc;

use super::super::graph::{Node, ValueId};
use super::super::kernels::{KernelKey, Launch, Operand, Params, Shader, grid};
use super::super::ops::{ReduceOp, contiguous_strides, normalize_axis};
use super::super::tensor::{DType, HostTensor, numel};
use super::{LowerResult, Lowering, MAX_RANK, check_rank};

/// Most elements one workgroup of reduce.wgsl or softmax.wgsl reduces in one launch: 4096
/// per lane (16384 for softmax's 64) keeps their loops well inside lavapipe's 65535
/// iterations, where it stops a loop silently. Longer rows run in parts.
const MAX_ROW_PER_LAUNCH: usize = 1 << 20;

/// Rows per workgroup when each thread owns one (rows.wgsl's WORKGROUP then).
const ROWS_PER_GROUP: usize = 64;

/// Threads sharing a row that is not a thread's own, below 2M elements.
const SHARED_ROW_THREADS: u32 = 64;

/// Threads per row of `rows` rows of `len` elements (rows.wgsl's `ROW_THREADS`): one for
/// short rows (a thread's pass over them is short, and a workgroup's barriers cost CPU
/// adapters more than the row), and for rows up to 2048 long when there are enough to
/// keep a device busy (a transformer's LayerNorm at any SD size: 5x faster on lavapipe
/// and SwiftShader at [2, 4096, 320]); otherwise 64 (a UNet's GroupNorm: 64 long rows),
/// or 256 past 64 * 32768 elements, where 64 threads would loop past lavapipe's limit.
fn row_threads(rows: usize, len: usize) -> u32 {
    match len {
        0..=256 => 1,
        257..=2048 if rows >= 512 => 1,
        0x20_0001.. => 256,
        _ => SHARED_ROW_THREADS,
    }
}

/// Workgroups for `rows` rows reduced by `threads` threads each.
fn row_groups(rows: usize, threads: u32, max_groups: u32) -> [u32; 3] {
    match threads {
        1 => grid(rows.div_ceil(ROWS_PER_GROUP), max_groups),
        _ => grid(rows, max_groups),
    }
}

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
        let words = [self.words(x, len), self.words(out, len)];
        let runs = self.runs(rows, &words, usize::MAX, "normalised row")?;
        let split = runs.len() > 1;
        let threads = row_threads(rows, len);
        let kernel = KernelKey {
            half_input: self.half(x),
            half_output: self.half(out),
            row_threads: threads,
            ..Shader::Norm.into()
        };
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
                    kernel,
                    params: params.0,
                    output: self.part(out, &elements, split),
                    inputs: vec![
                        self.part(x, &elements, split),
                        Operand::Value(scale),
                        bias.clone(),
                    ],
                    workgroups: row_groups(run.len(), threads, self.max_groups),
                }
            })
            .collect();
        Ok(launches)
    }

    /// Softmax over `axis`, the input viewed as [outer, len, inner]. Past one binding,
    /// launches take runs of whole [len, inner] blocks; a block too large for one binding
    /// runs in parts along `len`, in two phases (softmax.wgsl).
    pub(super) fn softmax(&self, node: &Node, axis: i64, legacy: bool) -> LowerResult<Vec<Launch>> {
        let (x, out) = (Self::input(node, 0)?, node.outputs[0]);
        let shape = self.shape(x);
        let axis = normalize_axis(axis, shape.len())?;
        let outer = numel(&shape[..axis]);
        let (len, inner) = match legacy {
            true => (numel(&shape[axis..]), 1),
            false => (shape[axis], numel(&shape[axis + 1..])),
        };
        let block = len * inner;
        let unused = Operand::Constant(Arc::new(HostTensor::f32(vec![1], vec![0.0])));
        let launch = |elements: Range<usize>,
                      rows: usize,
                      len: usize,
                      phase: [usize; 2],
                      stats: &Operand| {
            let (input, in_base) = self.windowed(x, &elements);
            let (output, out_base) = self.windowed(out, &elements);
            let params = Params::default()
                .u(rows)
                .u(len)
                .u(inner)
                .u(in_base)
                .u(out_base)
                .u(phase[0])
                .u(phase[1])
                .u(0);
            // Rows split in parts (phases 1 and 2) are long: a workgroup each.
            let threads = match phase[0] {
                0 => row_threads(rows, len),
                _ => SHARED_ROW_THREADS,
            };
            Launch {
                kernel: KernelKey {
                    row_threads: threads,
                    ..Shader::Softmax.into()
                },
                params: params.0,
                output,
                inputs: vec![input, stats.clone()],
                workgroups: row_groups(rows, threads, self.max_groups),
            }
        };
        let room = self.max_binding.saturating_sub(self.align);
        let short_rows = len <= MAX_ROW_PER_LAUNCH;
        if short_rows && (outer * block <= self.max_binding || block <= room) {
            let per = match outer * block <= self.max_binding {
                true => outer.max(1),
                false => room / block.max(1),
            };
            return Ok((0..outer)
                .step_by(per)
                .map(|start| {
                    let run = start..(start + per).min(outer);
                    launch(
                        run.start * block..run.end * block,
                        run.len() * inner,
                        len,
                        [0, 0],
                        &unused,
                    )
                })
                .collect());
        }
        if 2 * inner > self.max_binding || inner > room {
            return Err(format!(
                "softmax over {len} elements with {inner} columns exceeds the storage binding limit"
            ));
        }
        let per = (room / inner).min(MAX_ROW_PER_LAUNCH);
        let stats = Operand::Constant(Arc::new(HostTensor::f32(
            vec![2 * inner],
            vec![0.0; 2 * inner],
        )));
        let mut launches = Vec::new();
        for o in 0..outer {
            for phase in [1, 2] {
                for start in (0..len).step_by(per) {
                    let end = (start + per).min(len);
                    let elements = o * block + start * inner..o * block + end * inner;
                    let first = (start == 0) as usize;
                    launches.push(launch(elements, inner, end - start, [phase, first], &stats));
                }
            }
        }
        Ok(launches)
    }

    /// Reduces `axes` of `x` (ArgMax: one axis). Past one binding, or past
    /// `MAX_ROW_PER_LAUNCH` elements per output, the input is cut at the outermost axis
    /// `s` whose inner block fits both: every index of the axes before `s`, times runs along
    /// `s`, is one launch over a contiguous window of the input and of the output. Launches
    /// after the first over the same outputs (a reduced axis at or before `s`) combine with
    /// what is there.
    pub(super) fn reduce(
        &self,
        op: ReduceOp,
        out: ValueId,
        x: ValueId,
        axes: &[usize],
        select_last: bool,
    ) -> LowerResult<Vec<Launch>> {
        let shape = self.shape(x);
        check_rank(shape.len())?;
        let reduce = ReduceLaunch {
            op,
            in_type: self.dtype(x),
            select_last,
            mean_count: axes.iter().map(|&a| shape[a]).product::<usize>() as f32,
        };
        let rank = shape.len();
        let strides = contiguous_strides(shape);
        let kept = |d: usize| !axes.contains(&d);
        // Output elements per index of each input axis (0 for reduced axes).
        let mut out_strides = vec![0; rank];
        let mut block = 1;
        for d in (0..rank).rev().filter(|&d| kept(d)) {
            out_strides[d] = block;
            block *= shape[d];
        }
        let (n_in, n_out) = (numel(shape), numel(self.shape(out)));
        // Reduced elements per output from axis `d` on.
        let reduced_from = |d: usize| -> usize {
            axes.iter()
                .filter(|&&a| a >= d)
                .map(|&a| shape[a])
                .product()
        };
        if n_in <= self.max_binding && reduced_from(0) <= MAX_ROW_PER_LAUNCH {
            let whole = reduce.params(shape, &strides, axes, n_out, [0, 0], false, 0);
            let unused = Operand::Constant(Arc::new(HostTensor::f32(vec![1], vec![0.0])));
            return Ok(vec![Launch {
                kernel: reduce.kernel(),
                params: whole.0,
                output: Operand::Value(out),
                inputs: vec![Operand::Value(x), unused],
                workgroups: grid(n_out, self.max_groups),
            }]);
        }
        // Room for one index of axis `s` and the slack of an aligned-down window start.
        let room = self.max_binding.saturating_sub(self.align);
        let s = (0..rank)
            .find(|&s| numel(&shape[s + 1..]) <= room && reduced_from(s + 1) <= MAX_ROW_PER_LAUNCH)
            .ok_or("no axis leaves a part that fits one binding")?;
        let mut per = room / numel(&shape[s + 1..]);
        if !kept(s) {
            per = per.min(MAX_ROW_PER_LAUNCH / reduced_from(s + 1));
        }
        let local_axes: Vec<usize> = axes.iter().filter(|&&a| a >= s).map(|&a| a - s).collect();
        let mut launches = Vec::new();
        // Argmax's running maxima, one buffer per window of outputs.
        let mut maxima: Vec<(usize, Operand)> = Vec::new();
        let unused = Operand::Constant(Arc::new(HostTensor::f32(vec![1], vec![0.0])));
        for outer in 0..numel(&shape[..s]) {
            let index: Vec<usize> = unravel(outer, &shape[..s]);
            let in_start: usize = (0..s).map(|d| index[d] * strides[d]).sum();
            let out_start: usize = (0..s).map(|d| index[d] * out_strides[d]).sum();
            let first_of_outputs = (0..s).all(|d| kept(d) || index[d] == 0);
            for run in (0..shape[s]).step_by(per.max(1)) {
                let run = run..(run + per).min(shape[s]);
                let mut part_shape = shape[s..].to_vec();
                part_shape[0] = run.len();
                let inputs = in_start + run.start * strides[s]..in_start + run.end * strides[s];
                let outputs = match kept(s) {
                    true => {
                        out_start + run.start * out_strides[s]..out_start + run.end * out_strides[s]
                    }
                    false => out_start..out_start + block_after(shape, s, &kept),
                };
                let accumulate = !first_of_outputs || (!kept(s) && run.start > 0);
                let index_offset = match axes {
                    [a] if *a < s => index[*a],
                    [a] if *a == s => run.start,
                    _ => 0,
                };
                let (input_window, in_base) = self.windowed(x, &inputs);
                let (output_window, out_base) = self.windowed(out, &outputs);
                let best = match op {
                    ReduceOp::ArgMax => best_values(&mut maxima, &outputs),
                    _ => unused.clone(),
                };
                let params = reduce.params(
                    &part_shape,
                    &strides[s..],
                    &local_axes,
                    outputs.len(),
                    [in_base, out_base],
                    accumulate,
                    index_offset,
                );
                launches.push(Launch {
                    kernel: reduce.kernel(),
                    params: params.0,
                    output: output_window,
                    inputs: vec![input_window, best],
                    workgroups: grid(outputs.len(), self.max_groups),
                });
            }
        }
        Ok(launches)
    }
}

/// The running-maxima buffer of the argmax launches that write `outputs` (made on first
/// use; `list` holds one per window of outputs, by its start).
fn best_values(list: &mut Vec<(usize, Operand)>, outputs: &Range<usize>) -> Operand {
    if let Some((_, b)) = list.iter().find(|(start, _)| *start == outputs.start) {
        return b.clone();
    }
    let n = outputs.len().max(1);
    let b = Operand::Constant(Arc::new(HostTensor::f32(vec![n], vec![0.0; n])));
    list.push((outputs.start, b.clone()));
    b
}

/// Output elements one index of axis `s` covers when `s` is reduced: the kept axes after it.
fn block_after(shape: &[usize], s: usize, kept: &impl Fn(usize) -> bool) -> usize {
    (s + 1..shape.len())
        .filter(|&d| kept(d))
        .map(|d| shape[d])
        .product()
}

/// The multi-index of linear index `i` in `shape` (row-major).
fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        index[d] = i % shape[d];
        i /= shape[d];
    }
    index
}

/// What every launch of one reduction shares.
struct ReduceLaunch {
    op: ReduceOp,
    in_type: DType,
    select_last: bool,
    mean_count: f32,
}

impl ReduceLaunch {
    fn kernel(&self) -> KernelKey {
        KernelKey {
            op: Some(self.op as u32),
            ..Shader::Reduce.into()
        }
    }

    /// reduce.wgsl's parameters for a launch over a part of `shape` (strides of the whole
    /// tensor) reducing `axes`, writing `n` outputs.
    #[allow(clippy::too_many_arguments)]
    fn params(
        &self,
        shape: &[usize],
        strides: &[usize],
        axes: &[usize],
        n: usize,
        [in_base, out_base]: [usize; 2],
        accumulate: bool,
        index_offset: usize,
    ) -> Params {
        let kept: Vec<usize> = (0..shape.len()).filter(|i| !axes.contains(i)).collect();
        let pick =
            |list: &[usize], of: &[usize]| list.iter().map(|&i| of[i] as isize).collect::<Vec<_>>();
        Params::default()
            .u(n)
            .u(kept.len())
            .u(axes.len())
            .u(axes.iter().map(|&a| shape[a]).product())
            .u((self.in_type != DType::F32) as usize)
            .u(self.select_last as usize)
            .u(in_base)
            .u(out_base)
            .u(accumulate as usize)
            .u(index_offset)
            .f(self.mean_count)
            .u(0)
            .array(pick(&kept, shape), MAX_RANK)
            .array(pick(&kept, strides), MAX_RANK)
            .array(pick(axes, shape), MAX_RANK)
            .array(pick(axes, strides), MAX_RANK)
    }
}
