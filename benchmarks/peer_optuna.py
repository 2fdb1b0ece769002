"""The peer users pick instead: the same study with Optuna + MLflow and a plain PyTorch loop.

    python -m benchmarks.peer_optuna --dataset-loc PATH --trials 4 --epochs 5 --workdir DIR --out peer.json

What a capable user writes without this project (needs `pip install -e ".[bench]"` for optuna):

- Optuna's TPE sampler over the same search space (tagifai/search_space.py), the flow's initial
  point enqueued first, a median pruner on validation loss after each epoch (from the second
  trial on, after the flow's grace period);
- a plain PyTorch loop: a DataLoader with a collate function that pads each batch to its longest
  text (dynamic padding), AdamW, ReduceLROnPlateau, every layer trained, torch's default threads,
  trials one after the other in one process;
- one MLflow run per trial (parameters, per-epoch metrics) in a local SQLite store;
- the same backbone, batch size, epochs, text cleaning and train/validation/test split as the flow;
  the trial with the lowest validation loss (at its best epoch) is evaluated on the test split.

benchmarks/run.py starts this as a child process and times it from process start to exit, as it
does the flow's CLI.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from tagifai import search_space
from tagifai.settings import DEFAULT_BACKBONE, DEFAULT_SEED, TuneSettings


class TextDataset(torch.utils.data.Dataset):
    """Token ids per text (unpadded) and the label."""

    def __init__(self, encodings: list[list[int]], labels: list[int]):
        self.encodings, self.labels = encodings, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.encodings[index], self.labels[index]


def pad_collate(pad_token_id: int):
    """Pad a batch to its own longest text (dynamic padding)."""

    def collate(batch):
        longest = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), longest), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, (ids, _) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask, torch.tensor([label for _, label in batch])

    return collate


class Classifier(nn.Module):
    """The encoder, mean pooling over real tokens, dropout and a linear head (as the flow's model)."""

    def __init__(self, backbone_path: str, num_classes: int, dropout_p: float):
        from transformers import AutoModel

        super().__init__()
        self.encoder = AutoModel.from_pretrained(backbone_path)
        self.dropout = nn.Dropout(dropout_p)
        self.head = nn.Linear(self.encoder.config.hidden_size, num_classes)

    def forward(self, input_ids, attention_mask):
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).float()
        return self.head(self.dropout((states * mask).sum(1) / mask.sum(1).clamp(min=1.0)))


def evaluate(model: nn.Module, loader: DataLoader) -> tuple[float, np.ndarray, np.ndarray]:
    """(mean loss, predicted labels, true labels)."""
    model.eval()
    losses, predicted, true = [], [], []
    with torch.no_grad():
        for input_ids, attention_mask, labels in loader:
            logits = model(input_ids, attention_mask)
            losses.append(nn.functional.cross_entropy(logits, labels, reduction="sum").item())
            predicted.append(logits.argmax(1).numpy())
            true.append(labels.numpy())
    return sum(losses) / len(loader.dataset), np.concatenate(predicted), np.concatenate(true)


