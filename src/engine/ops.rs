//! Typed operators: each ONNX node is parsed once, at load time, into an [`Op`] whose
//! attributes are checked and defaulted for the model's opset. Everything downstream
//! (shape inference, folding, lowering to kernels) matches on `Op`, never on strings.

use std::collections::HashMap;

use super::error::{Error, Result};
use super::onnx::{self, attribute_type};
use super::tensor::{DType, HostTensor, Storage};

/// Discriminants are the op codes of `elementwise.wgsl` (keep in sync).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnaryOp {
    Identity = 0,
    Neg = 1,
    Abs = 2,
    Sqrt = 3,
    Reciprocal = 4,
    Exp = 5,
    Log = 6,
    Sin = 7,
    Cos = 8,
    Tanh = 9,
    Sigmoid = 10,
    Relu = 11,
    Erf = 12,
    Floor = 13,
    Ceil = 14,
    Not = 15,
    /// x * sigmoid(x), produced by fusing Sigmoid -> Mul.
    Silu = 16,
}

/// Discriminants are the op codes of `elementwise.wgsl` (keep in sync).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    Add = 100,
    Sub = 101,
    Mul = 102,
    Div = 103,
    Pow = 104,
    Max = 105,
    Min = 106,
    Equal = 107,
    Less = 108,
    Greater = 109,
    LessOrEqual = 110,
    GreaterOrEqual = 111,
    And = 112,
    Or = 113,
    Xor = 114,
}

impl BinaryOp {
    pub fn is_comparison(self) -> bool {
        use BinaryOp::*;
        matches!(
            self,
            Equal | Less | Greater | LessOrEqual | GreaterOrEqual | And | Or | Xor
        )
    }
}

/// Code of the ternary `Where` in `elementwise.wgsl`.
pub const WHERE_CODE: u32 = 200;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
    Min,
    Prod,
    ArgMax,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ConvAttrs {
    pub group: usize,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    /// ONNX order: begins for every spatial axis, then ends. Empty means "from auto_pad".
    pub pads: Vec<usize>,
    pub auto_pad: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoordinateMode {
    HalfPixel,
    PytorchHalfPixel,
    AlignCorners,
    Asymmetric,
    TfHalfPixelForNearest,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NearestMode {
    RoundPreferFloor,
    RoundPreferCeil,
    Floor,
    Ceil,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeMode {
    Nearest(NearestMode),
    Linear,
}

#[derive(Clone, Debug)]
pub enum Op {
    Unary(UnaryOp),
    Binary(BinaryOp),
    Where,
    Cast(DType),
    /// numpy matmul. A third input, only ever added by fusion, is a bias broadcast over
    /// the last two axes of the result.
    MatMul,
    Gemm {
        alpha: f32,
        beta: f32,
        trans_a: bool,
        trans_b: bool,
    },
    Conv(ConvAttrs),
    InstanceNorm {
        epsilon: f32,
    },
    LayerNorm {
        axis: i64,
        epsilon: f32,
    },
    /// `per_channel_affine`: opset 21 semantics (scale/bias per channel, not per group).
    /// `silu`: SiLU applied to the result (set by fusion).
    GroupNorm {
        epsilon: f32,
        groups: usize,
        per_channel_affine: bool,
        silu: bool,
    },
    /// `legacy` (opset < 13): normalise over every axis from `axis` on.
    Softmax {
        axis: i64,
        legacy: bool,
    },
    Transpose {
        perm: Option<Vec<i64>>,
    },
    Reshape {
        allow_zero: bool,
    },
    Flatten {
        axis: i64,
    },
    Squeeze {
        axes: Option<Vec<i64>>,
    },
    Unsqueeze {
        axes: Option<Vec<i64>>,
    },
    Concat {
        axis: i64,
    },
    Slice,
    Split {
        axis: i64,
        split: Option<Vec<i64>>,
    },
    Gather {
        axis: i64,
    },
    Expand,
    Pad,
    Resize {
        mode: ResizeMode,
        coordinates: CoordinateMode,
    },
    Reduce {
        op: ReduceOp,
        axes: Option<Vec<i64>>,
        keep_dims: bool,
        noop_with_empty_axes: bool,
    },
    ArgMax {
        axis: i64,
        keep_dims: bool,
        select_last: bool,
    },
    Shape {
        start: i64,
        end: Option<i64>,
    },
    ConstantOfShape {
        value: HostTensor,
    },
    Range,
    Trilu {
        upper: bool,
    },
    /// softmax(scale * Q @ Kt) @ V over a batch of heads: the fused form of the
    /// MatMul -> Mul -> Softmax -> MatMul chain (inputs Q [B,N,D], Kt [B,D,M], V [B,M,E]).
    Attention {
        scale: f32,
    },
    /// One part of the fused attention's backward pass (attention_grad.wgsl), from inputs
    /// Q, Kt, V, the output's gradient G and, for `Statistics`, the forward output O, else
    /// the statistics.
    AttentionGrad {
        scale: f32,
        part: AttentionPart,
    },
}

/// What an `AttentionGrad` node computes. Discriminants are attention_grad.wgsl's `OP`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionPart {
    /// Per query row: the log-sum-exp of its scores and G . O, shape [.., N, 2].
    Statistics = 0,
    Query = 1,
    Key = 2,
    Value = 3,
}

/// A node's attributes, by name.
pub struct Attributes<'a> {
    by_name: HashMap<&'a str, &'a onnx::AttributeProto>,
}

impl<'a> Attributes<'a> {
    pub fn new(node: &'a onnx::NodeProto) -> Self {
        Attributes {
            by_name: node
                .attribute
                .iter()
                .map(|a| (a.name.as_str(), a))
                .collect(),
        }
    }

    fn get(&self, name: &str, kind: i32) -> Option<&'a onnx::AttributeProto> {
        self.by_name
            .get(name)
            .copied()
            .filter(|a| a.r#type == kind || a.r#type == 0)
    }

    pub fn int(&self, name: &str, default: i64) -> i64 {
        self.get(name, attribute_type::INT).map_or(default, |a| a.i)
    }

    pub fn float(&self, name: &str, default: f32) -> f32 {
        self.get(name, attribute_type::FLOAT)
            .map_or(default, |a| a.f)
    }

    pub fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.get(name, attribute_type::INTS).map(|a| a.ints.clone())
    }

    pub fn floats(&self, name: &str) -> Option<Vec<f32>> {
        self.get(name, attribute_type::FLOATS)
            .map(|a| a.floats.clone())
    }

    pub fn string(&self, name: &str, default: &str) -> String {
        self.get(name, attribute_type::STRING)
            .map_or(default.to_string(), |a| {
                String::from_utf8_lossy(&a.s).into_owned()
            })
    }

    pub fn tensor(&self, name: &str) -> Option<&'a onnx::TensorProto> {
        self.get(name, attribute_type::TENSOR)
            .and_then(|a| a.t.as_ref())
    }
}

