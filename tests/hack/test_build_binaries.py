"""hack/build-binaries.sh run twice at once into one cache: the second copy waits for the build the
first has under way, then finds its binaries cached; neither breaks the other.

A stand-in ``go`` on PATH plays the compiler (a real build takes minutes): it records each call,
takes a while, and writes executables where ``go install`` would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "hack" / "build-binaries.sh"

FAKE_GO = """#!/usr/bin/env bash
# go install ... sigs.k8s.io/kwok/cmd/<name>@<version>: writes $GOBIN/<name>, slowly.
echo "$*" >>"$GO_CALLS"
sleep "$GO_SECONDS"
for arg in "$@"; do
  case $arg in
    */cmd/*@*) name=${arg##*/cmd/}; name=${name%@*}; printf '#!/bin/sh\\n' >"$GOBIN/$name"; chmod +x "$GOBIN/$name" ;;
  esac
done
"""

pytestmark = pytest.mark.skipif(shutil.which("flock") is None, reason="flock (util-linux) is not installed")


@pytest.fixture
def sandbox(tmp_path: Path) -> dict[str, str]:
    """An empty cache and the stand-in ``go``; returns the environment for the script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "go").write_text(FAKE_GO)
    (bin_dir / "go").chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "MB_CACHE": str(tmp_path / "cache"),
        "GO_CALLS": str(tmp_path / "go-calls"),
        "GO_SECONDS": "2",
    }


def build(env: dict[str, str], *targets: str) -> subprocess.Popen[str]:
    return subprocess.Popen([str(SCRIPT), *targets], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def go_calls(env: dict[str, str]) -> list[str]:
    path = Path(env["GO_CALLS"])
    return path.read_text().splitlines() if path.exists() else []


def kwok_bin(env: dict[str, str]) -> Path:
    out = subprocess.run(
        ["bash", "-c", f"source {REPO}/hack/versions.sh; kwok_bin"], env=env, capture_output=True, text=True, check=True
    )
    return Path(out.stdout.strip())


def test_a_second_copy_waits_for_the_build_under_way_then_finds_it_cached(sandbox: dict[str, str]) -> None:
    first = build(sandbox, "kwok")
    deadline = time.monotonic() + 30
    while not go_calls(sandbox):  # the first copy holds the lock and is compiling
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the first copy never started compiling"
        time.sleep(0.05)
    second = build(sandbox, "kwok")
    err1 = first.communicate(timeout=60)[1]
    err2 = second.communicate(timeout=60)[1]

    assert first.returncode == 0, err1
    assert second.returncode == 0, err2
    assert len(go_calls(sandbox)) == 1, go_calls(sandbox)  # built once, by the first copy
    assert "another build holds" in err2 and "waiting for it" in err2, err2
    assert "cached in" in err2, err2
    assert {p.name for p in kwok_bin(sandbox).iterdir()} == {"kwok", "kwokctl"}


def test_two_copies_with_the_cache_present_both_succeed_without_building(sandbox: dict[str, str]) -> None:
    first = build(sandbox, "kwok")
    first.communicate(timeout=60)
    assert first.returncode == 0
    calls = go_calls(sandbox)

    copies = [build(sandbox, "kwok") for _ in range(2)]
    results = [c.communicate(timeout=60) for c in copies]
    assert [c.returncode for c in copies] == [0, 0], results
    assert go_calls(sandbox) == calls
    assert all("cached in" in err for _, err in results), results
