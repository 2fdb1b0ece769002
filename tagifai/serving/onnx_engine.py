"""ONNX Runtime inference for a classifier checkpoint: the same model, fewer wasted FLOPs.

Why: per example, PyTorch spends as long dispatching HF's modules as multiplying matrices (a
one-text prediction: ~20 ms eager vs ~10 ms here, at 1 thread), and a batch padded to its
longest text computes on pad tokens. Here the graph runs in ONNX Runtime, and a batch is cut,
in length order, into runs of at most TOKENS_PER_RUN padded tokens: almost no padding, and GEMMs
still large enough to run near the machine's matmul rate (`python -m benchmarks.run`, `inference`).

Export cost: tracing a transformer into ONNX takes seconds, too slow to pay for every checkpoint
the flow evaluates. So the graph is exported once per architecture (backbone config, number of
classes, library versions) from a copy whose weights are all distinct random values; each of the
graph's weight tensors is then identified with the parameter (or its transpose) it holds. That
template is cached on disk without its weights (a few hundred kB); loading a checkpoint fills in
its weights and starts a session (well under a second for MiniLM).

`quantize=True` gives the int8 variant: every weight MatMul becomes ONNX Runtime's
DynamicQuantizeMatMul, weights symmetric int8 per output column, activations quantized per call.

`load_engine` checks every session it builds against the PyTorch model on a probe batch; any
failure there (ONNX Runtime missing, an architecture that does not export, a mismatch) returns
None with the reason logged, and the caller keeps PyTorch.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from tagifai.batching import TokenizedSplit, pad_batch
from tagifai.model import TextClassifier
from tagifai.settings import user_cache_dir

logger = logging.getLogger(__name__)

# Padded tokens per session run. At 1 thread, 128-512 ran ~1.7x faster than one padded batch of 64
# (2,368 tokens); larger runs lose to padding and cache misses, smaller ones to per-run overhead.
TOKENS_PER_RUN = 512
OPSET = 17
INPUTS = ("input_ids", "attention_mask")
MAPPING_KEY = "tagifai.weights"  # metadata: graph initializer -> [parameter name, transposed]
PROBE_TOLERANCE = 1e-3  # max |logit difference| fp32 ONNX vs PyTorch on the probe batch (seen: ~1e-6)
# Weight tensors the graph may keep as they are: constants of the architecture, not parameters.
MAX_UNMAPPED_FLOATS = 16


def cache_dir() -> Path:
    """Exported graph templates: $XDG_CACHE_HOME/tagifai/onnx (else ~/.cache/tagifai/onnx)."""
    return user_cache_dir() / "onnx"


def template_key(model: TextClassifier) -> str:
    """What decides the exported graph: the architecture and the code that exports and runs it."""
    import onnxruntime
    import transformers

    config = model.backbone.config.to_dict()
    parts = {
        "config": {k: v for k, v in sorted(config.items()) if k not in ("transformers_version", "_name_or_path")},
        "classes": model.head.out_features,
        "pooling": model.pooling,
        "versions": [torch.__version__, transformers.__version__, onnxruntime.__version__],
        "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _randomized_copy(model: TextClassifier) -> TextClassifier:
    """The same architecture with eager attention (plain ops, no data-dependent mask code) and every
    parameter set to distinct random values, so each exported weight names its parameter uniquely."""
    from transformers import AutoModel

    backbone = AutoModel.from_config(model.backbone.config, attn_implementation="eager")
    copy = TextClassifier(backbone, model.head.out_features, 0.0, model.pooling).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in copy.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return copy


def export_template(model: TextClassifier):
    """The classifier's ONNX graph, weights removed, with the initializer -> parameter mapping."""
    import onnx
    from onnx import numpy_helper

    copy = _randomized_copy(model)
    # A batch with padding, so the traced graph handles masks; lengths and batch stay dynamic.
    ids = torch.tensor([[101, 2000, 2001, 2002, 102], [101, 2003, 102, 0, 0]])
    mask = (ids != 0).long()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings: the probe check is what counts
        torch.onnx.export(
            copy,
            (ids, mask),
            buffer,
            input_names=list(INPUTS),
            output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"}},
            opset_version=OPSET,
            dynamo=False,
        )
    graph = onnx.load_from_string(buffer.getvalue())
    by_shape: dict[tuple, list[tuple[str, np.ndarray]]] = {}
    for name, parameter in copy.named_parameters():
        by_shape.setdefault(tuple(parameter.shape), []).append((name, parameter.detach().numpy()))
    mapping, unmapped = {}, []
    for initializer in graph.graph.initializer:
        value = numpy_helper.to_array(initializer)
        match = None
        if value.dtype == np.float32:
            for name, array in by_shape.get(value.shape, []):
                if np.array_equal(value, array):
                    match = (name, False)
                    break
            if match is None and value.ndim == 2:
                for name, array in by_shape.get(value.shape[::-1], []):
                    if np.array_equal(value, array.T):
                        match = (name, True)
                        break
            if match is None and value.size > MAX_UNMAPPED_FLOATS:
                unmapped.append(initializer.name)
        if match is not None:
            mapping[initializer.name] = match
            initializer.ClearField("raw_data")
            initializer.ClearField("float_data")
    if unmapped:
        raise RuntimeError(f"exported weights {unmapped[:3]} match no parameter (folded by the exporter?)")
    graph.metadata_props.add(key=MAPPING_KEY, value=json.dumps(mapping))
    return graph


