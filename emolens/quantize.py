"""Static int8 quantisation of an exported model, and the gate that decides whether it may stand in for fp32.

ONNX Runtime's QDQ format: weights int8 per output channel, activations uint8 per tensor; each activation's
range is the moving average of the min and max of ``CALIBRATION_BATCH``-image calibration batches. The
convolutions, their ReLU6 (Clip: quantised as the convolution's output, so its range is [0, 6] rather than
the pre-activation's), the stride-2 pads and the residual adds are quantised; the heads (Gemm) stay fp32.
Then each convolution's bias is corrected in graph order by the mean per-channel shift of its output from
the fp32 model's on calibration images, measured with the corrections before it in place (empirical bias
correction, Nagel et al., ICCV 2019). On the default model, the top emotion agreed with fp32 on 0.963 of
the shared images without the correction and 0.977 with it; with Clip left out (the pre-activation range
quantised), 0.79.

Building a quantised model needs the ``onnx`` package (the ``torch`` extra); running one needs only
ONNX Runtime. The gate (:func:`int8_gate`) compares the two models' task figures and top emotions.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Collection, Sequence

import numpy as np

from .identity import INT8_SUFFIX

#: The most int8 may lose on a task figure (accuracy, Pearson r, ROC AUC), and the least share of images
#: whose top emotion it must keep.
MAX_LOSS = 0.01
MIN_AGREEMENT = 0.97
CALIBRATION_BATCH = 10
QUANTISED_OPS = ["Conv", "Clip", "Pad", "Add"]
#: Images whose per-channel output means drive the bias correction (one pass of the model per convolution).
BIAS_CORRECTION_IMAGES = 160


@dataclass
class GateReport:
    """The figures of both precisions on the gate's tasks, the top-emotion agreement, and the verdict."""

    fp32: dict[str, float]
    int8: dict[str, float]
    agreement: float
    images: int
    passed: bool
    reason: str | None  # why int8 may not stand in for fp32 (None: it may)
    agreement_outside_calibration: float | None = None  # on the images the calibration did not use
    images_outside_calibration: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def int8_gate(fp32: dict[str, float], int8: dict[str, float], agreement: float, images: int) -> GateReport:
    """Whether int8 may stand in for fp32: no task figure (higher is better) lower by more than
    ``MAX_LOSS``, and the same top emotion on at least ``MIN_AGREEMENT`` of ``images`` images."""
    failures = [f"{name} {int8[name]:.4f} against fp32's {value:.4f}" for name, value in fp32.items()
                if not value - int8[name] <= MAX_LOSS]  # a NaN figure fails
    if not agreement >= MIN_AGREEMENT:
        failures.append(f"the top emotion agrees with fp32 on {agreement:.3f} of {images} images "
                        f"(at least {MIN_AGREEMENT} needed)")
    reason = "int8 loses too much: " + "; ".join(failures) if failures else None
    return GateReport(dict(fp32), dict(int8), float(agreement), int(images), not failures, reason)


class _Batches:
    """ONNX Runtime's calibration reader over an (N, 3, H, W) array."""

    def __init__(self, images: np.ndarray, batch: int):
        self.images, self.batch, self.at = images, batch, 0

    def get_next(self) -> dict | None:
        if self.at >= len(self.images):
            return None
        chunk = np.ascontiguousarray(self.images[self.at:self.at + self.batch], dtype=np.float32)
        self.at += self.batch
        return {"image": chunk}