/// Why a node cannot be parsed; turned into [`Error::Unsupported`] with the node's identity.
type ParseResult<T> = std::result::Result<T, String>;

impl Op {
    /// Parses a node of the default ONNX domain. `Constant` nodes are handled by the loader.
    pub fn parse(node: &onnx::NodeProto, opset: i64) -> Result<Op> {
        let attrs = Attributes::new(node);
        Op::parse_with(&node.op_type, &attrs, opset).map_err(|reason| Error::Unsupported {
            op_type: node.op_type.clone(),
            node: node.name.clone(),
            opset,
            reason,
        })
    }

    fn parse_with(op_type: &str, a: &Attributes, opset: i64) -> ParseResult<Op> {
        use BinaryOp as B;
        use UnaryOp as U;
        let unary = |op| Ok(Op::Unary(op));
        let binary = |op| Ok(Op::Binary(op));
        match op_type {
            "Identity" | "Dropout" => unary(U::Identity),
            "Neg" => unary(U::Neg),
            "Abs" => unary(U::Abs),
            "Sqrt" => unary(U::Sqrt),
            "Reciprocal" => unary(U::Reciprocal),
            "Exp" => unary(U::Exp),
            "Log" => unary(U::Log),
            "Sin" => unary(U::Sin),
            "Cos" => unary(U::Cos),
            "Tanh" => unary(U::Tanh),
            "Sigmoid" => unary(U::Sigmoid),
            "Relu" => unary(U::Relu),
            "Erf" => unary(U::Erf),
            "Floor" => unary(U::Floor),
            "Ceil" => unary(U::Ceil),
            "Not" => unary(U::Not),
            "Add" => binary(B::Add),
            "Sub" => binary(B::Sub),
            "Mul" => binary(B::Mul),
            "Div" => binary(B::Div),
            "Pow" => binary(B::Pow),
            "Max" => binary(B::Max),
            "Min" => binary(B::Min),
            "Equal" => binary(B::Equal),
            "Less" => binary(B::Less),
            "Greater" => binary(B::Greater),
            "LessOrEqual" => binary(B::LessOrEqual),
            "GreaterOrEqual" => binary(B::GreaterOrEqual),
            "And" => binary(B::And),
            "Or" => binary(B::Or),
            "Xor" => binary(B::Xor),
            "Where" => Ok(Op::Where),
            "Cast" => {
                let to = a.int("to", 0) as i32;
                let storage = Storage::from_onnx(to).ok_or(format!("cast to data type {to}"))?;
                Ok(Op::Cast(storage.dtype()))
            }
            "MatMul" => Ok(Op::MatMul),
            "Gemm" => Ok(Op::Gemm {
                alpha: a.float("alpha", 1.0),
                beta: a.float("beta", 1.0),
                trans_a: a.int("transA", 0) != 0,
                trans_b: a.int("transB", 0) != 0,
            }),
            "Conv" => parse_conv(a),
            "InstanceNormalization" => Ok(Op::InstanceNorm {
                epsilon: a.float("epsilon", 1e-5),
            }),
            "LayerNormalization" => Ok(Op::LayerNorm {
                axis: a.int("axis", -1),
                epsilon: a.float("epsilon", 1e-5),
            }),
            "GroupNormalization" => Ok(Op::GroupNorm {
                epsilon: a.float("epsilon", 1e-5),
                groups: positive(a.int("num_groups", 0), "num_groups")?,
                per_channel_affine: opset >= 21,
                silu: false,
            }),
            "Softmax" => Ok(Op::Softmax {
                axis: a.int("axis", if opset >= 13 { -1 } else { 1 }),
                legacy: opset < 13,
            }),
            "Transpose" => Ok(Op::Transpose {
                perm: a.ints("perm"),
            }),
            "Reshape" => Ok(Op::Reshape {
                allow_zero: a.int("allowzero", 0) != 0,
            }),
            "Flatten" => Ok(Op::Flatten {
                axis: a.int("axis", 1),
            }),
            "Squeeze" => Ok(Op::Squeeze {
                axes: a.ints("axes"),
            }),
            "Unsqueeze" => Ok(Op::Unsqueeze {
                axes: a.ints("axes"),
            }),
            "Concat" => Ok(Op::Concat {
                axis: a.int("axis", 0),
            }),
            "Slice" if opset >= 10 => Ok(Op::Slice),
            "Split" => Ok(Op::Split {
                axis: a.int("axis", 0),
                split: a.ints("split"),
            }),
            "Gather" => Ok(Op::Gather {
                axis: a.int("axis", 0),
            }),
            "Expand" => Ok(Op::Expand),
            "Pad" if opset >= 11 => match a.string("mode", "constant").as_str() {
                "constant" => Ok(Op::Pad),
                mode => Err(format!("pad mode `{mode}`")),
            },
            "Resize" if opset >= 11 => parse_resize(a),
            "ReduceSum" => parse_reduce(a, ReduceOp::Sum),
            "ReduceMean" => parse_reduce(a, ReduceOp::Mean),
            "ReduceMax" => parse_reduce(a, ReduceOp::Max),
            "ReduceMin" => parse_reduce(a, ReduceOp::Min),
            "ReduceProd" => parse_reduce(a, ReduceOp::Prod),
            "ArgMax" => Ok(Op::ArgMax {
                axis: a.int("axis", 0),
                keep_dims: a.int("keepdims", 1) != 0,
                select_last: a.int("select_last_index", 0) != 0,
            }),
            "Shape" => Ok(Op::Shape {
                start: a.int("start", 0),
                end: a.by_name.get("end").map(|e| e.i),
            }),
            "ConstantOfShape" => {
                let value = match a.tensor("value") {
                    Some(t) => super::loader::tensor_from_proto(t, None)
                        .map_err(|e| format!("value: {e}"))?,
                    None => HostTensor::f32(vec![1], vec![0.0]),
                };
                Ok(Op::ConstantOfShape { value })
            }
            "Range" => Ok(Op::Range),
            "Trilu" => Ok(Op::Trilu {
                upper: a.int("upper", 1) != 0,
            }),
            _ => Err("no kernel for this operator".to_string()),
        }
    }

