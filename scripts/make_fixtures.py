"""Reference data for websd's tests, computed by onnxruntime (never by websd).

    python scripts/make_fixtures.py TINY_ONNX_DIR

TINY_ONNX_DIR is the `onnx` folder written by make_tiny_sd.py. Writes:
  tests/fixtures/tiny-sd/        the exported pipeline (copied)
  tests/fixtures/tiny-sd-io/     inputs and onnxruntime outputs per graph, as .npy
  tests/fixtures/ops/<case>/     single-operator models on awkward cases, with
                                 inputs (in_*.npy) and outputs (out_*.npy)
  tests/fixtures/graphs/<case>/  small multi-node graphs (the attention patterns)
"""
import os
import shutil
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
rng = np.random.default_rng(1234)


def run_ort(model_path, feeds):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def save_case(folder, feeds, outputs):
    os.makedirs(folder, exist_ok=True)
    for name, value in feeds.items():
        np.save(os.path.join(folder, f"in_{name}.npy"), value)
    for name, value in outputs.items():
        np.save(os.path.join(folder, f"out_{name}.npy"), value)


def tiny_sd(src):
    dst = os.path.join(ROOT, "tiny-sd")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    io = os.path.join(ROOT, "tiny-sd-io")
    shutil.rmtree(io, ignore_errors=True)
    ids = np.full((2, 77), 49407, dtype=np.int64)
    ids[:, 0] = 49406
    ids[1, 1:6] = [320, 1125, 539, 518, 3937]  # "a photo of the cat"
    cases = {
        "text_encoder": {"input_ids": ids},
        "unet": {
            "sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
            "timestep": np.array(981.0, dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, 16), dtype=np.float32),
        },
        "unet_nonsquare": {
            "sample": rng.standard_normal((1, 4, 8, 12), dtype=np.float32),
            "timestep": np.array(1.0, dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((1, 77, 16), dtype=np.float32),
        },
        "vae_decoder": {"latent_sample": rng.standard_normal((1, 4, 8, 8), dtype=np.float32)},
        "vae_encoder": {"sample": rng.uniform(-1, 1, (1, 3, 16, 12)).astype(np.float32)},
    }
    for case, feeds in cases.items():
        graph = case.split("_nonsquare")[0]
        outputs = run_ort(os.path.join(dst, graph, "model.onnx"), feeds)
        save_case(os.path.join(io, case), feeds, outputs)


# ---- single-operator cases -------------------------------------------------------------

