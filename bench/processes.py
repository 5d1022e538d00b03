"""
What the benchmarks share for running their subprocesses: starting them
with the checkout on C{PYTHONPATH}, waiting for their ports, reading their
CPU time from C{/proc}, and stopping every one of them at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import socket
import subprocess
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: What the C{twistd} console script runs, under this interpreter. argv:
#: twistd's own (C{-n --pidfile= --logfile=FILE privox-farm ...}).
TWISTD_CODE = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"

CLK_TCK = os.sysconf("SC_CLK_TCK")


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpuTimes(pid: int) -> tuple[float, float]:
    """
    User and system CPU seconds process C{pid} has used so far.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpuSeconds(pid: int) -> float:
    return sum(cpuTimes(pid))


def machineCpuSeconds() -> float:
    """
    CPU seconds the whole machine has been busy (all cores, /proc/stat).
    """
    with open("/proc/stat") as f:
        ticks = [int(t) for t in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    guests = sum(ticks[8:])  # guest time is counted in user too
    return (sum(ticks) - idle - guests) / CLK_TCK


class Children:
    """
    The subprocesses a run started; L{stopAll} stops every one of them.
    Each writes to C{LOGDIR/NAME.out} (and twistd to C{NAME.log}, if told).
    """

    def __init__(self, logDir: str) -> None:
        self.logDir = logDir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(
        self, name: str, argv: list[str], discardStdout: bool = False, piped: bool = False
    ) -> subprocess.Popen[bytes]:
        """
        C{piped}: stdin and stdout are pipes to this process (instructions
        and results); stderr still goes to the file.
        """
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, env.get("PYTHONPATH", "")) if p)
        with open(self.path(name, "out"), "wb") as f:
            if piped:
                proc = subprocess.Popen(
                    argv, cwd=_REPO, env=env, stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=f,
                )
            else:
                proc = subprocess.Popen(
                    argv, cwd=_REPO, env=env, stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL if discardStdout else f, stderr=f,
                )
        self.procs[name] = proc
        return proc

    def path(self, name: str, kind: str) -> str:
        return os.path.join(self.logDir, f"{name}.{kind}")

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def cpuSeconds(self, name: str) -> float:
        return cpuSeconds(self.pid(name))

    def tail(self, name: str, lines: int = 30) -> str:
        text = []
        for kind in ("out", "log"):
            path = self.path(name, kind)
            if os.path.exists(path):
                with open(path, "rb") as f:
                    tail = b"".join(f.readlines()[-lines:]).decode("utf-8", "replace")
                text.append(f"[{os.path.basename(path)}]\n{tail}")
        return "\n".join(text)

    def readLine(self, name: str) -> str:
        proc = self.procs[name]
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")
        return line.decode()

    def waitForPort(self, name: str, port: int, timeout: float = 30.0) -> None:
        """
        Block until C{name} accepts connections on C{port} (call it before
        the benchmark's own reactor has work to do).
        """
        proc = self.procs[name]
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.tail(name)}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} is not listening on port {port}")
            time.sleep(0.05)

    def stop(self, name: str, grace: float = 3.0) -> None:
        """
        SIGTERM (a farm drains and, if profiled, saves its profile), then
        SIGKILL after C{grace} seconds: a farm stopped with jobs in flight
        would otherwise wait out its shutdown_grace.
        """
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stopAll(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def finish(self, failed: bool) -> None:
        """
        Stop them all; then show what each said if the run failed, or
        remove their logs if it did not.
        """
        self.stopAll()
        if failed:
            for name in self.procs:
                print(f"--- {name} output ({self.path(name, 'out')}):\n{self.tail(name)}",
                      file=sys.stderr)
        else:
            shutil.rmtree(self.logDir, ignore_errors=True)