    /// A short name for messages and profiles.
    pub fn name(&self) -> String {
        match self {
            Op::Unary(u) => format!("{u:?}"),
            Op::Binary(b) => format!("{b:?}"),
            Op::Reduce { op, .. } => format!("Reduce{op:?}"),
            other => {
                let debug = format!("{other:?}");
                debug
                    .split([' ', '(', '{'])
                    .next()
                    .unwrap_or_default()
                    .to_string()
            }
        }
    }
}

fn positive(value: i64, what: &str) -> ParseResult<usize> {
    if value > 0 {
        Ok(value as usize)
    } else {
        Err(format!("{what} must be positive"))
    }
}

fn parse_conv(a: &Attributes) -> ParseResult<Op> {
    let to_usize = |v: Vec<i64>| v.into_iter().map(|x| x.max(0) as usize).collect::<Vec<_>>();
    Ok(Op::Conv(ConvAttrs {
        group: positive(a.int("group", 1), "group")?,
        strides: to_usize(a.ints("strides").unwrap_or_default()),
        dilations: to_usize(a.ints("dilations").unwrap_or_default()),
        pads: to_usize(a.ints("pads").unwrap_or_default()),
        auto_pad: a.string("auto_pad", "NOTSET"),
    }))
}

fn parse_resize(a: &Attributes) -> ParseResult<Op> {
    let mode = match a.string("mode", "nearest").as_str() {
        "nearest" => ResizeMode::Nearest(
            match a.string("nearest_mode", "round_prefer_floor").as_str() {
                "round_prefer_floor" => NearestMode::RoundPreferFloor,
                "round_prefer_ceil" => NearestMode::RoundPreferCeil,
                "floor" => NearestMode::Floor,
                "ceil" => NearestMode::Ceil,
                other => return Err(format!("nearest_mode `{other}`")),
            },
        ),
        "linear" => ResizeMode::Linear,
        other => return Err(format!("resize mode `{other}`")),
    };
    let coordinates = match a
        .string("coordinate_transformation_mode", "half_pixel")
        .as_str()
    {
        "half_pixel" => CoordinateMode::HalfPixel,
        "pytorch_half_pixel" => CoordinateMode::PytorchHalfPixel,
        "align_corners" => CoordinateMode::AlignCorners,
        "asymmetric" => CoordinateMode::Asymmetric,
        "tf_half_pixel_for_nearest" => CoordinateMode::TfHalfPixelForNearest,
        other => return Err(format!("coordinate_transformation_mode `{other}`")),
    };
    if a.int("antialias", 0) != 0 {
        return Err("antialias".into());
    }
    Ok(Op::Resize { mode, coordinates })
}

