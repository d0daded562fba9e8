"""hack/testbed.sh up and down themselves, for real: a taken port, a phase that fails, an apiserver
restarted by hand and a process whose pid file is lost, and a cold start right after ``down``.

These tests start and stop the testbed, so they need it down when they begin and leave it down;
they are not in the ``e2e`` tier (which shares one running testbed) but run before it
(hack/test.sh): ``pytest tests/e2e -m testbed_lifecycle``. With a testbed running they are
skipped (under CI: fail).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import config
from support import REPO, missing_binaries, restart_apiserver, run_testbed, skip_or_fail

pytestmark = pytest.mark.testbed_lifecycle

LOCAL = REPO / ".local"
# The defaults of hack/testbed.sh (docs/testbed.md).
PORTS = {
    16443: "kube-apiserver",
    12379: "etcd",
    12380: "etcd-peer",
    20257: "kube-controller-manager",
    20259: "kube-scheduler",
    20247: "kwok-controller",
    19090: "prometheus",
}


def listening(port: int) -> bool:
    out = subprocess.run(["ss", "-H", "-ltn", f"sport = :{port}"], capture_output=True, text=True, check=True)
    return bool(out.stdout.strip())


def checkout_processes() -> list[str]:
    """Live processes (zombies excluded) of this checkout's testbed: their command line or working
    directory names its .local/ (as hack/lib.sh's belongs_to decides)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if state != "Z" and (f"{LOCAL}/" in cmdline or f"{cwd}/".startswith(f"{LOCAL}/")):
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


def assert_all_gone() -> None:
    assert not checkout_processes(), checkout_processes()
    assert not [p for p in PORTS if listening(p)], {p: PORTS[p] for p in PORTS if listening(p)}


@pytest.fixture(scope="module", autouse=True)
def testbed_down() -> Iterator[None]:
    missing = missing_binaries()
    if missing:
        skip_or_fail(f"testbed binaries missing ({', '.join(missing)}): run hack/build-binaries.sh")
    if "apiserver: ready" in run_testbed("status").stdout or any(listening(p) for p in PORTS):
        skip_or_fail("a testbed (or something on its ports) is running; these tests start and stop their own")
    yield
    run_testbed("down")


@pytest.fixture
def hold_port() -> Iterator[Callable[[int], subprocess.Popen[str]]]:
    """``hold_port(port)``: a plain Python process listening on ``port``, killed afterwards."""
    holders: list[subprocess.Popen[str]] = []

    def hold(port: int) -> subprocess.Popen[str]:
        # SO_REUSEADDR, as servers set it: connections of an earlier testbed may linger in TIME_WAIT.
        code = "import socket, time; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
        code += f"s.bind(('127.0.0.1', {port})); s.listen(); print('listening', flush=True); time.sleep(600)"
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        holders.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
        return proc

    yield hold
    for proc in holders:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("port", [16443, 19090], ids=["apiserver", "prometheus"])
def test_up_names_the_holder_of_a_taken_port_and_starts_nothing(
    hold_port: Callable[[int], subprocess.Popen[str]], port: int
) -> None:
    holder = hold_port(port)
    up = run_testbed("up")
    assert up.returncode != 0
    assert f"127.0.0.1:{port} ({PORTS[port]}) is taken by pid {holder.pid}: {sys.executable} -c" in up.stderr
    assert "control plane" not in up.stdout, up.stdout  # not a phase begun
    assert holder.poll() is None  # left alone
    assert not checkout_processes(), checkout_processes()
    assert [p for p in PORTS if listening(p)] == [port]


def test_a_failing_phase_stops_what_that_up_started_and_shows_the_log(tmp_path: Path) -> None:
    # A Prometheus that cannot start: the last phase, after the control plane and the pool
    # controller are up.
    broken = tmp_path / "prometheus"
    broken.write_text(
        "#!/bin/sh\n"
        'echo \'ts=0 level=error msg="Error starting web server" err="listen tcp 127.0.0.1:19090: bind: '
        "address already in use\"' >&2\n"
        "exit 1\n"
    )
    broken.chmod(0o755)
    up = run_testbed("up", env={"MB_PROMETHEUS_BIN": str(broken)})
    assert up.returncode != 0, up.stdout
    assert "phase 'prometheus (127.0.0.1:19090)' failed: prometheus: the process exited" in up.stderr, up.stderr
    assert "bind: address already in use" in up.stderr
    assert "stopping what this 'up' started: control-plane poolcontroller prometheus" in up.stderr
    assert "[testbed] kube-controller-manager" in up.stdout  # the earlier phases did run
    assert_all_gone()
    assert run_testbed("down").returncode == 0


def test_a_component_that_dies_during_a_cold_start_is_started_once_more() -> None:
    """As kube-controller-manager may give up on an apiserver that a cold, loaded machine makes
    slow: here it is SIGKILLed as soon as kwokctl has started it."""
    up = subprocess.Popen([str(REPO / "hack" / "testbed.sh"), "up"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pid_file = LOCAL / "kwok" / "clusters" / "modelbudget" / "pids" / "kube-controller-manager.pid"
    deadline = time.monotonic() + 120
    while not (pid_file.exists() and pid_file.read_text().strip()):
        assert up.poll() is None and time.monotonic() < deadline, up.communicate()
        time.sleep(0.01)
    first = int(pid_file.read_text())
    os.kill(first, signal.SIGKILL)
    out, err = (b.decode() for b in up.communicate(timeout=900))
    assert up.returncode == 0, err
    assert "kube-controller-manager exited during start-up; starting it once more" in out, out
    assert int(pid_file.read_text()) != first
    assert "[testbed] kube-controller-manager " in out  # its phase passed: the default ServiceAccount exists
    assert run_testbed("down").returncode == 0
    assert_all_gone()


def test_down_stops_a_hand_restarted_apiserver_and_an_untracked_process_then_a_cold_up_works() -> None:
    up = run_testbed("up")
    assert up.returncode == 0, up.stderr
    api = config.new_client_from_config(config_file=str(LOCAL / "kubeconfig"))
    restart_apiserver(api, down_for=0)  # as test_faults.py does: a process kwokctl did not start
    (LOCAL / "run" / "prometheus.pid").unlink()  # a process whose pid file is lost

    down = run_testbed("down")
    assert down.returncode == 0, down.stderr
    assert "stopped kube-apiserver" in down.stdout
    assert "untracked on port 19090" in down.stdout
    assert_all_gone()

    up = run_testbed("up")
    assert up.returncode == 0, up.stderr
    assert "already running" not in up.stdout  # a cold start, not leftovers
    down = run_testbed("down")
    assert down.returncode == 0, down.stderr
    assert_all_gone()
