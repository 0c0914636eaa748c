"""SAE presets: MSAE's per-backbone widths and TopK levels, chosen from the model's name."""

from __future__ import annotations

import math

import pytest
import torch

from fairclip.sae import SAEConfig
from fairclip.sae.corpus import train_sae_on_corpus
from fairclip.sae.presets import PRESETS, preset_for, sae_settings, scaled_preset


@pytest.mark.parametrize(
    ("name", "d", "levels"),
    [
        ("ViT-B-16", 512, (256, 512)),
        ("ViT-B/16", 512, (256, 512)),
        ("ViT-B-16-quickgelu", 512, (256, 512)),
        ("ViT-B-32", 512, (256, 512)),
        ("ViT-L-14", 768, (256, 512)),
        ("ViT-L-14-336", 768, (256, 512)),
        ("RN50", 1024, (512, 1024)),
        ("RN101", 512, (128, 256, 512)),
    ],
)
def test_backbones_get_the_authors_preset(name: str, d: int, levels: tuple[int, ...]) -> None:
    preset = preset_for(name, d)
    assert (preset.n_latents, preset.k_levels, preset.level_weights) == (16384, levels, "reverse")


def test_other_models_get_a_scaled_over_complete_sparse_preset() -> None:
    # SigLIP's ViT-B-16 is 768-dim, RN50x4 and the tiny demo model are other models
    for name, d in [("ViT-B-16-SigLIP", 768), ("RN50x4", 640), ("fairclip-tiny", 64), (None, 64)]:
        preset = preset_for(name, d)
        assert preset.name == "scaled" and preset.n_latents >= 8 * d
        assert preset.k_levels == (d // 2, d) and preset.level_weights == "reverse"
    cfg = SAEConfig(d_in=64, **scaled_preset(64).settings())
    assert cfg.n_latents == 2048 and cfg.weights == pytest.approx((2 / 3, 1 / 3))


def test_explicit_settings_override_the_preset() -> None:
    assert sae_settings("auto", "ViT-B-16", 512, {"n_latents": 4096}, "k")["n_latents"] == 4096
    # narrower than the preset's levels: MSAE's default levels for that width
    assert "k_levels" not in sae_settings("auto", "fairclip-tiny", 64, {"n_latents": 16}, "k")
    assert sae_settings("none", None, 64, {"n_latents": 16}, "k") == {"n_latents": 16}
    with pytest.raises(ValueError, match="sae_train.preset='RN50': that preset is for 1024-dim"):
        sae_settings("RN50", None, 512, {}, "sae_train.preset")
    with pytest.raises(ValueError, match="expected auto, scaled, none or one of"):
        sae_settings("ViT-H-14", None, 1024, {}, "sae_train.preset")
    with pytest.raises(ValueError, match="set n_latents"):
        sae_settings("none", None, 64, {}, "sae_train.preset")
    assert set(PRESETS) == {"ViT-B-16", "ViT-B-32", "ViT-L-14", "RN50", "RN101"}


def test_corpus_file_trains_streamed_a_chunk_at_a_time(tmp_path) -> None:
    lines = [f"caption number {i}" for i in range(600)]
    corpus = tmp_path / "captions.txt"
    corpus.write_text("\n".join(lines[:300] + ["", "  "] + lines[300:]) + "\n")
    g = torch.Generator().manual_seed(0)
    table = {line: torch.randn(16, generator=g) for line in lines}
    calls: list[int] = []

    def encode(captions):
        calls.append(len(captions))
        return torch.stack([table[c] for c in captions])

    cfg = SAEConfig(d_in=16, n_latents=128, k_levels=(8, 16), batch_size=64)
    extra = torch.randn(70, 16, generator=g)
    sae, hist = train_sae_on_corpus(corpus, encode, cfg, extra=extra, epochs=2, chunk=256,
                                    progress=False)  # fmt: skip
    assert calls == [256, 256, 88] * 2  # never more than a chunk encoded at once
    # per epoch: the extra rows (1 batch) + 4 + 4 + 1 batches of the file's chunks
    assert hist["steps"] == 2 * (1 + 4 + 4 + 1) and hist["captions"] == 600
    assert bool(sae.initialized) and len(hist["fvu"]) == 2 * 4  # one entry per chunk
    assert all(math.isfinite(v) for v in hist["fvu"])
    with pytest.raises(ValueError, match="600 captions do not fill one batch of 4096"):
        train_sae_on_corpus(corpus, encode, SAEConfig(d_in=16, n_latents=128, batch_size=4096))
