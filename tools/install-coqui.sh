#!/usr/bin/env bash
# Install the Coqui TTS stack (CPU torch, coqui-tts, torchaudio) into a venv.
#
#   tools/install-coqui.sh [VENV]        (VENV defaults to .venv)
#
# Idempotent: when the pinned stack is already there it checks package
# metadata only (no torch import) and exits in well under a second.
#
# Why it is done this way (see shared/notes/engines.md):
#  * torch: only the CPU build of torch $TORCH_VERSION, from a local wheel
#    (pip's find-links, /opt/wheels on our machines). Installed with
#    --no-index so that pip can never fall back to PyPI's multi-GB CUDA
#    build; a constraints file pins it for every later step, so no dependency
#    can replace it either.
#  * coqui-tts: its declared dependencies, as published (torch is only an
#    extra there). It imports `six` without declaring it.
#  * torchaudio/torchcodec: `import TTS` refuses to start without both
#    (TTS/__init__.py; VITS imports torchaudio at module level), but neither
#    is used to synthesize with VITS. Every torchaudio wheel on PyPI for Linux
#    x86_64 is a CUDA build pinned to its own torch (2.11.0 needs torch==2.11.0,
#    and its libraries link libc10_cuda.so/libcudart), and no release matches
#    torch 2.13. So: install torchaudio 2.11.0 (abi3, pure-Python API) and
#    torchcodec with --no-deps, then remove torchaudio's compiled libraries,
#    which can never load beside a CPU torch. torchaudio then imports as pure
#    Python (resampling, transforms) and reports its extension unavailable.
#
# Optional: PRIVOX_COQUI_ESPEAK=1 also apt-installs espeak-ng, the phonemizer
# that downloaded Coqui models such as tts_models/en/vctk/vits call. The tests
# (character-based tiny VITS) do not need it.
set -euo pipefail

TORCH_VERSION=2.13.0
COQUI_VERSION=0.28.0
TORCHAUDIO_VERSION=2.11.0
TORCHCODEC_VERSION=0.17.0
SIX_MIN=1.16

VENV=${1:-.venv}
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
    echo "install-coqui: no Python at $PY (create the venv first)" >&2
    exit 2
fi

# The whole check, without importing torch: versions from metadata, and
# torchaudio without compiled libraries.
check() {
    "$PY" - "$TORCH_VERSION" "$COQUI_VERSION" "$TORCHAUDIO_VERSION" "$TORCHCODEC_VERSION" <<'EOF'
import importlib.metadata as md, importlib.util, pathlib, sys
torch, coqui, audio, codec = sys.argv[1:]
want = {"torch": torch, "coqui-tts": coqui, "torchaudio": audio, "torchcodec": codec, "six": None}
for name, version in want.items():
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        sys.exit(f"{name} missing")
    if version is not None and have.split("+")[0] != version:
        sys.exit(f"{name} {have} != {version}")
if not md.version("torch").endswith("+cpu"):
    sys.exit("torch is not the CPU build")
spec = importlib.util.find_spec("torchaudio")
if list(pathlib.Path(spec.origin).parent.glob("lib/*.so")):
    sys.exit("torchaudio still has its CUDA libraries")
EOF
}

if [ "${PRIVOX_COQUI_ESPEAK:-0}" = 1 ] && ! command -v espeak-ng >/dev/null; then
    apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null
fi

if reason=$(check 2>&1); then
    echo "install-coqui: already installed in $VENV"
    exit 0
fi
echo "install-coqui: installing into $VENV ($reason)"
started=$(date +%s)

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$TORCH_VERSION" >"$constraints"
pip() { "$PY" -m pip --disable-pip-version-check --quiet "$@"; }

# 1. CPU torch from the local wheel only, then its (small) dependencies.
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('torch') != '$TORCH_VERSION+cpu')" 2>/dev/null; then
    links=()
    # Where this workplace's machines keep it (also in their pip config).
    [ -d /opt/wheels ] && links=(--find-links /opt/wheels)
    if ! pip install --no-index --no-deps "${links[@]}" "torch==$TORCH_VERSION"; then
        cat >&2 <<EOF
install-coqui: no local CPU wheel of torch $TORCH_VERSION found (pip find-links,
e.g. PIP_FIND_LINKS=/opt/wheels). Refusing to fetch PyPI's torch, which is a
multi-GB CUDA build. Put torch-$TORCH_VERSION+cpu-*.whl in a find-links folder.
EOF
        exit 1
    fi
fi
pip install -c "$constraints" "torch==$TORCH_VERSION"

# 2. coqui-tts with its declared dependencies (torch held by the constraint).
pip install -c "$constraints" "coqui-tts==$COQUI_VERSION" "six>=$SIX_MIN"

# 3. torchaudio and torchcodec, present for `import TTS`, without their torch pins.
pip install -c "$constraints" --no-deps "torchaudio==$TORCHAUDIO_VERSION" "torchcodec==$TORCHCODEC_VERSION"
audio_dir=$("$PY" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('torchaudio').origin).parent)")
rm -f "$audio_dir"/lib/*.so

# 4. Prove it: CPU torch, and the VITS path imports.
"$PY" - <<'EOF'
import torch
assert torch.version.cuda is None, f"torch {torch.__version__} is a CUDA build"
import TTS.api, TTS.tts.models.vits  # noqa: F401
print(f"install-coqui: torch {torch.__version__} (cuda available: {torch.cuda.is_available()}), coqui-tts {TTS.__version__}")
EOF
check
echo "install-coqui: done in $(($(date +%s) - started)) s"