def op_case(name, op_type, inputs, attrs=None, initializers=None, outputs=1, opset=18, external=False):
    """inputs: list of (name, array); initializers: (name, array) fed as constants."""
    attrs = attrs or {}
    initializers = initializers or []
    graph_inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for n, a in inputs]
    out_names = [f"y{i}" for i in range(outputs)]
    node = helper.make_node(op_type, [n for n, _ in inputs] + [n for n, _ in initializers if n], out_names, **attrs)
    # Optional inputs given as "" keep their position.
    node.input[:] = [n for n, _ in inputs] + [n for n, _ in initializers]
    inits = [numpy_helper.from_array(a, n) for n, a in initializers if n]
    # Output types come from ONNX shape inference, run on a graph that lists none.
    graph = helper.make_graph([node], name, graph_inputs, [], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model, strict_mode=True).graph.value_info}
    elem = graph_inputs[0].type.tensor_type.elem_type
    model.graph.output.extend(inferred.get(n, helper.make_tensor_value_info(n, elem, None)) for n in out_names)
    folder = os.path.join(ROOT, "ops", name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.onnx")
    onnx.save(model, path, save_as_external_data=external, location="weights.bin", size_threshold=0)
    feeds = dict(inputs)
    save_case(folder, feeds, run_ort(path, feeds))


def f32(*shape, low=-2.0, high=2.0):
    return rng.uniform(low, high, shape).astype(np.float32)


def op_cases():
    shutil.rmtree(os.path.join(ROOT, "ops"), ignore_errors=True)
    i64 = lambda v: np.array(v, dtype=np.int64)
    # Element-wise with numpy broadcasting, and every unary op over a wide range.
    op_case("add_broadcast", "Add", [("a", f32(3, 1, 5)), ("b", f32(4, 1))])
    op_case("sub_scalar", "Sub", [("a", f32(2, 3))], initializers=[("b", np.array(0.5, np.float32))])
    op_case("mul_broadcast", "Mul", [("a", f32(2, 1, 7, 1)), ("b", f32(3, 1, 6))])
    op_case("div", "Div", [("a", f32(5, 7)), ("b", f32(5, 7, low=0.5, high=3))])
    op_case("pow_square", "Pow", [("a", f32(13))], initializers=[("b", np.array(2.0, np.float32))])
    op_case("pow_fractional", "Pow", [("a", f32(13, low=0.1, high=4))], initializers=[("b", np.array(0.7, np.float32))])
    for op in ["Sqrt", "Exp", "Log", "Reciprocal"]:
        op_case(op.lower(), op, [("x", f32(37, low=0.05, high=5))])
    for op in ["Erf", "Tanh", "Sigmoid", "Sin", "Cos", "Neg", "Relu", "Abs", "Floor", "Ceil"]:
        op_case(op.lower(), op, [("x", np.concatenate([f32(61, low=-6, high=6), np.array([0, -0.5, 0.5, 3.9, -3.9, 20, -20], np.float32)]))])
    op_case("where_broadcast", "Where", [("c", rng.uniform(size=(3, 1)) > 0.5), ("x", f32(1, 4)), ("y", f32(3, 4))])
    op_case("equal_int", "Equal", [("a", i64([[1, 2, 3], [4, 5, 6]])), ("b", i64([2, 2, 6]))])
    op_case("less", "Less", [("a", f32(4, 5)), ("b", f32(5))])
    op_case("cast_float_to_int", "Cast", [("x", f32(9, low=-5, high=5))], {"to": TensorProto.INT64})
    op_case("cast_int_to_float", "Cast", [("x", i64([-3, 0, 7, 49407]))], {"to": TensorProto.FLOAT})
    # Matrix products.
    op_case("matmul_odd", "MatMul", [("a", f32(3, 37, 29)), ("b", f32(29, 67))])
    op_case("matmul_broadcast", "MatMul", [("a", f32(2, 1, 5, 70)), ("b", f32(3, 70, 9))])
    op_case("matmul_vector", "MatMul", [("a", f32(33)), ("b", f32(2, 33, 5))])
    op_case("matmul_77_tokens", "MatMul", [("a", f32(2, 77, 64)), ("b", f32(2, 64, 77))])
    op_case("gemm_transb", "Gemm", [("a", f32(6, 40))], {"transB": 1, "alpha": 0.5, "beta": 2.0},
            initializers=[("w", f32(30, 40)), ("c", f32(30))])
    op_case("gemm_transa", "Gemm", [("a", f32(40, 6))], {"transA": 1}, initializers=[("w", f32(40, 30))])
    # Convolutions.
    op_case("conv_3x3_pad", "Conv", [("x", f32(2, 5, 11, 9))], {"pads": [1, 1, 1, 1]},
            initializers=[("w", f32(7, 5, 3, 3)), ("b", f32(7))])
    op_case("conv_stride2", "Conv", [("x", f32(1, 4, 15, 16))], {"strides": [2, 2], "pads": [0, 0, 0, 0]},
            initializers=[("w", f32(6, 4, 3, 3))])
    op_case("conv_groups_dilation", "Conv", [("x", f32(1, 6, 12, 12))], {"group": 3, "dilations": [2, 2], "pads": [2, 2, 2, 2]},
            initializers=[("w", f32(9, 2, 3, 3)), ("b", f32(9))])
    op_case("conv_1x1", "Conv", [("x", f32(2, 70, 5, 7))], initializers=[("w", f32(65, 70, 1, 1)), ("b", f32(65))])
    # Normalisations.
    op_case("instance_norm", "InstanceNormalization", [("x", f32(2, 6, 5, 7))], {"epsilon": 1e-5},
            initializers=[("s", f32(6)), ("b", f32(6))])
    op_case("layer_norm", "LayerNormalization", [("x", f32(2, 77, 48))], {"epsilon": 1e-5},
            initializers=[("s", f32(48)), ("b", f32(48))])
    op_case("layer_norm_axis", "LayerNormalization", [("x", f32(3, 4, 10))], {"axis": -2},
            initializers=[("s", f32(4, 10)), ("b", f32(4, 10))])
    op_case("group_norm", "GroupNormalization", [("x", f32(2, 8, 3, 5))], {"num_groups": 4, "epsilon": 1e-5},
            initializers=[("s", f32(4)), ("b", f32(4))])
    op_case("group_norm_opset21", "GroupNormalization", [("x", f32(2, 8, 3, 5))], {"num_groups": 4},
            initializers=[("s", f32(8)), ("b", f32(8))], opset=21)
    op_case("softmax_last", "Softmax", [("x", f32(3, 7, 300, low=-10, high=10))])
    op_case("softmax_axis1", "Softmax", [("x", f32(2, 5, 3))], {"axis": 1})
    op_case("softmax_opset11", "Softmax", [("x", f32(2, 3, 4))], {"axis": 1}, opset=11)
    # Data movement.
    op_case("transpose", "Transpose", [("x", f32(2, 3, 4, 5))], {"perm": [0, 2, 3, 1]})
    op_case("concat_axis1", "Concat", [("a", f32(2, 3, 4)), ("b", f32(2, 1, 4)), ("c", f32(2, 5, 4))], {"axis": 1})
    op_case("concat_negative_axis", "Concat", [("a", f32(2, 3)), ("b", f32(2, 4))], {"axis": -1})
    op_case("slice_negative_step", "Slice", [("x", f32(6, 10))],
            initializers=[("st", i64([-1, 1])), ("en", i64([-100, 9])), ("ax", i64([0, 1])), ("sp", i64([-2, 3]))])
    op_case("slice_to_end", "Slice", [("x", f32(4, 7))],
            initializers=[("st", i64([2])), ("en", i64([9223372036854775807])), ("ax", i64([-1]))])
    op_case("split", "Split", [("x", f32(4, 9))], {"axis": 1}, initializers=[("sp", i64([2, 3, 4]))], outputs=3)
    op_case("gather_axis0", "Gather", [("x", f32(10, 4)), ("i", i64([[3, -1], [0, 9]]))])
    op_case("gather_axis1", "Gather", [("x", f32(3, 10, 2))], {"axis": 1}, initializers=[("i", i64([7, 2, -3]))])
    op_case("expand", "Expand", [("x", f32(3, 1))], initializers=[("s", i64([2, 3, 4]))])
    op_case("pad", "Pad", [("x", f32(1, 2, 3, 3))], initializers=[("p", i64([0, 0, 0, 1, 0, 0, 1, 2])), ("v", np.array(0.5, np.float32))])
    op_case("reshape", "Reshape", [("x", f32(2, 3, 4))], initializers=[("s", i64([0, -1]))])
    op_case("resize_nearest_2x", "Resize", [("x", f32(1, 2, 3, 5))],
            {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
            initializers=[("", np.zeros(0, np.float32)), ("sc", np.array([1, 1, 2, 2], np.float32))])
    op_case("resize_linear_half_pixel", "Resize", [("x", f32(1, 2, 4, 5))],
            {"mode": "linear", "coordinate_transformation_mode": "half_pixel"},
            initializers=[("", np.zeros(0, np.float32)), ("", np.zeros(0, np.float32)), ("sz", i64([1, 2, 7, 9]))])
    op_case("resize_linear_align_corners", "Resize", [("x", f32(1, 1, 3, 4))],
            {"mode": "linear", "coordinate_transformation_mode": "align_corners"},
            initializers=[("", np.zeros(0, np.float32)), ("sc", np.array([1, 1, 2.5, 1.5], np.float32))])
    op_case("reduce_mean", "ReduceMean", [("x", f32(3, 4, 5))], {"keepdims": 1}, initializers=[("ax", i64([-1, 0]))])
    op_case("reduce_sum", "ReduceSum", [("x", f32(3, 4, 5))], {"keepdims": 0}, initializers=[("ax", i64([1]))])
    op_case("reduce_max", "ReduceMax", [("x", f32(3, 4, 5))], {"keepdims": 0})
    op_case("argmax", "ArgMax", [("x", f32(3, 11))], {"axis": -1, "keepdims": 0})
    # Weights in an external-data file, as optimum writes for models over 2 GB.
    op_case("matmul_external_data", "MatMul", [("a", f32(3, 8))], initializers=[("w", f32(8, 5))], external=True)
    op_case("argmax_int", "ArgMax", [("x", i64([[5, 9, 9, 1], [0, -1, 2, 2]]))], {"axis": 1, "select_last_index": 1})


def binding_split_cases():
    """ops/split_*: cases larger than the 16 KiB binding limit tests/ops.rs imposes, so that
    each runs as several launches over parts of its tensors (websd splits what exceeds a
    device's storage binding limit). Odd planes and batches place the parts at unaligned
    channel and row boundaries. Own random stream: adding them changes no other fixture."""
    local = np.random.default_rng(77)
    x = lambda *shape: local.uniform(-2.0, 2.0, shape).astype(np.float32)
    op_case("split_conv_3x3", "Conv", [("x", x(2, 24, 16, 16))], {"pads": [1, 1, 1, 1]},
            initializers=[("w", x(20, 24, 3, 3)), ("b", x(20))])
    op_case("split_conv_odd_plane", "Conv", [("x", x(1, 72, 7, 9))], {"strides": [2, 2], "pads": [1, 1, 1, 1]},
            initializers=[("w", x(6, 72, 3, 3)), ("b", x(6))])
    op_case("split_group_norm", "GroupNormalization", [("x", x(2, 16, 16, 16))], {"num_groups": 4},
            initializers=[("s", x(16)), ("b", x(16))], opset=21)
    op_case("split_instance_norm_odd", "InstanceNormalization", [("x", x(2, 40, 7, 9))], {"epsilon": 1e-5},
            initializers=[("s", x(40)), ("b", x(40))])
    op_case("split_resize_nearest", "Resize", [("x", x(1, 24, 8, 8))],
            {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
            initializers=[("", np.zeros(0, np.float32)), ("sc", np.array([1, 1, 2, 2], np.float32))])
    op_case("split_resize_linear", "Resize", [("x", x(1, 12, 10, 12))],
            {"mode": "linear", "coordinate_transformation_mode": "half_pixel"},
            initializers=[("", np.zeros(0, np.float32)), ("sc", np.array([1, 1, 2, 2], np.float32))])
    op_case("split_add_broadcast", "Add", [("a", x(1, 32, 16, 16)), ("b", x(32, 1, 1))])
    op_case("split_where_broadcast", "Where",
            [("c", local.uniform(size=(1, 1, 16, 16)) > 0.5), ("x", x(2, 20, 16, 16)), ("y", x(1))])
    op_case("split_sigmoid", "Sigmoid", [("x", x(9000))])
    i64 = lambda v: np.array(v, dtype=np.int64)
    op_case("split_pad", "Pad", [("x", x(1, 24, 15, 15))], initializers=[("p", i64([0, 0, 0, 0, 0, 0, 1, 1]))])
    op_case("split_concat_axis1", "Concat", [("a", x(2, 10, 12, 12)), ("b", x(2, 14, 12, 12))], {"axis": 1})
    op_case("split_transpose", "Transpose", [("x", x(2, 40, 8, 8))], {"perm": [0, 2, 3, 1]})
    op_case("split_slice_reversed", "Slice", [("x", x(1, 30, 16, 16))],
            initializers=[("st", i64([-1])), ("en", i64([-100])), ("ax", i64([1])), ("sp", i64([-1]))])
    op_case("split_expand", "Expand", [("x", x(1, 1, 16, 16))], initializers=[("s", i64([2, 20, 16, 16]))])
    op_case("split_matmul_batched", "MatMul", [("a", x(2, 96, 32)), ("b", x(2, 32, 48))])
    op_case("split_matmul_weight", "MatMul", [("a", x(1, 130, 40))], initializers=[("w", x(40, 36))])
    op_case("split_gemm_transb", "Gemm", [("a", x(150, 30))], {"transB": 1, "alpha": 0.5, "beta": 2.0},
            initializers=[("w", x(20, 30)), ("c", x(20))])
    op_case("split_softmax_last", "Softmax", [("x", x(3, 7, 200) * 5)])
    op_case("split_gather_table", "Gather", [("table", x(300, 24)), ("i", i64([[0, 299, -1, 150], [77, -300, 5, 200]]))])
    conv_padding_cases()
    reduction_split_cases()


def conv_padding_cases():
    """ops/conv_pads_*: every way ONNX pads a convolution, begin and end apart (what graph
    optimizers write when they fold a Pad into the Conv after it). Own random stream."""
    local = np.random.default_rng(78)
    x = lambda *shape: local.uniform(-2.0, 2.0, shape).astype(np.float32)
    op_case("conv_pads_asymmetric", "Conv", [("x", x(1, 3, 9, 8))], {"pads": [1, 1, 2, 2]},
            initializers=[("w", x(4, 3, 3, 3)), ("b", x(4))])
    op_case("conv_pads_stride2_right_bottom", "Conv", [("x", x(2, 4, 10, 10))], {"strides": [2, 2], "pads": [0, 0, 1, 1]},
            initializers=[("w", x(5, 4, 3, 3))])
    op_case("conv_pads_grouped_dilated_strided", "Conv", [("x", x(1, 6, 13, 11))],
            {"group": 3, "dilations": [2, 1], "strides": [2, 3], "pads": [0, 2, 3, 1]},
            initializers=[("w", x(9, 2, 3, 3)), ("b", x(9))])
    for mode in ["SAME_UPPER", "SAME_LOWER"]:
        op_case(f"conv_pads_{mode.lower()}", "Conv", [("x", x(1, 3, 10, 7))], {"auto_pad": mode, "strides": [2, 2]},
                initializers=[("w", x(4, 3, 4, 3))])
    op_case("conv_pads_valid", "Conv", [("x", x(1, 3, 10, 7))], {"auto_pad": "VALID", "strides": [1, 2]},
            initializers=[("w", x(2, 3, 3, 2))])


def reduction_split_cases():
    """ops/split_reduce_*, split_argmax_*, split_softmax_*, split_conv_group*: the families
    that run past one binding by combining parts (reductions over any axes, ArgMax, softmax
    over a middle axis or a row longer than a binding, grouped convolution), sized past the
    16 KiB limit of tests/ops.rs. Own random stream."""
    local = np.random.default_rng(79)
    x = lambda *shape: local.uniform(-2.0, 2.0, shape).astype(np.float32)
    i64 = lambda v: np.array(v, dtype=np.int64)
    op_case("split_reduce_sum_axis0", "ReduceSum", [("x", x(40, 300))], {"keepdims": 0}, initializers=[("ax", i64([0]))])
    op_case("split_reduce_mean_middle", "ReduceMean", [("x", x(2, 3000, 3))], {"keepdims": 1}, initializers=[("ax", i64([1]))])
    op_case("split_reduce_mean_two_axes", "ReduceMean", [("x", x(3, 50, 40))], {"keepdims": 0}, initializers=[("ax", i64([0, 2]))])
    op_case("split_reduce_max_all", "ReduceMax", [("x", x(70, 90))], {"keepdims": 0})
    op_case("split_reduce_min_kept_outer", "ReduceMin", [("x", x(10, 20, 30))], {"keepdims": 1}, initializers=[("ax", i64([2]))])
    op_case("split_argmax_axis0", "ArgMax", [("x", x(5000, 3))], {"axis": 0, "keepdims": 0})
    op_case("split_argmax_middle", "ArgMax", [("x", x(3, 3000, 2))], {"axis": 1, "keepdims": 1})
    op_case("split_argmax_ties_last", "ArgMax", [("x", local.integers(0, 4, (6000,)).astype(np.int64))],
            {"axis": 0, "keepdims": 0, "select_last_index": 1})
    op_case("split_softmax_middle_blocks", "Softmax", [("x", x(6, 50, 30) * 5)], {"axis": 1})
    op_case("split_softmax_middle_long", "Softmax", [("x", x(2, 3000, 3) * 5)], {"axis": 1})
    op_case("split_softmax_long_row", "Softmax", [("x", x(2, 5000) * 5)], {"axis": -1})
    op_case("split_conv_grouped", "Conv", [("x", x(2, 16, 12, 12))], {"group": 2, "pads": [1, 1, 1, 1]},
            initializers=[("w", x(8, 8, 3, 3)), ("b", x(8))])
    op_case("split_conv_grouped_dilated_strided", "Conv", [("x", x(1, 12, 20, 20))],
            {"group": 3, "dilations": [2, 2], "strides": [2, 2], "pads": [1, 2, 2, 1]},
            initializers=[("w", x(6, 4, 3, 3)), ("b", x(6))])
    op_case("split_conv_depthwise", "Conv", [("x", x(1, 32, 12, 12))], {"group": 32, "pads": [1, 1, 1, 1]},
            initializers=[("w", x(32, 1, 3, 3))])


def external_constant_case():
    """graphs/constant_external_data: a Constant node whose value lives in the external-data
    file, as optimum's exports of SD UNets write their large Constant attributes (onnx saves
    attribute tensors externally with convert_attribute=True). Own random stream."""
    local = np.random.default_rng(80)
    c = local.uniform(-2, 2, (4, 64)).astype(np.float32)
    x = local.uniform(-2, 2, (3, 4, 64)).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(c, "c_value")),
             helper.make_node("Mul", ["x", "c"], ["y"])]
    graph = helper.make_graph(nodes, "constant_external", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    folder = os.path.join(ROOT, "graphs", "constant_external_data")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.onnx")
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx_data",
              size_threshold=0, convert_attribute=True)
    assert onnx.load(path, load_external_data=False).graph.node[0].attribute[0].t.data_location == TensorProto.EXTERNAL
    feeds = {"x": x}
    save_case(folder, feeds, run_ort(path, feeds))


def fp16_cases():
    """graphs/fp16_io and graphs/fp16_cast_edges: fp16 graphs as `optimum-cli export onnx
    --dtype fp16` writes them (fp16 inputs, weights and outputs) and as onnxruntime's float16
    converter with keep_io_types writes them (f32 edges, Casts around an fp16 body).
    out_y.npy is onnxruntime on the fp16 graph, ref_y.npy on the same graph in fp32: their
    difference is onnxruntime's own fp16 error. Own random stream."""
    local = np.random.default_rng(81)
    w = local.uniform(-0.5, 0.5, (6, 4, 3, 3)).astype(np.float16)
    b = local.uniform(-0.5, 0.5, (6,)).astype(np.float16)
    x = local.uniform(-2, 2, (1, 4, 8, 8)).astype(np.float32)
    mk = helper.make_node
    body = [mk("Conv", ["x16", "w", "b"], ["c"], pads=[1, 1, 1, 1]), mk("Sigmoid", ["c"], ["s"]), mk("Mul", ["c", "s"], ["y16"])]
    variants = {
        "fp16_io": ([mk("Identity", ["x"], ["x16"])] + body + [mk("Identity", ["y16"], ["y"])], TensorProto.FLOAT16, x.astype(np.float16)),
        "fp16_cast_edges": ([mk("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16)] + body + [mk("Cast", ["y16"], ["y"], to=TensorProto.FLOAT)],
                            TensorProto.FLOAT, x),
    }
    for name, (nodes, io_type, feed) in variants.items():
        folder = os.path.join(ROOT, "graphs", name)
        os.makedirs(folder, exist_ok=True)
        outputs = {}
        for key, dtype, init_type in [("out", io_type, np.float16), ("ref", TensorProto.FLOAT, np.float32)]:
            inits = [numpy_helper.from_array(w.astype(init_type), "w"), numpy_helper.from_array(b.astype(init_type), "b")]
            graph_nodes = nodes if init_type == np.float16 else [
                mk("Identity", [n.input[0]], [n.output[0]]) if n.op_type == "Cast" else n for n in nodes]
            graph = helper.make_graph(graph_nodes, name, [helper.make_tensor_value_info("x", dtype, x.shape)],
                                      [helper.make_tensor_value_info("y", dtype, [1, 6, 8, 8])], inits)
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
            path = os.path.join(folder, "model.onnx" if key == "out" else "reference.onnx")
            onnx.save(model, path)
            outputs[key] = run_ort(path, {"x": feed if key == "out" else feed.astype(np.float32)})["y"]
        os.remove(os.path.join(folder, "reference.onnx"))
        save_case(folder, {"x": feed}, {"y": outputs["out"]})
        np.save(os.path.join(folder, "ref_y.npy"), outputs["ref"])


def fp16_matmul_case():
    """graphs/fp16_matmul: fp16 weights read by MatMul (2-D, odd element count; batched 3-D)
    and Gemm (transB, with a bias): websd keeps them as packed halves on the GPU. out_y is
    onnxruntime in fp16, ref_y the same graph in fp32. Own random stream."""
    local = np.random.default_rng(82)
    x = local.uniform(-1, 1, (2, 3, 9)).astype(np.float16)
    weights = {
        "w1": local.uniform(-0.5, 0.5, (9, 5)),
        "w2": local.uniform(-0.5, 0.5, (2, 5, 7)),
        "w3": local.uniform(-0.5, 0.5, (4, 7)),
        "c": local.uniform(-0.5, 0.5, (4,)),
    }
    mk = helper.make_node
    nodes = [
        mk("MatMul", ["x", "w1"], ["y1"]),
        mk("MatMul", ["y1", "w2"], ["y2"]),
        mk("Flatten", ["y2"], ["f"], axis=2),
        mk("Gemm", ["f", "w3", "c"], ["y"], transB=1, alpha=0.5),
    ]
    folder = os.path.join(ROOT, "graphs", "fp16_matmul")
    os.makedirs(folder, exist_ok=True)
    outputs = {}
    for key, elem, dtype in [("out", TensorProto.FLOAT16, np.float16), ("ref", TensorProto.FLOAT, np.float32)]:
        inits = [numpy_helper.from_array(v.astype(np.float16).astype(dtype), k) for k, v in weights.items()]
        graph = helper.make_graph(nodes, "fp16_matmul", [helper.make_tensor_value_info("x", elem, x.shape)],
                                  [helper.make_tensor_value_info("y", elem, [6, 4])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        path = os.path.join(folder, "model.onnx" if key == "out" else "reference.onnx")
        onnx.save(model, path)
        outputs[key] = run_ort(path, {"x": x.astype(dtype)})["y"]
    os.remove(os.path.join(folder, "reference.onnx"))
    save_case(folder, {"x": x}, {"y": outputs["out"]})
    np.save(os.path.join(folder, "ref_y.npy"), outputs["ref"])


LARGE_N, LARGE_LAYERS = 4096, 8


def large_weight(k):
    """Layer k's [4096, 4096] weight of graphs/large_external_data: a formula that
    tests/memory.rs computes too, so the 512 MiB file is written by the test, not stored."""
    i = np.arange(LARGE_N, dtype=np.int64)[:, None]
    j = np.arange(LARGE_N, dtype=np.int64)[None, :]
    return (((i * 31 + j * 17 + k * 7) % 23).astype(np.float32) - 11.0) / np.float32(2048.0)


def large_external_data_case():
    """graphs/large_external_data: y = x W0 W1 ... W7 with 512 MiB of f32 weights in one
    external-data file `weights.bin` (tensors at offsets up to 448 MiB), for the test that
    loading it keeps host memory bounded. Only the model and its input/output are kept."""
    folder = os.path.join(ROOT, "graphs", "large_external_data")
    os.makedirs(folder, exist_ok=True)
    nodes, inits, prev = [], [], "x"
    for k in range(LARGE_LAYERS):
        inits.append(numpy_helper.from_array(large_weight(k), f"w{k}"))
        out = "y" if k == LARGE_LAYERS - 1 else f"h{k}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{k}"], [out]))
        prev = out
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, LARGE_N]) for n in ["x", "y"]]
    model = helper.make_model(helper.make_graph(nodes, "large_external_data", io[:1], io[1:], inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    path = os.path.join(folder, "model.onnx")
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
              size_threshold=0)
    x = np.random.default_rng(82).uniform(-1, 1, (1, LARGE_N)).astype(np.float32)
    save_case(folder, {"x": x}, run_ort(path, {"x": x}))
    os.remove(os.path.join(folder, "weights.bin"))


def symbolic_models():
    """Models with symbolic dimensions, for tests that pick sizes at run time."""
    # y = a + b with a of length `n`.
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n"])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "add", [a, b], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), os.path.join(ROOT, "add_symbolic.onnx"))
    # Self-attention over [batch, n, d] as SD's UNet writes it.
    dims = ["batch", "n", "d"]
    io = [helper.make_tensor_value_info(x, TensorProto.FLOAT, dims) for x in ["q", "k", "v", "y"]]
    mk = helper.make_node
    nodes = [mk("Transpose", ["k"], ["kt"], perm=[0, 2, 1]), mk("MatMul", ["q", "kt"], ["s"]),
             mk("Mul", ["s", "scale"], ["ss"]), mk("Softmax", ["ss"], ["p"], axis=-1), mk("MatMul", ["p", "v"], ["y"])]
    graph = helper.make_graph(nodes, "attention", io[:3], io[3:], [numpy_helper.from_array(np.array(0.35, np.float32), "scale")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), os.path.join(ROOT, "attention_symbolic.onnx"))
    # The index of the maximum of `n` values, for reductions past the device's binding.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, [])
    graph = helper.make_graph([helper.make_node("ArgMax", ["x"], ["y"], axis=0, keepdims=0)], "argmax", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), os.path.join(ROOT, "argmax_symbolic.onnx"))


