"""SEM and its SAE against the published definitions, on fixed random tensors.

The reference here is written from the papers' formulas (Guimard et al. 2026, SEM; Zaigrajew
et al. 2025, MSAE), one latent and one prompt at a time, independently of fairclip's
vectorised code: content score, bias score, modulation and the decode ``W_dec z' + b_pre``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fairclip.debias.orth import fit_orth_cali, fit_orth_proj_published, orth_prompts
from fairclip.debias.sem import fit_sem
from fairclip.sae import load_sae

D, N = 12, 96  # over-complete: 8 x d


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(N, D, generator=g) / D**0.5,
        "b_enc": torch.randn(N, generator=g) * 0.1,
        "W_dec": torch.randn(N, D, generator=g) / D**0.5,
        "b_pre": torch.randn(D, generator=g) * 0.3,
    }


def _write_sem_layout(path: Path, w: dict[str, torch.Tensor]) -> Path:
    torch.save(
        {
            "bpre": w["b_pre"],
            "encoder.weight": w["W_enc"],
            "encoder.bias": w["b_enc"],
            "decoder.weight": w["W_dec"].T.contiguous(),
        },
        path,
    )
    return path


def _encode_ref(w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``z_j = max(0, sum_i W_enc[j, i] (x_i - b_pre_i) + b_enc_j)``, latent by latent."""
    z = torch.zeros(x.shape[0], N, dtype=torch.float64)
    for r in range(x.shape[0]):
        for j in range(N):
            pre = sum(float(w["W_enc"][j, i]) * float(x[r, i] - w["b_pre"][i]) for i in range(D))
            z[r, j] = max(0.0, pre + float(w["b_enc"][j]))
    return z


def _decode_ref(w: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    return z @ w["W_dec"].double() + w["b_pre"].double()


def test_sem_layout_checkpoint_loads_and_reproduces_the_published_forward(tmp_path: Path) -> None:
    w = _weights()
    sae = load_sae(_write_sem_layout(tmp_path / "MSAE_ViT-B-16_12_96_24x48_reverse.pth", w))
    assert (sae.cfg.d_in, sae.cfg.n_latents, sae.cfg.k_levels) == (D, N, (24, 48))
    assert sae.cfg.level_weights == "reverse" and sae.cfg.input_norm == "raw"
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(1)) * 3  # raw, not unit
    z = sae.encode(sae.prepare(x))
    assert torch.allclose(z.double(), _encode_ref(w, x), atol=1e-5)
    assert torch.allclose(sae.decode(z).double(), _decode_ref(w, z.double()), atol=1e-5)


def test_msae_layout_checkpoint_folds_its_centring_and_scaling(tmp_path: Path) -> None:
    """MSAE: ``x' = (x - mean) s``, ``z = ReLU(x' - pre_bias) @ encoder + latent_bias``,
    output ``(z @ decoder + pre_bias) / s + mean``."""
    w = _weights(2)
    g = torch.Generator().manual_seed(3)
    mean, scale = torch.randn(D, generator=g), 0.37
    path = tmp_path / "96_12_TopKReLU_48_RW_False_False_0.0_cc3m_ViT-B~16_train.pth"
    torch.save(
        {
            "model": {
                "pre_bias": w["b_pre"],
                "encoder": w["W_enc"].T.contiguous(),
                "latent_bias": w["b_enc"],
                "decoder": w["W_dec"],
                "latents_activation_frequency": torch.zeros(N, dtype=torch.int64),
            },
            "mean_center": mean,
            "scaling_factor": scale,
            "target_norm": D**0.5,
        },
        path,
    )
    sae = load_sae(path)
    assert sae.cfg.level_weights == "reverse"
    x = torch.randn(4, D, generator=g) * 2
    z = sae.encode(sae.prepare(x))
    assert torch.allclose(z.double(), _encode_ref(w, (x - mean) * scale), atol=1e-5)
    expected = _decode_ref(w, z.double()) / scale + mean.double()
    assert torch.allclose(sae.decode(z).double(), expected, atol=1e-5)


