"""ONNX export of a deployment file: standard operators (opset 13), ternary weights kept as int8 codes.

`to_onnx(manifest, tensors)` translates the file's op list one op at a time, so the ONNX model computes what
the file specifies (docs/deployment_format.md, "Ops"):

    input "pixels"  uint8 [N, C, H, W]  -> Cast -> Div(divisor) -> Sub(mean) -> Div(std)   the file's normalisation
    conv2d -> Conv (stride 1, no padding)      batch_norm -> BatchNormalization (files packed with --no-fold-bn)
    relu -> Relu    max_pool2d -> MaxPool (kernel = stride)    flatten -> Flatten(axis=1)    linear -> Gemm(transB=1)
    output "logits" float32 [N, 10]

A ternary weight is stored as its int8 codes T and dequantised in the graph, QDQ style (DequantizeLinear,
zero point 0, one scale per output channel on axis 0, or one per tensor):
    w_p = w_n = alpha (TWN, ADMM):  W = DequantizeLinear(T, alpha)
    w_p != w_n (TTQ):               W = DequantizeLinear(Max(T, 0), w_p) + DequantizeLinear(Min(T, 0), w_n)
Both are exact: every product is a level times 0 or +-1. int8 is the narrowest integer type that
DequantizeLinear takes in opset 13 and onnxruntime's CPU provider runs.

The graph is built with onnx.helper rather than torch.onnx.export: the exporter of recent torch versions needs
onnxscript and would trace float weights from a model, where translating the file keeps its codes, folded
BatchNorm and normalisation exactly as stored.
"""
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13


def to_onnx(manifest: dict, tensors: dict) -> bytes:
    """The serialised ONNX model of an unpacked deployment file (deploy_format.unpack's two results)."""
    nodes, inits, names = [], [], set()
    spec = manifest["input"]
    channels = len(spec["mean"])

    def const(name, array):  # an initializer, added once however many ops read it
        if name not in names:
            names.add(name)
            inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def scale(name):  # [1] -> scalar (per-tensor), [O] stays (per-channel, axis 0)
        value = tensors[name].float().numpy()
        return const(name, value.reshape(()) if value.size == 1 else value)

    def weight(name):
        rec = next((r for r in manifest["ternary"] if r["name"] == name), None)
        if rec is None:
            return const(name, tensors[name].float().numpy())
        codes = const(f"{name}.codes", tensors[name].numpy().astype(np.int8))
        zero = const(f"{name}.zero_point", np.zeros(rec["shape"][0] if tensors[rec["w_p"]].numel() > 1 else (),
                                                    np.int8))
        if rec["w_p"] == rec["w_n"]:
            return node("DequantizeLinear", [codes, scale(rec["w_p"]), zero], name, axis=0)
        pos = node("Max", [codes, const(f"{name}.int8_zero", np.int8(0))], f"{name}.positive")
        neg = node("Min", [codes, f"{name}.int8_zero"], f"{name}.negative")
        return node("Add", [node("DequantizeLinear", [pos, scale(rec["w_p"]), zero], f"{name}.w_p_part", axis=0),
                            node("DequantizeLinear", [neg, scale(rec["w_n"]), zero], f"{name}.w_n_part", axis=0)],
                    name)

    def vector(name):
        return const(name, tensors[name].float().numpy())

    x = node("Cast", ["pixels"], "pixels_float", to=TensorProto.FLOAT)
    x = node("Div", [x, const("divisor", np.float32(spec["divisor"]))], "scaled")
    x = node("Sub", [x, const("mean", np.float32(spec["mean"]).reshape(1, channels, 1, 1))], "centred")
    x = node("Div", [x, const("std", np.float32(spec["std"]).reshape(1, channels, 1, 1))], "normalised")
    for i, op in enumerate(manifest["network"]):
        out, kind = f"op{i}_{op['op']}", op["op"]
        bias = [vector(op["bias"])] if kind in ("conv2d", "linear") and op["bias"] else []
        if kind == "conv2d":
            x = node("Conv", [x, weight(op["weight"]), *bias], out)
        elif kind == "linear":
            x = node("Gemm", [x, weight(op["weight"]), *bias], out, transB=1)
        elif kind == "batch_norm":
            x = node("BatchNormalization", [x, *(vector(op[k]) for k in ("weight", "bias", "running_mean",
                                                                        "running_var"))], out, epsilon=op["eps"])
        elif kind == "relu":
            x = node("Relu", [x], out)
        elif kind == "max_pool2d":
            k = op["kernel_size"]
            x = node("MaxPool", [x], out, kernel_shape=[k, k], strides=[k, k])
        elif kind == "flatten":
            x = node("Flatten", [x], out, axis=1)
    nodes.append(helper.make_node("Identity", [x], ["logits"], name="logits"))
    graph = helper.make_graph(
        nodes, "ternary_lenet5",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", *spec["shape"]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="quant.onnx_export",
                              doc_string="Ternary LeNet-5; input: raw uint8 pixels, normalised in the graph.")
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def load_onnx(model):
    """A callable uint8 pixels [N, C, H, W] -> float32 logits tensor, running the ONNX model (path or bytes)
    in onnxruntime on the CPU."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.log_severity_level = 3  # no warnings about initializers the optimiser folded away
    source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else model
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return lambda pixels: torch.from_numpy(session.run(["logits"], {"pixels": np.asarray(pixels, np.uint8)})[0])
