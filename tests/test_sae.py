"""Tests for the Matryoshka TopK SAE (fairclip.sae) on synthetic sparse data.

The data are sparse non-negative combinations of known unit atoms, so a good SAE must recover
the atoms as decoder rows. 512 atoms in d=128 with 4 active per row: in d=64 the best possible
one-layer encoder (matched filter on the true atoms) already leaves FVU ~0.23 of cross-talk,
which would test the encoder's capacity rather than the training.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fairclip.sae import (
    MatryoshkaTopKSAE,
    SAEConfig,
    default_k_levels,
    load_sae,
    make_optimizer,
    sae_metrics,
    sae_step,
    save_sae,
    top_activating,
    train_sae,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small matmuls on a shared CPU are far faster (and reproducible) single-threaded.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sparse_data(n: int, d: int, n_atoms: int, active: int, seed: int = 1234):
    """(X, atoms): rows are sums of ``active`` random atoms with coefficients in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)  # != the SAE's init seed, or atoms == init
    atoms = F.normalize(torch.randn(n_atoms, d, generator=g), dim=1)
    idx = torch.rand(n, n_atoms, generator=g).argsort(1)[:, :active]
    coef = 0.5 + torch.rand(n, active, generator=g)
    return torch.einsum("na,nad->nd", coef, atoms[idx]), atoms


@pytest.fixture(scope="module")
def trained():
    x, atoms = sparse_data(23_000, d=128, n_atoms=512, active=4)
    train, test = x[:20_000], x[20_000:]
    cfg = SAEConfig(
        d_in=128,
        n_latents=512,
        k_levels=(1, 2, 4),
        dead_after=5_000,
        lr=5e-3,
        batch_size=256,
        epochs=7,
        seed=0,
    )
    sae, hist = train_sae(train, cfg, progress=False)
    return sae, hist, train, test, atoms


def test_training_reduces_fvu_and_recovers_atoms(trained):
    sae, hist, _, test, atoms = trained
    untrained = MatryoshkaTopKSAE(sae.cfg).init_from_data(test)
    before = sae_metrics(untrained, test)["fvu_topk"]
    m = sae_metrics(sae, test)
    assert before > 0.6
    assert m["fvu_topk"] < 0.1, m
    assert m["cos_topk"] > 0.95
    best_cos = (atoms @ sae.W_dec.detach().T).max(dim=1).values
    assert (best_cos > 0.9).float().mean() > 0.9, best_cos.quantile(torch.tensor([0.1, 0.5]))
    assert hist["loss"][-1] < hist["loss"][0]
    assert hist["samples_per_s"] > 0 and hist["steps"] == 7 * (20_000 // 256)


def test_decoder_rows_unit_norm(trained):
    sae = trained[0]
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(512), atol=1e-5, rtol=0)


def test_fvu_decreases_with_k(trained):
    m = sae_metrics(trained[0], trained[3])
    assert m["fvu_k1"] > m["fvu_k2"] > m["fvu_k4"] == m["fvu_topk"]


