"""
The systemd units in etc/systemd: C{systemd-analyze verify} accepts each of
them without a warning, and they run the daemons the way
docs/operating.rst says (twistd in the foreground as an unprivileged user,
restarted on failure, hardened).

C{systemd-analyze} comes with Debian's C{systemd} package
(C{apt-get install -y systemd}); without it these tests fail rather than
skip, so that CI cannot silently stop checking the units.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from tests.test_e2e import freePorts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = "from twisted.scripts.twistd import run; run()"
UNITS = FilePath(__file__).parent().parent().child("etc").child("systemd")
SHIPPED_TWISTD = "/opt/privox/venv/bin/twistd"
UNIT_NAMES = [
    "privox-farm.service",
    "privox-farm.socket",
    "privox-api.service",
    "privox-node@.service",
]
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "LockPersonality": "yes",
    # pyOpenSSL's cffi callbacks (all TLS) need W+X memory: see the units.
    "MemoryDenyWriteExecute": "no",
}


def systemdAnalyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        raise AssertionError(
            "systemd-analyze is missing: install Debian's systemd package "
            "(apt-get install -y systemd) to check the unit files"
        )
    return found


def twistd() -> str:
    """
    The twistd of the interpreter running the tests (the venv's), which
    systemd-analyze needs to find executable.
    """
    beside = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("twistd")
    if found is None:
        raise AssertionError("no twistd executable beside the Python running the tests")
    return found



def parseUnit(path: FilePath) -> dict[str, dict[str, list[str]]]:
    """
    Sections of a unit file, each key with all its values (keys repeat).
    """
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in path.getContent().decode().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


class VerifyTests(SynchronousTestCase):
    def test_systemdAnalyzeVerify(self) -> None:
        """
        Each unit, with its ExecStart pointed at this venv's twistd (the
        shipped path is /opt/privox/venv), passes C{systemd-analyze verify}
        with no output at all: systemd only warns about an unknown key or a
        bad value, so a warning fails the test too.
        """
        analyze = systemdAnalyze()
        work = FilePath(self.mktemp())
        work.makedirs()
        for name in UNIT_NAMES:
            text = UNITS.child(name).getContent().decode()
            work.child(name).setContent(text.replace(SHIPPED_TWISTD, twistd()).encode())
            work.child(name).chmod(0o644)
        for name in UNIT_NAMES:
            result = subprocess.run(
                [analyze, "verify", "--man=no", work.child(name).path],
                capture_output=True,
                text=True,
                cwd=work.path,
            )
            output = (result.stdout + result.stderr).strip()
            self.assertEqual(
                (result.returncode, output), (0, ""), f"systemd-analyze verify {name}"
            )

    def test_verifyCatchesMistakes(self) -> None:
        """
        The check above is not vacuous: a missing binary fails it, a
        misspelt key makes it speak.
        """
        analyze = systemdAnalyze()
        work = FilePath(self.mktemp())
        work.makedirs()
        text = UNITS.child("privox-api.service").getContent().decode()
        work.child("missing.service").setContent(text.encode())
        misspelt = text.replace(SHIPPED_TWISTD, twistd()).replace("NoNewPrivileges", "NoNewPrivilege")
        work.child("misspelt.service").setContent(misspelt.encode())
        for name in ("missing.service", "misspelt.service"):
            work.child(name).chmod(0o644)
        missing = subprocess.run(
            [analyze, "verify", "--man=no", work.child("missing.service").path],
            capture_output=True, text=True,
        )
        self.assertNotEqual(missing.returncode, 0)
        self.assertIn(SHIPPED_TWISTD, missing.stdout + missing.stderr)
        spoke = subprocess.run(
            [analyze, "verify", "--man=no", work.child("misspelt.service").path],
            capture_output=True, text=True,
        )
        self.assertIn("NoNewPrivilege", spoke.stdout + spoke.stderr)


class UnitTests(SynchronousTestCase):
    def service(self, name: str) -> dict[str, list[str]]:
        return parseUnit(UNITS.child(name))["Service"]

    def test_daemons(self) -> None:
        """
        twistd in the foreground on privox's reactor, no pidfile, logging to
        the journal, each with its config under /etc/privox, as the privox
        user.
        """
        expected = {
            "privox-farm.service": "privox-farm --config /etc/privox/farm.toml",
            "privox-api.service": "privox-api --config /etc/privox/api.toml",
            "privox-node@.service": "privox-node --config /etc/privox/node-%i.toml",
        }
        for name, command in expected.items():
            service = self.service(name)
            self.assertEqual(
                service["ExecStart"],
                [
                    f"{SHIPPED_TWISTD} --nodaemon --reactor=privox --pidfile= "
                    f"--logger=privox.logs.textStdout {command}"
                ],
                name,
            )
            self.assertEqual((service["User"], service["Group"]), (["privox"], ["privox"]), name)
            self.assertEqual(service["Restart"], ["on-failure"], name)
            for key, value in HARDENING.items():
                self.assertEqual(service.get(key), [value], f"{name}: {key}")
            self.assertEqual(parseUnit(UNITS.child(name))["Install"]["WantedBy"], ["multi-user.target"])

    def test_nodeDirectories(self) -> None:
        """
        Nodes get a state and a cache directory, and the engines' downloads
        are pointed there (the unit's home is protected).
        """
        service = self.service("privox-node@.service")
        self.assertEqual((service["StateDirectory"], service["CacheDirectory"]), (["privox"], ["privox"]))
        environment = dict(e.split("=", 1) for e in service["Environment"])
        self.assertEqual(environment["HOME"], "/var/lib/privox")
        self.assertTrue(environment["HF_HOME"].startswith("/var/cache/privox/"))

    def test_farmSocket(self) -> None:
        """
        The socket unit opens the farm's two ports, in the order the
        C{systemd:} endpoints' indexes say, for the farm's service.
        """
        socket = parseUnit(UNITS.child("privox-farm.socket"))["Socket"]
        self.assertEqual(socket["ListenStream"], ["1776", "1777"])
        self.assertEqual(socket["Service"], ["privox-farm.service"])



class SocketActivationTests(SynchronousTestCase):
    def test_farmTakesSystemdSockets(self) -> None:
        """
        With the endpoints the docs give (C{systemd:domain=INET:index=0} and
        C{1}), a real twistd privox-farm serves on sockets systemd opened:
        C{systemd-socket-activate} (systemd's own tool for this) holds two
        ports, starts the farm at the first connection and hands both over.
        """
        activate = shutil.which("systemd-socket-activate")
        if activate is None:
            raise AssertionError(
                "systemd-socket-activate is missing: apt-get install -y systemd"
            )
        ports = freePorts(2)
        farm = subprocess.Popen(
            [
                activate,
                *(f"--listen=127.0.0.1:{port}" for port in ports),
                # systemd names every descriptor (after the socket unit), and
                # Twisted ignores descriptors without names.
                "--fdname=privox-farm.socket:privox-farm.socket",
                # It passes the farm only the variables it is told to: this
                # one makes the farm the checkout's code, not an installed copy.
                f"--setenv=PYTHONPATH={REPO}",
                sys.executable, "-c", TWISTD,
                "--nodaemon", "--reactor=privox", "--pidfile=",
                "--logger=privox.logs.textStdout", "privox-farm",
                "--stt-listen", "systemd:domain=INET:index=0",
                "--tts-listen", "systemd:domain=INET:index=1",
                "--stats-interval", "0",
            ],
            env=dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.addCleanup(farm.wait, 30)
        self.addCleanup(farm.terminate)
        # systemd-socket-activate says when it holds the ports.
        listening = b""
        while listening.count(b"Listening on") < 2:
            line = farm.stdout.readline()
            self.assertTrue(line, f"systemd-socket-activate ended: {listening!r}")
            listening += line
        for port in ports:
            # Until the farm runs, the kernel queues the connection; the farm's
            # first word is its greeting.
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                self.assertEqual(s.recv(3), b"who", f"port {port}")
        farm.terminate()
        output = farm.communicate(timeout=30)[0].decode(errors="replace")
        for index in (0, 1):
            self.assertIn(f"on systemd:domain=INET:index={index}", output)
