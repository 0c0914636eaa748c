"""Attention-head decomposition, head scores, mean ablation and the fairclip-heads audit."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from fairclip.cli.heads import main
from fairclip.debias.debiased_clip import DebiasedCLIP
from fairclip.debias.head_ablation import HeadMeanAblation
from fairclip.debias.head_attribution import decompose, head_shape, layer_matched_random, top_heads
from fairclip.debias.registry import component_class
from fairclip.loading import load_model
from fairclip.model.factory import create_model
from tests.conftest import run_app


def _check_sum(model: torch.nn.Module, images: torch.Tensor) -> None:
    model.eval()
    heads, other = decompose(model.visual, images)
    with torch.no_grad():
        ref = model.visual(images)
    assert heads.shape[:3] == (images.shape[0], *head_shape(model.visual))
    assert torch.allclose(heads.sum((1, 2)) + other, ref, atol=1e-4)


def test_decomposition_tiny() -> None:
    torch.manual_seed(0)
    _check_sum(create_model("fairclip-tiny").model, torch.randn(6, 3, 32, 32))


def test_decomposition_bigger_vit_with_layerscale() -> None:
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=128,
        vision_cfg={"image_size": 64, "layers": 6, "width": 256, "head_width": 32,
                    "patch_size": 8, "ls_init_value": 0.3},
        text_cfg={"context_length": 16, "vocab_size": 1000, "width": 64, "heads": 2, "layers": 1},
    )  # fmt: skip
    _check_sum(model, torch.randn(3, 3, 64, 64))


def test_mean_ablation_patch_basics() -> None:
    torch.manual_seed(0)
    model = create_model("fairclip-tiny").model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model.visual(x)
        # the mean of one image is that image: ablating with it changes nothing
        patch = HeadMeanAblation.fit(model.visual, [(1, 0), (2, 2)], iter([x[:1]]))
        with patch.patch(model.visual):
            same = model.visual(x[:1])
        assert torch.allclose(same, ref[:1], atol=1e-5)
        patch = HeadMeanAblation.fit(model.visual, [(1, 0), (2, 2)], iter([x]))
        with patch.patch(model.visual):
            changed = model.visual(x)
        assert not torch.allclose(changed, ref, atol=1e-4)
        assert torch.allclose(model.visual(x), ref)  # hooks removed on exit
    assert component_class("head_mean_ablation") is HeadMeanAblation
    with (
        pytest.raises(ValueError, match="out of range"),
        HeadMeanAblation([(7, 0)], torch.zeros(1, 65, 32)).patch(model.visual),
    ):
        pass


def test_head_selection_helpers() -> None:
    scores = torch.tensor([[0.1, 0.2, 0.0], [0.0, 0.9, 0.3]])
    assert top_heads(scores, 2) == [(1, 1), (1, 2)]
    control = layer_matched_random([(1, 1)], (2, 3), seed=0)
    assert len(control) == 1 and control[0][0] == 1 and control[0] != (1, 1)


@pytest.fixture(scope="module")
def demo_run(trained_run: Path) -> Path:
    """The session's trained demo run (tests/conftest.py)."""
    return trained_run