def graph_case(name, nodes, inputs, initializers=(), opset=18):
    """A multi-node case; the last node's first output is the graph output `y`."""
    graph_inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for n, a in inputs]
    inits = [numpy_helper.from_array(a, n) for n, a in initializers]
    graph = helper.make_graph(nodes, name, graph_inputs, [], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model, strict_mode=True).graph.value_info}
    model.graph.output.extend([inferred["y"]])
    folder = os.path.join(ROOT, "graphs", name)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.onnx")
    onnx.save(model, path)
    feeds = dict(inputs)
    save_case(folder, feeds, run_ort(path, feeds))


def attention_cases():
    """Attention as exporters write it, which websd fuses into one kernel."""
    shutil.rmtree(os.path.join(ROOT, "graphs"), ignore_errors=True)
    mk = helper.make_node
    # Self-attention, heads folded into the batch, K transposed by a node, scale by Mul.
    graph_case("attention_self", [
        mk("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        mk("MatMul", ["q", "kt"], ["s"]),
        mk("Mul", ["s", "scale"], ["ss"]),
        mk("Softmax", ["ss"], ["p"], axis=-1),
        mk("MatMul", ["p", "v"], ["y"]),
    ], [("q", f32(4, 300, 40)), ("k", f32(4, 300, 40)), ("v", f32(4, 300, 40))],
        [("scale", np.array(40 ** -0.5, np.float32))])
    # Cross-attention over 77 tokens, 4-D heads, scale by Div, different value width.
    graph_case("attention_cross", [
        mk("MatMul", ["q", "kt"], ["s"]),
        mk("Div", ["s", "d"], ["ss"]),
        mk("Softmax", ["ss"], ["p"], axis=3),
        mk("MatMul", ["p", "v"], ["y"]),
    ], [("q", f32(2, 2, 65, 64)), ("kt", f32(2, 2, 64, 77)), ("v", f32(2, 2, 77, 24))],
        [("d", np.array(8.0, np.float32))])
    # fp16 weights (raw_data) cast up for an f32 MatMul, as mixed-precision exports store them.
    graph_case("fp16_weights", [
        mk("Cast", ["w16"], ["w"], to=TensorProto.FLOAT),
        mk("MatMul", ["a", "w"], ["y"]),
    ], [("a", f32(3, 9))], [("w16", f32(9, 5).astype(np.float16))])
    # Heads wider than the fused kernel holds: runs unfused, same result.
    graph_case("attention_wide_heads", [
        mk("MatMul", ["q", "kt"], ["s"]),
        mk("Softmax", ["s"], ["p"], axis=-1),
        mk("MatMul", ["p", "v"], ["y"]),
    ], [("q", f32(1, 9, 200, low=-0.2, high=0.2)), ("kt", f32(1, 200, 11)), ("v", f32(1, 11, 200))])
    external_constant_case()
    fp16_cases()
    fp16_matmul_case()
    large_external_data_case()


def fp16_converter_case():
    """graphs/fp16_converter_order: onnxruntime's float16 converter on a Conv -> Resize ->
    Conv graph, as it converts SD's VAE decoder: Resize is on its block list, so it appends
    Casts of Resize's fp16 inputs back to f32 at the end of the graph, after the Resize that
    reads them. ONNX asks for nodes in topological order, onnxruntime does not. out_y is
    onnxruntime on the converted graph, ref_y on the f32 one."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    local = np.random.default_rng(83)
    mk = helper.make_node
    # Values fp16 holds exactly, so the f32 reference computes on the same numbers.
    exact = lambda *shape: local.uniform(-0.5, 0.5, shape).astype(np.float16).astype(np.float32)
    x = 4 * exact(1, 4, 5, 5)
    inits = [numpy_helper.from_array(exact(6, 4, 3, 3), "w1"), numpy_helper.from_array(exact(3, 6, 3, 3), "w2")]
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    nodes = [mk("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]), mk("Constant", [], ["s"], value=scales),
             mk("Resize", ["c", "", "s"], ["r"], mode="nearest"), mk("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "fp16_converter_order", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 10, 10])], inits)
    reference = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    converted = convert_float_to_float16(reference, keep_io_types=False)
    defined = {i.name for i in converted.graph.initializer} | {i.name for i in converted.graph.input}
    out_of_order = False
    for node in converted.graph.node:
        out_of_order |= any(name and name not in defined for name in node.input)
        defined |= set(node.output)
    assert out_of_order, "the converter now writes nodes in order: this case tests nothing"
    folder = os.path.join(ROOT, "graphs", "fp16_converter_order")
    os.makedirs(folder, exist_ok=True)
    onnx.save(converted, os.path.join(folder, "model.onnx"))
    onnx.save(reference, os.path.join(folder, "reference.onnx"))
    ref = run_ort(os.path.join(folder, "reference.onnx"), {"x": x})["y"]
    os.remove(os.path.join(folder, "reference.onnx"))
    feed = x.astype(np.float16)
    save_case(folder, {"x": feed}, {"y": run_ort(os.path.join(folder, "model.onnx"), {"x": feed})["y"]})
    np.save(os.path.join(folder, "ref_y.npy"), ref)


def fp16_activations_case():
    """graphs/fp16_activations: an fp16 graph shaped like a VAE decoder's resnet and
    upsampler, as optimum exports them (fp16 inputs, weights and outputs; GroupNorm as
    Reshape -> InstanceNormalization -> Reshape -> Mul -> Add, SiLU as Sigmoid * x, the
    residual sum divided by an output scale of 1): websd keeps the largest (the upsampled
    image) as halves.
    out_y is onnxruntime on the fp16 graph; reference.onnx is the same graph in fp32 (kept,
    for the memory comparison) and ref_y its result. Own random stream."""
    local = np.random.default_rng(85)
    mk = helper.make_node
    f = lambda *shape: local.uniform(-0.5, 0.5, shape).astype(np.float32)
    x = 2 * f(1, 8, 16, 16)
    weights = {"w1": f(8, 8, 3, 3), "b1": f(8), "w2": f(8, 8, 3, 3), "b2": f(8),
               "w3": f(4, 8, 3, 3), "b3": f(4), "gamma": 1 + f(8, 1, 1), "beta": f(8, 1, 1),
               "ones": np.ones(4, np.float32), "zeros": np.zeros(4, np.float32), "one": np.ones((), np.float32),
               "scales": np.array([1, 1, 2, 2], np.float32)}
    shapes = {"grouped": np.array([0, 4, -1], np.int64), "shape": np.array([1, 8, 16, 16], np.int64)}
    nodes = [mk("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             mk("Reshape", ["c1", "grouped"], ["g"]),
             mk("InstanceNormalization", ["g", "ones", "zeros"], ["n"], epsilon=1e-5),
             mk("Reshape", ["n", "shape"], ["n4"]), mk("Mul", ["n4", "gamma"], ["scaled"]),
             mk("Add", ["scaled", "beta"], ["shifted"]), mk("Sigmoid", ["shifted"], ["sig"]),
             mk("Mul", ["shifted", "sig"], ["silu"]),
             mk("Conv", ["silu", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             mk("Add", ["c1", "c2"], ["sum"]), mk("Div", ["sum", "one"], ["residual"]),
             mk("Resize", ["residual", "", "scales"], ["up"], mode="nearest"),
             mk("Conv", ["up", "w3", "b3"], ["y"], pads=[1, 1, 1, 1])]
    folder = os.path.join(ROOT, "graphs", "fp16_activations")
    os.makedirs(folder, exist_ok=True)
    for name, elem, dtype in [("model.onnx", TensorProto.FLOAT16, np.float16), ("reference.onnx", TensorProto.FLOAT, np.float32)]:
        inits = [numpy_helper.from_array(v if k == "scales" else v.astype(dtype), k) for k, v in weights.items()]
        inits += [numpy_helper.from_array(v, k) for k, v in shapes.items()]
        graph = helper.make_graph(nodes, "fp16_activations", [helper.make_tensor_value_info("x", elem, x.shape)],
                                  [helper.make_tensor_value_info("y", elem, [1, 4, 32, 32])], inits)
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), os.path.join(folder, name))
    feed = x.astype(np.float16)
    save_case(folder, {"x": feed}, run_ort(os.path.join(folder, "model.onnx"), {"x": feed}))
    np.save(os.path.join(folder, "ref_y.npy"), run_ort(os.path.join(folder, "reference.onnx"), {"x": feed.astype(np.float32)})["y"])


def narrow_tile_cases():
    """Products a few columns wide (the GEMM core's 4-, 8- and 16-column tiles) and batches
    folded into one product: convolutions whose columns span images, MatMuls whose batch
    becomes rows. A generator of their own, so the cases above keep their data."""
    local = np.random.default_rng(77)
    f = lambda *shape: local.uniform(-2.0, 2.0, shape).astype(np.float32)
    op_case("matmul_fold_2_rows", "MatMul", [("a", f(2, 1, 50)), ("b", f(50, 90))])
    op_case("matmul_fold_6_rows", "MatMul", [("a", f(2, 3, 40)), ("b", f(40, 70))])
    op_case("matmul_7_columns", "MatMul", [("a", f(70, 33)), ("b", f(33, 7))])
    op_case("matmul_3_columns", "MatMul", [("a", f(130, 20)), ("b", f(20, 3))])
    op_case("conv_batch_1px", "Conv", [("x", f(2, 70, 1, 1))], {"pads": [1, 1, 1, 1]},
            initializers=[("w", f(67, 70, 3, 3)), ("b", f(67))])
    op_case("conv_batch_2x2", "Conv", [("x", f(2, 24, 2, 2))], {"pads": [1, 1, 1, 1]},
            initializers=[("w", f(70, 24, 3, 3))])
    op_case("conv_batch_straddle", "Conv", [("x", f(3, 5, 3, 1))], {"pads": [1, 1, 1, 1]},
            initializers=[("w", f(7, 5, 3, 3)), ("b", f(7))])
    op_case("conv_batch_grouped", "Conv", [("x", f(2, 6, 2, 1))], {"group": 2, "pads": [1, 1, 1, 1]},
            initializers=[("w", f(4, 3, 3, 3))])


def one_tap_cases():
    """Filters that reach past their image everywhere but at one tap (websd runs them as a
    1x1 convolution of that tap): a 3x3 kernel on 1x1 pixels, and a dilated one whose tap
    lies past the padding (a negative pad once the other taps are gone)."""
    local = np.random.default_rng(78)
    f = lambda *shape: local.uniform(-2.0, 2.0, shape).astype(np.float32)
    op_case("conv_one_tap", "Conv", [("x", f(1, 9, 1, 1))], {"pads": [1, 1, 1, 1]},
            initializers=[("w", f(5, 9, 3, 3)), ("b", f(5))])
    op_case("conv_one_tap_dilated", "Conv", [("x", f(2, 5, 2, 2))],
            {"dilations": [3, 3], "pads": [2, 2, 3, 3]}, initializers=[("w", f(6, 5, 3, 3))])
    op_case("conv_one_tap_row", "Conv", [("x", f(2, 4, 1, 6))], {"pads": [1, 0, 1, 0]},
            initializers=[("w", f(3, 4, 3, 1))])


def norm_variant_cases():
    """Rows on both sides of the length where websd stops normalising a row per thread and
    shares one per workgroup (256): layer norms over 256 and 257 channels, and a group norm
    of 2 rows of 1800 elements (a UNet's few long rows)."""
    local = np.random.default_rng(91)
    f = lambda *shape: local.uniform(-3.0, 3.0, shape).astype(np.float32)
    for channels in [256, 257]:
        op_case(f"layer_norm_{channels}_channels", "LayerNormalization", [("x", f(3, 5, channels))],
                {"epsilon": 1e-5}, initializers=[("scale", f(channels)), ("bias", f(channels))])
    op_case("group_norm_long_rows", "GroupNormalization", [("x", f(1, 4, 30, 30))], {"num_groups": 2, "epsilon": 1e-5},
            initializers=[("scale", f(4)), ("bias", f(4))], opset=21)


if __name__ == "__main__":
    tiny_sd(sys.argv[1])
    op_cases()
    binding_split_cases()
    attention_cases()
    symbolic_models()
    narrow_tile_cases()
    one_tap_cases()
    norm_variant_cases()
    fp16_converter_case()
    fp16_activations_case()
