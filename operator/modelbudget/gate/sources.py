"""Where the gate reads the published limits: a watch on the ConfigMap, and its mounted directory as fallback.

The watch (get, then watch with a field selector on the one name) runs in a thread with the
kubernetes client and hands each object's data to the event loop. The mounted directory is
read on a timer, but applied only while the watch is not connected, and only when the files
changed since the watch last delivered: the kubelet refreshes mounts a minute or more late,
so an old file must never undo a newer value from the API when the apiserver goes away.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch

log = logging.getLogger("modelbudget.gate")

Offer = Callable[[Mapping[str, str] | None, str], object]
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
WATCH_SECONDS = 240  # the server ends a watch after this; the loop re-lists and watches again
RETRY_SECONDS = (0.5, 1.0, 2.0, 5.0)


class ConfigMapWatch:
    """Get + watch one ConfigMap in a daemon thread; ``connected`` says whether the last call worked."""

    def __init__(self, api: client.ApiClient, namespace: str, name: str, deliver: Offer) -> None:
        self.core: Any = client.CoreV1Api(api)
        self.namespace, self.name, self.deliver = namespace, name, deliver
        self.connected = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="configmap-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._list_and_watch()
                failures = 0
            except Exception as exc:  # any failure of the client or the network: keep the last good value
                self.connected = False
                delay = RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)]
                failures += 1
                log.warning("ConfigMap %s/%s: %s; retrying in %.1fs", self.namespace, self.name, exc, delay)
                self._stop.wait(delay)

    def _list_and_watch(self) -> None:
        selector = f"metadata.name={self.name}"
        listed = self.core.list_namespaced_config_map(self.namespace, field_selector=selector, _request_timeout=10)
        self.connected = True
        for item in listed.items:
            self.deliver(item.data, "api")
        if not listed.items:
            log.warning("ConfigMap %s/%s does not exist yet", self.namespace, self.name)
        stream = watch.Watch().stream(  # type: ignore[no-untyped-call]
            self.core.list_namespaced_config_map,
            self.namespace,
            field_selector=selector,
            resource_version=listed.metadata.resource_version,
            timeout_seconds=WATCH_SECONDS,
            _request_timeout=(10, WATCH_SECONDS + 30),
        )
        for event in stream:
            if self._stop.is_set():
                return
            kind, obj = event["type"], event["object"]
            if kind in ("ADDED", "MODIFIED"):
                self.deliver(obj.data, "api")
            elif kind == "DELETED":
                log.warning("ConfigMap %s/%s was deleted; keeping the last good limits", self.namespace, self.name)


class MountedDirectory:
    """Re-reads the ConfigMap mounted as a directory (one file per key)."""

    def __init__(self, directory: Path, keys: tuple[str, ...]) -> None:
        self.directory, self.keys = directory, keys
        self._last: dict[str, str] | None = None

    def read(self) -> dict[str, str]:
        data = {}
        for key in self.keys:
            try:
                data[key] = (self.directory / key).read_text()
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("cannot read %s: %s", self.directory / key, exc)
        return data

    def changed(self) -> dict[str, str] | None:
        """The files' content if it changed since the last call (the first call always counts)."""
        data = self.read()
        if data == self._last:
            return None
        self._last = data
        return data

    async def poll(self, interval: float, offer: Offer, watch_connected: Callable[[], bool]) -> None:
        while True:
            data = self.changed()
            # An empty directory is nothing published yet, not a bad value.
            if data and not watch_connected():
                offer(data, "file")
            await asyncio.sleep(interval)


def pod_namespace(explicit: str | None) -> str:
    """``explicit``, else $POD_NAMESPACE (the downward API), else the ServiceAccount's, else ``default``."""
    if explicit or os.environ.get("POD_NAMESPACE"):
        return explicit or os.environ["POD_NAMESPACE"]
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    except OSError:
        return "default"


def api_client(kubeconfig: str | None) -> client.ApiClient:
    """In a pod its ServiceAccount; elsewhere ``kubeconfig`` or the usual $KUBECONFIG."""
    if not kubeconfig:
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
            return client.ApiClient()
        except config.ConfigException:
            pass
    api: client.ApiClient = config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    return api
