//! Data movement: strided copies (Transpose, Expand, Slice, Concat, Split, Pad) through one
//! copy kernel, and Gather.

use std::ops::Range;

use super::super::graph::{Node, ValueId};
use super::super::infer;
use super::super::kernels::{KernelKey, Launch, Operand, Params, Shader};
use super::super::ops::{broadcast_strides, contiguous_strides, normalize_axis};
use super::super::tensor::numel;
use super::{LowerResult, Lowering, MAX_RANK, check_rank};

/// The lowest and highest element offsets a group of copied elements touches.
#[derive(Clone, Copy)]
struct Span {
    lo: isize,
    hi: isize,
}

impl Span {
    fn shifted(self, by: isize) -> Span {
        Span {
            lo: self.lo + by,
            hi: self.hi + by,
        }
    }

    fn union(self, other: Span) -> Span {
        Span {
            lo: self.lo.min(other.lo),
            hi: self.hi.max(other.hi),
        }
    }
}

/// One launch of a copy: the copy's elements it covers, the windows of `src` and `out` it
/// binds, and the bases relative to those windows.
struct CopyRun {
    elements: Range<usize>,
    src_window: Range<usize>,
    out_window: Range<usize>,
    src_base: isize,
    out_base: isize,
}

impl Lowering<'_> {
    pub(super) fn transpose(&self, node: &Node, perm: Option<&[i64]>) -> LowerResult<Vec<Launch>> {
        let (x, out) = (Self::input(node, 0)?, node.outputs[0]);
        let shape = self.shape(x);
        let perm = infer::transpose_perm(perm, shape.len())?;
        let src = contiguous_strides(shape);
        let strides = perm.iter().map(|&p| src[p] as isize).collect();
        self.copy(out, x, self.shape(out), strides, 0, 0)
    }

    pub(super) fn expand(&self, node: &Node) -> LowerResult<Vec<Launch>> {
        let (x, out) = (Self::input(node, 0)?, node.outputs[0]);
        let strides = broadcast_strides(self.shape(x), self.shape(out))
            .iter()
            .map(|&s| s as isize)
            .collect();
        self.copy(out, x, self.shape(out), strides, 0, 0)
    }

    pub(super) fn slice(&self, node: &Node) -> LowerResult<Vec<Launch>> {
        let (x, out) = (Self::input(node, 0)?, node.outputs[0]);
        let plan = infer::slice_plan(&self.infos(node))?;
        let src = contiguous_strides(self.shape(x));
        let base = plan
            .starts
            .iter()
            .zip(&src)
            .map(|(&s, &st)| (s * st) as isize)
            .sum();
        let strides = plan
            .steps
            .iter()
            .zip(&src)
            .map(|(&step, &st)| step as isize * st as isize)
            .collect();
        self.copy(out, x, &plan.shape, strides, base, 0)
    }

    /// One copy per non-empty input, each into its window of the output.
    pub(super) fn concat(&self, node: &Node, axis: i64) -> LowerResult<Vec<Launch>> {
        let out = node.outputs[0];
        let out_shape = self.shape(out);
        let axis = normalize_axis(axis, out_shape.len())?;
        let out_strides = contiguous_strides(out_shape);
        let mut offset = 0;
        let mut launches = Vec::new();
        for &input in node.inputs.iter().flatten() {
            let shape = self.shape(input);
            if numel(shape) > 0 {
                let strides = contiguous_strides(shape)
                    .iter()
                    .map(|&s| s as isize)
                    .collect();
                let base = offset * out_strides[axis];
                launches.extend(self.copy(out, input, shape, strides, 0, base)?);
            }
            offset += shape[axis];
        }
        Ok(launches)
    }

    /// One copy per output, each from its window of the input.
    pub(super) fn split(&self, node: &Node, axis: i64) -> LowerResult<Vec<Launch>> {
        let x = Self::input(node, 0)?;
        let in_shape = self.shape(x);
        let axis = normalize_axis(axis, in_shape.len())?;
        let src = contiguous_strides(in_shape);
        let strides: Vec<isize> = src.iter().map(|&s| s as isize).collect();
        let mut offset = 0;
        let mut launches = Vec::new();
        for &o in &node.outputs {
            let shape = self.shape(o);
            let base = (offset * src[axis]) as isize;
            launches.extend(self.copy(o, x, shape, strides.clone(), base, 0)?);
            offset += shape[axis];
        }
        Ok(launches)
    }

    /// Strided copy of `shape` elements from `src` into `out` (see copy.wgsl). Past the
    /// binding limit, launches take runs of the copy's leading axes, each binding the spans
    /// of `out` and `src` it touches; a copy whose runs touch too much (a transpose of a huge
    /// tensor) is an error.
    fn copy(
        &self,
        out: ValueId,
        src: ValueId,
        shape: &[usize],
        src_strides: Vec<isize>,
        src_base: isize,
        out_base: usize,
    ) -> LowerResult<Vec<Launch>> {
        check_rank(shape.len())?;
        // Offsets into the output follow its own layout; for Concat the copy is a window of it.
        let out_shape = self.shape(out);
        let out_strides: Vec<isize> = if out_shape.len() == shape.len() {
            contiguous_strides(out_shape)
        } else {
            contiguous_strides(shape)
        }
        .iter()
        .map(|&s| s as isize)
        .collect();
        let launch = |elements: Range<usize>, bases: [isize; 2], operands: [Operand; 2]| {
            let params = Params::default()
                .u(elements.len())
                .u(shape.len())
                .i(bases[0])
                .i(bases[1])
                .u(elements.start)
                .array(shape.iter().map(|&d| d as isize), MAX_RANK)
                .array(src_strides.iter().copied(), MAX_RANK)
                .array(out_strides.iter().copied(), MAX_RANK);
            let [src, out] = operands;
            Launch {
                kernel: Shader::Copy.into(),
                params: params.0,
                output: out,
                inputs: vec![src],
                workgroups: self.linear(elements.len()),
            }
        };
        let fits = [out, src]
            .iter()
            .all(|&v| numel(self.shape(v)) <= self.max_binding);
        if fits {
            let whole = [Operand::Value(src), Operand::Value(out)];
            return Ok(vec![launch(
                0..numel(shape),
                [src_base, out_base as isize],
                whole,
            )]);
        }
        let runs = self.copy_runs(
            shape,
            &src_strides,
            &out_strides,
            src_base,
            out_base as isize,
        )?;
        Ok(runs
            .into_iter()
            .map(|run| {
                let parts = [
                    Operand::Part(src, run.src_window),
                    Operand::Part(out, run.out_window),
                ];
                launch(run.elements, [run.src_base, run.out_base], parts)
            })
            .collect())
    }

    /// Runs of a copy too large for whole bindings: units are the positions of the leading
    /// axes (as few as leave inner spans that fit), grouped while the `out` and `src` spans
    /// of the group fit one binding from aligned starts.
    fn copy_runs(
        &self,
        shape: &[usize],
        src_strides: &[isize],
        out_strides: &[isize],
        src_base: isize,
        out_base: isize,
    ) -> LowerResult<Vec<CopyRun>> {
        // The offsets the axes from `k` on reach, for given strides.
        let extent = |k: usize, strides: &[isize]| {
            shape[k..].iter().zip(&strides[k..]).fold(
                Span { lo: 0, hi: 0 },
                |span, (&n, &stride)| {
                    let reach = (n as isize - 1).max(0) * stride;
                    Span {
                        lo: span.lo + reach.min(0),
                        hi: span.hi + reach.max(0),
                    }
                },
            )
        };
        let k = (1..=shape.len())
            .find(|&k| {
                self.span_fits(extent(k, src_strides)) && self.span_fits(extent(k, out_strides))
            })
            .ok_or("a copy whose every slice spans more than a binding cannot be split")?;
        let inner = numel(&shape[k..]);
        let (src_extent, out_extent) = (extent(k, src_strides), extent(k, out_strides));
        // The spans of `src` and `out` that each unit touches, in row-major order.
        let units: Vec<(Span, Span)> = (0..numel(&shape[..k]))
            .map(|unit| {
                let mut rest = unit;
                let (mut s, mut o) = (src_base, out_base);
                for d in (0..k).rev() {
                    let coordinate = (rest % shape[d]) as isize;
                    rest /= shape[d];
                    s += coordinate * src_strides[d];
                    o += coordinate * out_strides[d];
                }
                (src_extent.shifted(s), out_extent.shifted(o))
            })
            .collect();
        let mut runs = Vec::new();
        let mut first = 0;
        while first < units.len() {
            let (mut src, mut out) = units[first];
            if !(self.span_fits(src) && self.span_fits(out)) {
                return Err(
                    "a slice of this copy does not fit a binding at an aligned offset".into(),
                );
            }
            let mut end = first + 1;
            while let Some(&(s, o)) = units.get(end) {
                let (s, o) = (src.union(s), out.union(o));
                if !(self.span_fits(s) && self.span_fits(o)) {
                    break;
                }
                (src, out, end) = (s, o, end + 1);
            }
            let (src_window, out_window) = (self.window(src), self.window(out));
            runs.push(CopyRun {
                elements: first * inner..end * inner,
                src_base: src_base - src_window.start as isize,
                out_base: out_base - out_window.start as isize,
                src_window,
                out_window,
            });
            first = end;
        }
        Ok(runs)
    }

    /// The elements a binding of `span` covers, from the aligned offset at or below it.
    fn window(&self, span: Span) -> Range<usize> {
        let start = span.lo - span.lo.rem_euclid(self.align as isize);
        start as usize..span.hi as usize + 1
    }

    fn span_fits(&self, span: Span) -> bool {
        self.window(span).len() <= self.max_binding
    }

    pub(super) fn pad(&self, node: &Node) -> LowerResult<Vec<Launch>> {
        let (x, out) = (Self::input(node, 0)?, node.outputs[0]);
        let infos = self.infos(node);
        let (begin, end) = infer::pad_amounts(&infos)?;
        if begin.iter().chain(&end).any(|&p| p < 0) {
            return Err("negative padding (cropping) is not supported on the GPU".into());
        }
        let value = infer::const_input(&infos, 2, "the pad value")?
            .map(|v| v.cast(self.dtype(out)).to_gpu_words()[0])
            .unwrap_or(0);
        let n = numel(self.shape(out));
        let runs = self.runs(n, &[1], usize::MAX, "element")?;
        let split = runs.len() > 1;
        let mut launches: Vec<Launch> = runs
            .into_iter()
            .map(|run| Launch {
                kernel: Shader::Fill.into(),
                params: Params::default().u(run.len()).u(value as usize).0,
                output: self.part(out, &run, split),
                inputs: vec![],
                workgroups: self.linear(run.len()),
            })
            .collect();
        let out_strides = contiguous_strides(self.shape(out));
        let base = begin
            .iter()
            .zip(&out_strides)
            .map(|(&b, &s)| b as usize * s)
            .sum();
        let src = contiguous_strides(self.shape(x))
            .iter()
            .map(|&s| s as isize)
            .collect();
        launches.extend(self.copy(out, x, self.shape(x), src, 0, base)?);
        Ok(launches)
    }

    /// Past the binding limit the table is cut into runs of rows (along axis 0 only); each
    /// launch writes the outputs whose index falls in its run.
    pub(super) fn gather(&self, node: &Node, axis: i64) -> LowerResult<Vec<Launch>> {
        let (data, idx, out) = (
            Self::input(node, 0)?,
            Self::input(node, 1)?,
            node.outputs[0],
        );
        let shape = self.shape(data);
        let axis = normalize_axis(axis, shape.len())?;
        let (outer, inner) = (numel(&shape[..axis]), numel(&shape[axis + 1..]));
        // Rows of halves (`half_weights` keeps only even ones) are half as many words.
        let halves = self.halves[data];
        let row_words = if halves { inner / 2 } else { inner };
        let runs = self.runs(shape[axis], &[row_words], usize::MAX, "gathered row")?;
        let split = runs.len() > 1;
        if split && outer > 1 {
            return Err("a Gather past the binding limit must gather along its first axis".into());
        }
        let n = numel(self.shape(out));
        Ok(runs
            .into_iter()
            .map(|run| Launch {
                kernel: KernelKey {
                    half_weights: halves,
                    ..Shader::Gather.into()
                },
                params: Params::default()
                    .u(n)
                    .u(inner)
                    .u(numel(self.shape(idx)))
                    .u(shape[axis])
                    .u(run.start)
                    .u(run.len())
                    .0,
                output: Operand::Value(out),
                inputs: vec![
                    self.part(data, &(run.start * inner..run.end * inner), split),
                    Operand::Value(idx),
                ],
                workgroups: self.linear(n),
            })
            .collect())
    }
}
