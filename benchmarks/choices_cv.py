"""Compare training choices by k-fold cross-validation on the non-test rows only.

Defaults are picked here, never on the test split: the flow's test split is carved out first and
left untouched, the remaining rows are cut into stratified folds, and each choice trains one model
per fold. The checkpoint kept is the one the flow would keep (lowest held-out loss); its
probabilities on the held-out fold are stored, so every development row is scored exactly once per
choice (out-of-fold). Each choice is compared with the baseline on the same rows by a paired
bootstrap of the weighted-F1 difference.

    python -m benchmarks.choices_cv --dataset-loc ../shared/data/made-with-ml/dataset.csv \
        --out benchmarks/quality_cv.json --choice base --choice lr=3e-4 --choice layers=3,epochs=5

A choice is `base` (today's defaults) or comma-separated overrides of them:
  lr, dropout_p, lr_factor, lr_patience   the initial point's hyperparameters
  layers=N|all    fine-tuned encoder layers     batch=N   batch size     epochs=N
  pooling=mean|cls       smoothing=F (label smoothing)       weights=balanced (class weights)
  clean=default|raw      text cleaning (raw: title and description joined, nothing removed)
Results accumulate in --out: choices already there are not retrained. `--ensemble a+b` adds the
average of those choices' out-of-fold probabilities (the top-k trials of a study, served together).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedKFold
from transformers import AutoConfig

from tagifai.batching import TokenizedData, tokenize_texts
from tagifai.data import load_dataset, project_texts, split_dataset
from tagifai.model import load_checkpoint, load_tokenizer, predict_logits, resolve_backbone
from tagifai.settings import DEFAULT_BACKBONE, DEFAULT_INITIAL_PARAMS, DEFAULT_SEED, TuneSettings
from tagifai.train import train_classifier

BASELINE = "base"
BOOTSTRAP_SAMPLES = 2000
TODAY = TuneSettings()
DEFAULTS = {
    **DEFAULT_INITIAL_PARAMS[0],
    "layers": TODAY.trainable_layers,
    "batch": TODAY.batch_size,
    "epochs": TODAY.num_epochs,
    "pooling": "mean",
    "smoothing": 0.0,
    "weights": "none",
    "clean": "default",
}
HYPERPARAMETERS = tuple(DEFAULT_INITIAL_PARAMS[0])


def parse_choice(text: str) -> dict:
    """Today's defaults with the choice's overrides applied (values typed like the defaults)."""
    options = dict(DEFAULTS)
    if text == BASELINE:
        return options
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in DEFAULTS:
            raise SystemExit(f"unknown option {key!r} in choice {text!r}; known: {sorted(DEFAULTS)}")
        if key == "layers":
            options[key] = None if value == "all" else int(value)
        elif isinstance(DEFAULTS[key], (int, float)) and not isinstance(DEFAULTS[key], bool):
            options[key] = type(DEFAULTS[key])(float(value))
        else:
            options[key] = value
    return options


def raw_texts(titles, descriptions) -> list[str]:
    """Title and description joined, whitespace collapsed; case, stop words and punctuation kept."""
    return [re.sub(r"\s+", " ", f"{title} {description}").strip() for title, description in zip(titles, descriptions)]


CLEANERS = {"default": project_texts, "raw": raw_texts}


def training_kwargs(options: dict, labels: np.ndarray, num_classes: int) -> dict:
    """Arguments of train_classifier beyond today's, passed only when a choice sets them."""
    extra = {}
    if options["pooling"] != "mean":
        extra["pooling"] = options["pooling"]
    if options["smoothing"]:
        extra["label_smoothing"] = options["smoothing"]
    if options["weights"] == "balanced":  # inverse class frequency, as scikit-learn's "balanced"
        counts = np.bincount(labels, minlength=num_classes)
        extra["class_weights"] = (len(labels) / (num_classes * counts)).tolist()
    return extra


