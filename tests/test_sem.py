"""SEM / Orth-Proj on a short-trained demo model, and the debias comparison table."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, open_dict

from fairclip.data.prompts import expand_prompts
from fairclip.data.shards import read_captions, write_shards
from fairclip.data.synthetic import SyntheticConfig, generate_samples
from fairclip.debias.debiased_clip import DebiasedCLIP
from fairclip.debias.orth import fit_orth_proj, score_gap_split
from fairclip.debias.sem import (
    SEM,
    bias_score,
    build_sem,
    content_score,
    fit_sem,
    flagged_lean_share,
)
from fairclip.eval import method_table
from fairclip.eval.method_context import MethodContext
from fairclip.eval.method_table import compare_methods as run
from fairclip.loading import load_model
from fairclip.runtime import CONF_DIR
from fairclip.sae import MatryoshkaTopKSAE, SAEConfig

torch.set_num_threads(1)


# -- unit level (no model) ---------------------------------------------------------------------
def test_content_and_bias_scores() -> None:
    ref = torch.tensor([[0.0, 1.0], [1.0, 2.0], [2.0, 3.0], [3.0, 0.0]])  # A_D [4, 2]
    sorted_ref = ref.T.sort(dim=1).values
    c = content_score(sorted_ref, torch.tensor([[2.5, 0.0]]))
    assert c.tolist() == [[0.75, 0.0]]  # 3 of 4 below 2.5; nothing strictly below 0
    female = torch.tensor([[5.0, 0.0], [4.0, 0.0], [6.0, 0.0]])
    male = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    b = bias_score(sorted_ref, [[female, male]])
    # latent 0: female median 5 is above all of D and all male prompts -> 1
    # latent 1: male median 1 is above 1/4 of D and 3/3 female prompts -> min = 0.25
    assert b.tolist() == pytest.approx([1.0, 0.25])


def _toy_encoder(dim: int = 16):
    gen = torch.Generator().manual_seed(0)
    table: dict[str, torch.Tensor] = {}

    def encode(prompts):
        for p in prompts:
            if p not in table:
                table[p] = torch.randn(dim, generator=gen)
        return torch.stack([table[p] for p in prompts])

    return encode


def test_sem_modulation_rules_and_unknown_inputs() -> None:
    encode = _toy_encoder()
    sae = MatryoshkaTopKSAE(SAEConfig(d_in=16, n_latents=32, k_levels=(4, 16)))
    sae.init_from_data(encode([f"x{i}" for i in range(64)]))
    ref = [f"neutral {i}" for i in range(20)]
    bias = {"gender": {"female": ["w1", "w2"], "male": ["m1", "m2"]}}
    classes = {"doctor": ["d1", "d2", "d3"], "nurse": ["n1", "n2"]}
    x = encode(["d1", "n2", "unseen prompt"]) * 3.0  # un-normalised input
    for variant in ("i", "b", "bi"):
        sem = fit_sem(variant, sae, encode, ref, bias, classes)
        out = sem(x)
        assert out.shape == x.shape and torch.isfinite(out).all()
        unit = torch.nn.functional.normalize(x, dim=-1)
        z = sem.sae.encode(unit)
        m = sem.modulation(unit, z)
        if variant == "b":  # content score on the input's own latent, minus the bias score
            c = (sem.ref_sorted[None] < z[:, :, None]).float().mean(-1)
            assert torch.allclose(m, (1 + c - sem.bias).square())
        if variant != "b":  # matched inputs use the class's paraphrase median latent
            zq = sem.query_latents(unit, z)
            assert torch.equal(zq[0], sem.class_latents[0]) and torch.equal(zq[2], z[2])
        # SEM_i modulates the class median itself; SEM_b/SEM_bi the input's own latent
        modulated = zq if variant == "i" else z
        expected = m * modulated + (1 - m) * sem.ref_median
        assert torch.allclose(sem.modulated_latents(unit, z), expected)
    # M = 1 everywhere and keep_residual: SEM is the identity
    sem = fit_sem(
        "b", sae, encode, ref, {"gender": {"a": ["p"], "b": ["p"]}}, None, keep_residual=True
    )
    assert torch.count_nonzero(sem.bias) == 0  # identical group prompts: no bias latent
    sem._modulation = lambda zq: torch.ones_like(zq)
    assert torch.allclose(sem(x), x, atol=1e-5)
    with pytest.raises(ValueError, match="debias.sem.bias_prompts"):
        fit_sem("bi", sae, encode, ref, None, classes)
    with pytest.raises(ValueError, match="variant"):
        SEM("x", sae.cfg.to_dict(), n_reference=1)


def test_flagged_lean_share_splits_the_lean_by_latent() -> None:
    """Lean decoded from flagged latents over the whole lean, against a hand computation."""
    sae = MatryoshkaTopKSAE(SAEConfig(d_in=4, n_latents=4, k_levels=(2, 4)))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
        sae.b_enc.zero_()
        sae.b_pre.zero_()
    sem = SEM("b", sae.cfg.to_dict(), n_reference=1)
    sem.sae.load_state_dict(sae.state_dict())
    sem.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))  # latent 0 is the flagged one
    direction = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    # row 1 leans 0.6 + 0.2, 0.6 of it from latent 0 (share 0.75); row 2 does not lean
    emb = torch.tensor([[0.6, 0.2, 0.0, 0.7746], [0.0, 0.0, 0.9, 0.4359]])
    unit = torch.nn.functional.normalize(emb, dim=-1)
    expected = float(unit[0, 0] / (unit[0, 0] + unit[0, 1]))  # row 2 has no lean
    assert flagged_lean_share(sem, emb, direction) == pytest.approx(expected, rel=1e-4)
    sem.bias.zero_()  # nothing flagged: no part of the lean SEM could remove
    assert flagged_lean_share(sem, emb, direction) == 0.0


def test_score_gap_split_separates_the_lean_from_the_images() -> None:
    """Two cases worked by hand: a gap the images cancel, and a gap that is all lean."""
    t = torch.nn.functional.normalize(torch.tensor([[0.3, 0.9, 0.0]]), dim=-1)
    direction = torch.tensor([[2.0, 0.0, 0.0]])  # the bias-prompt span is the first axis
    concepts = torch.tensor([0, 0, 0, 0, -1, 0])
    groups = torch.tensor([0, 0, 1, 1, 0, -1])  # the last two are unlabelled: ignored

    def images(female: list[float], male: list[float]) -> torch.Tensor:
        return torch.tensor([female, female, male, male, [9.0, 9, 9], [9.0, 9, 9]])

    # women sit toward +x (the lean's side) and, by as much in score, toward -y: cancelled
    cancel = score_gap_split(
        t, images([0.3, -0.1, 0.5], [-0.3, 0.1, 0.5]), concepts, groups, direction
    )
    lean = float(t[0, 0] * 0.6)
    assert cancel["gap"] == pytest.approx(0.0, abs=1e-6)
    assert cancel["gap_lean"] == pytest.approx(lean) and cancel["gap_rest"] == pytest.approx(lean)
    assert cancel["offset"] == pytest.approx(1.0)
    # the groups differ only along the lean: all of the gap is the prompts'
    text = score_gap_split(
        t, images([0.3, 0.2, 0.5], [-0.3, 0.2, 0.5]), concepts, groups, direction
    )
    assert text["gap"] == pytest.approx(lean) and text["gap_rest"] == pytest.approx(0.0, abs=1e-6)
    assert text["offset"] == pytest.approx(0.0, abs=1e-6)


def test_expand_prompts() -> None:
    spec = {"templates": ["a {a} {g}.", "a {g}."], "words": {"g": ["man", "woman"], "a": ["old"]}}
    assert expand_prompts(spec, "k") == ["a old man.", "a old woman.", "a man.", "a woman."]
    assert expand_prompts(["x", spec], "k")[:2] == ["x", "a old man."]
    with pytest.raises(ValueError, match="k: expected"):
        expand_prompts(3, "k")


def test_per_class_bias_prompts_pair_groups_within_each_class(tmp_path: Path) -> None:
    """debias=synthetic_per_class: every group prompt names a class, and the prompts of the
    two values differ only in the group word at each position (Orth-Proj pairs by position)."""
    cfg = _compare_cfg(tmp_path, tmp_path, tmp_path, "debias=synthetic_per_class")
    concepts = list(cfg.data.concepts)
    for attr, (a, b), (wa, wb) in (
        ("gender", ("female", "male"), ("woman", "man")),
        ("background", ("warm", "cool"), ("warm", "cool")),
    ):
        first = expand_prompts(cfg.debias.bias_prompts[attr][a], attr)
        second = expand_prompts(cfg.debias.bias_prompts[attr][b], attr)
        assert len(first) == len(second) >= 3 * len(concepts)
        assert all(any(f" {c}" in p for c in concepts) for p in first + second)
        assert [p.replace(f" {wa}", f" {wb}") for p in first] == second
    # everything else is the default prompt set
    base = _compare_cfg(tmp_path, tmp_path, tmp_path)
    assert cfg.debias.reference_prompts == base.debias.reference_prompts
    assert cfg.debias.class_templates == base.debias.class_templates


# -- on a trained demo model ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_run(trained_run: Path) -> Path:
    """The session's trained demo run (tests/conftest.py), shared with the evaluation tests."""
    return trained_run