def quantize_onnx(fp32_path: str | Path, calibration: np.ndarray, out: str | Path) -> None:
    """Write the int8 version of the exported model ``fp32_path`` to ``out``, calibrated on ``calibration``
    (preprocessed model inputs, a few hundred training images) and bias-corrected against fp32."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="emolens-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))  # shapes inferred, constants folded
        heads = [n.name for n in onnx.load(str(prepared)).graph.node if n.op_type in ("Gemm", "MatMul")]
        quantised = Path(tmp) / "int8.onnx"
        quantize_static(str(prepared), str(quantised), _Batches(calibration, CALIBRATION_BATCH),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, op_types_to_quantize=QUANTISED_OPS, nodes_to_exclude=heads,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"CalibMovingAverage": True, "WeightSymmetric": True,
                                       "ActivationSymmetric": False})
        model = correct_biases(onnx.load(str(prepared)), onnx.load(str(quantised)),
                               calibration[:BIAS_CORRECTION_IMAGES])
    onnx.save(model, str(out))


def correct_biases(fp32, int8, images: np.ndarray):
    """``int8`` (an ONNX QDQ model) with each convolution's quantised bias shifted, in graph order, by the
    mean per-channel difference of its output from ``fp32``'s on ``images`` (its ReLU6 applied where the
    quantiser folded it into the convolution's output range)."""
    from onnx import numpy_helper

    fp32_outputs = {n.name: n.output[0] for n in fp32.graph.node if n.op_type == "Conv"}
    producers = {o: n for n in int8.graph.node for o in n.output}
    initialisers = {i.name: i for i in int8.graph.initializer}
    convs = [n for n in int8.graph.node if n.op_type == "Conv" and n.name in fp32_outputs and len(n.input) > 2
             and producers.get(n.input[2]) is not None and producers[n.input[2]].op_type == "DequantizeLinear"]
    # A convolution whose ReLU6 the quantiser removed writes the activation's tensor, clipped by its range.
    clipped = {n.output[0] for n in convs if n.output[0] != fp32_outputs[n.name]}
    targets = _channel_means(fp32, [n.output[0] for n in convs], images, clipped)
    for conv, target in zip(convs, targets):
        now = _channel_means(int8, [conv.output[0]], images, clipped)[0]
        bias_q = producers[conv.input[2]]
        values, scale = initialisers[bias_q.input[0]], initialisers[bias_q.input[1]]
        shift = np.round((target - now) / numpy_helper.to_array(scale).astype(np.float64)).astype(np.int64)
        corrected = numpy_helper.to_array(values).astype(np.int64) + shift
        values.CopyFrom(numpy_helper.from_array(corrected.astype(np.int32), values.name))
    return int8


