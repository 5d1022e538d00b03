"""
atheris: a whole farm connection on the in-memory harness. Any bytes, cut
anywhere, then the clock runs: dataReceived never raises, and a fresh
consumer and producer then complete a job.

    PYTHONPATH=. .venv/bin/python fuzz/fuzz_farm.py -runs=20000
"""

import sys

import atheris

with atheris.instrument_imports():
    from tests.farmharness import FarmHarness

MODEL = "whisper:tiny.en"
JOB = {"model": MODEL, "language": "en", "format": "wav", "size": 1}


def serves(h: FarmHarness) -> None:
    producer = h.producer(models=[MODEL], languages=["en"])
    consumer = h.consumer()
    consumer.send(b"JOB_", JOB)
    [(verb, asgn)] = consumer.messages()
    assert verb == "ASGN", verb
    consumer.data(b"x")
    producer.messages()
    producer.send(b"RSLT", {"id": asgn["id"], "text": "ok"})
    assert consumer.messages() == [("RSLT", {"id": asgn["id"], "text": "ok"})]
    consumer.lose()
    producer.lose()


def test(data: bytes) -> None:
    # Byte 0: how the stream is cut; byte 1: the port (stt or tts).
    step = data[0] % 64 + 1 if data else 1
    service = "tts" if data[1:2] and data[1] & 1 else "stt"
    stream = data[2:]
    h = FarmHarness(max_frame=4096, max_job_bytes=100_000, handshake_timeout=10,
                    queue_timeout=5, max_job_timeout=60, cancel_grace=10)
    peer = h.peer(service)
    for i in range(0, len(stream), step):
        peer.raw(stream[i : i + step])
    h.clock.advance(100)
    h.clock.advance(100)
    peer.lose()
    assert not h.farm.jobs, h.farm.jobs
    serves(h)
    assert not h.farm.connections


if __name__ == "__main__":
    atheris.instrument_all()
    atheris.Setup(sys.argv, test)
    atheris.Fuzz()
