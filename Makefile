# The two commands a new user needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test

.PHONY: test run venv bench clean fuzz

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall whenever the package's files (code and data) or metadata change.
# A regular (not editable) install, so twistd sees twisted/plugins.
$(STAMP): $(PY) setup.py $(shell find privox twisted -type f ! -path '*__pycache__*' ! -name dropin.cache 2>/dev/null)
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
	tools/install-system-packages.sh
	PYTHONPATH=. $(PY) -m twisted.trial tests

# The whole exchange in one process (farm, API, a node with the bundled
# models); it prints the URL and curl examples once it is ready.
# `make run PORT=8090`, `make run RUN_ARGS='--deadline 600'` (see
# `twistd privox-local --help` for every option).
PORT ?= 8080
RUN_ARGS ?=
# On Linux the daemons' own reactor (privox/reactor.py: epoll); elsewhere
# Twisted's default.
REACTOR ?= $(if $(filter Linux,$(shell uname -s)),--reactor=privox)
run: $(STAMP)
	@$(VENV)/bin/twistd --nodaemon $(REACTOR) --pidfile= --logfile=- privox-local --port $(PORT) $(RUN_ARGS)

# farm_relay.py and sealing.py check large jobs with xxhash; wyoming.py runs the
# Wyoming servers Home Assistant users run beside Privox's (see bench/README.rst).
bench: $(STAMP)
	$(PY) -c 'import xxhash' 2>/dev/null || $(PY) -m pip install --quiet 'xxhash>=3'
	$(PY) -c 'import wyoming_faster_whisper, wyoming_piper' 2>/dev/null || \
		$(PY) -m pip install --quiet 'wyoming-faster-whisper>=3.8,<4' 'wyoming-piper>=2.5,<3'
	PYTHONPATH=. $(PY) bench/farm_relay.py
	PYTHONPATH=. $(PY) bench/farm_memory.py
	PYTHONPATH=. $(PY) bench/engines.py
	PYTHONPATH=. $(PY) bench/api.py
	PYTHONPATH=. $(PY) bench/quota.py
	PYTHONPATH=. $(PY) bench/log_format.py
	PYTHONPATH=. $(PY) bench/sealing.py
	PYTHONPATH=. $(PY) bench/speech_encoding.py
	PYTHONPATH=. $(PY) bench/wyoming.py
	PYTHONPATH=. $(PY) bench/fanout.py

# The long reliability runs (issue 9): load and fault scenarios scaled up;
# prints figures. `make soak SOAK_SECONDS=60` for a shorter run.
SOAK_SECONDS ?= 300
.PHONY: soak
soak: $(STAMP)
	PYTHONPATH=. $(PY) soak/run.py --duration $(SOAK_SECONDS)

# Coverage-guided fuzzing with atheris (not part of `make test`): each
# harness in fuzz/ runs FUZZ_SECONDS from its seeds, growing a corpus
# outside the checkout; a crash stops it and leaves the input in fuzz-crashes/.
FUZZ_SECONDS ?= 60
FUZZ_CORPUS ?= $(or $(TMPDIR),/tmp)/privox-fuzz
fuzz: $(STAMP)
	$(PY) -c 'import atheris' 2>/dev/null || $(PY) -m pip install --quiet atheris
	mkdir -p fuzz-crashes
	for name in framing messages pvx1 farm; do \
		mkdir -p $(FUZZ_CORPUS)/$$name && \
		PYTHONPATH=. $(PY) fuzz/fuzz_$$name.py -max_total_time=$(FUZZ_SECONDS) \
			-artifact_prefix=fuzz-crashes/$$name- $(FUZZ_CORPUS)/$$name fuzz/seeds/$$name \
			|| exit 1; \
	done

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp dropin.cache