def test_audit_top_heads_beat_random_control(
    demo_run: Path, synthetic_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "audit"
    exit_value = run_app(
        main,
        [f"model.name={demo_run}", f"splits.train={synthetic_dir / 'train'}",
         f"splits.eval={synthetic_dir / 'eval'}", f"hydra.run.dir={out}",
         "heads.max_samples=600", "heads.random_seeds=[0,1]", "heads.curve=2",
         "heads.textspan.top=2", "heads.textspan.n_texts=3"],
    )  # fmt: skip
    for name in ("head_scores.png", "head_scores_gender.png", "head_scores_age.png",
                 "ablation_curve.png", "ablation.md", "ablation.json"):  # fmt: skip
        assert (out / name).stat().st_size > 0
    assert exit_value is None  # what the console script exits with: 0
    result = json.loads((out / "ablation.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    print((out / "ablation.md").read_text())
    key = "cramers_v_eval/gender"
    original = rows["original"][key]
    top = rows["top-1 (projection)"][key]
    control = rows["random layer-matched (mean)"][key]
    assert top < original
    assert top < control
    # the heads chosen are in the same layer as the control
    assert (
        rows["top-1 (projection)"]["heads"][0][0]
        == rows["random layer-matched (seed 0)"]["heads"][0][0]
    )
    assert len(result["scores"]["projection"]) == 3
    # every attribute with group prompts is scored; age has three values: a score per value
    age = result["attributes"]["age"]
    assert age["values"] == ["young", "middle-aged", "old"]
    assert torch.tensor(age["per_value"]).shape == (3, *torch.tensor(age["projection"]).shape)
    assert 0.0 <= min(min(r) for r in age["probe"]) <= max(max(r) for r in age["probe"]) <= 1.0
    concepts = {"doctor", "nurse", "engineer", "teacher", "pilot", "dancer", "chef", "baker"}
    assert set(result["per_class"]["original"]) == concepts
    assert [r["heads"] for r in result["curve"]] == [1, 2]
    assert "random/cramers_v_eval/gender" in result["curve"][0]
    described = result["textspan"]
    assert len(described) == 2 and all(len(d["texts"]) == 3 for d in described)
    assert all(d["explained"] > d["random_explained"] for d in described)
    assert "TextSpan descriptions" in (out / "ablation.md").read_text()


def _planted(
    n: int = 240, d: int = 12, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contributions ``[n, 3 layers, 2 heads, d]`` of a three-valued attribute: head (1, 0)
    writes value v's direction e_v for images of value v, every other head noise."""
    gen = torch.Generator().manual_seed(seed)
    groups = torch.arange(n) % 3
    contrib = 0.1 * torch.randn(n, 3, 2, d, generator=gen)
    directions = torch.eye(d)[:3]
    contrib[:, 1, 0] += directions[groups]
    return contrib, groups, directions


def test_three_valued_attribute_gets_per_value_scores_and_a_multinomial_probe() -> None:
    from fairclip.debias.head_attribution import probe_scores, value_projection_scores

    contrib, groups, directions = _planted()
    scores = value_projection_scores(contrib, groups, directions)
    assert scores.shape == (3, 3, 2)
    for v in range(3):  # the direct formula: |mean over v − mean over the rest| along e_v
        proj = contrib[..., v]
        expected = (proj[groups == v].mean(0) - proj[groups != v].mean(0)).abs()
        torch.testing.assert_close(scores[v], expected)
        assert top_heads(scores[v], 1) == [(1, 0)]
    assert scores[0, 1, 0] == pytest.approx(1.0, abs=0.05)  # 1 inside, 0 outside
    probe = probe_scores(contrib, groups)
    assert probe[1, 0] > 0.95 and float(probe.flatten()[[0, 1, 3, 4, 5]].max()) < 0.6


def test_text_span_finds_the_directions_a_head_writes() -> None:
    """A head whose contributions are combinations of 3 pool texts: TextSpan picks those 3
    and their span explains nearly all the variance, far more than 3 random pool entries."""
    from fairclip.debias.text_span import explained_variance, text_span

    gen = torch.Generator().manual_seed(0)
    pool = torch.nn.functional.normalize(torch.randn(40, 32, generator=gen), dim=-1)
    planted = [5, 17, 31]
    coeffs = torch.randn(500, 3, generator=gen) * torch.tensor([3.0, 2.0, 1.0])
    contrib = coeffs @ pool[planted] + 0.01 * torch.randn(500, 32, generator=gen) + 4.0
    chosen = text_span(contrib, pool, n_texts=3, rank=80)
    assert chosen[0] == 5 and sorted(chosen) == planted  # the strongest direction first
    explained = explained_variance(contrib, pool[chosen])
    assert explained > 0.99
    random = [explained_variance(contrib, pool[torch.randperm(40, generator=gen)[:3]])
              for _ in range(20)]  # fmt: skip
    assert max(random) < explained and sum(random) / 20 < 0.5
    with pytest.raises(ValueError, match="n_texts=41"):
        text_span(contrib, pool, n_texts=41)


def test_head_ablation_saves_and_loads(demo_run: Path, synthetic_dir: Path, tmp_path: Path) -> None:
    from fairclip.debias.head_ablation import build_head_ablation

    bundle = load_model(str(demo_run))
    context = {
        "train_shards": str(synthetic_dir / "train"),
        "attributes": {"gender": ["female", "male"], "age": ["young", "middle-aged", "old"]},
        "concepts": ["doctor", "nurse", "engineer", "teacher", "pilot", "dancer", "chef",
                     "baker"],
    }  # fmt: skip
    model = build_head_ablation(bundle, context, max_samples=300, head_score="probe")
    assert isinstance(model, DebiasedCLIP) and len(model.vision_patches) == 1
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        before = model.encode_image(images, normalize=True)
        base = bundle.model.encode_image(images, normalize=True)
    assert not torch.allclose(before, base, atol=1e-4)
    model.save(tmp_path / "ablated")
    loaded = DebiasedCLIP.load(tmp_path / "ablated")
    with torch.no_grad():
        after = loaded.encode_image(images, normalize=True)
    assert torch.allclose(before, after, atol=1e-6)


def test_audit_settings_are_checked_before_any_work(synthetic_dir: Path, tmp_path: Path) -> None:
    shards = [f"splits.train={synthetic_dir / 'train'}", "splits.eval=/nope",
              "model.name=unused-model", f"hydra.run.dir={tmp_path}"]  # fmt: skip
    with pytest.raises(FileNotFoundError, match=r"^splits.eval: 1 shard\(s\) not found"):
        run_app(main, shards)
    for bad, said in ((["heads.num_heads=0"], "heads.num_heads=0: expected a positive integer"),
                      (["data=synthetc"], "Could not find 'data/synthetc'")):  # fmt: skip
        with pytest.raises(Exception, match=said):
            run_app(main, [*shards, *bad])


def _zero_head(visual: torch.nn.Module, layer: int, head: int) -> None:
    """Zero one head's columns of ``out_proj`` (its whole path into the residual stream)."""
    attn = visual.transformer.resblocks[layer].attn
    width = attn.head_dim
    with torch.no_grad():
        attn.out_proj.weight[:, head * width : (head + 1) * width] = 0


@pytest.mark.parametrize(
    "name", ["ViT-B-32", pytest.param("ViT-L-14", marks=pytest.mark.slow)]
)  # fmt: skip
def test_decomposition_and_one_head_ablation_at_real_sizes(name: str) -> None:
    """Full open_clip architectures (random weights): heads + remaining terms give the image
    embedding to 1e-4 relative; zeroing one head's out_proj columns sets exactly its direct
    contribution to 0, leaves every earlier head's (up to ln_post's per-image rescaling, which
    depends on the final residual) and its own layer's other heads the same."""
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        heads, other = decompose(model.visual, images)
        ref = model.visual(images)
    error = (heads.sum((1, 2)) + other - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert float(error.max()) < 1e-4
    layers, n_heads = head_shape(model.visual)
    layer, head = layers // 2, 3
    _zero_head(model.visual, layer, head)
    with torch.no_grad():
        ablated, _ = decompose(model.visual, images)
    assert float(ablated[:, layer, head].abs().max()) == 0.0
    # earlier layers and the same layer's other heads: the same up to one factor per image
    keep = torch.ones(layers, n_heads, dtype=torch.bool)
    keep[layer:] = False
    keep[layer, [h for h in range(n_heads) if h != head]] = True
    before, after = heads[:, keep], ablated[:, keep]  # [N, K, D]
    factor = (after * before).sum((1, 2)) / (before * before).sum((1, 2))  # least squares
    assert torch.allclose(after, before * factor[:, None, None], rtol=1e-3, atol=1e-6)
    assert float((ablated[:, layer + 1 :] - heads[:, layer + 1 :]).abs().max()) > 1e-4
    # scoring (three values: per-value + multinomial probe) and TextSpan at this size
    from fairclip.debias.head_attribution import score_attribute
    from fairclip.debias.text_span import describe_heads

    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        contrib, _ = decompose(model.visual, torch.randn(6, 3, 224, 224))
    attributes = {"age": ["young", "middle-aged", "old"]}
    prompts = {v: [f"a photo of a {v} person."] for v in attributes["age"]}
    groups = (torch.arange(6) % 3)[:, None]
    scores = score_attribute(model, tokenizer, contrib, groups, attributes, "age", prompts)
    assert scores["per_value"].shape == (3, layers, n_heads)
    assert scores["probe"].shape == (layers, n_heads)
    with torch.no_grad():
        pool = model.encode_text(
            tokenizer([f"a photo of a {w}." for w in ("dog", "cat", "car", "tree", "face")]),
            normalize=True,
        )
    (described,) = describe_heads(contrib, [(layers - 1, 0)], pool, list("abcde"), n_texts=2)
    assert len(described.texts) == 2 and 0.0 < described.explained <= 1.0
