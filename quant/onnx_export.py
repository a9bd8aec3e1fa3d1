"""ONNX export of a deployment file: standard operators (opset 13), ternary weights kept as int8 codes.

`to_onnx` translates the file's ops one by one (docs/deployment_format.md section 5), normalising uint8 "pixels"
[N, C, H, W] in the graph, to float32 "logits" [N, 10]. A ternary weight is dequantised in the graph, QDQ style
(zero point 0, scales per tensor or per output channel): DequantizeLinear(T, alpha) where w_p = w_n (TWN, ADMM),
else DequantizeLinear(Max(T, 0), w_p) + DequantizeLinear(Min(T, 0), w_n) (TTQ); both exact. int8 is the narrowest
type DequantizeLinear takes in opset 13 that onnxruntime's CPU provider runs. Built with onnx.helper, not
torch.onnx.export, which would trace float weights and need onnxscript.
"""
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13


def to_onnx(manifest: dict, tensors: dict) -> bytes:
    """The serialised ONNX model of an unpacked deployment file (deploy_format.unpack's two results)."""
    nodes, inits, spec = [], {}, manifest["input"]

    def const(name, array):  # an initializer, added once however many ops read it
        if name not in inits:
            inits[name] = numpy_helper.from_array(np.asarray(array), name)
        return name

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def vector(name, scale=False):  # a scale [1] becomes a scalar (per-tensor); [O] stays (per-channel, axis 0)
        value = tensors[name].float().numpy()
        return const(name, value.reshape(()) if scale and value.size == 1 else value)

    def weight(name):
        rec = next((r for r in manifest["ternary"] if r["name"] == name), None)
        if rec is None:
            return vector(name)
        codes = const(f"{name}.codes", tensors[name].numpy().astype(np.int8))
        zero = const(f"{name}.zero_point", np.zeros(rec["shape"][0] if tensors[rec["w_p"]].numel() > 1 else (),
                                                    np.int8))
        if rec["w_p"] == rec["w_n"]:
            return node("DequantizeLinear", [codes, vector(rec["w_p"], True), zero], name, axis=0)
        pos = node("Max", [codes, const(f"{name}.int8_zero", np.int8(0))], f"{name}.positive")
        neg = node("Min", [codes, f"{name}.int8_zero"], f"{name}.negative")
        return node("Add", [node("DequantizeLinear", [pos, vector(rec["w_p"], True), zero], f"{name}.w_p_part", axis=0),
                            node("DequantizeLinear", [neg, vector(rec["w_n"], True), zero], f"{name}.w_n_part",
                                 axis=0)], name)

    x = node("Cast", ["pixels"], "pixels_float", to=TensorProto.FLOAT)
    x = node("Div", [x, const("divisor", np.float32(spec["divisor"]))], "scaled")
    x = node("Sub", [x, const("mean", np.float32(spec["mean"]).reshape(1, -1, 1, 1))], "centred")
    x = node("Div", [x, const("std", np.float32(spec["std"]).reshape(1, -1, 1, 1))], "normalised")
    for i, op in enumerate(manifest["network"]):
        kind, k = op["op"], op.get("kernel_size")
        if kind == "batch_norm":
            inputs = [vector(op[key]) for key in ("weight", "bias", "running_mean", "running_var")]
        else:  # bias before weight: the initializer order fixes the ONNX bytes
            bias = [vector(op["bias"])] if op.get("bias") else []
            inputs = [weight(op["weight"]), *bias] if "weight" in op else []
        onnx_op, attrs = {"conv2d": ("Conv", {}), "linear": ("Gemm", {"transB": 1}), "relu": ("Relu", {}),
                          "batch_norm": ("BatchNormalization", {"epsilon": op.get("eps")}),
                          "max_pool2d": ("MaxPool", {"kernel_shape": [k, k], "strides": [k, k]}),
                          "flatten": ("Flatten", {"axis": 1})}[kind]
        x = node(onnx_op, [x, *inputs], f"op{i}_{kind}", **attrs)
    nodes.append(helper.make_node("Identity", [x], ["logits"], name="logits"))
    graph = helper.make_graph(
        nodes, "ternary_lenet5",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", *spec["shape"]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], initializer=list(inits.values()))
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
