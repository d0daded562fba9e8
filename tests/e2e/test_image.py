"""The operator image (hack/build-image.sh) run as the chart runs it, against the testbed.

The chart is installed with ``replicaCount=0`` (the testbed's kwok nodes run no containers); its
Deployment, read back from the apiserver, says how the operator container runs: the arguments, the
user (with no /etc/passwd entry, as a kubelet runs it), a read-only root filesystem, the dropped
capabilities, no privilege escalation, /tmp as the only writable place, the memory limit and the
ServiceAccount whose token the Pod gets. The image then runs on this machine with exactly that, on
the host network, with the token, the cluster CA and the namespace mounted where the kubelet puts
them and in-cluster credentials pointing at the testbed's apiserver: with podman where it works,
else with ``buildah run`` (chroot isolation, under a read-only bind of the container's root, which
buildah run cannot make itself). ``MB_IMAGE_RUNNER=podman|buildah`` forces one.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from support import CHART, LOGS, MB, Env, Testbed, budget, free_port, record, token_kubeconfig, wait_for, world

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
IMAGE_ENV = REPO / ".local" / "image.env"  # written by hack/build-image.sh
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# Root in some VMs and containers lacks CAP_SYS_RESOURCE, so podman cannot
# raise the open-file and process limits to its defaults; these are below any host's hard limits
# and far above what the operator uses.
PODMAN_ULIMITS = ("--ulimit", "nofile=8192:8192", "--ulimit", "nproc=4096:4096")
# Prints what the process inside the container may do, as JSON.
CONFINEMENT_PROBE = """
import json, os
def writable(path):
    try:
        with open(os.path.join(path, ".probe"), "w"):
            pass
        return True
    except OSError:
        return False
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(),
    "cap_eff": int(status["CapEff"], 16), "cap_bnd": int(status["CapBnd"], 16),
    "no_new_privs": int(status["NoNewPrivs"]), "seccomp": int(status["Seccomp"]),
    "writable": {p: writable(p) for p in ("/", "/opt/venv", "/etc", "/var/tmp", "/tmp")},
    "token": os.path.exists("%s/token" % os.environ["SA_DIR"]),
}))
"""


@dataclass(frozen=True)
class BuiltImage:
    name: str
    id: str
    storage_driver: str
    entrypoint: tuple[str, ...]


@dataclass(frozen=True)
class RunSpec:
    """How a container runs, in the terms of a Pod spec, whatever runs it."""

    argv: tuple[str, ...]  # entrypoint + args
    user: str  # "uid:gid"
    read_only_root: bool
    drop_capabilities: tuple[str, ...]
    no_new_privileges: bool
    tmpfs: tuple[tuple[str, str], ...]  # (path, size in the runtime's units)
    volumes: tuple[tuple[str, str], ...]  # (host dir, path inside), read-only
    env: tuple[tuple[str, str], ...]
    memory: str | None  # in the runtime's units


class Runner(Protocol):
    name: str

    def command(self, spec: RunSpec, container: str) -> list[str]: ...

    def remove(self, container: str) -> None: ...


def _quantity(value: str) -> str:
    """A Kubernetes binary quantity (16Mi, 1Gi) in the units podman and buildah take (16m, 1g)."""
    match = re.fullmatch(r"(\d+)([KMG])i", value)
    assert match, f"quantity {value!r}: only Ki, Mi and Gi are translated"
    return match[1] + match[2].lower()


class Podman:
    name = "podman"

    def __init__(self, image: BuiltImage) -> None:
        self.image = image
        self.base = ["podman", "--storage-driver", image.storage_driver]
        # crun refuses cgroups in hybrid (v1 + v2) mode, which runc handles; runc is as good elsewhere.
        if shutil.which("runc"):
            self.base += ["--runtime", "runc"]

    def command(self, spec: RunSpec, container: str) -> list[str]:
        cmd = [*self.base, "run", "--rm", "--name", container, "--network", "host", "--user", spec.user]
        # A kubelet's runtime adds no /etc/passwd entry for runAsUser; podman would, unless told not to.
        cmd += ["--passwd=false"]
        if spec.read_only_root:
            cmd += ["--read-only", "--read-only-tmpfs=false"]  # writable only where the spec says
        cmd += [f"--cap-drop={cap}" for cap in spec.drop_capabilities]
        if spec.no_new_privileges:
            cmd += ["--security-opt", "no-new-privileges"]
        cmd += [f"--tmpfs={path}:size={size}" for path, size in spec.tmpfs]
        cmd += [f"--volume={host}:{path}:ro" for host, path in spec.volumes]
        cmd += [f"--env={name}={value}" for name, value in spec.env]
        if spec.memory:
            cmd += ["--memory", spec.memory]
        return [*cmd, *PODMAN_ULIMITS, "--entrypoint", spec.argv[0], self.image.id, *spec.argv[1:]]

    def remove(self, container: str) -> None:
        subprocess.run([*self.base, "rm", "--force", "--ignore", container], capture_output=True, timeout=60)


def _inside(root: str, path: str) -> str:
    """``path`` with the container's symlinks resolved (Debian's /var/run -> /run, for one).

    buildah run (1.28) follows an absolute symlink in a mount's destination out of the container,
    and the mount never shows inside.
    """
    resolved = Path("/")
    for part in Path(path).parts[1:]:
        resolved /= part
        for _ in range(10):  # a chain of links
            host = Path(root, *resolved.parts[1:])
            if not host.is_symlink():
                break
            resolved = Path(os.path.normpath(resolved.parent / os.readlink(host)))
    return str(resolved)


class BuildahRun:
    """``buildah run --isolation chroot`` on the host network.

    buildah run has no read-only root and no memory limit: the root is made read-only by a
    read-only bind of the container's root in a private mount namespace around it (but /run, which
    only root may write); the memory limit is not applied. no_new_privs is set by util-linux's
    setpriv from the image. On SIGTERM buildah run kills the command outright: a graceful stop is
    only shown under podman.
    """

    name = "buildah"

    def __init__(self, image: BuiltImage) -> None:
        self.image = image
        self.base = ["buildah", "--storage-driver", image.storage_driver]

    def _buildah(self, *args: str) -> str:
        done = subprocess.run([*self.base, *args], capture_output=True, text=True, check=True, timeout=120)
        return done.stdout.strip()

    def command(self, spec: RunSpec, container: str) -> list[str]:
        self._buildah("from", "--quiet", "--name", container, self.image.id)
        root = self._buildah("mount", container)
        cmd = [*self.base, "run", "--isolation", "chroot", "--network", "host", "--user", spec.user]
        cmd += [f"--cap-drop={cap}" for cap in spec.drop_capabilities]
        cmd += [f"--mount=type=tmpfs,destination={path}" for path, _ in spec.tmpfs]
        cmd += [f"--volume={host}:{_inside(root, path)}:ro" for host, path in spec.volumes]
        cmd += [f"--env={name}={value}" for name, value in spec.env]
        argv = ["setpriv", "--no-new-privs", "--", *spec.argv] if spec.no_new_privileges else list(spec.argv)
        cmd += [container, "--", *argv]
        if not spec.read_only_root:
            return cmd
        # /run stays writable to root only: buildah run puts (and removes) its marker file there.
        read_only = (
            'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0"'
            ' && mount --bind "$0/run" "$0/run" && mount -o remount,bind,rw "$0/run" && exec "$@"'
        )
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", read_only, root, *cmd]

    def remove(self, container: str) -> None:
        subprocess.run([*self.base, "rm", container], capture_output=True, timeout=60)


def _unavailable(reason: str) -> None:
    # hack/test.sh runs this file only after it built the image: a missing image there is a failure.
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def image() -> BuiltImage:
    if not IMAGE_ENV.exists() or not shutil.which("buildah"):
        _unavailable("no image built: run hack/build-image.sh --with-podman (as root)")
    built = dict(line.split("=", 1) for line in IMAGE_ENV.read_text().splitlines() if "=" in line)
    buildah = ["buildah", "--storage-driver", built["MB_STORAGE_DRIVER"]]
    inspect = subprocess.run(
        [*buildah, "inspect", "--type", "image", built["MB_IMAGE_ID"]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if inspect.returncode != 0:
        _unavailable(f"image {built['MB_IMAGE']} ({built['MB_IMAGE_ID'][:12]}) is gone: {inspect.stderr.strip()}")
    return BuiltImage(
        built["MB_IMAGE"],
        built["MB_IMAGE_ID"],
        built["MB_STORAGE_DRIVER"],
        tuple(json.loads(inspect.stdout)["OCIv1"]["config"]["Entrypoint"]),
    )


def confined(argv: tuple[str, ...], volumes: tuple[tuple[str, str], ...] = ()) -> RunSpec:
    """The chart's defaults (values.yaml), for runs that need no cluster."""
    return RunSpec(argv, "65532:65532", True, ("ALL",), True, (("/tmp", "16m"),), volumes, (), "512m")