def quantize_template(graph):
    """The int8 graph: each MatMul by a weight becomes DynamicQuantizeMatMul(x, W int8, scale, zero
    point) with per-column scales; the mapping gains '<weight>#int8/#scale/#zero' entries."""
    import onnx
    from onnx import TensorProto, helper

    graph = onnx.load_from_string(graph.SerializeToString())
    mapping = json.loads(next(p.value for p in graph.metadata_props if p.key == MAPPING_KEY))
    shapes = {i.name: list(i.dims) for i in graph.graph.initializer}
    nodes = []
    for node in graph.graph.node:
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight not in mapping or len(shapes[weight]) != 2:
            nodes.append(node)
            continue
        columns = shapes[weight][1]
        names = {kind: f"{weight}#{kind}" for kind in ("int8", "scale", "zero")}
        for kind, data_type, dims in (
            ("int8", TensorProto.INT8, shapes[weight]),
            ("scale", TensorProto.FLOAT, [columns]),
            ("zero", TensorProto.INT8, [columns]),
        ):
            tensor = graph.graph.initializer.add(name=names[kind], data_type=data_type)  # data filled per checkpoint
            tensor.dims.extend(dims)
        for kind, name in names.items():
            mapping[name] = [*mapping[weight], kind]
        nodes.append(
            helper.make_node(
                "DynamicQuantizeMatMul",
                [node.input[0], names["int8"], names["scale"], names["zero"]],
                list(node.output),
                name=f"{node.name}_int8",
                domain="com.microsoft",
            )
        )
    del graph.graph.node[:]
    graph.graph.node.extend(nodes)
    used = {name for node in graph.graph.node for name in node.input}
    kept = [i for i in graph.graph.initializer if i.name in used]
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(kept)
    mapping = {name: value for name, value in mapping.items() if name in used}
    graph.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    for prop in graph.metadata_props:
        if prop.key == MAPPING_KEY:
            prop.value = json.dumps(mapping)
    return graph