def _channel_means(model, tensors: list[str], images: np.ndarray, clipped: set[str]) -> list[np.ndarray]:
    """The per-channel means of ``tensors`` (each made a graph output) over ``images``."""
    import onnx
    import onnxruntime as ort

    probe = copy.deepcopy(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Unfused, so a convolution's own output is read, before requantisation.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    sums = [0.0] * len(tensors)
    for s in range(0, len(images), 20):
        outputs = session.run(tensors, {"image": np.ascontiguousarray(images[s:s + 20], dtype=np.float32)})
        for i, (name, out) in enumerate(zip(tensors, outputs)):
            out = np.clip(out, 0.0, 6.0) if name in clipped else out
            sums[i] = sums[i] + out.astype(np.float64).sum(axis=(0, 2, 3)) / (out.shape[2] * out.shape[3])
    return [s / len(images) for s in sums]


def int8_meta(fp32_meta: dict, calibrated_on: str, gate: GateReport) -> dict:
    """The metadata of the int8 model: the fp32 model's, its own identity, how it was made, and its gate."""
    return {**fp32_meta, "precision": "int8", "model_id": fp32_meta["model_id"] + INT8_SUFFIX,
            "fp32_model_id": fp32_meta["model_id"],
            "quantization": {"format": "QDQ", "weights": "int8 per channel", "activations": "uint8 per tensor",
                             "calibration": calibrated_on, "ops": QUANTISED_OPS, "heads": "fp32",
                             "bias_correction_images": BIAS_CORRECTION_IMAGES},
            "int8_gate": gate.to_dict()}


def task_figures(outputs: dict[str, np.ndarray], positive: np.ndarray, dataset, folds: list[list[int]],
                 classes: list[str]) -> dict[str, float]:
    """A model's figures on ``dataset`` (its rows' ``outputs`` and positive probabilities), each the mean
    over the test parts ``folds``: accuracy of the head for the dataset's classes (a joint model's
    ``TAXONOMY.logits`` head, else ``logits`` where the classes match), valence and arousal Pearson r (its
    ``affect@KIND`` head, else ``affect``), and polarity ROC AUC where its images have a polarity."""
    from sklearn.metrics import roc_auc_score

    from .metrics import accuracy, affect_report

    kind, figures = dataset.kind, {}
    own = f"{dataset.taxonomy.name}.logits"
    head = own if own in outputs else ("logits" if dataset.taxonomy.classes == classes else None)
    if head is not None:
        labels = dataset.labels
        figures[f"{kind} accuracy"] = np.mean([accuracy(labels[f], outputs[head][f].argmax(1)) for f in folds])
    rating = f"affect@{kind}" if f"affect@{kind}" in outputs else "affect"
    if dataset.has_affect and rating in outputs:
        reports = [affect_report(dataset.affect[f], outputs[rating][f]) for f in folds]
        for name in ("valence", "arousal"):
            figures[f"{kind} {name} r"] = np.mean([r[f"{name}_pearson"] for r in reports])
    polar = dataset.polarities
    if (polar >= 0).any() and not np.isnan(positive).all():
        figures[f"{kind} polarity AUC"] = np.mean([roc_auc_score(polar[f][polar[f] >= 0], positive[f][polar[f] >= 0])
                                                   for f in folds])
    return {k: float(v) for k, v in figures.items()}


def measure_gate(fp32, int8, datasets: list, seed: int = 0, k: int = 5, batch: int = 32,
                 calibrated: Collection[str] = ()) -> GateReport:
    """:func:`int8_gate` of two :class:`~emolens.predict.Predictor` s of one model on ``datasets``: the
    task figures on each dataset's ``k``-fold test parts (stratified, ``seed``) and the top-emotion
    agreement on every image of every dataset, and on those not among the ``calibrated`` paths."""
    from .data import make_protocol
    from .predict import positive_probabilities, softmax

    figures = {"fp32": {}, "int8": {}}
    logits = {"fp32": [], "int8": []}
    paths = []
    for dataset in datasets:
        folds = [f.test for f in make_protocol(dataset, "kfold", seed=seed, k=k).folds]
        paths += [str(s.path) for s in dataset.samples]
        for name, predictor in (("fp32", fp32), ("int8", int8)):
            outputs: dict[str, list] = {}
            for s in range(0, len(dataset), batch):
                arrays = np.stack([predictor.prepare(x.path) for x in dataset.samples[s:s + batch]])
                for key, value in predictor.run(arrays).items():
                    outputs.setdefault(key, []).append(value)
            joined = {key: np.concatenate(v) for key, v in outputs.items()}
            positive = positive_probabilities(predictor.taxonomy, softmax(joined["logits"]), joined.get("affect"),
                                              predictor.calibration)
            figures[name].update(task_figures(joined, positive, dataset, folds, predictor.taxonomy.classes))
            logits[name].append(joined["logits"])
    agrees = np.concatenate(logits["fp32"]).argmax(1) == np.concatenate(logits["int8"]).argmax(1)
    calibrated = set(calibrated)
    outside = np.array([p not in calibrated for p in paths], dtype=bool)
    report = int8_gate(figures["fp32"], figures["int8"], float(agrees.mean()), len(agrees))
    report.agreement_outside_calibration = float(agrees[outside].mean()) if outside.any() else None
    report.images_outside_calibration = int(outside.sum())
    return report


def build_int8(fp32_path: str | Path, calibrated: Sequence[str], datasets: list, calibrated_on: str,
               out: str | Path) -> GateReport:
    """Quantise the exported model ``fp32_path`` (its metadata beside it) on the images ``calibrated``
    (paths), measure it against fp32 on ``datasets`` (:func:`measure_gate`), and write it with its
    metadata, the gate included, to ``out`` (``.onnx`` and ``.json``). Returns the gate."""
    from .predict import Predictor
    from .runtime import read_onnx_meta
    from .storage import atomic_write_bytes, atomic_write_json

    fp32 = Predictor(fp32_path)
    fp32_meta = read_onnx_meta(fp32_path)
    out = Path(out).with_suffix(".onnx")
    with tempfile.TemporaryDirectory(prefix="emolens-int8-") as tmp:
        draft = Path(tmp) / "int8.onnx"
        quantize_onnx(fp32_path, np.stack([fp32.prepare(p) for p in calibrated]), draft)
        # measured before its gate is known: the draft's metadata says it was never measured
        atomic_write_json(draft.with_suffix(".json"), int8_meta(fp32_meta, calibrated_on, int8_gate({}, {}, np.nan, 0)))
        gate = measure_gate(fp32, Predictor(draft), datasets, calibrated=calibrated)
        atomic_write_bytes(out, draft.read_bytes())
    atomic_write_json(out.with_suffix(".json"), int8_meta(fp32_meta, calibrated_on, gate))
    return gate