def run_once(runner: Runner, spec: RunSpec) -> subprocess.CompletedProcess[str]:
    container = f"mb-e2e-{secrets.token_hex(3)}"
    try:
        return subprocess.run(runner.command(spec, container), capture_output=True, text=True, timeout=120)
    finally:
        runner.remove(container)


@pytest.fixture(scope="module")
def runner(image: BuiltImage) -> Runner:
    forced = os.environ.get("MB_IMAGE_RUNNER")
    assert forced in (None, "podman", "buildah"), f"MB_IMAGE_RUNNER={forced}: podman or buildah"
    if forced != "buildah" and shutil.which("podman"):
        podman = Podman(image)
        probe = run_once(podman, confined(("python", "-c", "pass")))
        if probe.returncode == 0:
            return podman
        if forced == "podman":
            pytest.fail(f"podman cannot run the image: {probe.stderr.strip()}")
        sys.stderr.write(f"podman cannot run the image here ({probe.stderr.strip()}); using buildah run\n")
    return BuildahRun(image)


def chart_run_spec(deployment: Any, entrypoint: tuple[str, ...], credentials: Path, env: dict[str, str]) -> RunSpec:
    """The chart's container, as its Deployment says, on the host network.

    Listeners on 0.0.0.0 bind loopback instead (the container shares the host's network). A volume
    or an env var this does not know how to give the container fails the test instead of being
    dropped silently. Left to the runtime: the RuntimeDefault seccomp profile (its default one);
    left out: the probes (the test polls /healthz itself), ports
    and CPU requests.
    """
    env = dict(env)
    pod = deployment.spec.template.spec
    (container,) = pod.containers
    pod_sc, sc = pod.security_context, container.security_context
    uid, gid = sc.run_as_user or pod_sc.run_as_user, sc.run_as_group or pod_sc.run_as_group
    assert uid and gid, "the chart must give a numeric non-root user"
    volumes = {v.name: v for v in pod.volumes or []}
    tmpfs = []
    for mount in container.volume_mounts or []:
        volume = volumes[mount.name]
        assert volume.empty_dir is not None, f"volume {mount.name}: only emptyDir is translated"
        tmpfs.append((mount.mount_path, _quantity(volume.empty_dir.size_limit)))
    for var in container.env or []:
        if var.value is not None:
            env[var.name] = var.value
        else:
            assert var.value_from.field_ref.field_path == "metadata.namespace", f"env {var.name}: not translated"
            env[var.name] = deployment.metadata.namespace
    assert pod.automount_service_account_token is not False, "the operator needs its ServiceAccount token"
    limits = (container.resources.limits if container.resources else None) or {}
    return RunSpec(
        argv=(*(container.command or entrypoint), *(a.replace("0.0.0.0:", "127.0.0.1:") for a in container.args)),
        user=f"{uid}:{gid}",
        read_only_root=bool(sc.read_only_root_filesystem),
        drop_capabilities=tuple(sc.capabilities.drop or ()) if sc.capabilities else (),
        no_new_privileges=sc.allow_privilege_escalation is False,
        tmpfs=tuple(tmpfs),
        volumes=((str(credentials), SERVICE_ACCOUNT_DIR),),
        env=tuple(sorted(env.items())),
        memory=_quantity(limits["memory"]) if "memory" in limits else None,
    )


