"""Compare training choices by k-fold cross-validation on the non-test rows only.

Defaults (which layers train, batch size) are picked here, never on the test split: the flow's
test split is carved out first and left untouched, the remaining rows are cut into stratified
folds, and each choice trains one model per fold with the flow's initial hyperparameters. Prints,
per choice, the mean over folds of the held-out fold's F1 and loss at the epoch with the best loss
(the checkpoint the flow would keep), and the training time.

    python -m benchmarks.choices_cv --dataset-loc ../shared/data/made-with-ml/dataset.csv \
        --choice all:32 --choice top4:32 --folds 5 --epochs 5

A choice is `<layers>:<batch size>`: `all` trains every weight, `topN` only the top N encoder
layers and the head (embeddings and lower layers frozen).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import pandas as pd
import torch
from sklearn.model_selection import StratifiedKFold

from tagifai.batching import TokenizedData, tokenize_texts
from tagifai.data import load_dataset, project_texts, split_dataset
from tagifai.model import load_tokenizer
from tagifai.settings import DEFAULT_BACKBONE, DEFAULT_INITIAL_PARAMS, DEFAULT_SEED
from tagifai.train import train_classifier


def parse_choice(text: str) -> tuple[int | None, int]:
    layers, batch = text.split(":")
    return (None if layers == "all" else int(layers.removeprefix("top"))), int(batch)


def fold_data(texts, labels, train_idx, val_idx, tokenizer, class_to_index, backbone, max_length) -> TokenizedData:
    def encode(indices):
        return tokenize_texts([texts[i] for i in indices], [labels[i] for i in indices], tokenizer, max_length)

    return TokenizedData(
        backbone, class_to_index, max_length, int(tokenizer.pad_token_id or 0), encode(train_idx), encode(val_idx)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-loc", required=True)
    parser.add_argument("--model", default=DEFAULT_BACKBONE)
    parser.add_argument("--choice", action="append", required=True)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--out", help="write per-fold results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    splits = split_dataset(load_dataset(args.dataset_loc).frame, seed=args.seed)
    development = pd.concat([splits.train, splits.val], ignore_index=True)
    texts = project_texts(development["title"], development["description"])
    labels = [splits.class_to_index[tag] for tag in development["tag"]]
    tokenizer = load_tokenizer(args.model)
    folds = [  # tokenized once; every choice trains on the same fold data
        fold_data(texts, labels, train_idx, val_idx, tokenizer, splits.class_to_index, args.model, args.max_length)
        for train_idx, val_idx in StratifiedKFold(args.folds, shuffle=True, random_state=args.seed).split(texts, labels)
    ]
    config = dict(DEFAULT_INITIAL_PARAMS[0])
    print(f"{len(texts)} development rows (test split of {len(splits.test)} rows excluded), {args.folds} folds")

    results = {}
    for choice in args.choice:
        trainable_layers, batch_size = parse_choice(choice)
        per_fold = []
        for fold, data in enumerate(folds):
            history = []
            started = time.perf_counter()
            train_classifier(
                config,
                data,
                num_epochs=args.epochs,
                batch_size=batch_size,
                report=lambda metrics, save, history=history: history.append(metrics),
                seed=args.seed,
                trainable_layers=trainable_layers,
                precision="fp32",
            )
            best = min(history, key=lambda m: m["val_loss"])
            per_fold.append(
                {
                    "fold": fold,
                    "val_loss": best["val_loss"],
                    "val_f1": best["val_f1"],
                    "best_epoch": best["epoch"],
                    "last_f1": history[-1]["val_f1"],
                    "train_s": sum(m["epoch_time_s"] for m in history),
                    "wall_s": time.perf_counter() - started,
                }
            )
            print(
                f"{choice} fold {fold}: loss {best['val_loss']:.3f} f1 {best['val_f1']:.3f} "
                f"(epoch {best['epoch']}) train {per_fold[-1]['train_s']:.1f}s",
                flush=True,
            )
        results[choice] = per_fold
        f1s = [f["val_f1"] for f in per_fold]
        print(
            f"== {choice}: mean f1 {statistics.mean(f1s):.4f} (sd {statistics.stdev(f1s):.4f}), "
            f"mean loss {statistics.mean(f['val_loss'] for f in per_fold):.4f}, "
            f"train {sum(f['train_s'] for f in per_fold):.0f}s",
            flush=True,
        )
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
