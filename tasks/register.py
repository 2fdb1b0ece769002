"""Prefect task: register the best run as a new model version (the promotion gate decides whether
it becomes the champion), and publish the `best-run` report."""

from __future__ import annotations

import time
from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tagifai.lifecycle import registry, tracking
from tagifai.serving import packaging


@task(name="register-best", cache_policy=NO_CACHE)
def register_best(
    tracking_uri: str,
    model_name: str,
    run_id: str,
    checkpoint_dir: str,
    test_metrics: dict,
    data_key: str,
    settings_fingerprint: str,
) -> str:
    """Every challenger becomes a version (so it can be promoted later): its checkpoint logged as an
    MLflow Model in its run, registered, and tagged with what it was trained on, which is what
    --skip-if-unchanged compares."""
    client = MlflowClient(tracking_uri)
    tracking.mark_best(client, run_id, test_metrics)
    started = time.perf_counter()
    packaging.log_model(tracking_uri, run_id, Path(checkpoint_dir))
    tags = {registry.TAG_DATA_KEY: data_key, registry.TAG_SETTINGS_FINGERPRINT: settings_fingerprint}
    version = registry.register_version(client, model_name, run_id, tags)
    get_run_logger().info(
        "registered %s version %s (MLflow Model logged in run %s in %.1f s)",
        model_name, version, run_id, time.perf_counter() - started,
    )  # fmt: skip
    return version


def best_run_markdown(summary: dict) -> str:
    test = summary["test"]
    per_class = "\n".join(
        f"| {tag} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
        for tag, m in test["per_class"].items()
    )
    params = "\n".join(f"- `{k}`: {v:.4g}" for k, v in summary["params"].items())
    slices = "\n".join(
        f"| {name} | {m['num_samples']} | " + (f"{m['f1']:.3f} |" if m["num_samples"] else "- |")
        for name, m in test["slices"].items()
    )
    plot_links = "\n".join(f"- {name}: `{uri}`" for name, uri in summary["plots"].items())
    return (
        f"# Best run `{summary['run_id']}`\n\n"
        f"Experiment `{summary['experiment_name']}`, registered as `{summary['registered_model']}` "
        f"version {summary['model_version']} "
        f"({'now the champion' if summary['promotion']['promoted'] else 'not promoted'}: see the `promotion` artifact)."
        "\n\n"
        f"Validation loss {summary['val_loss']:.4f}\n\n## Parameters\n{params}\n\n"
        f"## Test metrics (weighted)\nprecision {test['precision']:.3f}, recall {test['recall']:.3f}, "
        f"**F1 {test['f1']:.3f}** on {test['num_samples']} examples\n\n"
        f"| tag | precision | recall | F1 | support |\n|---|---|---|---|---|\n{per_class}\n\n"
        f"## Slices\n| slice | rows | F1 |\n|---|---|---|\n{slices}\n\n"
        f"## Plots (MLflow artifacts of the best run)\n{plot_links}\n"
    )


@task(name="publish-best-run", cache_policy=NO_CACHE)
def publish_best_run(summary: dict) -> None:
    create_markdown_artifact(
        key="best-run", description="Best run of this tuning run", markdown=best_run_markdown(summary)
    )
