# The two commands a new user needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test

.PHONY: test run venv bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall whenever the package's sources or metadata change. A regular
# (not editable) install, so twistd sees twisted/plugins.
$(STAMP): $(PY) setup.py $(shell find privox twisted -name '*.py' 2>/dev/null)
	$(PY) -m pip install --quiet '.[test]'
	touch $@

# Coqui TTS needs a CPU torch and a trimmed torchaudio that pip cannot pick
# by itself; the script knows how (and is quick when already done).
COQUI_STAMP := $(VENV)/.installed-coqui
$(COQUI_STAMP): $(PY) tools/install-coqui.sh
	tools/install-coqui.sh $(VENV)
	touch $@

venv: $(STAMP)

# Tests import the package from this checkout (PYTHONPATH) so they always run
# the code you are looking at; the installed copy serves twistd's plugin list.
test: $(STAMP) $(COQUI_STAMP)
	PYTHONPATH=. $(PY) -m twisted.trial tests

# A farm and a node with the bundled models (whisper:tiny.en, piper:en_US-joe-medium)
# on this machine; Ctrl-C stops both.
run: $(STAMP)
	@echo "Starting a local exchange: farm on tcp:1776 (STT) and tcp:1777 (TTS), one node."
	@echo "Once the node logs 'serving', try (any WAV file will do):"
	@echo "  $(PY) tests/pvx2_reference.py consumer-tts 127.0.0.1 1777 'Hello from Privox.' --model piper:en_US-joe-medium -o hello.wav"
	@echo "  $(PY) tests/pvx2_reference.py consumer-stt 127.0.0.1 1776 hello.wav --model whisper:tiny.en"
	@$(VENV)/bin/twistd --nodaemon --pidfile= --logfile=- privox-farm --config etc/privox-farm.toml & farm=$$!; \
	trap 'kill $$farm 2>/dev/null' EXIT INT TERM; \
	$(VENV)/bin/twistd --nodaemon --pidfile= --logfile=- privox-node --config etc/privox-node.toml

bench: $(STAMP)
	PYTHONPATH=. $(PY) bench/farm_relay.py

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp dropin.cache
