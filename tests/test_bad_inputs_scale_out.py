"""Bad scale-out input, through the real CLI as in test_bad_inputs.py: an object store or a database
that cannot be used ends the flow with one clear line before any trial, leaves nothing in the bucket
or the MLflow store, and never shows a secret."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from test_bad_inputs import write_rows

from processes import free_port

pytestmark = pytest.mark.slow  # a SeaweedFS and a PostgreSQL server for the session

WRONG_SECRET = "not-the-secret-0123456789"


def scale_out_cases(bucket: str, s3_server, postgres_server, closed_port: int) -> dict:
    """name -> (extra argv, environment overrides, fragment of the expected message)."""
    storage = ["--storage-path", f"s3://{bucket}/ray"]
    fresh_db = postgres_server.create_database(f"bad_{free_port()}")
    return {
        "object store unreachable": (storage, {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed_port}"}, "cannot reach"),
        "bucket missing": (["--storage-path", "s3://no-such-bucket/ray"], {}, "bucket 'no-such-bucket' does not exist"),
        "wrong secret key": (storage, {"AWS_SECRET_ACCESS_KEY": WRONG_SECRET}, "refused the credentials"),
        "unknown access key": (storage, {"AWS_ACCESS_KEY_ID": "nobody"}, "refused the credentials"),
        "credentials in the storage URI": (
            ["--storage-path", f"s3://{s3_server.access_key}:{WRONG_SECRET}@{bucket}/ray"],
            {},
            "not in --storage-path",
        ),
        "storage scheme without a lease": (["--storage-path", "gs://bucket/ray"], {}, "only local folders and s3://"),
        "database that does not answer": (
            ["--tracking-uri", f"postgresql://tagifai:{WRONG_SECRET}@127.0.0.1:{closed_port}/mlflow"],
            {},
            "not reachable",
        ),
        "database password wrong": (
            ["--tracking-uri", postgres_server.uri("postgres").replace(postgres_server.password, WRONG_SECRET)],
            {},
            "password authentication failed",
        ),
        "database without an artifact location": (["--tracking-uri", fresh_db], {}, "--artifact-location"),
    }


CASE_NAMES = [
    "object store unreachable",
    "bucket missing",
    "wrong secret key",
    "unknown access key",
    "credentials in the storage URI",
    "storage scheme without a lease",
    "database that does not answer",
    "database password wrong",
    "database without an artifact location",
]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_scale_out_input_fails_fast_with_a_clear_message(
    case, tmp_path, s3_bucket, s3_server, postgres_server, tiny_backbone, monkeypatch, capsys
):
    from flows.tune import main

    argv, env, expected = scale_out_cases(s3_bucket, s3_server, postgres_server, free_port())[case]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    sqlite_uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    defaults = {"--tracking-uri": sqlite_uri, "--storage-path": str(tmp_path / "ray_results")}
    for option, value in defaults.items():
        if option not in argv:
            argv = argv + [option, value]
    dataset = write_rows(tmp_path / "good.csv")
    argv += ["--dataset-loc", str(dataset), "--model", str(tiny_backbone), "--experiment-name", "bad"]

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = str(exit_info.value.code) + capsys.readouterr().err
    assert expected in message, message
    assert "Traceback" not in message
    for secret in (WRONG_SECRET, s3_server.secret_key, postgres_server.password):
        assert secret not in message
    assert s3_server.keys(s3_bucket) == []  # nothing written to the bucket
    tracking_uri = argv[argv.index("--tracking-uri") + 1]
    if tracking_uri == sqlite_uri and not (tmp_path / "mlruns" / "mlflow.db").exists():
        return
    if "password authentication" in expected or "not reachable" in expected:
        return  # the database never answered: nothing could be written there
    client = MlflowClient(tracking_uri)
    assert [e.name for e in client.search_experiments()] in ([], ["Default"])
