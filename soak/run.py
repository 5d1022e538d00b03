"""
The long runs of the reliability suite (issue 9): the load and fault
scenarios of C{tests/test_faults.py}, scaled up and run for a duration.

    PYTHONPATH=. .venv/bin/python soak/run.py [--duration SECONDS]   # or: make soak

With C{--duration D} (default 300): the load run takes 40% of D with 64
consumers against 16 STT and 16 TTS producers, every answer checked against
its own request; the farm failover scenario does one SIGKILL/restart cycle of
a real farm process per 30 s of D, streaming API requests for 40% of D in
all; the other fault scenarios (node SIGKILLed mid-job, a node that never
answers, a node that answers garbage, a consumer that stops reading a 48 MiB
result) run once each; the attacks of C{tests/test_attack.py} run too, with
a farm SIGKILL per 30 s of D under its ledger and 30% of D of steady load on
the API's memory. Each scenario prints a C{[figures]} line; the exit status
is trial's (0: every assertion held).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument(
        "--duration", type=float, default=300.0,
        help="seconds the scaled scenarios run for, in all (default 300)",
    )
    parser.add_argument(
        "tests", nargs="*", default=["tests.test_faults", "tests.test_attack"],
        help="trial names to run (default: tests.test_faults tests.test_attack)",
    )
    args = parser.parse_args(argv)
    if args.duration < 10:
        parser.error("--duration must be at least 10 seconds")
    env = dict(os.environ, PRIVOX_SOAK_SECONDS=str(args.duration))
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else REPO
    print(f"soak: {args.duration:.0f} s of load and faults ({' '.join(args.tests)})", flush=True)
    started = time.monotonic()
    code = subprocess.call(
        [sys.executable, "-m", "twisted.trial", "--temp-directory", "_trial_temp-soak", *args.tests],
        cwd=REPO, env=env,
    )
    print(f"soak: {'passed' if code == 0 else 'FAILED'} in {time.monotonic() - started:.0f} s", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