def test_bad_published_checkpoints_name_the_file_and_the_key(tmp_path: Path) -> None:
    good = _write_sem_layout(tmp_path / "sae.pth", _weights())
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"truncated\.pth: not a readable torch checkpoint"):
        load_sae(truncated)
    state = torch.load(good, weights_only=True)
    del state["encoder.bias"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing\.pth: missing key 'encoder.bias'"):
        load_sae(tmp_path / "missing.pth")
    torch.save({"model": {"pre_bias": torch.zeros(D)}}, tmp_path / "msae.pth")
    with pytest.raises(ValueError, match=r"msae\.pth: missing key 'encoder'"):
        load_sae(tmp_path / "msae.pth")
    state = torch.load(good, weights_only=True)
    state["decoder.weight"] = torch.zeros(D, N + 1)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"shape\.pth: decoder has shape"):
        load_sae(tmp_path / "shape.pth")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="neither SEM's SAE layout"):
        load_sae(tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_sae(tmp_path / "nothing.pth")


# -- SEM, by the paper ------------------------------------------------------------------------
def _share_below(values: list[float], v: float) -> float:
    return sum(1 for a in values if a < v) / len(values)


def _median(rows: torch.Tensor) -> torch.Tensor:
    """Lower median per latent (torch's ``median``, as the authors' code uses)."""
    return rows.median(dim=0).values


def _sem_ref(variant, w, emb, reference, groups, class_rows) -> torch.Tensor:
    """SEM_``variant`` of each raw embedding in ``emb`` by the published definition.

    ``groups``: one attribute's bias-prompt embeddings per value; ``class_rows``: the
    paraphrase embeddings of the class each row of ``emb`` is (for SEM_i, SEM_bi).
    """
    a_d = _encode_ref(w, reference)  # A_D [|D|, N]
    med_d = _median(a_d)
    bias = torch.zeros(N, dtype=torch.float64)
    if variant != "i":
        acts = [_encode_ref(w, g) for g in groups]
        for k, a_k in enumerate(acts):
            m_k = _median(a_k)
            others = torch.cat([a for i, a in enumerate(acts) if i != k])
            for j in range(N):
                general = _share_below(a_d[:, j].tolist(), float(m_k[j]))
                specific = _share_below(others[:, j].tolist(), float(m_k[j]))
                bias[j] = max(bias[j], min(general, specific))
    out = []
    for r in range(emb.shape[0]):
        z = _encode_ref(w, emb[r : r + 1])[0]
        med_c = _median(_encode_ref(w, class_rows[r])) if variant != "b" else z
        if variant == "i":
            z = med_c  # SEM_i modulates the class's median latent itself
        z_mod = torch.zeros(N, dtype=torch.float64)
        for j in range(N):
            c = _share_below(a_d[:, j].tolist(), float(med_c[j]))
            m = c**2 if variant == "i" else (1 + c - float(bias[j])) ** 2
            z_mod[j] = m * z[j] + (1 - m) * med_d[j]
        out.append(_decode_ref(w, z_mod[None])[0])
    return torch.stack(out)


@pytest.mark.parametrize("variant", ["i", "b", "bi"])
def test_sem_equals_the_published_definition(variant: str, tmp_path: Path) -> None:
    w = _weights(4)
    sae = load_sae(_write_sem_layout(tmp_path / "sae.pth", w))
    g = torch.Generator().manual_seed(5)
    table: dict[str, torch.Tensor] = {}

    def encode(prompts):  # raw "text embeddings": a fixed random vector per prompt
        for p in prompts:
            table.setdefault(p, torch.randn(D, generator=g) * 2)
        return torch.stack([table[p] for p in prompts])

    reference = [f"ref {i}" for i in range(31)]
    bias = {"gender": {v: [f"{v} {i}" for i in range(7)] for v in ("female", "male")}}
    classes = {c: [f"{c} {i}" for i in range(5)] for c in ("doctor", "nurse")}
    sem = fit_sem(variant, sae, encode, reference, bias, classes)
    queries = ["doctor 0", "nurse 3"]  # a paraphrase each: matched to its class
    got = sem(encode(queries)).double()
    expected = _sem_ref(
        variant,
        w,
        encode(queries),
        encode(reference),
        [encode(p) for p in bias["gender"].values()],
        [encode(classes["doctor"]), encode(classes["nurse"])],
    )
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


# -- Orth-Proj and Orth-Cali (Chuang et al. 2023) ----------------------------------------------
def _lookup(table: dict[str, list[float]]):
    return lambda prompts: torch.tensor([table[p] for p in prompts])


def test_orth_proj_maps_every_spurious_prompt_to_zero() -> None:
    g = torch.Generator().manual_seed(6)
    table = {f"s{i}": (torch.randn(D, generator=g) * 2).tolist() for i in range(4)}
    table["query"] = torch.randn(D, generator=g).tolist()
    encode = _lookup(table)
    proj = fit_orth_proj_published(encode, ["s0", "s1", "s2", "s3"])
    assert proj.config["rank"] == 4  # the span of the prompts themselves, not of differences
    assert proj(encode(["s0", "s1", "s2", "s3"])).norm(dim=1).max() <= 1e-6
    v = torch.nn.functional.normalize(encode(["s0", "s1", "s2", "s3"]).double(), dim=1).T
    p0 = torch.eye(D, dtype=torch.float64) - v @ torch.linalg.inv(v.T @ v) @ v.T
    q = encode(["query"])
    assert torch.allclose(proj(q).double(), q.double() @ p0.T, atol=1e-5)


def test_orth_cali_closed_form_on_a_hand_computed_case() -> None:
    """V = e1: P0 = diag(0, 1, 1). One pair (e2, e3): M = (e2 - e3)(e2 - e3)^T; with lam = 1,
    G = I + M = [[1,0,0],[0,2,-1],[0,-1,2]], G^-1 = [[1,0,0],[0,2/3,1/3],[0,1/3,2/3]] and
    P* = P0 G^-1 = [[0,0,0],[0,2/3,1/3],[0,1/3,2/3]]."""
    encode = _lookup({"s": [2.0, 0, 0], "a": [0, 3.0, 0], "b": [0, 0, 0.5]})
    cali = fit_orth_cali(encode, ["s"], [("a", "b")], lam=1.0)
    expected = torch.tensor([[0, 0, 0], [0, 2 / 3, 1 / 3], [0, 1 / 3, 2 / 3]])
    assert torch.allclose(cali.matrix, expected, atol=1e-6)
    x = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.allclose(cali(x), x @ expected.T, atol=1e-6)
    with pytest.raises(ValueError, match="lam"):
        fit_orth_cali(encode, ["s"], [("a", "b")], lam=-1.0)
    with pytest.raises(ValueError, match="positive pair"):
        fit_orth_cali(encode, ["s"], [], lam=1.0)


def test_orth_prompts_pair_every_two_values_per_class() -> None:
    spurious, pairs = orth_prompts(
        {"race": {"a": "x", "b": "y", "c": ["z", "w"]}},
        ["a photo of a {g} person."],
        {"race": ["a {g} {c}."]},
        ["doctor"],
    )
    assert spurious == [f"a photo of a {w} person." for w in "xyzw"]
    # candidates x, y, z, w; z and w name the same value, so they are no pair
    assert pairs == [
        ("a x doctor.", "a y doctor."), ("a x doctor.", "a z doctor."),
        ("a x doctor.", "a w doctor."), ("a y doctor.", "a z doctor."),
        ("a y doctor.", "a w doctor."),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="pair_templates: no templates for 'race'"):
        orth_prompts({"race": {"a": "x", "b": "y"}}, ["{g}"], {"gender": ["{g} {c}"]}, ["c"])
