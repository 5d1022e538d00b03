"""
privox-local end to end, over real sockets: farm, API and a node with the
bundled models in one process; curl-style requests to the original and the
OpenAI endpoints.
"""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import wave

from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from privox.identity import Certificate, exchangePublicKey
from privox.keys import accountId
from privox.local import LocalExchange, LocalSettings, Options, apiSettings, banner, keyDirectory
from tests.support import until
from tests.test_e2e import ENV, REPO, TWISTD
from tests.test_faults import ProcessTestCase
from tests.test_page import localExchange
from tests.test_roundtrip import speak
from tests.wer import wer

SENTENCE = "She sells fresh bread at the market every morning."


def multipart(fields: dict[str, str], wav: bytes) -> tuple[bytes, str]:
    boundary = "privoxtestboundary"
    parts = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="speech.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n".encode() + wav + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class OptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        options = Options()
        options.parseOptions([])
        self.assertEqual(options.settings, LocalSettings())

    def test_wrongService(self) -> None:
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--stt", "piper:x"])

    def test_e2e(self) -> None:
        self.assertEqual(LocalSettings().e2e, "required")
        options = Options()
        options.parseOptions(["--e2e", "preferred"])
        self.assertEqual(options.settings.e2e, "preferred")
        e = self.assertRaises(usage.UsageError, Options().parseOptions, ["--e2e", "maybe"])
        self.assertIn("--e2e must be one of required, preferred, off", str(e))

    def test_keysBesideTheStore(self) -> None:
        """
        The exchange's and the node's keys live beside a SQLite store, else
        in the working directory.
        """
        self.assertEqual(keyDirectory(LocalSettings()), "")
        self.assertEqual(keyDirectory(LocalSettings(accounts="sqlite:/var/x/a.sqlite3")), "/var/x")
        self.assertEqual(keyDirectory(LocalSettings(accounts="none")), "")

    def test_bannerSaysHowToAuthenticate(self) -> None:
        url = "http://127.0.0.1:8080"
        anonymous = "\n".join(banner(url, LocalSettings()))
        self.assertIn("no key needed", anonymous)
        self.assertIn("privox keys create --accounts sqlite:privox-accounts.sqlite3", anonymous)
        self.assertNotIn("key=", anonymous)
        keyed = "\n".join(banner(url, LocalSettings(anonymous="off")))
        self.assertIn("-F key=KEY", keyed)
        self.assertIn("Bearer KEY", keyed)
        self.assertIn("-F key=demo", "\n".join(banner(url, LocalSettings(accounts="none"))))

    def test_everythingMapsToTheBundledModels(self) -> None:
        api = apiSettings(LocalSettings())
        self.assertTrue(all(line.split()[1:] == ["whisper:tiny.en"] * 2 for line in api.stt_model))
        voices = {line.split()[0] for line in api.voice}
        self.assertTrue({"voice1", "voice2", "alloy", "nova"} <= voices)