def fold_data(texts, labels, train_idx, val_idx, tokenizer, class_to_index, args) -> TokenizedData:
    def encode(rows):
        return tokenize_texts([texts[i] for i in rows], labels[rows].tolist(), tokenizer, args.max_length)

    pad_token_id = int(tokenizer.pad_token_id or 0)
    return TokenizedData(args.model, class_to_index, args.max_length, pad_token_id, encode(train_idx), encode(val_idx))


def flop_proxy(options: dict, data: TokenizedData, layer_params: int, num_layers: int) -> float:
    """Deterministic training cost: real tokens x (2 FLOPs per weight forward through every layer, 4
    more backward through the trained ones) x epochs, plus the held-out pass. Attention's
    length-squared terms and padding are ignored (texts are short)."""
    trained = num_layers if options["layers"] is None else options["layers"]
    train_tokens, val_tokens = int(data.train.lengths.sum()), int(data.val.lengths.sum())
    per_epoch = (
        train_tokens * (2 * num_layers + 4 * trained) * layer_params + val_tokens * 2 * num_layers * layer_params
    )
    return float(options["epochs"] * per_epoch)


def run_fold(options: dict, data: TokenizedData, seed: int, scratch: Path) -> tuple[dict, np.ndarray]:
    """Train on one fold; the held-out metrics and probabilities of the checkpoint the flow keeps."""
    history = []

    def report(metrics, save):
        history.append(metrics)
        if save is not None:
            save(scratch)

    config = {name: options[name] for name in HYPERPARAMETERS}
    train_classifier(
        config,
        data,
        num_epochs=options["epochs"],
        batch_size=options["batch"],
        report=report,
        seed=seed,
        trainable_layers=options["layers"],
        precision="fp32",
        **training_kwargs(options, data.train.labels, len(data.class_to_index)),
    )
    model, _, saved = load_checkpoint(scratch)
    logits = predict_logits(model, data.val, batch_size=64, pad_token_id=data.pad_token_id)
    best = next(m for m in history if m["epoch"] == saved["epoch"])
    summary = {
        "val_loss": best["val_loss"],
        "val_f1": best["val_f1"],
        "best_epoch": best["epoch"],
        "last_f1": history[-1]["val_f1"],
        "train_s": sum(m["epoch_time_s"] for m in history),
    }
    return summary, torch.softmax(logits, dim=1).numpy()


