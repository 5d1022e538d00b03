"""
OpenAI's C{/v1/audio/translations} through separate farm, node and API
processes, called with the stock openai SDK: a job that needs translating
goes only to a node that can (here the model-free C{digest} engine, which
says it translated), and where no connected node can, the answer is a 422
that says what is missing.
"""

from __future__ import annotations

import os

import openai
from twisted.internet.threads import deferToThread

from privox.wav import pcmToWav
from tests.test_e2e import freePorts
from tests.test_faults import ProcessTestCase


class TranslationProcessTests(ProcessTestCase):
    timeout = 120

    async def test_translations(self) -> None:
        _, stt, tts = await self.startFarmProcess("translating")
        node = self.spawn(
            "node", "privox-node", "--stt-farm", f"tcp:host=127.0.0.1:port={stt}",
            "--stt", "digest:x", "--retry-max", "0.5", "--shutdown-grace", "1",
        )
        await node.waitFor(b"serving stt through", timeout=60)
        [port] = freePorts(1)
        api = self.spawn(
            "api", "privox-api", "--accounts", "none", "--keys", "open",
            "--listen", f"tcp:{port}:interface=127.0.0.1",
            "--farm", f"f tcp:host=127.0.0.1:port={stt} tcp:host=127.0.0.1:port={tts}",
            "--stt-model", "fast digest:x digest:x",
            "--e2e", "off",  # translating, not sealing: this node enrols nowhere
            # Absolute: the API runs in the checkout, not in trial's directory.
            "--exchange-key", os.path.abspath(self.mktemp()),
        )
        await api.waitFor(b"starting on %d" % port)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="any", max_retries=0, timeout=30
        )
        audio = pcmToWav(b"\x00\x01" * 8000, 16000)

        translated = await deferToThread(
            client.audio.translations.create, model="whisper-1", file=("speech.wav", audio)
        )
        self.assertTrue(translated.text.startswith("translated sha256:"), translated.text)

        # A model no connected node translates with: 422, saying so.
        with self.assertRaises(openai.UnprocessableEntityError) as caught:
            await deferToThread(
                client.audio.translations.create, model="whisper:tiny", file=("speech.wav", audio)
            )
        self.assertIn("no connected node translates with whisper:tiny", str(caught.exception))