def test_inference_keeps_all_positive_activations(trained):
    sae, _, _, test, _ = trained
    x = test[:256]
    with torch.no_grad():
        z = sae.encode(x)
        pre = sae.preacts(x)
        torch.testing.assert_close(z, pre.clamp_min(0))
        z4 = sae.encode(x, k=4)
        assert ((z4 > 0).sum(1) <= 4).all()
        out = sae(x)
        torch.testing.assert_close(sae.decode(z4), out.recons[-1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.codes(-1), z4)
    m = sae_metrics(sae, test)
    assert m["l0"] >= m["l0_topk"] and m["l0_topk"] <= 4
    assert 0.0 <= m["dead_fraction"] <= 1.0 and "fvu" in m and "cos" in m


def test_forward_gradients_match_dense_reference():
    """The sparse backward (embedding_bag decoder, sparse encoder grads) equals dense autograd."""
    torch.manual_seed(0)
    cfg = SAEConfig(
        d_in=16, n_latents=64, k_levels=(2, 4, 8), aux_k=6, dead_after=10, level_weights=(1, 2, 3)
    )
    sae = MatryoshkaTopKSAE(cfg).double()
    x = torch.randn(32, 16, dtype=torch.double)
    sae.init_from_data(x)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.b_enc.add_(0.1 * torch.randn_like(sae.b_enc))
    sae.samples_since_fired[:20] = 100  # 20 dead latents -> AuxK is active
    out = sae(x)
    out.loss.backward()
    fast = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()

    xs = x * sae.input_scale
    pre = (xs - sae.b_pre) @ sae.W_enc.T + sae.b_enc
    vals, idx = pre.topk(8, dim=1)
    denom = (xs - xs.mean(0)).square().sum()
    loss, rec = 0.0, None
    for w, k in zip(cfg.weights, cfg.k_levels, strict=True):
        z = torch.zeros_like(pre).scatter(1, idx[:, :k], vals[:, :k].relu())
        rec = z @ sae.W_dec + sae.b_pre
        loss = loss + w * (rec - xs).square().sum() / denom
    aux_v, aux_i = pre.masked_fill(~sae.dead_mask, -math.inf).topk(6, dim=1)
    resid = (xs - rec).detach()
    aux_rec = torch.zeros_like(pre).scatter(1, aux_i, aux_v.relu()) @ sae.W_dec
    aux = (aux_rec - resid).square().sum() / (resid - resid.mean(0)).square().sum()
    (loss + cfg.aux_coef * aux).backward()
    torch.testing.assert_close(out.loss, loss + cfg.aux_coef * aux)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(fast[name], p.grad, msg=name)


def test_auxk_revives_dead_latents():
    """Half the latents start with tiny encoders: they never win a top-k, so only AuxK trains
    them. There are more atoms than live latents, so reviving them pays off."""
    x, _ = sparse_data(10_000, d=64, n_atoms=512, active=4)

    def run(aux_coef: float) -> dict[str, float]:
        cfg = SAEConfig(
            d_in=64,
            n_latents=512,
            k_levels=(2, 4),
            aux_coef=aux_coef,
            dead_after=1024,
            lr=2e-3,
            batch_size=256,
        )
        sae = MatryoshkaTopKSAE(cfg).init_from_data(x)
        with torch.no_grad():
            sae.W_enc[256:] *= 0.05
        opt = make_optimizer(sae)
        g = torch.Generator().manual_seed(0)
        for _ in range(400):
            sae_step(sae, opt, x[torch.randint(0, 8_000, (256,), generator=g)])
        return sae_metrics(sae, x[8_000:])

    without, with_aux = run(0.0), run(1 / 32)
    assert without["dead_fraction"] > 0.45  # the crippled half stays dead
    assert with_aux["dead_fraction"] < without["dead_fraction"] - 0.15, (with_aux, without)
    assert with_aux["dead_fraction_train"] < without["dead_fraction_train"]
    assert with_aux["fvu_topk"] < without["fvu_topk"]


def test_sae_step_initialises_and_tracks_dead_latents():
    x, _ = sparse_data(512, d=32, n_atoms=64, active=3)
    cfg = SAEConfig(d_in=32, n_latents=128, k_levels=(2, 4), dead_after=10_000)
    sae = MatryoshkaTopKSAE(cfg)
    assert not bool(sae.initialized)
    opt = make_optimizer(sae)
    logs = sae_step(sae, opt, x)
    assert bool(sae.initialized)
    assert set(logs) == {"loss", "fvu", "aux_loss", "dead_fraction"}
    assert all(math.isfinite(v) for v in logs.values())
    fired = sae.samples_since_fired == 0
    assert fired.any() and (sae.samples_since_fired[~fired] == 512).all()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128), atol=1e-5, rtol=0)


def test_normalize_sets_scale_and_bias():
    x = 0.01 * torch.randn(1000, 16) + 3.0
    sae = MatryoshkaTopKSAE(SAEConfig(d_in=16, n_latents=32, k_levels=(4,))).init_from_data(x)
    xs = x * sae.input_scale
    assert (xs - xs.mean(0)).square().sum(1).mean().item() == pytest.approx(16, rel=1e-4)
    torch.testing.assert_close(sae.b_pre.detach(), xs.mean(0))
    raw = SAEConfig(d_in=16, n_latents=32, k_levels=(4,), normalize=False)
    assert MatryoshkaTopKSAE(raw).init_from_data(x).input_scale.item() == 1.0


def test_save_load_roundtrip(tmp_path, trained):
    sae = trained[0]
    path = save_sae(sae, tmp_path / "sub" / "sae.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["sae.safetensors"]  # no temp left
    loaded = load_sae(path)
    assert loaded.cfg == sae.cfg
    for (k, a), (k2, b) in zip(sae.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    x = trained[3][:64]
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), sae.encode(x))
        assert torch.equal(loaded.decode(sae.encode(x)), sae.decode(sae.encode(x)))


def test_load_bad_files_name_the_path(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        load_sae(bad)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="other.safetensors.*not a fairclip SAE"):
        load_sae(other)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_sae(tmp_path / "missing.safetensors")


