"""
The try-it page (C{GET /}) in real headless Chromium, against a whole local
exchange (real sockets, the bundled models): the page records a fake
microphone fed from a Piper WAV and shows its transcript; it speaks typed
text into a playable C{<audio>} element; it shows an API error as one line.

Chromium and ChromeDriver come from Debian (C{apt-get install -y chromium
chromium-driver}); Selenium drives them, pointed at both binaries, so its
Selenium Manager never tries to download a browser or a driver. The test
fails, not skips, without them.

Artifacts: C{_trial_temp/try-it.png} every run; with
C{PRIVOX_UPDATE_SCREENSHOT=1} also C{docs/try-it.png} (the README's picture),
once every check has passed, so ordinary runs leave the checkout clean.
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import tempfile
import time
import wave
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.python.filepath import FilePath
from twisted.trial.unittest import TestCase

from privox.local import LocalExchange, LocalSettings
from privox.wav import wavSeconds
from tests.test_roundtrip import speak
from tests.wer import distance, words

ROOT = FilePath(__file__).parent().parent()
SENTENCE = "The quick brown fox jumps over the lazy dog."
SPOKEN = "Privacy matters to everyone who uses the internet."
MAX_WER = 0.25

#: The fake microphone's file: a PCM WAV, 16-bit mono. Chromium's fake
#: capture resamples whatever rate it finds (Piper's own 22050 Hz file works
#: too); 48 kHz is the rate the capture runs at, so nothing is resampled.
MIC_RATE = 48000
#: Silence before and after the sentence in the fake microphone's file.
LEAD_S, TAIL_S = 0.3, 1.2

INSTALL = (
    "the try-it page test needs Chromium and ChromeDriver: "
    "apt-get install -y chromium chromium-driver"
)

#: How Chromium runs here: headless, as root, offline (the background
#: networking flags keep it from calling Google's hosts), with a fake
#: microphone that needs no permission prompt.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--window-size=960,1000",
    "--force-device-scale-factor=1",
    "--lang=en-US",
]


def browserPaths() -> tuple[str, str]:
    """
    Debian's C{chromium} and C{chromedriver}.

    @raise AssertionError: either is missing (the test fails, saying what
        to install).
    """
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    missing = [p for p in (chromium, driver) if not os.access(p, os.X_OK)]
    if missing:
        raise AssertionError(f"{INSTALL} (missing: {', '.join(missing)})")
    return chromium, driver


def micWav(text: str) -> bytes:
    """
    Piper speaking C{text}, as the fake microphone's file: 48 kHz mono
    16-bit PCM, with a little silence before and more after.
    """
    import av

    resampler = av.AudioResampler(format="s16", layout="mono", rate=MIC_RATE)
    frames = []
    with av.open(io.BytesIO(speak(text))) as container:
        for frame in container.decode(audio=0):
            frames.extend(resampler.resample(frame))
    frames.extend(resampler.resample(None))
    samples = np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.int16)
    silence = lambda seconds: np.zeros(int(MIC_RATE * seconds), np.int16)  # noqa: E731
    samples = np.concatenate([silence(LEAD_S), samples, silence(TAIL_S)])
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(MIC_RATE)
        w.writeframes(samples.tobytes())
    return out.getvalue()



def windowWer(reference: str, hypothesis: str) -> float:
    """
    The word error rate of the best-matching run of words in C{hypothesis}:
    the fake microphone loops its file, so a recording may hold a stray word
    of the next pass before or after the sentence; those are not errors.
    (The plain WER of the best window: the minimum over every slice of the
    hypothesis of L{distance} to the reference.)
    """
    ref, hyp = words(reference), words(hypothesis)
    if not ref:
        return 0.0
    best = min(
        distance(ref, hyp[i:j]) for i in range(len(hyp) + 1) for j in range(i, len(hyp) + 1)
    )
    return best / len(ref)


@dataclass
class Seen:
    """
    What the browser showed, collected in its thread and checked in the
    test's.
    """

    transcript: str = ""
    sttStatus: str = ""
    audio: dict[str, Any] = field(default_factory=dict)
    ttsStatus: str = ""
    errorStatus: str = ""
    errorClass: str = ""
    playerAfterError: str = ""
    storedKey: str | None = None
    examplesOverflow: bool = True
    statusPage: dict[str, Any] = field(default_factory=dict)
    consoleErrors: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


_AUDIO_JS = """
const done = arguments[arguments.length - 1];
const player = document.getElementById("player");
const report = async () => {
  const blob = await (await fetch(player.src)).blob();
  const head = new Uint8Array(await blob.slice(0, 12).arrayBuffer());
  done({
    readyState: player.readyState, duration: player.duration, error: player.error && player.error.code,
    type: blob.type, size: blob.size, head: String.fromCharCode(...head),
  });
};
if (player.readyState >= 1) report();
else {
  player.addEventListener("loadedmetadata", report, { once: true });
  player.addEventListener("error", report, { once: true });
}
"""


def drive(url: str, key: str, mic: str, record: float, screenshot: str) -> Seen:
    """
    Run the page in headless Chromium (blocking: call it in a thread).
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, chromedriver = browserPaths()
    seen = Seen()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="privox-chromium-")
    for flag in CHROMIUM_FLAGS + [
        f"--user-data-dir={profile}",
        # %noloop: the file plays once, then silence.
        f"--use-file-for-fake-audio-capture={mic}%noloop",
    ]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    started = time.monotonic()
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        seen.seconds["browser start"] = time.monotonic() - started
        driver.set_script_timeout(20)
        wait = WebDriverWait(driver, 30, poll_frequency=0.1)
        find = lambda id: driver.find_element(By.ID, id)  # noqa: E731

        driver.get(url + "/")
        # No example runs off the page's right edge.
        seen.examplesOverflow = driver.execute_script(
            "return [...document.querySelectorAll('pre')].some(p => p.scrollWidth > p.clientWidth)"
        )
        keyField = find("key")
        keyField.clear()
        keyField.send_keys(key)
        seen.storedKey = driver.execute_script("return localStorage.getItem('privox-key')")

        # Speech to text: record the fake microphone, stop, wait for text.
        mark = time.monotonic()
        find("record").click()
        wait.until(lambda d: find("stop").is_enabled())
        # Let the page record for `record` seconds of real time, timed by
        # the browser itself, then press Stop.
        driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "setTimeout(() => { document.getElementById('stop').click(); done(); }, arguments[0]);",
            int(record * 1000),
        )
        wait.until(
            lambda d: find("transcript").text.strip()
            or find("status").get_attribute("class") == "error"
        )
        seen.transcript = find("transcript").text
        seen.sttStatus = find("status").text
        seen.seconds["record and transcribe"] = time.monotonic() - mark

        # Text to speech: a playable WAV in the <audio> element.
        mark = time.monotonic()
        text = find("tts-text")
        text.clear()
        text.send_keys(SPOKEN)
        find("speak").click()
        wait.until(
            lambda d: (find("player").get_attribute("src") or "").startswith("blob:")
            or find("status").get_attribute("class") == "error"
        )
        seen.ttsStatus = find("status").text
        if (find("player").get_attribute("src") or "").startswith("blob:"):
            seen.audio = driver.execute_async_script(_AUDIO_JS)
        seen.seconds["speak"] = time.monotonic() - mark
        # Stop playback where it is, for a steadier picture.
        driver.execute_script("const p = document.getElementById('player'); p.pause(); p.currentTime = 0;")
        driver.save_screenshot(screenshot)

        # An error: no key -> the status and the one-line reason, no audio.
        before = find("player").get_attribute("src")
        keyField.clear()
        find("speak").click()
        wait.until(lambda d: find("status").get_attribute("class") == "error")
        seen.errorStatus = find("status").text
        seen.errorClass = find("status").get_attribute("class")
        seen.playerAfterError = "unchanged" if find("player").get_attribute("src") == before else "changed"

        # The status page, reached from the page's footer, and back.
        driver.find_element(By.LINK_TEXT, "farms and their load").click()
        wait.until(lambda d: d.title == "Privox status")
        seen.statusPage = driver.execute_script(
            "return {rows: document.querySelectorAll('tr').length,"
            " styled: getComputedStyle(document.body).fontFamily.includes('system-ui'),"
            " back: document.querySelector(\"a[href='/']\") !== null}"
        )

        seen.consoleErrors = [
            entry["message"]
            for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and "status of 401" not in entry["message"]
        ]
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    return seen