def quantize_columns(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per column of a [K, N] MatMul weight: (int8 weights, float scales)."""
    scale = np.abs(weight).max(axis=0) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    quantized = np.clip(np.rint(weight / scale), -127, 127).astype(np.int8)
    return quantized, scale


def load_template(model: TextClassifier, quantize: bool) -> tuple[object, bool]:
    """The (possibly cached) graph template; True when it was exported now rather than read."""
    import onnx

    path = cache_dir() / f"{template_key(model)}{'-int8' if quantize else ''}.onnx"
    if path.exists():
        try:
            return onnx.load(str(path)), False
        except Exception as error:  # a damaged cache file: export again over it
            logger.info("re-exporting the ONNX template %s (%s)", path, error)
    graph = export_template(model)
    if quantize:
        graph = quantize_template(graph)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
            handle.write(graph.SerializeToString())
        os.replace(handle.name, path)  # whole or absent, also with two processes exporting at once
    except OSError as error:  # a read-only home: the template is just not cached
        logger.info("cannot cache the ONNX template in %s (%s)", path.parent, error)
    return graph, True


def fill_weights(graph, model: TextClassifier) -> tuple[bytes, dict[str, np.ndarray]]:
    """The template serialized for a session, and `model`'s weights by initializer name.

    The weights are handed to ONNX Runtime as in-memory external initializers rather than written
    into the protobuf: no 90 MB serialization per load, and untransposed fp32 weights share the
    PyTorch model's memory."""
    from onnx import TensorProto

    mapping = json.loads(next(p.value for p in graph.metadata_props if p.key == MAPPING_KEY))
    parameters = {name: p.detach().numpy() for name, p in model.named_parameters()}
    quantized: dict[tuple[str, bool], tuple[np.ndarray, np.ndarray]] = {}
    weights = {}
    for initializer in graph.graph.initializer:
        if initializer.name not in mapping:
            continue
        source, transposed, *kind = mapping[initializer.name]
        array = parameters[source].T if transposed else parameters[source]
        if kind:
            if (source, transposed) not in quantized:
                quantized[source, transposed] = quantize_columns(np.asarray(array, dtype=np.float32))
            int8, scale = quantized[source, transposed]
            array = {"int8": int8, "scale": scale, "zero": np.zeros(scale.shape, np.int8)}[kind[0]]
        weights[initializer.name] = np.ascontiguousarray(array)
        initializer.ClearField("raw_data")
        initializer.data_location = TensorProto.EXTERNAL
        del initializer.external_data[:]
        initializer.external_data.add(key="location", value="in-memory")  # supplied at session start
    return graph.SerializeToString(), weights


def run_chunks(lengths: np.ndarray, max_rows: int, tokens_per_run: int = TOKENS_PER_RUN) -> Iterator[np.ndarray]:
    """Row indices per session run: rows in length order, a run closing when one more row would
    pad past `tokens_per_run` tokens or exceed `max_rows` rows."""
    order = np.argsort(lengths, kind="stable")
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and end - start < max_rows and (end + 1 - start) * lengths[order[end]] <= tokens_per_run:
            end += 1
        yield order[start:end]
        start = end


@dataclass
class OnnxClassifier:
    """A session over one checkpoint's weights."""

    session: object
    quantized: bool
    threads: int
    load_s: float  # template (exported or read) + weights + session start
    exported: bool  # the template was exported during this load (first load of this architecture)
    weights: dict = field(default_factory=dict, repr=False)  # the session reads these arrays: keep them alive
    probe_error: float = float("nan")  # max |logit difference| from PyTorch on the probe rows

    @property
    def name(self) -> str:
        return "onnxruntime-int8" if self.quantized else "onnxruntime-fp32"

    def logits(self, split: TokenizedSplit, pad_token_id: int, max_rows: int = 64) -> np.ndarray:
        """Logits in the split's row order."""
        out: Optional[np.ndarray] = None
        for rows in run_chunks(split.lengths, max_rows):
            input_ids, attention_mask = pad_batch(split, rows, pad_token_id)
            feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
            result = self.session.run(["logits"], feeds)[0]
            if out is None:
                out = np.empty((len(split), result.shape[1]), dtype=np.float32)
            out[rows] = result
        return out if out is not None else np.empty((0, 0), dtype=np.float32)


def start_session(serialized: bytes, weights: dict[str, np.ndarray], threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only
    names = list(weights)
    options.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(weights[n]) for n in names])
    return ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])