class LocalExchangeTests(TestCase):
    timeout = 120

    async def test_curlExamples(self) -> None:
        store = FilePath(self.mktemp())
        local = LocalExchange(LocalSettings(port=0, accounts=f"sqlite:{store.path}"), reactor)
        local.startService()
        self.addCleanup(local.stopService)
        await local.ready
        url = local.url
        self.assertEqual(
            [line.strip().split(" ", 3)[2] for line in banner(url, local.settings) if "curl" in line][:3],
            [f"{url}/tts", f"{url}/stt", f"{url}/v1/audio/transcriptions"],
        )
        assert local.store is not None
        key, _ = await local.store.createKey(reactor.seconds())
        pool = HTTPConnectionPool(reactor, persistent=False)
        http = HTTPClient(Agent(reactor, pool=pool))

        # /tts, as the original's curl example posts it.
        response = await http.post(
            f"{url}/tts", data={"voice": "voice1", "text": SENTENCE}
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["audio/x-wav"])
        spoken = await response.content()
        with wave.open(io.BytesIO(spoken)) as w:
            self.assertGreater(w.getnframes() / w.getframerate(), 1.0)

        # That WAV transcribes back through /stt ...
        body, contentType = multipart({"quality": "fast"}, spoken)
        response = await http.post(f"{url}/stt", data=body, headers={"Content-Type": contentType})
        self.assertEqual(response.code, 200)
        transcript = await response.text()
        self.assertLessEqual(wer(SENTENCE, transcript), 0.25, transcript)

        # ... and a Piper WAV through the OpenAI endpoint, JSON out.
        clip = speak("The weather today is sunny with a light breeze.")
        body, contentType = multipart({"model": "whisper-1"}, clip)
        response = await http.post(
            f"{url}/v1/audio/transcriptions",
            data=body,
            headers={"Content-Type": contentType, "Authorization": f"Bearer {key}"},
        )
        self.assertEqual(response.code, 200)
        text = json.loads(await response.text())["text"]
        self.assertLessEqual(wer("The weather today is sunny with a light breeze.", text), 0.25)

        # /stt with Accept: application/json, and a key nobody made.
        body, contentType = multipart({"key": key}, clip)
        response = await http.post(
            f"{url}/stt", data=body,
            headers={"Content-Type": contentType, "Accept": "application/json"},
        )
        fields = json.loads(await response.text())
        self.assertEqual((fields["model"], fields["language"]), ("whisper:tiny.en", "en"))
        body, contentType = multipart({"key": "demo"}, clip)
        response = await http.post(f"{url}/stt", data=body, headers={"Content-Type": contentType})
        self.assertEqual(response.code, 401)
        await response.content()

        # The key's account shows what its requests used.
        response = await http.get(f"{url}/v1/account", headers={"Authorization": f"Bearer {key}"})
        account = json.loads(await response.text())
        self.assertEqual(account["allowance"], 3600)
        self.assertGreater(account["used"], 4.0)

        health = json.loads(await (await http.get(f"{url}/healthz")).text())
        self.assertEqual(health["farms"][0]["up"], True)

        # The node holds a certificate from this exchange, whose key
        # /v1/exchange publishes; both keys are kept beside the store.
        published = json.loads(await (await http.get(f"{url}/v1/exchange")).text())["key"]
        assert local.enrolment is not None
        certificate = local.enrolment.certificate
        assert certificate is not None
        Certificate.verify(certificate.text, exchangePublicKey(published), reactor.seconds())
        self.assertEqual(certificate.account, accountId(""))
        self.assertIsNotNone(local.enrolment.offer())
        self.assertTrue(store.sibling("privox-exchange.key").exists())
        self.assertTrue(store.sibling("privox-node-state").child("identity.key").exists())