class TryItPageTests(TestCase):
    timeout = 120

    async def test_tryIt(self) -> None:
        if importlib.util.find_spec("selenium") is None:
            self.fail("the try-it page test needs selenium: pip install '.[test]'")
        try:
            browserPaths()
        except AssertionError as e:
            self.fail(str(e))

        # Anonymous use off, so the page shows what a missing key gets.
        local = LocalExchange(
            LocalSettings(port=0, accounts=f"sqlite:{self.mktemp()}", anonymous="off"), reactor
        )
        local.startService()
        self.addCleanup(local.stopService)
        await local.ready
        assert local.store is not None
        key, _ = await local.store.createKey(reactor.seconds())

        work = FilePath(self.mktemp())
        work.makedirs()
        mic = work.child("mic.wav")
        clip = micWav(SENTENCE)
        mic.setContent(clip)
        # Record the whole clip and a little more: with %noloop the rest
        # is silence.
        record = wavSeconds(clip) + 0.5
        shot = FilePath(os.path.abspath("try-it.png"))  # trial runs in _trial_temp

        seen = await deferToThread(drive, local.url, key, mic.path, record, shot.path)
        print(f"\ntranscript: {seen.transcript!r}; timings: "
              + ", ".join(f"{k} {v:.1f} s" for k, v in seen.seconds.items()))

        self.assertEqual(seen.storedKey, key)
        self.assertTrue(seen.transcript.strip(), f"no transcript; status: {seen.sttStatus!r}")
        self.assertLessEqual(
            windowWer(SENTENCE, seen.transcript), MAX_WER,
            f"{seen.transcript!r} is too far from {SENTENCE!r}",
        )
        self.assertIn("whisper:tiny.en", seen.sttStatus)

        audio = seen.audio
        self.assertTrue(audio, f"no audio; status: {seen.ttsStatus!r}")
        self.assertEqual(audio["type"], "audio/wav")
        self.assertTrue(audio["head"].startswith("RIFF") and audio["head"][8:12] == "WAVE", audio)
        self.assertIsNone(audio["error"])
        self.assertGreaterEqual(audio["readyState"], 1)
        self.assertGreater(audio["duration"], 1.0)

        self.assertEqual(seen.errorClass, "error")
        self.assertTrue(seen.errorStatus.startswith("Error 401: a key is required"), seen.errorStatus)
        self.assertEqual(seen.playerAfterError, "unchanged")
        self.assertEqual(seen.consoleErrors, [])
        self.assertFalse(seen.examplesOverflow)
        self.assertEqual(seen.statusPage, {"rows": 3, "styled": True, "back": True})

        self.assertTrue(shot.getsize() > 10_000)
        if os.environ.get("PRIVOX_UPDATE_SCREENSHOT") == "1":
            ROOT.child("docs").child("try-it.png").setContent(shot.getContent())
