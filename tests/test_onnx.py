"""quant/onnx_export.py: the ONNX model of a deployment file runs in onnxruntime and predicts what the
checkpoint's ternary model predicts, with int8 codes and QDQ dequantisation in the graph, for equal levels
(TWN / ADMM), unequal levels (TTQ), per-channel scales, a layer kept FP and unfolded BatchNorm."""
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from quant import deploy_format as df
from quant.data import normalise
from quant.export import rebuild_model
from quant.onnx_export import load_onnx, to_onnx
from test_deploy_format import make_export, pixels


@pytest.mark.parametrize("variant, fold_bn, encoding", [("twn", True, "entropy"), ("all", True, "2bit"),
                                                        ("mixed", True, "base3"), ("all", False, "entropy")])
def test_onnxruntime_matches_the_checkpoint(variant, fold_bn, encoding):
    images = pixels(64)
    with torch.no_grad():
        expected = rebuild_model(make_export(variant))(normalise(images[:, 0]))
    model = to_onnx(*df.unpack(df.pack(make_export(variant), encoding, fold_bn=fold_bn)))
    logits = load_onnx(model)(images)  # raw uint8 pixels: the graph normalises them
    assert logits.shape == (64, 10)
    assert torch.equal(logits.argmax(1), expected.argmax(1))
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def initializers(model: bytes) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load_from_string(model).graph.initializer}


def test_graph_stores_int8_codes_and_dequantizes_them():
    export = make_export("all")
    manifest, tensors = df.unpack(df.pack(export, "2bit"))
    model = to_onnx(manifest, tensors)
    graph = onnx.load_from_string(model).graph
    ops = [n.op_type for n in graph.node]
    assert ops[:4] == ["Cast", "Div", "Sub", "Div"]  # normalisation in the graph
    assert ops.count("DequantizeLinear") == 2 * 4 and "BatchNormalization" not in ops  # w_p and w_n parts, BN folded
    init = initializers(model)
    for rec in manifest["ternary"]:
        codes = init[f"{rec['name']}.codes"]
        assert codes.dtype == np.int8 and np.array_equal(codes, tensors[rec["name"]].numpy())
        assert rec["name"] not in init  # no float copy of a ternary weight
    assert {i.name: i.type.tensor_type.elem_type for i in graph.input} == {"pixels": onnx.TensorProto.UINT8}
    # 581,408 one-byte codes plus ~3 KB of scales, biases and graph
    assert 581_408 < len(model) < 581_408 + 16_000


def test_equal_levels_use_one_dequantize_per_layer():
    ops = [n.op_type for n in onnx.load_from_string(to_onnx(*df.unpack(df.pack(make_export("twn"))))).graph.node]
    assert ops.count("DequantizeLinear") == 4 and "Max" not in ops


def test_unfolded_bn_becomes_batchnormalization():
    model = to_onnx(*df.unpack(df.pack(make_export("mixed"), fold_bn=False)))
    ops = [n.op_type for n in onnx.load_from_string(model).graph.node]
    assert ops.count("BatchNormalization") == 2 and ops.count("Conv") == 2 and ops.count("Gemm") == 2
    assert "conv1.weight" in initializers(model)  # conv1 is kept FP in "mixed": a float weight