def summarise(results: dict, seed: int) -> list[dict]:
    """One row per choice: CV means, out-of-fold F1, and, against the baseline on the same rows, the
    promotion gate's paired bootstrap and verdict (challenger = the choice, champion = the baseline)
    and the cost ratios."""
    from tagifai.evaluate import classification_metrics
    from tagifai.lifecycle.promotion import GateRules, decide, paired_bootstrap

    labels = np.asarray(results["labels"])
    classes = sorted(results["class_to_index"], key=results["class_to_index"].get)
    base = results["choices"][BASELINE]
    base_predicted = np.asarray(base["oof_probs"]).argmax(axis=1)
    champion = classification_metrics([classes[i] for i in labels], [classes[i] for i in base_predicted], classes)
    rows = []
    for name, entry in results["choices"].items():
        predicted = np.asarray(entry["oof_probs"]).argmax(axis=1)
        challenger = classification_metrics([classes[i] for i in labels], [classes[i] for i in predicted], classes)
        noise = paired_bootstrap(labels, predicted, base_predicted, seed)
        promoted, reason = decide(challenger, champion, True, GateRules(), noise=noise)
        folds = entry.get("folds")
        rows.append(
            {
                "choice": name,
                "cv_mean_f1": statistics.mean(f["val_f1"] for f in folds) if folds else None,
                "oof_f1": challenger["f1"],
                "diff_vs_base": noise["f1_difference"],
                "ci95": noise["ci95"],
                "time_ratio": entry["train_s"] / base["train_s"] if entry.get("train_s") else None,
                "flop_ratio": entry["flop_proxy"] / base["flop_proxy"] if entry.get("flop_proxy") else None,
                "per_tag_f1": {tag: scores["f1"] for tag, scores in challenger["per_class"].items()},
                "gate_promotes": promoted,
                "gate_reason": reason,
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    print("| choice | CV mean F1 | OOF F1 | diff vs base [95% CI] | time x | FLOPs x | mlops F1 | gate |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        mean = f"{row['cv_mean_f1']:.4f}" if row["cv_mean_f1"] is not None else "-"
        ratios = [f"{row[k]:.2f}" if row[k] is not None else "-" for k in ("time_ratio", "flop_ratio")]
        low, high = row["ci95"]
        print(
            f"| {row['choice']} | {mean} | {row['oof_f1']:.4f} | {row['diff_vs_base']:+.4f} "
            f"[{low:+.4f}, {high:+.4f}] | {ratios[0]} | {ratios[1]} | {row['per_tag_f1'].get('mlops', 0):.3f} | "
            f"{'promotes' if row['gate_promotes'] else 'keeps base'} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-loc", required=True)
    parser.add_argument("--model", default=DEFAULT_BACKBONE)
    parser.add_argument("--choice", action="append", default=[])
    parser.add_argument("--ensemble", action="append", default=[], help="choices joined by '+'")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=TODAY.max_length)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--out", required=True, help="JSON of every choice's results (read, extended, rewritten)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    splits = split_dataset(load_dataset(args.dataset_loc).frame, seed=args.seed)
    development = pd.concat([splits.train, splits.val], ignore_index=True)
    labels = np.asarray([splits.class_to_index[tag] for tag in development["tag"]])
    fold_indices = list(StratifiedKFold(args.folds, shuffle=True, random_state=args.seed).split(labels, labels))
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results.update(
        folds=args.folds, seed=args.seed, dataset_rows=len(development), test_rows_excluded=len(splits.test),
        labels=labels.tolist(), class_to_index=splits.class_to_index,
    )  # fmt: skip
    results.setdefault("choices", {})
    tokenizer = load_tokenizer(args.model)
    backbone_config = AutoConfig.from_pretrained(resolve_backbone(args.model))
    num_layers, width = backbone_config.num_hidden_layers, backbone_config.hidden_size
    layer_params = 12 * width * width  # attention (4 d^2) + feed-forward (8 d^2) weights of one layer
    print(f"{len(labels)} development rows (test split of {len(splits.test)} rows excluded), {args.folds} folds")

    for choice in args.choice:
        if choice in results["choices"]:
            print(f"{choice}: already in {out}, not retrained")
            continue
        options = parse_choice(choice)
        texts = CLEANERS[options["clean"]](development["title"], development["description"])
        oof = np.zeros((len(labels), len(splits.class_to_index)))
        folds, flops = [], 0.0
        for fold, (train_idx, val_idx) in enumerate(fold_indices):
            data = fold_data(texts, labels, train_idx, val_idx, tokenizer, splits.class_to_index, args)
            with tempfile.TemporaryDirectory(prefix="choices-cv-") as scratch:
                summary, probs = run_fold(options, data, args.seed, Path(scratch))
            oof[val_idx] = probs
            folds.append({"fold": fold, **summary})
            flops += flop_proxy(options, data, layer_params, num_layers)
            print(
                f"{choice} fold {fold}: loss {summary['val_loss']:.3f} f1 {summary['val_f1']:.3f} "
                f"(epoch {summary['best_epoch']}) train {summary['train_s']:.1f}s",
                flush=True,
            )
        results["choices"][choice] = {
            "options": options,
            "folds": folds,
            "train_s": sum(f["train_s"] for f in folds),
            "flop_proxy": flops,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "oof_probs": np.round(oof, 5).tolist(),
        }
        out.write_text(json.dumps(results, indent=1))  # after every choice: a long run loses little
    for ensemble in args.ensemble:
        members = ensemble.split("+")
        probs = np.mean([results["choices"][m]["oof_probs"] for m in members], axis=0)
        results["choices"][f"ensemble({ensemble})"] = {
            "members": members,
            "folds": None,
            "train_s": None,  # the members are trials the study trains anyway; serving costs len(members)x
            "flop_proxy": None,
            "oof_probs": np.round(probs, 5).tolist(),
        }
    if BASELINE in results["choices"]:
        results["summary"] = summarise(results, args.seed)
        print_table(results["summary"])
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
