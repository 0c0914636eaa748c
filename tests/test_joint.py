"""Joint V-L debiasing heads: interventions, losses, trainer, builders, callback."""

from __future__ import annotations

import csv
import functools
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fairclip.callbacks.joint import JointHeadsCallback
from fairclip.debias.debiased_clip import DebiasedCLIP
from fairclip.debias.joint import (
    SELECT_KEY,
    JointHeads,
    JointTrainer,
    TokenSwapper,
    balance_groups,
    build_joint,
    encode_pairs,
    evaluate_heads,
    fit_joint_heads,
    headline,
)
from fairclip.debias.registry import COMPONENTS, component_class
from fairclip.eval.run import evaluate_model
from fairclip.eval.spec import EvalSpec, resolve_splits
from fairclip.loading import load_model
from fairclip.model.factory import create_model
from fairclip.runtime import CONF_DIR
from tests.conftest import compose_train, run_train_process, small_run_overrides

ATTRIBUTES = {"gender": ["female", "male"], "age": ["young", "middle-aged", "old"]}
CONCEPTS = ["doctor", "nurse", "engineer", "teacher", "pilot", "dancer", "chef", "baker"]


def _spec() -> EvalSpec:
    cfg = OmegaConf.create(
        {
            "data": {"concepts": CONCEPTS},
            "prompts": OmegaConf.load(Path(CONF_DIR) / "prompts" / "synthetic.yaml"),
        }
    )
    prompts = OmegaConf.to_container(cfg.prompts, resolve=True)
    return EvalSpec.from_config(prompts, ATTRIBUTES, CONCEPTS)


def test_untrained_heads_are_identity_and_registered() -> None:
    heads = JointHeads(16, 32, "joint")
    assert heads.image.mlp2 is heads.text.mlp2  # shared MLP2
    f = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    v, t = heads.encode(f, f)
    assert torch.allclose(v, f, atol=1e-6) and torch.allclose(t, f, atol=1e-6)
    assert {"joint_text", "joint_image"} <= set(COMPONENTS)
    assert all(component_class(kind).kind == kind for kind in COMPONENTS)
    with pytest.raises(ValueError, match="variant"):
        JointHeads(16, 32, "both")


def test_epochs_are_selected_by_able_averaged_over_every_depth() -> None:
    """SELECT_KEY is the mean ABLE over spec.skew_ks (the first k alone hid top-k inversions);
    a missing depth makes it NaN, never a mean over fewer depths."""
    spec = SimpleNamespace(skew_ks=[300, 10, 50], able_query_set="concepts")
    able = {
        "able@300/gender/eq_opp": 0.9,
        "able@10/gender/eq_opp": 0.6,
        "able@50/gender/eq_opp": 0.75,
    }
    report = {"metrics": {"able": able, "zeroshot": {"acc": 0.8}}}
    row = headline(report, spec)
    assert row["able@300"] == 0.9
    assert row[SELECT_KEY] == pytest.approx(0.75)
    del able["able@10/gender/eq_opp"]
    assert math.isnan(headline(report, spec)[SELECT_KEY])


def test_token_swapper_and_group_balance() -> None:
    tok = create_model("fairclip-tiny").tokenizer
    swap = TokenSwapper(tok, {"woman": "man"})
    tokens = tok(["a photo of a woman nurse.", "a man at work.", "a photo of a nurse."])
    expected = tok(["a photo of a man nurse.", "a woman at work.", "a photo of a nurse."])
    assert torch.equal(swap(tokens), expected)
    # one caption's target over 6 images: concept 0 has 3 images of group 0 and 1 of group 1
    # (the rare group), concept 1 one image of group 1, and one image is unlabelled
    p = torch.tensor([[0.30, 0.20, 0.10, 0.06, 0.04, 0.30], [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]])
    groups = torch.tensor([0, 0, 0, 1, 1, -1])
    concepts = torch.tensor([0, 0, 0, 0, 1, 0])
    q = balance_groups(p, groups, concepts)
    assert torch.allclose(q.sum(1), torch.ones(2))  # still distributions
    # quantile matching: the rare image (its group's median) takes the pooled median, the
    # same target as the common group's median image; pooled values 0.06 0.10 0.20 0.30
    # become 0.30 0.20 0.06 | 0.20, then scaled so the concept keeps its mass 0.66
    expected = torch.tensor([0.30, 0.20, 0.06, 0.20]) * 0.66 / 0.76
    assert torch.allclose(q[0, :4], expected, atol=1e-6)
    assert q[0, 3] == q[0, 1]  # equal quantile, equal target, whatever the group
    assert torch.allclose(q[:, 4:], p[:, 4:])  # a concept with one group, unlabelled: kept
    assert torch.allclose(q[1], p[1])  # groups already alike: unchanged
    # random batches: rows stay distributions, each concept keeps its mass
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(4, 64, generator=gen).softmax(-1)
    groups = torch.randint(0, 2, (64,), generator=gen)
    concepts = torch.randint(0, 4, (64,), generator=gen)
    q = balance_groups(p, groups, concepts)
    onehot = torch.nn.functional.one_hot(concepts, 4).float()
    assert torch.allclose(q @ onehot, p @ onehot, atol=1e-6)


