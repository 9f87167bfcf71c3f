"""A tiny ONNX model with the WD14 taggers' signature, built with onnx's helper API, and its tag list.

Input ``input_1:0`` float32 (N, size, size, 3) BGR 0..255, output (N, tags) sigmoid confidences of
``weights @ mean colour + bias``, so the tags a picture gets depend on its colour in a known way.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# name, category (9 rating, 0 general, 4 character), weights on the mean (blue, green, red) in 0..1, bias.
TAGS = [
    ("general", 9, (0, 0, 0), 3.0),
    ("sensitive", 9, (0, 0, 0), -3.0),
    ("questionable", 9, (0, 0, 0), -3.0),
    ("explicit", 9, (0, 0, 0), -3.0),
    ("red_background", 0, (0, 0, 6), -3.0),
    ("hat_(object)", 0, (0, 0, 3.5), -3.0),
    ("^_^", 0, (6, 0, 0), -3.0),
    ("long_hair", 0, (2.5, 0, 0), -3.0),
    ("hatsune_miku", 4, (0, 5, 0), -3.0),
    ("kagamine_rin", 4, (0, 4.5, 0), -3.0),
    ("o_o", 0, (0, 6, 0), -3.0),
    ("white_background", 0, (4, 4, 4), -10.0),
]


def expected_confidences(rgb_means: tuple[float, float, float]) -> dict[str, float]:
    """What the model computes for a picture whose (preprocessed) mean colour is ``rgb_means`` in 0..255."""
    bgr = np.array(rgb_means[::-1], dtype=np.float64) / 255.0
    return {name: float(1 / (1 + np.exp(-(np.dot(w, bgr) + b)))) for name, _, w, b in TAGS}


def write_tiny_wd14(folder: Path, size: int = 32, tags: list = TAGS, output_tags: int | None = None) -> Path:
    """``model.onnx`` and ``selected_tags.csv`` in ``folder``; ``output_tags`` makes the model disagree with the list."""
    folder.mkdir(parents=True, exist_ok=True)
    count = output_tags or len(tags)
    weights = np.zeros((3, count), dtype=np.float32)
    bias = np.zeros(count, dtype=np.float32)
    for index, (_, _, w, b) in enumerate(tags[:count]):
        weights[:, index] = np.array(w, dtype=np.float32) / 255.0  # the model sees 0..255
        bias[index] = b
    nodes = [
        helper.make_node("Transpose", ["input_1:0"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("GlobalAveragePool", ["nchw"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["means"], axis=1),
        helper.make_node("MatMul", ["means", "weights"], ["product"]),
        helper.make_node("Add", ["product", "bias"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_wd14",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["batch", count])],
        initializer=[numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by older onnxruntime builds too
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    with open(folder / "selected_tags.csv", "w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["tag_id", "name", "category", "count"])
        for index, (name, category, _, _) in enumerate(tags):
            writer.writerow([1000 + index, name, category, 500 - index])
    return folder
