"""
docs/operating.rst, performed: its private CA (the OpenSSL commands as
written), its farm, API and node settings (the blocks as written, with the
host, ports, keys and /etc and /var/lib under a temporary root), the three
daemons started as their systemd units start them, a key made as its
section 9 makes one, and requests through the lot over TLS; the farm's
ledger gets their records. If a step in the guide stops working, this
fails, so the guide stays true.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import sys

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.filepath import FilePath
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

from tests.test_e2e import ENV, REPO, TWISTD, WatchedProcess, freePorts
from tests.test_faults import ProcessTestCase
from tests.test_roundtrip import speak
from tests.wer import wer

ROOT = FilePath(REPO)
GUIDE = ROOT.child("docs").child("operating.rst")
SENTENCE = "Every volunteer machine helps the exchange."


def literalBlocks(text: str) -> list[str]:
    """
    The literal blocks of a reStructuredText file (after a paragraph ending
    in C{::}), dedented.
    """
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].rstrip().endswith("::"):
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            body = []
            while j < len(lines) and (not lines[j].strip() or lines[j].startswith("    ")):
                body.append(lines[j][4:])
                j += 1
            if body:
                blocks.append("\n".join(body).strip("\n"))
            i = j
        else:
            i += 1
    return blocks


class Guide:
    """
    The guide's blocks, with the example host, ports, keys and directories
    of a real deployment replaced by this test's.
    """

    def __init__(self, root: FilePath, ports: dict[str, int], keys: dict[str, str]) -> None:
        self.blocks = literalBlocks(GUIDE.getContent().decode("utf-8"))
        self.root = root
        self.replacements = [
            ("farm.example.org", "localhost"),
            ("/etc/privox", root.path + "/etc/privox"),
            ("/var/lib/privox-api", root.path + "/var/lib/privox-api"),
            ("/var/lib/privox-farm", root.path + "/var/lib/privox-farm"),
            ("/var/lib/privox", root.path + "/var/lib/privox"),
            ("1776", str(ports["stt"])),
            ("1777", str(ports["tts"])),
            ("8080", str(ports["api"])),
            *keys.items(),
        ]

    def here(self, text: str) -> str:
        # One pass, longest first: a replaced path is never replaced again.
        table = dict(self.replacements)
        pattern = "|".join(re.escape(k) for k in sorted(table, key=len, reverse=True))
        return re.sub(pattern, lambda m: table[m.group(0)], text)

    def block(self, firstLine: str) -> str:
        """
        The one block that starts with C{firstLine}, made local.
        """
        [found] = [b for b in self.blocks if b.startswith(firstLine)]
        return self.here(found)

    def commands(self, firstLine: str) -> str:
        """
        A block of shell commands, made local and runnable without root:
        no owner or group for C{install}, no comments.
        """
        text = self.block(firstLine).replace("-o root -g privox ", "")
        return "\n".join(line.split("   #")[0] for line in text.splitlines())


def unitCommand(unit: str, guide: Guide, instance: str = "") -> tuple[list[str], str]:
    """
    The unit's C{ExecStart}, for this Python and the test's root, and its
    working directory.
    """
    text = ROOT.child("etc").child("systemd").child(unit).getContent().decode()
    [command] = re.findall(r"^ExecStart=(.+)$", text, re.M)
    argv = shlex.split(guide.here(command.replace("%i", instance)))
    assert argv[0] == "/opt/privox/venv/bin/twistd", argv
    where = re.findall(r"^WorkingDirectory=(.+)$", text, re.M)
    cwd = guide.here(where[0]) if where else guide.root.path
    return [sys.executable, "-c", TWISTD, *argv[1:]], cwd


class OperatingGuideTests(ProcessTestCase):
    timeout = 240

    async def sh(self, script: str, cwd: str) -> str:
        out, err, code = await getProcessOutputAndValue(
            "/bin/bash", ["-euo", "pipefail", "-c", script], env=ENV, path=cwd, reactor=reactor
        )
        self.assertEqual(code, 0, f"{script}\n{err.decode()}")
        return out.decode()

    def start(self, name: str, unit: str, guide: Guide, instance: str = "") -> WatchedProcess:
        argv, cwd = unitCommand(unit, guide, instance)
        FilePath(cwd).makedirs(ignoreExistingDirectory=True)
        process = WatchedProcess(name)
        reactor.spawnProcess(process, sys.executable, argv, env=ENV, path=cwd)
        self.addCleanup(self.kill, process)
        return process

    async def test_theGuide(self) -> None:
        root = FilePath(os.path.abspath(self.mktemp()))
        stt, tts, api = freePorts(3)
        keys = {
            "THE-API-CONSUMER-KEY": secrets.token_urlsafe(24),
            "THIS-NODE-PRODUCER-KEY": secrets.token_urlsafe(24),
        }
        guide = Guide(root, {"stt": stt, "tts": tts, "api": api}, keys)
        etc = root.child("etc").child("privox")
        etc.makedirs()
        ca = root.child("ca")
        ca.makedirs()

        # §2: a private CA, the farm's certificate, both installed.
        await self.sh(guide.commands("# the exchange's CA, once"), ca.path)
        await self.sh(guide.commands("install -d -o root -g privox -m 0750 /etc/privox/tls"), ca.path)
        await self.sh(guide.commands("install -o root -g privox -m 0640 exchange-ca.pem"), ca.path)

        # §3: the farm, its key files, and (§8) a ledger file.
        await self.sh(guide.commands("install -o root -g privox -m 0640 /dev/null /etc/privox/farm.toml"), root.path)
        farmToml = guide.block('name = "farm.example.org"')
        ledgerLine = guide.block('ledger = "/var/lib/privox-farm/ledger.jsonl"')
        etc.child("farm.toml").setContent(f"{farmToml}\n{ledgerLine}\n".encode())
        etc.child("producer-keys").setContent(keys["THIS-NODE-PRODUCER-KEY"].encode() + b"\n")
        etc.child("consumer-keys").setContent(keys["THE-API-CONSUMER-KEY"].encode() + b"\n")
        farm = self.start("farm", "privox-farm.service", guide)
        await farm.waitFor(b"starting on %d" % stt)

        # §5: a node with the models the guide names.
        await self.sh(guide.commands("install -o root -g privox -m 0640 /dev/null /etc/privox/node-main.toml"), root.path)
        nodeToml = guide.block('stt-farm = ["tls:host=farm.example.org:port=1776"]')
        etc.child("node-main.toml").setContent(nodeToml.encode() + b"\n")
        node = self.start("node", "privox-node@.service", guide, "main")
        for service in (b"stt", b"tts"):
            await node.waitFor(b"serving %s through tls:host=localhost" % service, timeout=90)

        # §4: the API.
        await self.sh(guide.commands("install -o root -g privox -m 0640 /dev/null /etc/privox/api.toml"), root.path)
        etc.child("api.toml").setContent(guide.block('listen = "tcp:8080').encode() + b"\n")
        apiProcess = self.start("api", "privox-api.service", guide)
        await apiProcess.waitFor(b"starting on %d" % api)
        url = f"http://127.0.0.1:{api}"
        http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        [healthz] = [line for line in guide.block("cp /opt/privox/src/etc/systemd/privox-api.service").splitlines()
                     if line.startswith("curl")]
        health = json.loads(await (await http.get(healthz.split()[-1])).text())
        self.assertEqual(health["status"], "ok")

        # §9: a user key, as the guide makes it (its alias, run as this user).
        section9 = guide.block("alias keys=")
        [create] = [line for line in section9.splitlines() if line.startswith("keys create") and "alice" in line]
        argv = shlex.split(create.split("   #")[0])[1:]
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "privox.cli", "keys", *argv], env=ENV, path=root.path, reactor=reactor
        )
        self.assertEqual(code, 0, err)
        key = out.decode().splitlines()[-1]
        self.assertTrue(key.startswith("pvx_"))

        # §4 and §5: the node enrols with the API's exchange key, its key
        # made a user key of the store (§9's import).
        exchangeKey = root.descendant(["var", "lib", "privox-api", "exchange.key"])
        self.assertEqual(exchangeKey.getPermissions().shorthand(), "rw-------")
        [curl] = [b for b in guide.blocks if b.startswith("curl -s http://127.0.0.1:8080/v1/exchange")]
        published = json.loads(await (await http.get(guide.here(curl).split()[-1])).text())["key"]
        imported = root.child("node-key.txt")
        imported.setContent(keys["THIS-NODE-PRODUCER-KEY"].encode() + b"\n")
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "privox.cli", "keys", "import", "--config", etc.child("api.toml").path, imported.path],
            env=ENV, path=root.path, reactor=reactor,
        )
        self.assertEqual(code, 0, err)
        enrolment = guide.block('exchange = "https://api.example.org"')
        enrolment = enrolment.replace("https://api.example.org", url).replace("THE-EXCHANGE-KEY", published)
        etc.child("node-main.toml").setContent(f"{nodeToml}\n{enrolment}\n".encode())
        await self.kill(node)
        node = self.start("node enrolled", "privox-node@.service", guide, "main")
        await node.waitFor(b"enrolled with " + url.encode(), timeout=90)
        identity = root.descendant(["var", "lib", "privox", "node-main", "identity.key"])
        self.assertEqual(identity.getPermissions().shorthand(), "rw-------")
        await apiProcess.waitFor(b"enrolled node")
        for service in (b"stt", b"tts"):
            await node.waitFor(b"serving %s through" % service, timeout=90)

        # Requests through the API, the farm (TLS) and the node: sealed
        # (the API's default, --e2e required).
        response = await http.post(url + "/tts", data={"key": key, "text": SENTENCE, "voice": "voice1"})
        spoken = await response.content()
        self.assertEqual(response.code, 200, spoken[:200])
        response = await http.post(
            url + "/stt", data={"key": key, "quality": "fast"}, files={"file": ("a.wav", speak(SENTENCE))}
        )
        text = await response.text()
        self.assertEqual(response.code, 200, text)
        self.assertLessEqual(wer(SENTENCE, text), 0.25, text)
        status = json.loads(await (await http.get(url + "/status")).text())
        self.assertEqual(status["farms"][0]["up"], True)

        # §8: the farm's ledger has both jobs.
        ledger = root.descendant(["var", "lib", "privox-farm", "ledger.jsonl"])
        records = [json.loads(line) for line in ledger.getContent().splitlines()]
        self.assertEqual(sorted(r["service"] for r in records), ["stt", "tts"])
        self.assertTrue(all(r["status"] == "ok" for r in records))