def test_trainer_step_reduces_loss_on_toy_features() -> None:
    torch.manual_seed(0)
    n, d = 64, 16
    fv, ft = torch.randn(n, d), torch.randn(n, d)
    ftc = ft + 0.3 * torch.randn(n, d)
    ftc[: n // 2] = ft[: n // 2]  # captions without group words: balanced targets apply
    groups, concepts = torch.randint(0, 2, (n,)), torch.randint(0, 4, (n,))
    trainer = JointTrainer(JointHeads(d, 32), lr=5e-3)
    first = trainer.step(fv, ft, ftc, groups, concepts, 20.0)
    for _ in range(30):
        last = trainer.step(fv, ft, ftc, groups, concepts, 20.0)
    assert last["loss"] < first["loss"] and {"l_cd", "l_ba", "loss"} <= set(last)
    assert trainer.queue_t is not None and trainer.queue_t.shape[0] <= trainer.loss.queue_size


@pytest.fixture(scope="module")
def demo(synthetic_dir: Path, trained_run: Path) -> dict:
    """The session's trained demo model and its frozen train features (shared by the variants)."""
    out = trained_run
    bundle = load_model(str(out))
    spec = _spec()
    pairs = encode_pairs(
        bundle.model, bundle.tokenizer, bundle.preprocess_val, synthetic_dir / "train",
        ATTRIBUTES, CONCEPTS,
    )  # fmt: skip
    return {"run": out, "bundle": bundle, "spec": spec, "pairs": pairs}


@pytest.mark.slow  # 40 s of fitting; an outcome on the demo model (issue 23 rewrites it)
def test_joint_heads_lower_skew_keep_accuracy(demo: dict, synthetic_dir: Path) -> None:
    bundle, spec = demo["bundle"], demo["spec"]
    splits = resolve_splits(str(synthetic_dir / "eval"))
    base = headline(
        evaluate_model(
            bundle.model, bundle.tokenizer, bundle.preprocess_val, spec, splits,
            num_workers=0, progress=False,
        ),
        spec,
    )  # fmt: skip
    results = {}
    evaluate = functools.partial(
        evaluate_model, tokenizer=bundle.tokenizer, preprocess=bundle.preprocess_val, spec=spec,
        splits=splits, num_workers=0, progress=False,
    )  # fmt: skip
    for variant in ("joint", "image", "text"):
        heads, history = fit_joint_heads(
            bundle.model, bundle.tokenizer, bundle.preprocess_val, synthetic_dir / "train",
            ATTRIBUTES, CONCEPTS, spec=spec, evaluate=evaluate, variant=variant, epochs=6, lr=5e-3,
            pairs=demo["pairs"],
        )  # fmt: skip
        assert len(history) == 6
        best = max(h[SELECT_KEY] for h in history)
        from fairclip.debias.joint import _CachedEncoder

        final = evaluate_heads(_CachedEncoder(bundle.model), heads, evaluate, spec)
        assert final[SELECT_KEY] == pytest.approx(best, abs=1e-6)  # best epoch restored
        results[variant] = final
    print(json.dumps({"base": base, **results}, indent=1))
    joint = results["joint"]
    # Quantile-balanced targets (balance_groups) no longer invert the stereotype (equal group
    # *mass* did: every rare image became a top target), and the effect is small: the heads
    # must not raise the skew of the top of the ranking, nor cost accuracy or recall.
    assert joint["maxskew@10"] <= base["maxskew@10"] + 1e-6
    assert joint["acc"] > base["acc"] - 0.03
    for key in ("retrieval/i2t_R@5", "retrieval/t2i_R@5"):
        assert joint[key] > base[key] - 0.03
    assert joint["able@10"] > base["able@10"]


def test_debiased_clip_with_joint_heads_saves_and_loads(
    demo: dict, synthetic_dir: Path, tmp_path: Path
) -> None:
    bundle = demo["bundle"]
    context = {
        "train_shards": str(synthetic_dir / "train"),
        "attributes": ATTRIBUTES,
        "concepts": CONCEPTS,
    }
    model = build_joint(bundle, context, epochs=2, max_samples=500)
    assert isinstance(model, DebiasedCLIP) and len(model.text) == len(model.image) == 1
    # the loss knobs reach the trainer: alpha=1 (L_cd only) fits other heads
    cd_only = build_joint(bundle, context, epochs=2, max_samples=500, alpha=1.0)
    assert not torch.allclose(cd_only.text[0].mlp2[2].weight, model.text[0].mlp2[2].weight)
    images = torch.randn(4, 3, 32, 32)
    tokens = bundle.tokenizer(["a photo of a nurse.", "a man at work."])
    model.save(tmp_path / "joint")
    loaded = DebiasedCLIP.load(tmp_path / "joint")
    with torch.no_grad():
        assert torch.allclose(
            model.encode_image(images, normalize=True), loaded.encode_image(images, normalize=True)
        )
        assert torch.allclose(
            model.encode_text(tokens, normalize=True), loaded.encode_text(tokens, normalize=True)
        )
        base = bundle.model.encode_text(tokens, normalize=True)
    assert not torch.allclose(base, model.encode_text(tokens, normalize=True), atol=1e-4)


class _Module(SimpleNamespace):
    def log(self, *args: object, **kwargs: object) -> None:
        pass

    def log_dict(self, *args: object, **kwargs: object) -> None:
        pass


def test_callback_config_and_both_modes(demo: dict, synthetic_dir: Path, tmp_path: Path) -> None:
    cfg = compose_train(
        small_run_overrides(synthetic_dir, "callbacks=joint", "callbacks.joint.epochs=1",
                            "callbacks.joint.max_samples=300"),
        tmp_path,
    )  # fmt: skip
    callback = instantiate(cfg.callbacks.joint)
    assert isinstance(callback, JointHeadsCallback) and callback.mode == "train_end"
    bundle = demo["bundle"]
    module = _Module(
        model=bundle.model, tokenizer=bundle.tokenizer, preprocess_val=bundle.preprocess_val,
        attributes=ATTRIBUTES, concepts=CONCEPTS, model_name=bundle.name,
        device=torch.device("cpu"),
    )  # fmt: skip
    trainer = SimpleNamespace(is_global_zero=True, global_rank=0, world_size=1, current_epoch=0)
    callback.setup(trainer, module, "fit")
    callback.on_fit_end(trainer, module)
    assert (tmp_path / "joint_heads" / "debias.json").is_file()
    assert len(json.loads((tmp_path / "joint_heads" / "history.json").read_text())) == 1

    during = JointHeadsCallback(
        cfg.callbacks.joint.prompts, str(synthetic_dir / "eval"), tmp_path / "during",
        mode="during", variant="image",
    )  # fmt: skip
    during.setup(trainer, module, "fit")
    from fairclip.data.batches import iter_batches

    for i, batch in enumerate(
        iter_batches(synthetic_dir / "train", bundle.preprocess_val, bundle.tokenizer, ATTRIBUTES,
                     CONCEPTS, batch_size=64, max_samples=256)
    ):  # fmt: skip
        during.on_train_batch_end(trainer, module, None, batch, i)
    during.on_train_epoch_end(trainer, module)
    during.on_fit_end(trainer, module)
    loaded = DebiasedCLIP.load(tmp_path / "during")
    assert len(loaded.image) == 1 and len(loaded.text) == 0


def test_during_reuses_the_training_steps_embeddings(
    demo: dict, synthetic_dir: Path, tmp_path: Path
) -> None:
    """mode=during takes the image and caption embeddings the training step returned and runs
    only the counterfactual captions through the text tower; the heads it fits are those of
    encoding the batch again (a module that returns no embeddings)."""
    from fairclip.data.batches import iter_batches

    prompts = compose_train(small_run_overrides(synthetic_dir, "callbacks=joint"), tmp_path)
    prompts = prompts.callbacks.joint.prompts
    bundle = demo["bundle"]
    model = bundle.model
    calls = {"image": 0, "text": 0}
    encode_image, encode_text = model.encode_image, model.encode_text

    def counted(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    module = _Module(
        model=model, tokenizer=bundle.tokenizer, preprocess_val=bundle.preprocess_val,
        attributes=ATTRIBUTES, concepts=CONCEPTS, model_name=bundle.name,
        device=torch.device("cpu"),
    )  # fmt: skip
    trainer = SimpleNamespace(is_global_zero=True, global_rank=0, world_size=1, current_epoch=0)
    batches = list(
        iter_batches(synthetic_dir / "train", bundle.preprocess_val, bundle.tokenizer, ATTRIBUTES,
                     CONCEPTS, batch_size=64, max_samples=192)
    )  # fmt: skip
    with torch.no_grad():
        outputs = [
            {"embeddings": {"image": encode_image(b["image"], normalize=True),
                            "text": encode_text(b["text"], normalize=True)}}
            for b in batches
        ]  # fmt: skip
    heads = []
    for given in (outputs, [None] * len(batches)):
        callback = JointHeadsCallback(
            prompts, str(synthetic_dir / "eval"), tmp_path, mode="during",
        )  # fmt: skip
        callback.setup(trainer, module, "fit")
        torch.manual_seed(0)
        calls.update(image=0, text=0)
        model.encode_image, model.encode_text = (
            counted("image", encode_image), counted("text", encode_text),
        )  # fmt: skip
        try:
            for i, (batch, out) in enumerate(zip(batches, given, strict=True)):
                callback.on_train_batch_end(trainer, module, out, batch, i)
        finally:
            del model.encode_image, model.encode_text
        heads.append(callback.trainer_.heads.state_dict())
        if given is outputs:
            assert calls == {"image": 0, "text": len(batches)}  # counterfactuals only
        else:
            assert calls == {"image": len(batches), "text": 2 * len(batches)}
    assert heads[0]["text.mlp2.2.weight"].abs().sum() > 0  # stepped
    for name, weight in heads[0].items():
        torch.testing.assert_close(weight, heads[1][name], rtol=1e-4, atol=1e-5)


def test_joint_during_a_real_fit(synthetic_dir: Path, tmp_path: Path) -> None:
    """`fairclip-train callbacks=joint callbacks.joint.mode=during`: the heads are stepped on
    every training batch of a real Lightning fit, logged, scored per epoch and saved."""
    from fairclip.training import train

    overrides = small_run_overrides(
        synthetic_dir,
        "callbacks=joint",
        "callbacks.joint.mode=during",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=6",
        "trainer.limit_val_batches=1",
    )
    train(compose_train(overrides, tmp_path))
    history = json.loads((tmp_path / "joint_heads" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0.0, 1.0]
    assert all(0.0 <= h["acc"] <= 1.0 and math.isfinite(h["able@10"]) for h in history)
    rows = list(csv.DictReader(next(tmp_path.glob("csv/**/metrics.csv")).open()))
    losses = [float(r["joint/loss"]) for r in rows if r.get("joint/loss")]
    assert losses and all(math.isfinite(v) and v >= 0 for v in losses)
    loaded = DebiasedCLIP.load(tmp_path / "joint_heads")
    assert len(loaded.text) == len(loaded.image) == 1
    # stepped: the zero-initialised last layer of the shared MLP2 moved
    assert loaded.text[0].mlp2[2].weight.abs().sum() > 0


@pytest.mark.slow  # minutes on 2 cores: CI runs it with the slow tests
def test_joint_during_two_process_ddp_keeps_one_set_of_heads(
    synthetic_dir: Path, tmp_path: Path
) -> None:
    """Real 2-process DDP (gloo): every rank steps the heads on its own shard with gradients
    averaged over ranks, so the ranks hold identical heads and the epoch's ABLE (evaluated
    over both ranks' eval shards) scores the heads that are saved. Without the averaging the
    copies drift apart (rank_spread > 0)."""
    out = tmp_path / "ddp_joint"
    run_train_process(
        synthetic_dir, out, tmp_path,
        "trainer=ddp_cpu", "callbacks=joint", "callbacks.joint.mode=during",
        "trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=1",
    )  # fmt: skip
    history = json.loads((out / "joint_heads" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0.0]
    assert history[0]["rank_spread"] < 1e-6
    loaded = DebiasedCLIP.load(out / "joint_heads")
    assert loaded.text[0].mlp2[2].weight.abs().sum() > 0  # stepped, not the identity
