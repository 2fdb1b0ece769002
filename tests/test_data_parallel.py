"""Data-parallel training (--num-workers N): the loop's sharding, and 2 DDP workers against 1.

The 2-worker runs here are two real processes joined by torch.distributed over gloo, running the
same hooks a Ray Train worker runs (tagifai/tuning/data_parallel.py); the Ray Train path itself
runs in tests/test_integration_ddp_cluster.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from tagifai.batching import batch_order, subset, tokenize_splits
from tagifai.data import load_dataset, split_dataset
from tagifai.train import DataParallel, train_classifier

# dropout 0 (the head's here, the backbone's in the fixture): with dropout, each worker draws its own
# masks and no two runs could be compared.
CONFIG = {"dropout_p": 0.0, "lr": 5e-4, "lr_factor": 0.8, "lr_patience": 3}
BATCH_SIZE = 15  # odd: one worker of two takes 8 rows of each batch, the other 7
EPOCHS = 3


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """The tiny random BERT without its own dropout (BERT's 0.1 inside every layer)."""
    from conftest import make_tiny_backbone

    backbone = make_tiny_backbone(tmp_path_factory.mktemp("tiny-bert-no-dropout"), dropout=0.0)
    splits = split_dataset(load_dataset(None).frame, num_samples=160)
    return tokenize_splits(splits, str(backbone), max_length=64)


def test_shards_of_one_global_batch_order_cover_every_row_once_per_epoch(tiny_data):
    """Each worker slices the same seeded global batches: together they see each global batch
    exactly as one process would, and every row once per epoch."""
    split = tiny_data.train
    for world_size in (2, 3):
        global_batches = batch_order(split, BATCH_SIZE, np.random.default_rng(7))
        shards = [
            [
                DataParallel(rank, world_size).shard(batch)
                for batch in batch_order(split, BATCH_SIZE, np.random.default_rng(7))
            ]
            for rank in range(world_size)
        ]
        for step, batch in enumerate(global_batches):
            pieces = [shards[rank][step] for rank in range(world_size)]
            assert np.array_equal(np.concatenate(pieces), batch)
            assert [len(p) for p in pieces] == sorted((len(p) for p in pieces), reverse=True)  # remainder: first ranks
            assert max(len(p) for p in pieces) - min(len(p) for p in pieces) <= 1
        every_row = np.concatenate([s for rank_shards in shards for s in rank_shards])
        assert sorted(every_row.tolist()) == list(range(len(split)))


def test_subset_keeps_each_rows_tokens(tiny_data):
    split = tiny_data.val
    rows = np.array([5, 0, 3])
    part = subset(split, rows)
    for i, row in enumerate(rows):
        assert part.token_ids[part.offsets[i] : part.offsets[i + 1]].tolist() == (
            split.token_ids[split.offsets[row] : split.offsets[row + 1]].tolist()
        )
    assert part.labels.tolist() == split.labels[rows].tolist()


class ReorderedRows(DataParallel):
    """One process that feeds each batch's rows in a different (seeded) order: the same loss and
    gradient in exact arithmetic, a different float32 summation order."""

    def shard(self, rows: np.ndarray) -> np.ndarray:
        return np.random.default_rng(int(rows.sum()) + self.rank).permutation(rows)


def train_losses(data, parallel: DataParallel = DataParallel()) -> list[dict]:
    reports = []
    torch.set_num_threads(1)
    train_classifier(
        CONFIG, data, num_epochs=EPOCHS, batch_size=BATCH_SIZE, report=lambda m, save: reports.append(m),
        seed=0, trainable_layers=None, parallel=parallel,
    )  # fmt: skip
    return reports


def ddp_worker(rank: int, world_size: int, port: int, data, results) -> None:
    import torch.distributed as dist

    from tagifai.tuning.data_parallel import gather_from_workers, share_gradients

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        reports = train_losses(data, DataParallel(rank, world_size, gather=gather_from_workers, wrap=share_gradients))
        results.put((rank, reports))
    finally:
        dist.destroy_process_group()


def run_ddp(data, world_size: int) -> list[list[dict]]:
    from processes import free_port

    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    workers = [context.Process(target=ddp_worker, args=(r, world_size, port, data, results)) for r in range(world_size)]
    for worker in workers:
        worker.start()
    gathered = dict(results.get(timeout=300) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    return [gathered[rank] for rank in range(world_size)]


def relative_gap(a: list[dict], b: list[dict], key: str) -> float:
    return max(abs(x[key] - y[key]) / abs(y[key]) for x, y in zip(a, b))


@pytest.mark.slow  # two gloo worker processes: ~18 s
def test_two_workers_train_like_one(tiny_data):
    """Same seed, same global batches, dropout 0: 2 DDP workers must report the per-epoch training
    loss of 1 worker, up to float32 rounding.

    How the tolerance is derived rather than guessed: DDP computes the same sums as one process
    in another order (each worker sums the gradient of its half batch, gloo adds the two halves;
    each half is padded to its own longest row, which changes the matmul shapes but adds only exact
    zeros). A one-process run that feeds every batch's rows in another order changes the float32
    summation order in the same way and nothing else. Measured here (3 reorderings, 3 epochs):
    the largest relative gap of the per-epoch training loss is 4e-8 to 6e-8, and 2 workers differ
    from 1 by 5e-8. The 2-worker run must stay within 10x the largest gap measured in the same
    session (rounding grows with the epochs and varies with the data; 10x leaves room for the
    gloo addition and the padding shapes while staying four orders below a real error). The
    measurement itself must stay below 1e-5: above that the model would amplify rounding so much
    that no comparison is meaningful (the backbone's own dropout, left on, gave 3e-3). A bug that
    changes what is trained (a row seen twice or missed, a shard weighted wrongly, gradients not
    averaged) changes the sums themselves, not their order.
    """
    single = train_losses(tiny_data)
    reorder_gaps = [
        relative_gap(train_losses(tiny_data, ReorderedRows(rank=seed)), single, "train_loss") for seed in range(3)
    ]
    tolerance = 10 * max(reorder_gaps)
    print(f"reordering gaps {reorder_gaps}, tolerance {tolerance:.2e}")
    assert 0 < max(reorder_gaps) < 1e-5, reorder_gaps

    ranks = run_ddp(tiny_data, world_size=2)
    without_time = [[{k: v for k, v in m.items() if k != "epoch_time_s"} for m in reports] for reports in ranks]
    assert without_time[0] == without_time[1]  # every worker reports the metrics of all rows
    ddp = ranks[0]
    assert [m["epoch"] for m in ddp] == list(range(1, EPOCHS + 1))
    gap = relative_gap(ddp, single, "train_loss")
    print(f"2 workers vs 1: relative gap {gap:.2e}")
    assert gap <= tolerance, (gap, tolerance, [m["train_loss"] for m in ddp], [m["train_loss"] for m in single])
    # Validation is over the whole validation set, gathered from both workers: the same numbers too.
    assert relative_gap(ddp, single, "val_loss") <= tolerance
    assert [m["val_f1"] for m in ddp] == pytest.approx([m["val_f1"] for m in single], abs=1e-12)


GIB = 1024**3


@pytest.mark.parametrize(
    ("num_workers", "cpus", "gpus", "cluster", "fits"),
    [
        (2, 1, 0, [{"CPU": 1.0, "memory": GIB}, {"CPU": 1.0, "memory": GIB}], True),  # one worker per node
        (3, 1, 0, [{"CPU": 1.0, "memory": GIB}, {"CPU": 1.0, "memory": GIB}], False),
        (3, 1, 0, [{"CPU": 1.5, "memory": GIB}, {"CPU": 1.5, "memory": GIB}], False),  # 3 CPUs, 1 worker per node
        (2, 1, 1, [{"CPU": 8.0, "GPU": 1.0, "memory": GIB}, {"CPU": 8.0, "GPU": 1.0, "memory": GIB}], True),
        (4, 1, 1, [{"CPU": 8.0, "GPU": 2.0, "memory": GIB}, {"CPU": 1.0, "GPU": 2.0, "memory": GIB}], False),
    ],
)
def test_a_trials_workers_must_fit_the_cluster_together(monkeypatch, num_workers, cpus, gpus, cluster, fits):
    from tagifai.errors import ResourceError
    from tagifai.settings import TuneSettings
    from tagifai.tuning import study

    monkeypatch.setattr(study.ray, "nodes", lambda: [{"Alive": True, "Resources": r} for r in cluster])
    settings = TuneSettings(num_workers=num_workers, cpu_per_worker=cpus, gpu_per_worker=gpus)
    if fits:
        study.check_resources(settings)
        return
    with pytest.raises(ResourceError) as refused:
        study.check_resources(settings)
    message = str(refused.value)
    assert "\n" not in message and f"{num_workers} workers x {cpus} CPU" in message and "hold only" in message


@pytest.mark.integration
@pytest.mark.slow
def test_two_worker_trials_keep_their_records_on_s3_and_retry_from_them(
    tmp_path, tiny_backbone, s3_bucket, monkeypatch, own_ray
):
    """--storage-path s3:// with 2 workers per trial: rank 0 writes the record and checkpoints to
    the bucket; a worker that fails (injected, once per trial, at epoch 2) fails the Train run, and
    Tune's retry continues from the record in the bucket, not from scratch."""
    from mlflow.tracking import MlflowClient

    from conftest import tiny_settings
    from flows.tune import tune_classifier
    from tagifai.tuning.trial import INJECT_FAULT_ENV

    monkeypatch.setenv(INJECT_FAULT_ENV, f"2:{tmp_path}")
    settings = tiny_settings(
        tmp_path, tiny_backbone, experiment_name="ddp-s3", num_workers=2, cpu_per_worker=1, max_concurrent=1,
        num_runs=1, num_epochs=3, grace_period=3, storage_path=f"s3://{s3_bucket}/ray_results",
    )  # fmt: skip
    summary = tune_classifier(settings)
    [trial] = summary["trials"]
    assert trial["status"] == "completed" and trial["epochs"] == 3 and trial["attempts"] == 2, trial
    client = MlflowClient(settings.tracking_uri)
    failed, retried = sorted(
        client.search_runs([client.get_experiment_by_name("ddp-s3").experiment_id]), key=lambda r: r.info.start_time
    )
    assert failed.info.status == "FAILED" and retried.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(retried.info.run_id, "val_loss")] == [2, 3]  # resumed
    assert retried.data.params["world_size"] == "2"
