//! Matrix products: MatMul and Gemm (matmul.wgsl), and the fused attention (attention.wgsl)
//! and its backward passes (attention_grad.wgsl).

use super::super::graph::Node;
use super::super::kernels::{KernelKey, Launch, Operand, Params, Shader, gemm_tile_columns};
use super::super::ops::{AttentionPart, broadcast_shapes, broadcast_strides, contiguous_strides};
use super::super::tensor::numel;
use super::{LowerResult, Lowering};

impl Lowering<'_> {
    pub(super) fn matmul(
        &self,
        node: &Node,
        gemm: Option<(f32, f32, bool, bool)>,
    ) -> LowerResult<Vec<Launch>> {
        let (a, b, out) = (
            Self::input(node, 0)?,
            Self::input(node, 1)?,
            node.outputs[0],
        );
        // A MatMul's third input (set by fusion) is a bias over [M, N], like Gemm's C.
        let (alpha, beta, trans_a, trans_b) = gemm.unwrap_or((1.0, 1.0, false, false));
        // 1-D operands act as a row (A) or a column (B) vector.
        let a_shape: Vec<usize> = match self.shape(a) {
            [k] => vec![1, *k],
            s => s.to_vec(),
        };
        let b_shape: Vec<usize> = match self.shape(b) {
            [k] => vec![*k, 1],
            s => s.to_vec(),
        };
        // One B for every matrix of A (a linear layer's weight): A's batch folds into its
        // rows, one product of batch x M rows, so B is staged once for all of them (and the
        // few-row products at a UNet's smallest levels get rows enough to fill a tile).
        let bias = node.inputs.get(2).copied().flatten();
        let bias_per_row = bias.is_some_and(|c| {
            let s = self.shape(c);
            s.len() >= 2 && s[s.len() - 2] > 1
        });
        let a_shape = if !trans_a && !bias_per_row && numel(&b_shape[..b_shape.len() - 2]) == 1 {
            let k = a_shape[a_shape.len() - 1];
            vec![numel(&a_shape) / k, k]
        } else {
            a_shape
        };
        let (ar, br) = (a_shape.len(), b_shape.len());
        let (a_strides, b_strides) = (contiguous_strides(&a_shape), contiguous_strides(&b_shape));
        let (m, k, a_m, a_k) = if trans_a {
            (
                a_shape[ar - 1],
                a_shape[ar - 2],
                a_strides[ar - 1],
                a_strides[ar - 2],
            )
        } else {
            (
                a_shape[ar - 2],
                a_shape[ar - 1],
                a_strides[ar - 2],
                a_strides[ar - 1],
            )
        };
        let (n, b_k, b_n) = if trans_b {
            (b_shape[br - 2], b_strides[br - 1], b_strides[br - 2])
        } else {
            (b_shape[br - 1], b_strides[br - 2], b_strides[br - 1])
        };
        let batch_shape = broadcast_shapes(&[&a_shape[..ar - 2], &b_shape[..br - 2]])?;
        if batch_shape.len() > 4 {
            return Err("MatMul with more than 4 batch axes".into());
        }
        // Batch strides in matrices, scaled to elements; 0 on broadcast axes.
        let batch_strides = |shape: &[usize]| -> Vec<isize> {
            let matrix = shape[shape.len() - 2] * shape[shape.len() - 1];
            broadcast_strides(&shape[..shape.len() - 2], &batch_shape)
                .iter()
                .map(|&s| (s * matrix) as isize)
                .collect()
        };
        let (bias_m, bias_n) = match bias {
            Some(c) => {
                let s = broadcast_strides(self.shape(c), &[m, n]);
                (s[0], s[1])
            }
            None => (0, 0),
        };
        let batch: usize = batch_shape.iter().product();
        if batch > self.max_groups as usize {
            return Err(format!(
                "MatMul batch {batch} exceeds {} workgroups",
                self.max_groups
            ));
        }
        let params = |m: usize, batch_shape: &[usize]| {
            Params::default()
                .u(m)
                .u(n)
                .u(k)
                .u(batch_shape.len())
                .u(a_m)
                .u(a_k)
                .u(b_k)
                .u(b_n)
                .f(alpha)
                .f(beta)
                .u(bias.is_some() as usize)
                .u(bias_m)
                .u(bias_n)
                .u(0)
                .u(0)
                .u(0)
                .array(batch_shape.iter().map(|&d| d as isize), 4)
                .array(batch_strides(&a_shape), 4)
                .array(batch_strides(&b_shape), 4)
        };
        let fits = [Some(a), Some(b), Some(out), bias]
            .iter()
            .flatten()
            .all(|&v| numel(self.shape(v)) <= self.max_binding);
        let tile_columns = gemm_tile_columns(n);
        let kernel = KernelKey {
            tile_columns,
            ..self.gemm_kernel(Shader::MatMul, b)
        };
        if fits {
            // Few rows, many columns: computed transposed, its rows on the narrow tiles.
            let swapped = tile_columns == 64 && gemm_tile_columns(m) < 64;
            let (gemm_m, gemm_n) = if swapped { (n, m) } else { (m, n) };
            let tile_columns = gemm_tile_columns(gemm_n);
            let kernel = KernelKey {
                tile_columns,
                swapped,
                ..kernel
            };
            let groups = [
                gemm_n.div_ceil(tile_columns as usize) as u32,
                gemm_m.div_ceil(64) as u32,
                batch as u32,
            ];
            let inputs = vec![
                Operand::Value(a),
                Operand::Value(b),
                Operand::Value(bias.unwrap_or(a)),
            ];
            return Ok(vec![self.launch(
                kernel,
                params(m, &batch_shape),
                out,
                inputs,
                groups,
            )]);
        }
        // Past the binding limit (unfused attention scores of the VAE's mid block at 768 px
        // and up): per matrix of the batch, runs of output rows with their rows of A and the
        // whole of that matrix's B.
        if trans_a || bias_m != 0 {
            return Err(
                "a transposed A or a per-row bias past the binding limit cannot be split".into(),
            );
        }
        let (a_batch, b_batch) = (batch_strides(&a_shape), batch_strides(&b_shape));
        let runs = self.runs(m, &[n, k], usize::MAX, "matrix row")?;
        let mut launches = Vec::new();
        for index in 0..batch {
            let (mut rest, mut a_base, mut b_base) = (index, 0, 0);
            for d in (0..batch_shape.len()).rev() {
                let coordinate = (rest % batch_shape[d]) as isize;
                rest /= batch_shape[d];
                a_base += coordinate * a_batch[d];
                b_base += coordinate * b_batch[d];
            }
            let (a_base, b_base, out_base) = (a_base as usize, b_base as usize, index * m * n);
            // A B of halves starts at half the offset: twice the alignment in elements.
            let b_align = if self.halves[b] { 2 } else { 1 } * self.align;
            if ![a_base, out_base]
                .iter()
                .all(|o| o.is_multiple_of(self.align))
                || !b_base.is_multiple_of(b_align)
            {
                return Err("matrices of this size cannot be split at aligned offsets".into());
            }
            for run in &runs {
                let rows = Operand::Part(a, a_base + run.start * k..a_base + run.end * k);
                launches.push(Launch {
                    kernel,
                    params: params(run.len(), &[]).0,
                    output: Operand::Part(out, out_base + run.start * n..out_base + run.end * n),
                    inputs: vec![
                        rows.clone(),
                        Operand::Part(b, b_base..b_base + k * n),
                        // An unused bias binding repeats A's rows.
                        bias.map_or(rows, Operand::Value),
                    ],
                    workgroups: [
                        n.div_ceil(tile_columns as usize) as u32,
                        run.len().div_ceil(64) as u32,
                        1,
                    ],
                });
            }
        }
        Ok(launches)
    }

    pub(super) fn attention(&self, node: &Node, scale: f32) -> LowerResult<Vec<Launch>> {
        let (q, kt, v, out) = (
            Self::input(node, 0)?,
            Self::input(node, 1)?,
            Self::input(node, 2)?,
            node.outputs[0],
        );
        let (qs, ks, vs) = (self.shape(q), self.shape(kt), self.shape(v));
        let r = qs.len();
        let (n, d, m, e) = (qs[r - 2], qs[r - 1], ks[r - 1], vs[r - 1]);
        let batch = numel(&qs[..r - 2]);
        let params = Params::default()
            .u(n)
            .u(m)
            .u(d)
            .u(e)
            .f(scale)
            .u(n * d)
            .u(d)
            .u(1)
            .u(d * m)
            .u(m)
            .u(1)
            .u(m * e)
            .u(e)
            .u(1);
        let groups = [n.div_ceil(64) as u32, 1, batch as u32];
        let inputs = vec![Operand::Value(q), Operand::Value(kt), Operand::Value(v)];
        let kernel = KernelKey {
            head_quads: [d, e].map(|c| c.div_ceil(4) as u32),
            ..Shader::Attention.into()
        };
        Ok(vec![self.launch(kernel, params, out, inputs, groups)])
    }

    /// One pass of the attention's backward pass: one thread per query row (statistics,
    /// dQ) or per key (dKt, dV).
    pub(super) fn attention_grad(
        &self,
        node: &Node,
        scale: f32,
        part: AttentionPart,
    ) -> LowerResult<Vec<Launch>> {
        let inputs = (0..5)
            .map(|i| Self::input(node, i).map(Operand::Value))
            .collect::<LowerResult<Vec<_>>>()?;
        let (qs, ks, vs) = (
            self.shape(Self::input(node, 0)?),
            self.shape(Self::input(node, 1)?),
            self.shape(Self::input(node, 2)?),
        );
        let r = qs.len();
        let (n, d, m, e) = (qs[r - 2], qs[r - 1], ks[r - 1], vs[r - 1]);
        let params = Params::default().u(n).u(m).u(d).u(e).f(scale);
        let rows = match part {
            AttentionPart::Statistics | AttentionPart::Query => n,
            AttentionPart::Key | AttentionPart::Value => m,
        };
        let groups = [rows.div_ceil(64) as u32, 1, numel(&qs[..r - 2]) as u32];
        let kernel = KernelKey {
            op: Some(part as u32),
            ..Shader::AttentionGrad.into()
        };
        Ok(vec![self.launch(
            kernel,
            params,
            node.outputs[0],
            inputs,
            groups,
        )])
    }
}