class StartFailureTests(TestCase):
    """
    A daemon whose port is taken, or whose model cannot be had, says so in
    one line and exits 1 (a taken port before it loads a model or dials a
    farm).
    """

    timeout = 120

    async def _fails(self, argv: list[str], *expected: str) -> str:
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-c", TWISTD, "-n", "--reactor=privox", "--pidfile=", "--logfile=-", *argv],
            # Never a download, even where the Hub can be reached.
            env=dict(ENV, HF_HUB_OFFLINE="1"), path=REPO, reactor=reactor,
        )
        log = (out + err).decode()
        self.assertEqual(code, 1, log)
        self.assertNotIn("Traceback", log)
        [line] = [line for line in log.splitlines() if "#critical]" in line]
        for text in expected:
            self.assertIn(text, line)
        return line

    async def _refused(self, *argv: str) -> str:
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = [a.replace("PORT", str(port)) for a in argv]
        return await self._fails(
            args, f"cannot listen on tcp:{port}:interface=127.0.0.1: Address already in use"
        )

    async def test_local(self) -> None:
        line = await self._refused("privox-local", "--port", "PORT")
        self.assertIn("choose another with --port (make run PORT=8090)", line)

    async def test_farm(self) -> None:
        line = await self._refused(
            "privox-farm", "--stt-listen", "tcp:PORT:interface=127.0.0.1", "--tts-listen", "none"
        )
        self.assertIn("choose another with --stt-listen", line)

    async def test_api(self) -> None:
        line = await self._refused(
            "privox-api", "--listen", "tcp:PORT:interface=127.0.0.1",
            "--farm", "f tcp:host=127.0.0.1:port=9 tcp:host=127.0.0.1:port=9",
        )
        self.assertIn("choose another with --listen", line)

    async def test_modelNotHere(self) -> None:
        for argv in (
            ["privox-node", "--stt", "whisper:base", "--stt-farm", "tcp:host=127.0.0.1:port=9"],
            ["privox-local", "--port", "0", "--stt", "whisper:base"],
        ):
            line = await self._fails(
                argv,
                "whisper:base: cannot load Whisper model 'base': it is not on this machine",
                "Give a local CTranslate2 directory as whisper:base=PATH",
            )
            self.assertNotIn("snapshot", line)

    async def test_makeRunPassesThePort(self) -> None:
        out, err, code = await getProcessOutputAndValue(
            "make", ["-n", "run", "PORT=8090", "RUN_ARGS=--deadline 600"],
            env=ENV, path=REPO, reactor=reactor,
        )
        self.assertEqual(code, 0, err)
        self.assertIn(b"privox-local --port 8090 --deadline 600", out)


class LendANodeTests(ProcessTestCase):
    """
    A person lends C{make run}'s exchange a node of their own, as its
    banner says, and sees that node's credit on their account.
    """

    timeout = 180

    async def test_bannersNodeEarns(self) -> None:
        local, key = await localExchange(self)
        assert local.store is not None
        treq = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        published = json.loads(await (await treq.get(f"{local.url}/v1/exchange")).text())["key"]
        [command] = [line for line in banner(local.url, local.settings, published)
                     if "privox-node" in line]
        args = command.split("twistd -n ", 1)[1].replace("YOUR-KEY", key).split()
        args[args.index("--state-dir") + 1] = os.path.abspath(self.mktemp())
        self.assertIn(published, args)
        node = self.spawn("node", *args)
        await node.waitFor(b"the directory of " + local.url.encode() + b" lists 1 farm(s)")
        await node.waitFor(b"serving stt through", timeout=60)
        # The farm was shown no key: the node's certificate, bound to the
        # farm, says whose it is.
        [lent] = [c for c in local.farm.connections if c.node is not None]
        self.assertEqual(lent.session.accountId, accountId(key))

        clip = speak("The weather today is sunny with a light breeze.")

        async def credited() -> bool:
            # Jobs go to the idle node served longest ago: this one soon.
            body, contentType = multipart({"quality": "fast", "key": key}, clip)
            response = await treq.post(f"{local.url}/stt", data=body,
                                       headers={"Content-Type": contentType})
            self.assertEqual(response.code, 200, await response.text())
            account = json.loads(await (await treq.get(
                f"{local.url}/v1/account", headers={"Authorization": f"Bearer {key}"}
            )).text())
            return bool(account["earned"] > 0)

        await until(credited, "the lent node's credit", 60, every=0.1)
        # Its owner's page says it is online, and where.
        async def online() -> bool:
            page = await (await treq.get(f"{local.url}/account",
                                         headers={"Cookie": f"privox_key={key}"})).text()
            return "online: 1 connection at 1 farm" in page

        await until(online, "the lent node online on /account", 20, every=0.2)
        [served] = await local.store.producing(accountId(key))
        self.assertEqual((served["farm"], served["service"], served["model"]),
                         ("local", "stt", "whisper:tiny.en"))
        await node.stop()