def in_cluster_credentials(sa_kubeconfig: str, namespace: str, directory: Path) -> dict[str, str]:
    """What the kubelet gives a Pod: token, cluster CA and namespace as files, the apiserver as env."""
    config = yaml.safe_load(Path(sa_kubeconfig).read_text())
    cluster, user = config["clusters"][0]["cluster"], config["users"][0]["user"]
    directory.mkdir(mode=0o755)
    (directory / "token").write_text(user["token"])
    (directory / "ca.crt").write_bytes(base64.b64decode(cluster["certificate-authority-data"]))
    (directory / "namespace").write_text(namespace)
    for f in directory.iterdir():
        f.chmod(0o644)  # the Pod's user reads them (projected volumes default to 0644 too)
    server = urllib.parse.urlsplit(cluster["server"])
    return {"KUBERNETES_SERVICE_HOST": str(server.hostname), "KUBERNETES_SERVICE_PORT": str(server.port)}


@dataclass(frozen=True)
class Started:
    proc: subprocess.Popen[bytes]
    log: Path

    def running(self) -> bool:
        tail = "\n".join(self.log.read_text().splitlines()[-20:])
        assert self.proc.poll() is None, f"the container exited with {self.proc.returncode}:\n{tail}"
        return True


@pytest.fixture
def container(runner: Runner) -> Iterator[Callable[[RunSpec], Started]]:
    """Factory: starts a long-running container (log under .local/logs); removed afterwards."""
    started: list[tuple[str, Started]] = []

    def start(spec: RunSpec) -> Started:
        name = f"mb-e2e-{secrets.token_hex(3)}"
        LOGS.mkdir(parents=True, exist_ok=True)
        log = LOGS / f"e2e-image-{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                runner.command(spec, name), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        started.append((name, Started(proc, log)))
        return started[-1][1]

    yield start
    for name, run in started:
        if run.proc.poll() is None:
            os.killpg(run.proc.pid, signal.SIGKILL)
            run.proc.wait(timeout=30)
        runner.remove(name)
        tail = "\n".join(run.log.read_text().splitlines()[-30:])
        sys.stderr.write(f"--- {run.log.name} (last lines) ---\n{tail}\n")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@world(replicas=1, rps=1.0)