def _compare_cfg(run_dir: Path, synthetic_dir: Path, out: Path, *extra: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose(
            config_name="debias_compare",
            overrides=[
                f"model.name={run_dir}",
                f"data.val_shards={synthetic_dir}/eval",
                f"output_dir={out}",
                "table_k=10",  # the fixture's eval split has 60 images per concept
                "wandb.enabled=false",
                *extra,
            ],
        )


@pytest.fixture(scope="module")
def table(demo_run: Path, synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("compare")
    result = run(
        _compare_cfg(demo_run, synthetic_dir, out, "save_models=true", "wandb.enabled=true")
    )
    result["out"] = out
    return result


def test_compare_table(table: dict) -> None:
    rows = table["rows"]
    assert list(rows) == ["clip", "orth_proj", "orth_cali", "sem_i", "sem_b", "sem_bi"]
    md = (table["out"] / "compare.md").read_text()
    assert "| sem_bi |" in md and "fvu=" in md and "dead_fraction=" in md
    assert all(0.0 <= r["class_group_gap"] <= 1.0 for r in rows.values())
    # the planted bias shows in clip: its class prompts lean toward a gender
    assert rows["clip"]["class_lean"] > 0.01 and rows["clip"]["maxskew@10"] > 0.3
    assert -1.0 <= table["sae"]["flagged_lean_share"] <= 1.5
    gap = table["score_gap"]  # |lean + rest| <= |lean| + |rest| for every (class, value)
    assert 0 < gap["gap"] <= gap["gap_lean"] + gap["gap_rest"] + 1e-6
    assert f"cancels {gap['offset']:.0%} of the lean" in md
    assert json.loads((table["out"] / "compare.json").read_text())["rows"] == rows
    # the SAE's quality is reported, whatever it is (docs/results/sem_published_defaults.md:
    # the MSAE preset needs far more text than the demo's prompts to reconstruct well)
    assert table["sae"]["fvu"] > 0 and 0 <= table["sae"]["dead_fraction"] <= 1
    assert table["sae"]["l0"] > 0
    # which method lowers the skew of a toy model is seed luck, not a property to pin here:
    # the methods are checked against their published definitions in test_sem_published.py
    for r in rows.values():
        assert 0 <= r["acc"] <= 1 and r["maxskew@10"] >= 0 and r["ndkl@10"] >= 0


def test_compare_logs_the_table_to_wandb(table: dict) -> None:
    """The offline wandb run in the output dir holds the table (as in compare.json), the depth
    table, the plot, and each finite cell as a summary value."""
    (run_dir,) = (table["out"] / "wandb").glob("offline-run-*")
    media = run_dir / "files" / "media"
    logged = json.loads(next((media / "table" / "debias_compare").glob("table_*")).read_text())
    assert logged["columns"][0] == "method" and len(logged["data"]) == 6
    row = next(r for r in logged["data"] if r[0] == "sem_b")
    sem_b = dict(zip(logged["columns"], row, strict=True))
    assert sem_b["maxskew@10"] == pytest.approx(table["rows"]["sem_b"]["maxskew@10"])
    assert next((media / "table" / "debias_compare").glob("depth_*"))
    assert next((media / "images" / "debias_compare" / "plots").glob("compare_depth*.png"))
    records = next(run_dir.glob("run-*.wandb")).read_bytes()  # offline: summary in records
    assert b"debias_compare/orth_proj/class_lean" in records


def test_compare_on_the_spurious_background(
    demo_run: Path, synthetic_dir: Path, tmp_path: Path
) -> None:
    """data=synthetic_spurious attribute=background (the Waterbirds-style split): (concept,
    background) cells, Orth-Proj fitted on the background prompts only (debias_attributes
    defaults to the attribute), and SEM's protocol table per method."""
    cfg = _compare_cfg(
        demo_run, synthetic_dir, tmp_path,
        "data=synthetic_spurious", "protocol=sem2026", "folds.k=50",
        "attribute=background", "methods=[clip,orth_proj]", "debias.orth_proj.variant=centred",
    )  # fmt: skip
    result = run(cfg)
    paper = (tmp_path / "protocol.md").read_text()
    assert result["protocol"] == "sem2026" and paper in (tmp_path / "compare.md").read_text()
    for name in ("clip", "orth_proj"):
        zs = result["metrics"][name]["folds"]["zeroshot"]
        assert (
            f"| {name} | {zs['acc']:.4f} ± {zs['acc/ci']:.4f} | {zs['wg_acc/background']:.4f}"
            in paper
        )
    rows = result["rows"]
    zs = result["metrics"]["clip"]["zeroshot"]
    cells = [zs[f"acc/background={b}"] for b in ("warm", "cool")]
    assert rows["clip"]["worst_group_acc"] == pytest.approx(min(cells))
    assert rows["clip"]["worst_class_group_acc"] <= min(cells)
    by_cell = result["metrics"]["clip"]["cells"]["background"]  # concept -> value -> accuracy
    assert set(by_cell) == set(cfg.data.concepts) and set(by_cell["doctor"]) == {"warm", "cool"}
    assert min(min(v.values()) for v in by_cell.values()) == pytest.approx(
        rows["clip"]["worst_class_group_acc"]
    )
    # the centred Orth-Proj projects out the directions the lean is measured along
    assert abs(rows["orth_proj"]["class_lean"]) < 1e-3
    ctx = MethodContext(cfg, load_model(str(demo_run)), torch.device("cpu"))
    assert list(ctx.bias_prompts()) == ["background"]


def test_compare_over_seeds_reports_the_mean_and_the_spread(
    demo_run: Path, synthetic_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """seeds=[0,1]: SEM's SAE is retrained per seed, the table is the mean of the seeds."""
    built: list[str] = []
    builders = method_table.method_builders

    def counting_builds(cfg: DictConfig) -> dict[str, method_table.Method]:
        return {
            name: dataclasses.replace(
                m, build=lambda b, c, n=name, f=m.build: built.append(n) or f(b, c)
            )
            for name, m in builders(cfg).items()
        }

    monkeypatch.setattr(method_table, "method_builders", counting_builds)
    encoded: list[int] = []  # sizes of the SAE corpus encodings
    make_sae = MethodContext._load_or_train_sae

    def counting(ctx: MethodContext) -> MatryoshkaTopKSAE:
        encode = ctx.encode
        ctx.encode = lambda prompts: encoded.append(len(prompts)) or encode(prompts)
        return make_sae(ctx)

    monkeypatch.setattr(MethodContext, "_load_or_train_sae", counting)
    cfg = _compare_cfg(
        demo_run, synthetic_dir, tmp_path, "methods=[clip,sem_b]", "seeds=[0,1]",
        "sae_train.epochs=60",
    )  # fmt: skip
    result = run(cfg)
    # the SAE corpus (240 prompts; the other prompt sets hold <= 72) is encoded once for both
    assert [n for n in encoded if n > 200] == [240]
    per_seed = result["per_seed"]
    assert [p["seed"] for p in per_seed] == [0, 1] and result["seeds"] == [0, 1]
    for name in ("clip", "sem_b"):
        for col, mean in result["rows"][name].items():
            vals = [p["rows"][name][col] for p in per_seed]
            assert mean == pytest.approx(sum(vals) / 2), (name, col)
            assert result["spread"][name][col]["min"] == pytest.approx(min(vals))
    assert per_seed[0]["rows"]["clip"] == per_seed[1]["rows"]["clip"]  # nothing random in clip
    assert built == ["clip", "sem_b", "sem_b"]  # so clip is evaluated once, SEM once per seed
    assert result["spread"]["clip"]["acc"]["std"] == 0.0
    sem = [p["rows"]["sem_b"] for p in per_seed]
    assert sem[0] != sem[1]  # a different SAE per seed
    assert per_seed[0]["sae"]["fvu"] != per_seed[1]["sae"]["fvu"]
    md = (tmp_path / "compare.md").read_text()
    assert "Mean over seeds [0, 1]" in md and "| sem_b | " in md
    with pytest.raises(ValueError, match="seeds="):
        run(_compare_cfg(demo_run, synthetic_dir, tmp_path, "methods=[clip]", "seeds=[1,1]"))


def test_sae_corpus_adds_the_training_captions(
    demo_run: Path, synthetic_dir: Path, tmp_path: Path
) -> None:
    """sae_train.caption_samples: the SAE also sees the captions the model was tuned on."""
    cfg_synth = SyntheticConfig(captions="compositional")
    write_shards(generate_samples("train", 300, cfg_synth), tmp_path / "c", "c", progress=False)
    cfg = _compare_cfg(
        demo_run, synthetic_dir, tmp_path, f"data.train_shards={tmp_path}/c",
        "sae_train.caption_samples=200", "sae_train.epochs=2",
    )  # fmt: skip
    ctx = MethodContext(cfg, load_model(str(demo_run)), torch.device("cpu"))
    captions = read_captions(tmp_path / "c", 200)
    assert len(captions) == 200
    templates = set(ctx.prompt_list("sae_corpus")) | set(ctx.prompt_list("reference_prompts"))
    assert len(set(captions) - templates) > 50  # compositional captions the templates lack
    assert ctx.sae.cfg.n_latents == 32 * 64  # the scaled MSAE preset of a 64-dim model
    assert ctx.sae_info["corpus_prompts"] == len(templates | set(captions))

    no_text = (
        {k: v for k, v in x.items() if k != "txt"} for x in generate_samples("eval", 48, cfg_synth)
    )
    write_shards(no_text, tmp_path / "n", "n", progress=False)
    cfg.data.train_shards = str(tmp_path / "n")
    with pytest.raises(ValueError, match=r"caption_samples=200: data.train_shards=.* no .txt"):
        _ = MethodContext(cfg, ctx.bundle, torch.device("cpu")).sae


def test_sae_corpus_file_adds_its_lines(
    demo_run: Path, synthetic_dir: Path, tmp_path: Path
) -> None:
    """sae_train.corpus_file: the SAE trains on its lines (streamed) with the prompt corpus; a
    missing, empty or non-UTF-8 file names the key (and the line)."""
    lines = [f"a photo of a {w} in a {p}." for w in ("dog", "cat", "car") for p in ("park", "city")]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join([lines[0], "", *lines, "  "]) + "\n")
    cfg = _compare_cfg(
        demo_run, synthetic_dir, tmp_path, f"sae_train.corpus_file={corpus}", "sae_train.epochs=2"
    )
    ctx = MethodContext(cfg, load_model(str(demo_run)), torch.device("cpu"))
    templates = set(ctx.prompt_list("sae_corpus")) | set(ctx.prompt_list("reference_prompts"))
    assert ctx.sae.cfg.n_latents == 32 * 64  # the scaled MSAE preset of a 64-dim model
    assert ctx.sae_info["corpus_prompts"] == len(templates)
    assert ctx.sae_info["corpus_captions"] == len(lines) + 1  # streamed, duplicates and all

    for content, error, match in [
        (None, FileNotFoundError, r"sae_train.corpus_file='.*nope.txt': no such file"),
        ("\n \n", ValueError, r"sae_train.corpus_file: .*empty.txt holds no caption"),
        (b"ok\n\xff\xfe\n", ValueError, r"sae_train.corpus_file: .*latin.txt:2 is not UTF-8"),
    ]:
        name = {None: "nope.txt", "\n \n": "empty.txt"}.get(content, "latin.txt")
        path = tmp_path / name
        if isinstance(content, str):
            path.write_text(content)
        elif content is not None:
            path.write_bytes(content)
        cfg.sae_train.corpus_file = str(path)
        with pytest.raises(error, match=match):
            _ = MethodContext(cfg, ctx.bundle, torch.device("cpu")).sae


def test_compare_reports_skew_by_ranking_depth(table: dict) -> None:
    saved = json.loads((table["out"] / "compare.json").read_text())
    assert saved["depth_ks"] == [10, 50, 100]  # table_k=10 and skew_ks [10, 50, 100]
    assert list(saved["depth"]) == list(table["rows"])
    for name, depth in saved["depth"].items():
        # the depth table at the table's k is the table's value (one computation, two views)
        assert depth["maxskew@10"] == pytest.approx(table["rows"][name]["maxskew@10"])
        assert depth["ndkl@10"] == pytest.approx(table["rows"][name]["ndkl@10"])
        # deeper rankings of a balanced split hold more of each concept's images: skew falls
        assert depth["maxskew@100"] < depth["maxskew@10"], name
        assert all(0.0 <= v < 1.0 for v in depth.values()), name
    md = (table["out"] / "compare.md").read_text()
    assert "By ranking depth (gender, eq_opp; plot: compare_depth.png)" in md
    assert "| method | maxskew@10 | maxskew@50 | maxskew@100 | ndkl@10 |" in md
    png = (table["out"] / "compare_depth.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_sem_saves_and_loads_identically(table: dict, demo_run: Path) -> None:
    folder = table["out"] / "models" / "sem_bi"
    loaded = DebiasedCLIP.load(folder)
    assert [s.kind for s in loaded.text] == ["sem"]
    bundle = load_model(str(demo_run))
    tokens = bundle.tokenizer(["a photo of a doctor.", "a nurse at work.", "a red bicycle."])
    reference = DebiasedCLIP.load(folder)
    with torch.no_grad():
        a = loaded.encode_text(tokens, normalize=True)
        b = reference.encode_text(tokens, normalize=True)
        plain = bundle.model.encode_text(tokens, normalize=True)
    assert torch.equal(a, b)
    assert not torch.allclose(a, plain)  # SEM did change the embeddings
    # fairclip-eval's loader returns the DebiasedCLIP for such a folder
    via_eval = load_model(str(folder)).model
    assert isinstance(via_eval, DebiasedCLIP)
    with torch.no_grad():
        assert torch.equal(via_eval.encode_text(tokens, normalize=True), a)


def test_sem_roundtrip_exact(demo_run: Path, synthetic_dir: Path, tmp_path: Path) -> None:
    bundle = load_model(str(demo_run))
    cfg = _compare_cfg(demo_run, synthetic_dir, tmp_path, "sae_train.epochs=20")
    ctx = MethodContext(cfg, bundle, torch.device("cpu"), run_dir=demo_run)
    model = build_sem(bundle, ctx, "bi")
    orth = fit_orth_proj(ctx.encode, ctx.bias_prompts(), rel_tol=0.0)
    model.text.append(orth)
    model.save(tmp_path / "m")
    loaded = DebiasedCLIP.load(tmp_path / "m")
    tokens = bundle.tokenizer(["a photo of a pilot.", "an image of a dancer.", "a photo of a man."])
    with torch.no_grad():
        assert torch.equal(
            model.encode_text(tokens, normalize=True), loaded.encode_text(tokens, normalize=True)
        )
    # Orth-Proj removes the group directions exactly
    g = torch.nn.functional.normalize(
        ctx.encode(["a photo of a man."]) - ctx.encode(["a photo of a woman."]), dim=-1
    )
    with torch.no_grad():
        e = DebiasedCLIP(bundle.model, bundle.name, text=[orth]).encode_text(tokens)
    assert (e @ g.T).abs().max() < 1e-4
    # the methods debias the table's attribute by default, any listed ones on request
    assert list(ctx.bias_prompts()) == ["gender"]
    cfg.debias_attributes = ["gender", "background"]
    assert list(ctx.bias_prompts()) == ["gender", "background"]
    cfg.debias_attributes = ["race"]
    with pytest.raises(ValueError, match=r"debias_attributes=\['race'\]: debias.bias_prompts"):
        ctx.bias_prompts()
    # the class-lean column measures the table's attribute whatever the methods debias
    cfg.debias_attributes = ["gender"]
    expected, _ = MethodContext(cfg, bundle, torch.device("cpu")).lean_basis()
    cfg.debias_attributes = ["background"]
    directions, _ = MethodContext(cfg, bundle, torch.device("cpu")).lean_basis()
    assert torch.equal(directions, expected) and directions.abs().sum() > 0


def test_method_registry_and_errors(
    demo_run: Path, synthetic_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(MissingConfigException, match=r"Could not load 'methods/nope'"):
        run(_compare_cfg(demo_run, synthetic_dir, tmp_path, "methods=[nope]"))
    malformed = _compare_cfg(demo_run, synthetic_dir, tmp_path, "methods=[clip]")
    malformed.methods.clip.build = {"epochs": 2}
    with pytest.raises(ValueError, match=r"^methods.clip: expected \{seeded: bool, build"):
        run(malformed)
    with pytest.raises(FileNotFoundError, match=r"^model.pretrained='/nope.pt': weights file"):
        run(_compare_cfg(demo_run, synthetic_dir, tmp_path, "model.name=fairclip-tiny", "model.pretrained=/nope.pt"))  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"^model.name='ViT-B-3' .*ViT-B-32.*export dir>', or set model.config_file=<config.json>\.$",
    ):
        run(_compare_cfg(demo_run, synthetic_dir, tmp_path, "model.name=ViT-B-3"))
    with pytest.raises(ValueError, match="attribute="):
        run(_compare_cfg(demo_run, synthetic_dir, tmp_path, "attribute=race"))
    with pytest.raises(ValueError, match="recall_k=0: expected a positive integer"):
        run(_compare_cfg(demo_run, synthetic_dir, tmp_path, "recall_k=0"))
    bad_k = _compare_cfg(demo_run, synthetic_dir, tmp_path)
    bad_k.table_k = "ten"
    with pytest.raises(ValueError, match="table_k='ten': expected a positive integer"):
        run(bad_k)
    with pytest.raises(ValueError, match=r"skew_ks: expected positive integers, got 0"):
        run(_compare_cfg(demo_run, synthetic_dir, tmp_path, "skew_ks=[10,0]"))
    with caplog.at_level(logging.WARNING, logger="fairclip.eval.spec"):
        cfg = _compare_cfg(
            demo_run, synthetic_dir, tmp_path, "methods=[clip]", "skew_ks=[10,100000]"
        )
        # a method of the user's own: any builder, by its import path
        with open_dict(cfg.methods):
            cfg.methods._test_identity = {
                "seeded": True,
                "build": {"_target_": "tests.test_sem._build_identity", "_partial_": True},
            }
        result = run(cfg)
    assert "skew k=100000: the eval split" in caplog.text
    assert result["depth_ks"] == [10, 100000]
    assert result["depth"]["clip"]["maxskew@100000"] == 0.0  # the whole balanced split
    assert result["rows"]["clip"] == result["rows"]["_test_identity"]
    assert result["sae"] == {}  # no SEM row: no SAE trained


def test_joint_rows_select_their_epoch_on_the_held_out_split(
    demo_run: Path, synthetic_dir: Path, tmp_path: Path
) -> None:
    """The eval split is reported, val/ beside it chooses the joint heads' epoch (no leak)."""
    fast = [
        "methods.joint_vl_text.build.epochs=2",
        "methods.joint_vl_text.build.max_samples=300",
        "methods.joint_vl_text.build.batch_size=64",
        "methods.joint_vl_text.build.loss.queue_size=256",
        f"data.train_shards={synthetic_dir}/train",
    ]
    cfg = _compare_cfg(demo_run, synthetic_dir, tmp_path, "methods=[joint_vl_text]", *fast)
    result = run(cfg)
    assert result["selected_on"] == str(synthetic_dir / "val")
    assert (
        f"selected by ABLE@10 every 2 epochs, patience 10, on {synthetic_dir / 'val'}."
        in (tmp_path / "compare.md").read_text()
    )
    # choosing on the reported split itself is allowed, and flagged under the table
    eval_dir = str(synthetic_dir / "eval")
    on_eval = run(_compare_cfg(demo_run, synthetic_dir, tmp_path, "methods=[joint_vl_text]",
                               f"splits.select={eval_dir}", *fast))  # fmt: skip
    assert on_eval["selected_on"] == eval_dir
    assert "the reported split itself" in (tmp_path / "compare.md").read_text()
    with pytest.raises(FileNotFoundError, match=r"splits.select"):
        run(_compare_cfg(demo_run, synthetic_dir, tmp_path, f"splits.select={tmp_path}/nope"))
    none = run(
        _compare_cfg(demo_run, synthetic_dir, tmp_path, "methods=[clip]", "splits.select=null")
    )
    assert none["selected_on"] == eval_dir


def test_fairclip_debias_command(demo_run: Path, synthetic_dir: Path, tmp_path: Path) -> None:
    """The installed `fairclip-debias` entry point: `model.name=` names the model, as in every
    app; the rest are Hydra overrides, and the table lands in the Hydra run dir."""
    out = tmp_path / "cli"
    cmd = [
        str(Path(sys.executable).parent / "fairclip-debias"), f"model.name={demo_run}",
        f"data.val_shards={synthetic_dir}/eval", "table_k=10", "methods=[clip,orth_proj]",
        "debias.orth_proj.variant=centred", "wandb.enabled=false", f"hydra.run.dir={out}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "compare.json").read_text())
    assert result["model"] == str(demo_run) and list(result["rows"]) == ["clip", "orth_proj"]
    assert (
        abs(result["rows"]["orth_proj"]["class_lean"]) < 0.1 * result["rows"]["clip"]["class_lean"]
    )
    assert "| orth_proj |" in proc.stdout


def _build_identity(bundle, ctx) -> DebiasedCLIP:
    """A method defined outside fairclip (test_method_registry_and_errors)."""
    return DebiasedCLIP(bundle.model, bundle.name)