fn parse_reduce(a: &Attributes, op: ReduceOp) -> ParseResult<Op> {
    Ok(Op::Reduce {
        op,
        axes: a.ints("axes"),
        keep_dims: a.int("keepdims", 1) != 0,
        noop_with_empty_axes: a.int("noop_with_empty_axes", 0) != 0,
    })
}

/// Resolves a possibly negative axis against a rank.
pub fn normalize_axis(axis: i64, rank: usize) -> std::result::Result<usize, String> {
    let r = rank as i64;
    if axis < -r || axis >= r.max(1) {
        return Err(format!("axis {axis} out of range for rank {rank}"));
    }
    Ok(if axis < 0 {
        (axis + r) as usize
    } else {
        axis as usize
    })
}

/// Numpy-style broadcast of several shapes.
pub fn broadcast_shapes(shapes: &[&[usize]]) -> std::result::Result<Vec<usize>, String> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = vec![1; rank];
    for shape in shapes {
        let offset = rank - shape.len();
        for (i, &d) in shape.iter().enumerate() {
            let o = &mut out[offset + i];
            if *o == 1 {
                *o = d;
            } else if d != 1 && d != *o {
                return Err(format!("shapes {shapes:?} do not broadcast"));
            }
        }
    }
    Ok(out)
}

/// Row-major strides of a shape.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// Strides that read `shape` (right-aligned) as if broadcast to `out`: 0 on broadcast axes.
pub fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let own = contiguous_strides(shape);
    let offset = out.len() - shape.len();
    (0..out.len())
        .map(|i| {
            if i < offset || shape[i - offset] == 1 {
                0
            } else {
                own[i - offset]
            }
        })
        .collect()
}
