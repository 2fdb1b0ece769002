"""A lease on an experiment folder in an S3-compatible object store: the remote twin of `flock`.

Why: two flows with the same settings must not resume the same experiment folder, and a flow on
another machine cannot see a local lock. A lease is one object beside the folder,
`<storage>/.<folder>.lease`, changed only by conditional writes, which the store applies
atomically (AWS S3, MinIO and SeaweedFS do; a store without them refuses with 501):

- create: `If-None-Match: *`, succeeds for exactly one flow;
- heartbeat: every TTL/6 the holder rewrites it with `If-Match: <its last ETag>`; a refusal means
  another flow took it over, and the holder stops (`lost`);
- take over: a flow that finds a lease watches its ETag, on its own clock (no clock is compared
  across machines). A change within the TTL means a live holder: the flow moves to the next folder,
  as with a held `flock`. No change for the TTL means a dead holder: the flow replaces it with
  `If-Match` on the ETag it watched, so of several waiting flows one wins;
- release: on exit the holder marks it released (again `If-Match`), which frees it at once.

A holder cut off from the store for longer than the TTL may be taken over while it still runs;
it learns this at its next heartbeat (within TTL/6) and stops before marking the study finished.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Optional

from tagifai.errors import StorageError
from tagifai.tuning.storage import s3_client, split_s3, storage_error

logger = logging.getLogger(__name__)

TTL_ENV = "TAGIFAI_LEASE_TTL_S"
DEFAULT_TTL_S = 30.0


def lease_ttl_s() -> float:
    return float(os.environ.get(TTL_ENV) or DEFAULT_TTL_S)


def _refused(error) -> bool:
    """A conditional write that lost: 412, or 409 when AWS sees two at once."""
    code = error.response.get("Error", {}).get("Code", "")
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


class S3Lease:
    def __init__(self, uri: str, ttl_s: Optional[float] = None, client=None):
        self.uri = uri
        self.bucket, self.key = split_s3(uri)
        self.ttl_s = ttl_s or lease_ttl_s()
        self.client = client or s3_client()
        self.owner = uuid.uuid4().hex
        self.etag: Optional[str] = None
        self.lost = threading.Event()
        self._beats = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # --- requests -------------------------------------------------------------------------

    def _put(self, released: bool = False, **condition) -> Optional[str]:
        """Write our lease under `condition`; its new ETag, or None when the condition failed."""
        from botocore.exceptions import BotoCoreError, ClientError

        self._beats += 1
        body = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "beat": self._beats}
        try:
            answer = self.client.put_object(
                Bucket=self.bucket, Key=self.key, Body=json.dumps(body | {"released": released}).encode(), **condition
            )
        except ClientError as error:
            if _refused(error):
                return self._ours_after_all()
            raise storage_error(error, self.uri, self.client) from None
        except BotoCoreError as error:
            raise storage_error(error, self.uri, self.client) from None
        return answer["ETag"]

    def _ours_after_all(self) -> Optional[str]:
        """A refused write whose earlier try did land (a retried request): the lease is ours."""
        current = self.read()
        if current is not None and current[1].get("owner") == self.owner and not current[1].get("released"):
            return current[0]
        return None

    def read(self) -> Optional[tuple[str, dict]]:
        """(ETag, content) of the lease object, or None when there is none."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.key)
            return answer["ETag"], json.loads(answer["Body"].read())
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise storage_error(error, self.uri, self.client) from None
        except BotoCoreError as error:
            raise storage_error(error, self.uri, self.client) from None

    # --- acquire, keep, release -----------------------------------------------------------

    def acquire(self, on_wait: Callable[[str], None] = logger.warning) -> bool:
        """True when the lease is ours: new, released, or its holder stopped beating for the TTL.
        False when a live flow holds it (or another waiting flow took it first)."""
        self.etag = self._put(IfNoneMatch="*")
        if self.etag is not None:
            return True
        current = self.read()
        if current is None:  # deleted by hand in between
            return self.acquire(on_wait)
        etag, holder = current
        if not holder.get("released"):
            on_wait(
                f"{self.uri} is leased by pid {holder.get('pid')} on {holder.get('host')}; waiting up to "
                f"{self.ttl_s:g} s for its heartbeat (a live flow renews it every {self.ttl_s / 6:g} s, "
                "a killed one never does)"
            )
            etag = self._watch(etag)
            if etag is None:
                return False
        self.etag = self._put(IfMatch=etag)
        return self.etag is not None

    def _watch(self, etag: str) -> Optional[str]:
        """The ETag to take over from, once the lease has not changed for the TTL or was released;
        None when its holder renewed it (alive)."""
        deadline = time.monotonic() + self.ttl_s
        while time.monotonic() < deadline:
            time.sleep(min(1.0, self.ttl_s / 12))
            current = self.read()
            if current is None or current[0] != etag:
                return current[0] if current is not None and current[1].get("released") else None
        return etag

    def keep_alive(self, on_lost: Callable[[], None]) -> None:
        """Renew the lease every TTL/6 in a daemon thread; `on_lost()` once it was taken over."""

        def beat() -> None:
            while not self._stop.wait(self.ttl_s / 6):
                try:
                    etag = self._put(IfMatch=self.etag)
                except Exception as error:  # a store hiccup: the next beat tries again
                    logger.warning("lease heartbeat for %s failed: %s", self.uri, error)
                    continue
                if etag is None:
                    self.lost.set()
                    logger.error("%s was taken over by another flow: stopping this one", self.uri)
                    on_lost()
                    return
                self.etag = etag

        self._thread = threading.Thread(target=beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost.is_set() and self.etag is not None:
            try:
                self._put(released=True, IfMatch=self.etag)
            except StorageError as error:  # never hide the error the flow is ending with
                logger.warning("could not release %s (it lapses after %g s): %s", self.uri, self.ttl_s, error)
