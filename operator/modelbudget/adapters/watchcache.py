"""Informer-style caches: one LIST, then a WATCH that keeps a local mirror current, so reads in
the steady state cost no apiserver request.

Each cache runs on a daemon thread of its own and keeps raw objects (dicts: the kubernetes
client's model deserialisation is what made a LIST per reconcile expensive). A watch that ends
(the server's timeout) resumes from the last resourceVersion; one that expires (410 Gone) or
fails lists again. Reads before the first LIST has landed wait for it, briefly, and then raise
``Unavailable``; a resource whose API is not installed (404) reads as empty, as the direct
LIST did, and is looked for again now and then.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from modelbudget.adapters.errors import NotFound, Unavailable
from modelbudget.adapters.kube import kube_errors

log = logging.getLogger("modelbudget.watchcache")

WATCH_SECONDS = 300  # the server ends each watch after this; it resumes at once
RETRY_SECONDS = 2.0  # after a failed LIST or WATCH
ABSENT_RETRY_SECONDS = 60.0  # an API that is not installed is looked for again this often
REQUEST_SECONDS = 30.0  # connect/read bound of a LIST, and of a WATCH beyond its own timeout
SYNC_WAIT_SECONDS = 10.0  # a read before the first LIST waits this long for it

ListCall = Callable[..., Any]  # a kubernetes client list_* method, its arguments bound


class WatchCache:
    """The objects ``list_call`` lists, kept current by watching them."""

    def __init__(self, what: str, list_call: ListCall, sync_wait: float = SYNC_WAIT_SECONDS) -> None:
        self.what = what  # names the resource in errors, e.g. "Nodes", "HPAs in team-a"
        self._list = list_call
        self._sync_wait = sync_wait
        self._lock = threading.Lock()
        self._objects: dict[tuple[str, str], dict[str, Any]] = {}
        self._synced = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch {what}", daemon=True)
        self._thread.start()

    def items(self) -> list[dict[str, Any]]:
        """Every object as last seen; raises ``Unavailable`` when the first LIST has not landed."""
        if not self._synced.wait(self._sync_wait):
            raise Unavailable(f"{self.what}: not listed yet (apiserver unreachable?)")
        with self._lock:
            return list(self._objects.values())

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                version: str | None = self._relist()
                while not self._stop.is_set() and version is not None:
                    version = self._watch(version)
            except NotFound:
                self._replace([])  # the API is not installed: nothing of that kind exists
                self._stop.wait(ABSENT_RETRY_SECONDS)
            except Exception as exc:  # a broken watch must not end the mirror: list again
                log.warning("watch of %s failed, listing again: %s", self.what, exc)
                self._stop.wait(RETRY_SECONDS)

    def _relist(self) -> str:
        with kube_errors(f"listing {self.what}"):
            answer = json.loads(self._list(_preload_content=False, _request_timeout=REQUEST_SECONDS).data)
        self._replace(answer.get("items") or [])
        return str(answer["metadata"]["resourceVersion"])

    def _replace(self, items: list[dict[str, Any]]) -> None:
        with self._lock:
            self._objects = {_key(obj): obj for obj in items}
        self._synced.set()

    def _watch(self, version: str) -> str | None:
        """Apply one watch's events; the version to resume from, or None to list again."""
        with kube_errors(f"watching {self.what}"):
            response = self._list(
                watch=True,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=WATCH_SECONDS,
                _preload_content=False,
                # A connection that died silently must not hold the mirror forever.
                _request_timeout=(REQUEST_SECONDS, WATCH_SECONDS + REQUEST_SECONDS),
            )
            try:
                for line in _lines(response):
                    event = json.loads(line)
                    if not isinstance(event, dict) or "type" not in event:
                        raise ValueError(f"not a watch event: {line[:80]!r}")  # listed again, after a pause
                    kind, obj = event["type"], event.get("object") or {}
                    if kind == "ERROR":
                        return None  # 410 Gone: the version is too old; any other: start over
                    version = (obj.get("metadata") or {}).get("resourceVersion") or version
                    if kind in ("ADDED", "MODIFIED"):
                        with self._lock:
                            self._objects[_key(obj)] = obj
                    elif kind == "DELETED":
                        with self._lock:
                            self._objects.pop(_key(obj), None)
                    if self._stop.is_set():
                        return None
            finally:
                response.release_conn()
        return version


def _lines(response: Any) -> Iterator[bytes]:
    """The lines of a watch's body as they arrive (each read returns what is there)."""
    pending = b""
    while chunk := response.read1(65_536):
        *lines, pending = (pending + chunk).split(b"\n")
        yield from (line for line in lines if line.strip())
    if pending.strip():
        yield pending


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace") or "", meta.get("name") or ""


def labels_match(obj: dict[str, Any], selector: dict[str, str]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())
