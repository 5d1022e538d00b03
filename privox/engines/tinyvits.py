"""
A tiny random VITS for Coqui TTS (about 1 MB, built in a second, no
download): noise for speech, but it exercises Coqui's whole loading and
synthesis path. The tests and bench/engines.py use it; an operator can use
it to check a Coqui install (C{coqui:tiny=DIR}).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

RATE = 16000


def buildTinyVits(directory: Path, speakers: list[str] | None = None) -> None:
    """
    Save a tiny random VITS (checkpoint + config.json) in C{directory}; with
    C{speakers}, a multi-speaker English one whose config names its speaker
    file by a path from another machine, as Coqui's released models do.
    """
    import torch
    from TTS.config.shared_configs import BaseAudioConfig, BaseDatasetConfig
    from TTS.tts.configs.vits_config import VitsArgs, VitsConfig
    from TTS.tts.models.vits import Vits

    args = VitsArgs(
        hidden_channels=16,
        hidden_channels_ffn_text_encoder=32,
        num_heads_text_encoder=2,
        num_layers_text_encoder=1,
        num_layers_posterior_encoder=1,
        num_layers_flow=1,
        kernel_size_flow=3,
        kernel_size_posterior_encoder=3,
        resblock_kernel_sizes_decoder=[3],
        resblock_dilation_sizes_decoder=[[1, 3, 5]],
        upsample_rates_decoder=[8, 8, 4],  # product == hop_length
        upsample_kernel_sizes_decoder=[16, 16, 8],
        upsample_initial_channel_decoder=32,
        use_sdp=False,
        init_discriminator=False,  # else a 188 MB checkpoint
        use_speaker_embedding=bool(speakers),
        speaker_embedding_channels=8,
    )
    config = VitsConfig(
        audio=BaseAudioConfig(
            sample_rate=RATE, hop_length=256, win_length=1024, fft_size=1024, num_mels=80
        ),
        use_phonemes=False,  # no espeak-ng needed
        text_cleaner="basic_cleaners",
        add_blank=True,
        speakers=list(speakers or []),
        # Only the multi-speaker model says which language it speaks.
        datasets=[BaseDatasetConfig(formatter="vctk", path="/home/trainer/vctk", language="en")]
        if speakers
        else [],
        model_args=args,
    )
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    quiet = logging.getLogger("TTS")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "Could not identify language": on purpose
    try:
        model = Vits(config)
    finally:
        quiet.setLevel(level)
    torch.save({"model": model.state_dict()}, directory / "model.pth")
    model.config.save_json(str(directory / "config.json"))
    if speakers:
        # Like tts_models/en/vctk/vits: speaker_ids.json beside the model,
        # named in its config by where it lay when the model was trained.
        (directory / "speaker_ids.json").write_text(
            json.dumps({name: i for i, name in enumerate(speakers)}), encoding="utf-8"
        )
        saved = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        elsewhere = "/home/trainer/vctk/speaker_ids.json"
        saved["speakers"] = []
        saved["speakers_file"] = elsewhere
        saved["model_args"]["speakers_file"] = elsewhere
        (directory / "config.json").write_text(json.dumps(saved), encoding="utf-8")
