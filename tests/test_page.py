"""
The try-it page (C{GET /}) in real headless Chromium, against a whole local
exchange (real sockets, the bundled models): the page records a fake
microphone fed from a Piper WAV and shows its transcript; it speaks typed
text as it arrives (streamed PCM played with Web Audio), then into a
playable C{<audio>} element; it shows an API error as one line. Its live
captions stream the fake microphone (two sentences) over the realtime
WebSocket and show each utterance greyed while it is heard, black once final.

Chromium and ChromeDriver come from Debian (C{apt-get install -y chromium
chromium-driver}); Selenium drives them, pointed at both binaries, so its
Selenium Manager never tries to download a browser or a driver. The test
fails, not skips, without them.

Artifacts: C{try-it.png} and C{live-captions.png} in trial's temporary
directory every run; with C{PRIVOX_UPDATE_SCREENSHOT=1} also
C{docs/try-it.png} and C{docs/live-captions.png} (the README's pictures),
once every check has passed, so ordinary runs leave the checkout clean. The
live captions picture is the captions box as it was at a moment it held
both a final line and a greyed partial one (kept as the captions came, put
back for the picture).
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import tempfile
import time
import wave
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

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
#: What the live captions hear: two utterances, a pause between them.
LIVE = ("The quick brown fox jumps over the lazy dog.", "Please call me back when you get this message.")
#: Silence between the live captions' two sentences.
GAP_S = 1.2
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


def micWav(*texts: str, gap: float = GAP_S) -> bytes:
    """
    Piper speaking C{texts}, C{gap} seconds apart, as the fake microphone's
    file: 48 kHz mono 16-bit PCM, with a little silence before and more
    after.
    """
    import av

    silence = lambda seconds: np.zeros(int(MIC_RATE * seconds), np.int16)  # noqa: E731
    pieces = [silence(LEAD_S)]
    for n, text in enumerate(texts):
        resampler = av.AudioResampler(format="s16", layout="mono", rate=MIC_RATE)
        frames = []
        with av.open(io.BytesIO(speak(text))) as container:
            for frame in container.decode(audio=0):
                frames.extend(resampler.resample(frame))
        frames.extend(resampler.resample(None))
        if n:
            pieces.append(silence(gap))
        pieces.append(np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.int16))
    pieces.append(silence(TAIL_S))
    samples = np.concatenate(pieces)
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


@contextmanager
def chromium(mic: str) -> Iterator[Any]:
    """
    A headless Chromium whose fake microphone plays C{mic} once.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, chromedriver = browserPaths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    profile = tempfile.mkdtemp(prefix="privox-chromium-")
    for flag in CHROMIUM_FLAGS + [
        f"--user-data-dir={profile}",
        # %noloop: the file plays once, then silence.
        f"--use-file-for-fake-audio-capture={mic}%noloop",
    ]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def severe(driver: Any) -> list[str]:
    """
    The browser console's errors, but for the 401 the page asks for.
    """
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and "status of 401" not in entry["message"]
    ]


