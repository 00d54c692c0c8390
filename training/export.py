"""ONNX export, INT8 quantization and measurement (size, latency, operation count)."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray
from onnxruntime.quantization import QuantType, quantize_dynamic
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.pipeline import Pipeline

from training.errors import TrainingError

INPUT_NAME = "features"


def to_onnx(estimator: Any, n_features: int) -> bytes:
    """The estimator as an ONNX model: input ``features`` (float32, n x F); a regressor
    outputs ``variable`` (n x 1), a classifier ``label`` and ``probabilities`` (n x C)."""
    options = None
    final = estimator.steps[-1][1] if isinstance(estimator, Pipeline) else estimator
    if hasattr(final, "predict_proba"):
        options = {id(final): {"zipmap": False}}
    try:
        model = convert_sklearn(
            estimator,
            initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
            options=options,
            target_opset={"": 17, "ai.onnx.ml": 3},
        )
    except Exception as exc:  # skl2onnx raises many kinds; one message for all
        raise TrainingError(f"ONNX export failed: {exc}") from exc
    data: bytes = model.SerializeToString()
    return data


QUANTIZABLE_OPS = frozenset({"MatMul", "Gemm", "Conv"})


def quantize(model: bytes) -> bytes | None:
    """Dynamic INT8 quantization of the weights (MatMul/Gemm); None for a graph with no
    such operator (a tree ensemble compares thresholds: there is nothing to quantize)."""
    graph = onnx.load_from_string(model).graph
    if not any(node.op_type in QUANTIZABLE_OPS for node in graph.node):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(model)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        return dst.read_bytes()


def session(model: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, X: NDArray[np.float32]) -> NDArray[np.float32]:
    """The model's main output: the value (regressor) or the class probabilities."""
    outputs = sess.run(None, {INPUT_NAME: np.ascontiguousarray(X, dtype=np.float32)})
    result = outputs[-1] if len(outputs) > 1 else outputs[0]
    return np.asarray(result, dtype=np.float32).reshape(len(X), -1)


def run_rows(sess: ort.InferenceSession, X: NDArray[np.float32]) -> NDArray[np.float32]:
    """Row by row, as the device runs it. Dynamic INT8 quantizes activations with the
    range of each call's input, so a big batch would score differently than the field."""
    return np.concatenate([run(sess, X[i : i + 1]) for i in range(len(X))])


def median_latency_us(
    sess: ort.InferenceSession, row: NDArray[np.float32], repeat: int = 2000
) -> float:
    """Median time of one inference on ``row`` (one window), one thread."""
    feed = {INPUT_NAME: np.ascontiguousarray(row, dtype=np.float32)}
    for _ in range(50):
        sess.run(None, feed)
    times = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        sess.run(None, feed)
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1000.0


def operation_count(estimator: Any) -> dict[str, Any]:
    """Work per inference of one row, to scale x86 latency to other CPUs."""
    final = estimator.steps[-1][1] if isinstance(estimator, Pipeline) else estimator
    if hasattr(final, "estimators_"):  # gradient boosting or a random forest
        trees = [t for t in np.asarray(final.estimators_, dtype=object).ravel()]
        return {
            "kind": "tree ensemble",
            "trees": len(trees),
            "nodes": int(sum(t.tree_.node_count for t in trees)),
            "comparisons_max": int(sum(t.tree_.max_depth for t in trees)),
        }
    if hasattr(final, "coefs_"):
        macs = sum(int(w.shape[0] * w.shape[1]) for w in final.coefs_)
        return {
            "kind": "multilayer perceptron",
            "layers": [int(final.coefs_[0].shape[0]), *(int(w.shape[1]) for w in final.coefs_)],
            "multiply_adds": macs,
        }
    return {"kind": type(final).__name__}