def run_study(
    dataset_loc: Optional[str],
    holdout_loc: Optional[str],
    backbone: str,
    trials: int,
    epochs: int,
    batch_size: int,
    max_length: int,
    seed: int,
    tracking_uri: str,
) -> dict:
    import mlflow
    import optuna
    from sklearn.metrics import f1_score

    from tagifai.data import load_dataset, project_texts, split_dataset
    from tagifai.model import resolve_backbone

    splits = split_dataset(
        load_dataset(dataset_loc).frame, load_dataset(holdout_loc).frame if holdout_loc else None, seed=seed
    )
    backbone_path = resolve_backbone(backbone)  # the same offline, checksum-verified weights
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(backbone_path)

    def dataset(frame) -> TextDataset:
        texts = project_texts(frame["title"], frame["description"])
        encodings = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        return TextDataset(encodings, [splits.class_to_index[tag] for tag in frame["tag"]])

    train, val, test = dataset(splits.train), dataset(splits.val), dataset(splits.test)
    collate = pad_collate(tokenizer.pad_token_id or 0)
    val_loader = DataLoader(val, batch_size=batch_size * 2, collate_fn=collate)
    test_loader = DataLoader(test, batch_size=batch_size * 2, collate_fn=collate)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("peer-optuna")
    best: dict = {"val_loss": float("inf"), "state": None, "params": None}

    def objective(trial: optuna.Trial) -> float:
        params = {
            p.name: trial.suggest_float(p.name, p.low, p.high, log=p.log_scale) for p in search_space.SEARCH_SPACE
        }
        torch.manual_seed(seed)
        model = Classifier(backbone_path, len(splits.class_to_index), params["dropout_p"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=params["lr"])
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=params["lr_factor"], patience=int(params["lr_patience"])
        )
        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(train, batch_size=batch_size, shuffle=True, collate_fn=collate, generator=generator)
        trial_best = float("inf")
        with mlflow.start_run(run_name=f"trial-{trial.number}"):
            mlflow.log_params(params)
            for epoch in range(1, epochs + 1):
                started = time.perf_counter()
                model.train()
                for input_ids, attention_mask, labels in loader:
                    optimizer.zero_grad()
                    nn.functional.cross_entropy(model(input_ids, attention_mask), labels).backward()
                    optimizer.step()
                val_loss, predicted, true = evaluate(model, val_loader)
                scheduler.step(val_loss)
                val_f1 = f1_score(true, predicted, average="weighted", zero_division=0)
                mlflow.log_metrics(
                    {"val_loss": val_loss, "val_f1": val_f1, "epoch_time_s": time.perf_counter() - started}, step=epoch
                )
                if val_loss < trial_best:
                    trial_best = val_loss
                    if val_loss < best["val_loss"]:  # keep the study's best weights (its "checkpoint")
                        best.update(val_loss=val_loss, state=copy.deepcopy(model.state_dict()), params=params)
                trial.report(val_loss, epoch)
                if trial.should_prune():
                    mlflow.set_tag("pruned", "true")
                    raise optuna.TrialPruned()
        return trial_best

    study = optuna.create_study(
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        # As the flow's ASHA: may stop a trial after its grace period, against the trials before it
        # (Optuna's default waits for 5 finished trials, which a 4-trial study never reaches).
        pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=TuneSettings().grace_period),
    )
    for point in TuneSettings().initial_params:
        study.enqueue_trial(point)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=trials)

    model = Classifier(backbone_path, len(splits.class_to_index), best["params"]["dropout_p"])
    model.load_state_dict(best["state"])
    _, predicted, true = evaluate(model, test_loader)
    return {
        "test_f1": float(f1_score(true, predicted, average="weighted", zero_division=0)),
        "best_val_loss": best["val_loss"],
        "best_params": best["params"],
        "trials": [
            {"number": t.number, "state": t.state.name, "value": t.value, "epochs": len(t.intermediate_values)}
            for t in study.trials
        ],
        "torch_threads": torch.get_num_threads(),
        "test_rows": len(test),
    }


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peer_optuna", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset-loc", default=None)
    parser.add_argument("--holdout-loc", default=None)
    parser.add_argument("--model", default=DEFAULT_BACKBONE)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=TuneSettings().num_epochs)
    parser.add_argument("--batch-size", type=int, default=TuneSettings().batch_size)
    parser.add_argument("--max-length", type=int, default=TuneSettings().max_length)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    options = parser.parse_args(argv)
    workdir = Path(options.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    result = run_study(
        options.dataset_loc,
        options.holdout_loc,
        options.model,
        options.trials,
        options.epochs,
        options.batch_size,
        options.max_length,
        options.seed,
        f"sqlite:///{workdir.resolve() / 'mlflow.db'}",
    )
    Path(options.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
