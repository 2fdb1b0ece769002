"""Where Ray Tune state lives: a local folder or an object-store URI (s3://bucket/prefix).

Everything goes through `pyarrow.fs`, as Ray Tune's own storage does, so both see the same
bytes. S3-compatible stores (MinIO, Ceph, R2, SeaweedFS) are reached through the standard AWS
variables, read by pyarrow and boto3 alike: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION. Credentials are never taken from, or shown in, a URI.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

import pyarrow.fs as pafs

from tagifai.errors import StorageError

# Short waits: a store that does not answer fails the flow in seconds, before any trial.
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 5, 20


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def resolve(uri: str) -> str:
    """An absolute local path, or the URI without a trailing slash."""
    return uri.rstrip("/") if is_remote(uri) else str(Path(uri.removeprefix("file://")).resolve())


def open_storage(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local folder or a URI pyarrow knows (s3://bucket/prefix, gs://...)."""
    if is_remote(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), resolve(uri)


def join(*parts: str) -> str:
    return "/".join(part.strip("/") if i else part.rstrip("/") for i, part in enumerate(parts))


def exists(uri: str) -> bool:
    filesystem, path = open_storage(uri)
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def write_text(uri: str, text: str) -> None:
    filesystem, path = open_storage(uri)
    with filesystem.open_output_stream(path) as stream:
        stream.write(text.encode())


def split_s3(uri: str) -> tuple[str, str]:
    """("bucket", "prefix") of s3://bucket/prefix."""
    parts = urllib.parse.urlsplit(uri)
    return parts.hostname or parts.netloc, parts.path.strip("/")


def s3_client():
    """A boto3 S3 client configured from the standard AWS variables, with short timeouts."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise StorageError(
            "s3:// storage needs boto3: pip install 'tagifai-tune[scale-out]' (or pip install boto3)"
        ) from None
    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"total_max_attempts": 3, "mode": "standard"},
    )
    # A new session reads the AWS variables now; boto3's default session keeps the first ones it saw.
    return boto3.session.Session().client("s3", config=config)


def endpoint_of(client) -> str:
    return os.environ.get("AWS_ENDPOINT_URL") or client.meta.endpoint_url


def storage_error(error: Exception, uri: str, client) -> StorageError:
    """A one-line explanation of a failed S3 request; never the credentials themselves."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    endpoint = endpoint_of(client)
    bucket, _ = split_s3(uri)
    if isinstance(error, NoCredentialsError):
        return StorageError(f"no credentials for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket", "404") or status == 404:
            return StorageError(
                f"bucket {bucket!r} does not exist at {endpoint}; create it first (--storage-path {uri})"
            )
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403") or status == 403:
            return StorageError(
                f"the object store at {endpoint} refused the credentials for {uri} ({code or status}); "
                "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY and the bucket's permissions"
            )
        return StorageError(f"the object store at {endpoint} answered {code or status} for {uri}")
    reason = "no answer" if not isinstance(error, EndpointConnectionError) else "connection failed"
    return StorageError(
        f"cannot reach the object store at {endpoint} for {uri} ({reason}); check AWS_ENDPOINT_URL "
        "and that the server is running"
    )


def check_storage(uri: str) -> None:
    """Fail before any training when the object store behind `uri` cannot be used: it does not
    answer, the bucket is missing, or the credentials are refused. Local folders pass."""
    if not is_remote(uri):
        return
    if not uri.startswith("s3://"):
        # The experiment-folder lease needs S3's conditional writes (tagifai/tuning/lease.py).
        raise StorageError(f"--storage-path {uri}: only local folders and s3:// URIs are supported")
    if urllib.parse.urlsplit(uri).password is not None:
        raise StorageError("put S3 credentials in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, not in --storage-path")
    from botocore.exceptions import BotoCoreError, ClientError

    client = s3_client()
    bucket, prefix = split_s3(uri)
    try:
        client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except (BotoCoreError, ClientError) as error:
        raise storage_error(error, uri, client) from None