def test_top_activating(trained):
    sae, _, _, test, _ = trained
    x = test[:300]
    texts = [f"prompt {i}" for i in range(300)]
    out = top_activating(sae, x, texts, n=5, batch_size=64)  # several chunks are merged
    z = sae.encode(x).detach()
    assert out and set(out) == set(torch.nonzero(z.amax(0) > 0).flatten().tolist())
    lat = next(iter(out))
    best = z[:, lat].topk(5)
    expected = [
        (texts[i], v)
        for v, i in zip(best.values.tolist(), best.indices.tolist(), strict=True)
        if v > 0
    ]
    assert [t for t, _ in out[lat]] == [t for t, _ in expected]
    assert [v for _, v in out[lat]] == pytest.approx([v for _, v in expected])
    only = top_activating(sae, x, texts, n=2, latents=[lat])
    assert list(only) == [lat] and len(only[lat]) <= 2
    with pytest.raises(ValueError, match="texts"):
        top_activating(sae, x, texts[:-1], n=2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k_levels": (8, 4)}, "k_levels"),
        ({"k_levels": (4, 4, 8)}, "k_levels"),
        ({"k_levels": ()}, "k_levels"),
        ({"k_levels": (0, 4)}, "k_levels"),
        ({"k_levels": (8, 64)}, "k_levels.*n_latents=32"),
        ({"level_weights": (1.0,)}, "level_weights"),
        ({"level_weights": (1.0, -1.0)}, "level_weights"),
        ({"level_weights": "triangular"}, "level_weights"),
        ({"d_in": 0}, "d_in"),
        ({"aux_k": -1}, "aux_k"),
        ({"lr": 0.0}, "lr"),
        ({"decay_frac": 1.5}, "decay_frac"),
        ({"batch_size": 2.5}, "batch_size"),
    ],
)
def test_bad_config_raises(kwargs, match):
    base = {"d_in": 16, "n_latents": 32, "k_levels": (4, 8)}
    with pytest.raises(ValueError, match=match):
        SAEConfig(**{**base, **kwargs})


def test_config_defaults_and_weights():
    assert default_k_levels(512, 4096) == (64, 128, 256, 512)
    cfg = SAEConfig(d_in=512, n_latents=4096)
    assert cfg.k_levels == (64, 128, 256, 512) and cfg.resolved_aux_k == 1024
    assert cfg.weights == pytest.approx((0.25,) * 4)
    rev = SAEConfig(d_in=16, n_latents=32, k_levels=(2, 4, 8), level_weights="reverse")
    assert rev.weights == pytest.approx((3 / 6, 2 / 6, 1 / 6))
    assert SAEConfig.from_dict(rev.to_dict()) == rev


def test_bad_inputs_raise():
    sae = MatryoshkaTopKSAE(SAEConfig(d_in=16, n_latents=32, k_levels=(4,)))
    with pytest.raises(ValueError, match=r"x: expected shape \(N, 16\)"):
        sae.encode(torch.zeros(3, 15))
    with pytest.raises(ValueError, match="z: expected shape"):
        sae.decode(torch.zeros(3, 16))
    with pytest.raises(ValueError, match="k: expected"):
        sae.encode(torch.zeros(3, 16), k=64)
    with pytest.raises(ValueError, match="embeddings"):
        train_sae(torch.zeros(10, 8), sae.cfg, progress=False)
    with pytest.raises(ValueError, match="finite"):
        sae.init_from_data(torch.full((4, 16), float("nan")))


def test_initial_encoder_scale_fits_the_top_k_reconstruction() -> None:
    """init_from_data scales the tied encoder by the least-squares factor: at k_max = d_in
    (MSAE's top level) the unscaled start reconstructs at several times the input's norm."""
    x = torch.nn.functional.normalize(torch.randn(1000, 64) + 0.5, dim=1)
    sae = MatryoshkaTopKSAE(SAEConfig(d_in=64, n_latents=2048, k_levels=(32, 64)))
    sae.init_from_data(x)

    def err(scale: float) -> float:
        w = sae.W_enc.detach().clone()
        with torch.no_grad():
            sae.W_enc.mul_(scale)
            xs = x * sae.input_scale - sae.b_pre
            recon = sae.decode(sae.encode(x, k=64)) * sae.input_scale - sae.b_pre
            sae.W_enc.copy_(w)
        return float((recon - xs).square().sum() / xs.square().sum())

    assert err(1.0) < 0.5  # fits; the unit tied start is far above 1
    assert err(1.0) <= min(err(0.98), err(1.02)) + 1e-6  # the least-squares scale