def drive(url: str, key: str, mic: str, record: float, screenshot: str) -> Seen:
    """
    Run the page in headless Chromium (blocking: call it in a thread).
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    seen = Seen()
    started = time.monotonic()
    with chromium(mic) as driver:
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

        seen.consoleErrors = severe(driver)
    return seen


@dataclass
class LiveSeen:
    """
    What the live captions showed: the final lines, and when (milliseconds
    after Start was pressed) the first partial and the first final line
    appeared.
    """

    finals: list[str] = field(default_factory=list)
    partials: list[str] = field(default_factory=list)
    timeline: dict[str, Any] = field(default_factory=dict)
    moment: dict[str, Any] = field(default_factory=dict)
    status: str = ""
    startedStatus: str = ""
    errorStatus: str = ""
    button: str = ""
    consoleErrors: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


#: Watches the captions as they change: when the first partial and final
#: lines appear, every partial text seen, and each moment both kinds were
#: there (one, mid-sentence, is put back for the picture).
_WATCH_JS = """
const captions = document.getElementById("captions");
const seen = window.privoxLive = {
  start: performance.now(), firstPartial: null, firstFinal: null, partials: [], moments: [],
};
new MutationObserver(() => {
  const now = performance.now() - seen.start;
  const partials = [...captions.querySelectorAll(".partial")].map((p) => p.textContent);
  const finals = captions.querySelectorAll(".final").length;
  if (partials.length && seen.firstPartial === null) seen.firstPartial = now;
  if (finals && seen.firstFinal === null) seen.firstFinal = now;
  for (const text of partials) if (seen.partials[seen.partials.length - 1] !== text) seen.partials.push(text);
  if (finals && partials.some((text) => text.split(" ").length >= 2)) {
    seen.moments.push({ html: captions.innerHTML, status: document.getElementById("status").textContent });
  }
}).observe(captions, { childList: true, subtree: true, characterData: true, attributes: true });
"""

#: The captions box as it was at that moment, and the colours of its lines.
_RESTORE_JS = """
const moments = window.privoxLive.moments;
const moment = moments[Math.floor(moments.length / 2)];
const captions = document.getElementById("captions"), live = document.getElementById("live");
captions.innerHTML = moment.html;
document.getElementById("status").textContent = moment.status;
live.textContent = "Stop";
live.setAttribute("aria-pressed", "true");
const colour = (selector) => {
  const line = captions.querySelector(selector);
  return line && getComputedStyle(line).color;
};
return { partial: colour(".partial"), final: colour(".final") };
"""


def driveLive(url: str, key: str, mic: str, listen: float, screenshot: str) -> LiveSeen:
    """
    The page's live captions in headless Chromium, its fake microphone
    playing C{mic} (blocking: call it in a thread). Start, C{listen}
    seconds, Stop; then the picture.
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    seen = LiveSeen()
    started = time.monotonic()
    with chromium(mic) as driver:
        seen.seconds["browser start"] = time.monotonic() - started
        driver.set_script_timeout(listen + 20)
        wait = WebDriverWait(driver, 30, poll_frequency=0.1)
        find = lambda id: driver.find_element(By.ID, id)  # noqa: E731
        driver.get(url + "/")
        keyField = find("key")
        keyField.clear()
        keyField.send_keys(key)

        mark = time.monotonic()
        driver.execute_script(_WATCH_JS)
        find("live").click()
        wait.until(
            lambda d: find("status").text.startswith("Listening")
            or find("status").get_attribute("class") == "error"
        )
        seen.startedStatus = find("status").text
        # Listen for `listen` seconds, timed by the browser, then Stop.
        driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "setTimeout(() => { document.getElementById('live').click(); done(); }, arguments[0]);",
            int(listen * 1000),
        )
        wait.until(lambda d: find("live").text == "Start" and find("live").is_enabled())
        seen.seconds["live captions"] = time.monotonic() - mark
        seen.status = find("status").text
        seen.button = find("live").text
        seen.finals = [p.text for p in driver.find_elements(By.CSS_SELECTOR, "#captions .final")]
        watched = driver.execute_script("return window.privoxLive")
        seen.partials = watched["partials"]
        seen.timeline = {"firstPartial": watched["firstPartial"], "firstFinal": watched["firstFinal"]}
        if watched["moments"]:
            seen.moment = driver.execute_script(_RESTORE_JS)
            seen.moment["lines"] = [
                (p.get_attribute("class"), p.text)
                for p in driver.find_elements(By.CSS_SELECTOR, "#captions p")
            ]
            find("live-captions").screenshot(screenshot)

        # No key: the session's error, and Start again.
        driver.refresh()
        find("key").clear()
        driver.execute_script("localStorage.removeItem('privox-key')")
        find("live").click()
        wait.until(lambda d: find("status").get_attribute("class") == "error")
        wait.until(lambda d: find("live").text == "Start" and find("live").is_enabled())
        seen.errorStatus = find("status").text
        seen.consoleErrors = severe(driver)
    return seen