def build(model: TextClassifier, quantize: bool = False, threads: Optional[int] = None) -> OnnxClassifier:
    """An ONNX Runtime session for `model`'s weights (raises where that is not possible)."""
    started = time.perf_counter()
    threads = threads or torch.get_num_threads()
    graph, exported = load_template(model, quantize)
    serialized, weights = fill_weights(graph, model)
    session = start_session(serialized, weights, threads)
    return OnnxClassifier(session, quantize, threads, time.perf_counter() - started, exported, weights)


def export_inference_graph(model: TextClassifier, pad_token_id: int, path: Path) -> float:
    """Write the fp32 graph with `model`'s weights inside it to `path`: a self-contained file that
    any ONNX Runtime runs (the registered MLflow Model's engine). The written file is then loaded
    as it will be served and checked against PyTorch; returns the probe's max |logit difference|."""
    import onnx
    from onnx import numpy_helper

    graph, _ = load_template(model, quantize=False)
    serialized, weights = fill_weights(graph, model)
    full = onnx.load_from_string(serialized)
    for initializer in full.graph.initializer:
        if initializer.name in weights:
            initializer.CopyFrom(numpy_helper.from_array(weights[initializer.name], initializer.name))
    kept = [prop for prop in full.metadata_props if prop.key != MAPPING_KEY]
    del full.metadata_props[:]
    full.metadata_props.extend(kept)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(full, str(path))
    session = start_session(path.read_bytes(), {}, torch.get_num_threads())
    return check_against_torch(OnnxClassifier(session, False, torch.get_num_threads(), 0.0, False), model, pad_token_id)


def probe_split(vocab_size: int) -> TokenizedSplit:
    """Two rows of different lengths (so padding and the mask are exercised)."""
    rows = [[i % vocab_size for i in row] for row in ([101, 7592, 2088, 2003, 1037, 3231, 102], [101, 3231, 102])]
    lengths = np.array([len(r) for r in rows])
    return TokenizedSplit(
        token_ids=np.concatenate(rows).astype(np.int32),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        labels=np.full(len(rows), -1, dtype=np.int64),
    )


def check_against_torch(engine: OnnxClassifier, model: TextClassifier, pad_token_id: int) -> float:
    """Max |logit difference| from the PyTorch model on the probe rows, each run alone and padded
    together; raises when the fp32 graph disagrees beyond PROBE_TOLERANCE."""
    from tagifai.model import predict_logits

    split = probe_split(model.backbone.config.vocab_size)
    expected = predict_logits(model, split, batch_size=8, pad_token_id=pad_token_id).numpy()
    worst = 0.0
    for max_rows in (1, len(split)):
        got = engine.logits(split, pad_token_id, max_rows=max_rows)
        if not np.all(np.isfinite(got)):
            raise RuntimeError("non-finite logits from the ONNX graph")
        worst = max(worst, float(np.abs(got - expected).max()))
    if not engine.quantized and worst > PROBE_TOLERANCE:
        raise RuntimeError(f"ONNX logits differ from PyTorch by {worst:.2g} (> {PROBE_TOLERANCE})")
    return worst


def load_engine(
    model: TextClassifier, pad_token_id: int, quantize: bool = False, threads: Optional[int] = None
) -> Optional[OnnxClassifier]:
    """The ONNX Runtime engine for `model`, checked against it; None (reason logged) where ONNX
    Runtime is missing or fails, so that the caller predicts with PyTorch."""
    try:
        engine = build(model, quantize, threads)
        if quantize:  # the int8 graph shares the fp32 graph's weight mapping: check that mapping
            check_against_torch(build(model, False, threads), model, pad_token_id)
        engine.probe_error = check_against_torch(engine, model, pad_token_id)
    except ImportError as error:
        logger.warning("ONNX Runtime is not installed (%s): predicting with PyTorch", error)
        return None
    except Exception as error:  # export, session or check failed: PyTorch still works
        logger.warning("ONNX Runtime path failed (%s: %s): predicting with PyTorch", type(error).__name__, error)
        return None
    logger.info(
        "%s engine ready in %.2f s (%s template)", engine.name, engine.load_s, "new" if engine.exported else "cached"
    )
    return engine