def test_the_image_runs_confined_as_the_chart_says_and_reconciles(
    image: BuiltImage,
    runner: Runner,
    container: Callable[[RunSpec], Started],
    helm: Callable[..., subprocess.CompletedProcess[str]],
    testbed: Testbed,
    api_client: client.ApiClient,
    env: Env,
    tmp_path: Path,
) -> None:
    namespace = env.ns
    release = f"mbimage-{secrets.token_hex(3)}"
    fullname = f"{release}-modelbudget-operator"
    metrics_port, health_port = free_port(), free_port()
    sets = [
        "replicaCount=0",
        "crds.install=false",  # modelbudget_crd applied it; other releases may own it
        "rbac.nodePoolProviders.kwok=true",
        "tenancy.inlineClusterPools=true",  # the world's ModelBudget names its KwokNodePool inline
        f"watchNamespaces={{{namespace}}}",
        "operator.intervalSeconds=3",
        "operator.statusHeartbeatSeconds=5",
        "leaderElection.leaseDurationSeconds=6",
        f"metrics.port={metrics_port}",
        f"healthPort={health_port}",
    ]
    helm("install", release, str(CHART), "-n", namespace, *(a for s in sets for a in ("--set", s)))
    apps = client.AppsV1Api(api_client)
    try:
        deployment = apps.read_namespaced_deployment(fullname, namespace)
        sa_kubeconfig = token_kubeconfig(testbed.kubeconfig, namespace, fullname, testbed, tmp_path / "sa.kubeconfig")
        credentials = tmp_path / "serviceaccount"
        variables = in_cluster_credentials(sa_kubeconfig, namespace, credentials)
        spec = chart_run_spec(deployment, image.entrypoint, credentials, variables)
        sys.stderr.write(f"runner {runner.name}, container {spec}\n")

        # The container gets what the chart asks for: its user, no capabilities, no privilege
        # escalation, a read-only root with /tmp writable, the token where in-cluster config reads it.
        probe = run_once(
            runner, replace(spec, argv=("python", "-c", CONFINEMENT_PROBE), env=(("SA_DIR", SERVICE_ACCOUNT_DIR),))
        )
        assert probe.returncode == 0, probe.stderr
        seen = json.loads(probe.stdout.strip().splitlines()[-1])
        assert (seen["uid"], seen["gid"]) == (65532, 65532)
        assert seen["cap_eff"] == 0 and seen["no_new_privs"] == 1, seen
        assert seen["writable"] == {"/": False, "/opt/venv": False, "/etc": False, "/var/tmp": False, "/tmp": True}
        assert seen["token"]
        assert seen["seccomp"] == 2, seen  # a filter: the runtime's default profile (RuntimeDefault)

        env.apply_budget(budget("llm", env.pool, testbed.prometheus_url))

        started = time.monotonic()
        operator = container(spec)
        wait_for(lambda: operator.running() and _healthy(f"http://127.0.0.1:{health_port}/healthz"), 60, "/healthz")
        record("image_start_seconds_to_healthz", time.monotonic() - started)
        wait_for(lambda: operator.running() and env.status().get("conditions"), 60, "the first status")
        record("image_start_seconds_to_first_status", time.monotonic() - started)
        wait_for(lambda: env.condition("Ready").get("status") == "True", 60, "Ready=True")
        assert env.condition("MetricsAvailable")["status"] == "True"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            assert b"modelbudget_" in r.read()

        # A knob moved on what Prometheus saw: 30 req/s x 400 tokens needs more than one replica.
        base = env.replicas()
        env.demand(30)
        wait_for(lambda: env.replicas() > base, 90, "a scale-up")
        assert env.token_limit() is not None
        assert env.events("Rescaled")
        # The Lease under the chart's name, held by this container (the chart gives no --identity).
        lease = client.CoordinationV1Api(api_client).read_namespaced_lease(fullname, namespace)
        assert lease.spec.holder_identity

        # A Pod gets 30 s between SIGTERM and SIGKILL by default.
        # Nothing tried to write where it may not.
        operator.proc.send_signal(signal.SIGTERM)
        operator.proc.wait(timeout=30)
        log = operator.log.read_text()
        assert "Read-only file system" not in log and "Permission denied" not in log, log
    finally:
        with contextlib.suppress(ApiException):
            client.CustomObjectsApi(api_client).patch_namespaced_custom_object(
                *MB, namespace, "modelbudgets", "llm", {"metadata": {"finalizers": None}}
            )
        helm("uninstall", release, "-n", namespace, check=False)


def test_the_gate_runs_from_the_image(image: BuiltImage, runner: Runner) -> None:
    listing = run_once(runner, confined(("modelbudget", "--help")))
    assert listing.returncode == 0, listing.stderr
    # argparse lists the subcommands under "positional arguments", indented by four spaces.
    commands = re.findall(r"^    ([a-z][\w-]*)\s", listing.stdout, re.M)
    assert "run" in commands, listing.stdout
    if "gate" not in commands:
        pytest.skip(f"the image's modelbudget has no `gate` subcommand yet ({', '.join(commands)}); runs once it lands")
    gate = run_once(runner, confined(("modelbudget", "gate", "--help")))
    assert gate.returncode == 0, gate.stderr
    assert "usage" in gate.stdout.lower()