async def localExchange(case: TestCase) -> tuple[LocalExchange, str]:
    """
    A whole local exchange with anonymous use off, and a key of it.
    """
    local = LocalExchange(
        LocalSettings(
            port=0, accounts=f"sqlite:{case.mktemp()}", anonymous="off", wyoming_listen="none"
        ),
        reactor,
    )
    local.startService()
    case.addCleanup(local.stopService)
    await local.ready
    assert local.store is not None
    key, _ = await local.store.createKey(reactor.seconds())
    return local, key


class TryItPageTests(TestCase):
    timeout = 120

    async def test_liveCaptions(self) -> None:
        """
        Live captions of the fake microphone's two sentences: partial
        lines first, greyed, then each utterance final, in black; the
        transcript close to what was said.
        """
        if importlib.util.find_spec("selenium") is None:
            self.fail("the try-it page test needs selenium: pip install '.[test]'")
        try:
            browserPaths()
        except AssertionError as e:
            self.fail(str(e))
        local, key = await localExchange(self)
        work = FilePath(self.mktemp())
        work.makedirs()
        mic = work.child("mic.wav")
        clip = micWav(*LIVE)
        mic.setContent(clip)
        shot = FilePath(os.path.abspath("live-captions.png"))

        seen = await deferToThread(driveLive, local.url, key, mic.path, wavSeconds(clip) + 0.5, shot.path)
        timeline = seen.timeline
        print(
            f"\nlive captions: finals {seen.finals!r}; first partial"
            f" {timeline['firstPartial']:.0f} ms and first final {timeline['firstFinal']:.0f} ms"
            f" after Start (the speech begins {LEAD_S * 1000:.0f} ms into the microphone's file);"
            f" {len(seen.partials)} partial texts; timings: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in seen.seconds.items())
        )
        self.assertTrue(seen.startedStatus.startswith("Listening: captions by whisper:tiny.en"),
                        seen.startedStatus)
        self.assertEqual(seen.status, "Live captions stopped.")
        self.assertEqual(seen.button, "Start")
        # Partials came, and before the first final.
        self.assertTrue(seen.partials)
        self.assertIsNotNone(timeline["firstPartial"])
        self.assertLess(timeline["firstPartial"], timeline["firstFinal"])
        # Each sentence a final line of its own, close to what was said.
        self.assertEqual(len(seen.finals), 2, seen.finals)
        for said, line in zip(LIVE, seen.finals):
            self.assertLessEqual(windowWer(said, line), MAX_WER, f"{line!r} is too far from {said!r}")
        # The picture: a final line in black, a partial one greyed.
        self.assertTrue(seen.moment, "no moment with both a final and a partial line")
        self.assertEqual(seen.moment["final"], "rgb(0, 0, 0)")
        self.assertEqual(seen.moment["partial"], "rgb(138, 138, 148)")
        self.assertEqual([kind for kind, _ in seen.moment["lines"]][-2:], ["final", "partial"])
        self.assertTrue(seen.errorStatus.startswith("Error: a key is required"), seen.errorStatus)
        self.assertEqual(seen.consoleErrors, [])
        self.assertTrue(shot.getsize() > 5_000)
        if os.environ.get("PRIVOX_UPDATE_SCREENSHOT") == "1":
            ROOT.child("docs").child("live-captions.png").setContent(shot.getContent())

    async def test_tryIt(self) -> None:
        if importlib.util.find_spec("selenium") is None:
            self.fail("the try-it page test needs selenium: pip install '.[test]'")
        try:
            browserPaths()
        except AssertionError as e:
            self.fail(str(e))

        # Anonymous use off, so the page shows what a missing key gets.
        local, key = await localExchange(self)

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
        # Played as it arrived (streamed PCM), then kept as a WAV.
        self.assertTrue(seen.ttsStatus.startswith("Spoke "), seen.ttsStatus)
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
