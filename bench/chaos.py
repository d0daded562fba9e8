"""Long randomized operator-kill runs: the e2e chaos test with more kills and several seeds.

    hack/testbed.sh up
    .venv/bin/python bench/chaos.py                     # 5 seeds x 15 kills
    .venv/bin/python bench/chaos.py --seeds 1 2 --kills 30

Each run is tests/e2e/test_faults.py::test_operator_killed_at_random_points_during_a_ramp
(SIGKILL at a random point of the reconcile cycle during a demand ramp, restart at once; the
invariants -- spend under the ceiling, ledger never falling, no decision applied twice, scale-up
still rate-limited -- are checked over the whole run). Prints one line per seed and the
convergence times (also in .local/logs/e2e-measurements.txt).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST = "tests/e2e/test_faults.py::test_operator_killed_at_random_points_during_a_ramp"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--kills", type=int, default=15, help="SIGKILLs per run")
    args = p.parse_args()
    failed = []
    for seed in args.seeds:
        env = {**os.environ, "MB_CHAOS_SEED": str(seed), "MB_CHAOS_KILLS": str(args.kills), "MB_KEEP_TESTBED": "1"}
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "pytest", TEST, "-m", "e2e", "-q", "-p", "no:cacheprovider", "-s"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        converged = [ln for ln in result.stdout.splitlines() if ln.startswith("chaos_converged_after_last_kill")]
        verdict = "ok" if result.returncode == 0 else "FAILED"
        print(f"seed {seed}: {args.kills} kills, {verdict} in {time.monotonic() - started:.0f}s; {' '.join(converged)}")
        if result.returncode != 0:
            failed.append(seed)
            print(result.stdout[-3000:])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
