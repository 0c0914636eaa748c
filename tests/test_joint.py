"""Joint V-L debiasing heads: the paper's heads and losses against direct implementations of
their definitions on fixed tensors, selection, builders and the callback end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from fairclip.callbacks.joint import JointHeadsCallback
from fairclip.data.attribute_captions import AttributeCaptions, CaptionCodes
from fairclip.data.batches import iter_batches
from fairclip.debias.debiased_clip import DebiasedCLIP
from fairclip.debias.joint import (
    DEPTHS_KEY,
    EarlyStopping,
    JointFitConfig,
    Selection,
    build_joint,
    fit_joint_heads,
    headline,
    selection_score,
)
from fairclip.debias.joint_heads import JointHeads
from fairclip.debias.joint_loss import (
    JointLossConfig,
    JointTrainer,
    balance_groups,
    distillation_targets,
)
from fairclip.debias.joint_pairs import PairFeatures, TokenSwapper, encode_pairs
from fairclip.debias.registry import COMPONENTS, component_class
from fairclip.loading import load_model
from fairclip.model.factory import create_model
from tests.conftest import compose_train, run_train_process, small_run_overrides

ATTRIBUTES = {"gender": ["female", "male"], "age": ["young", "middle-aged", "old"]}
CONCEPTS = ["doctor", "nurse", "engineer", "teacher", "pilot", "dancer", "chef", "baker"]
FAST = ("callbacks.joint.skew_ks=[10]", "callbacks.joint.loss.queue_size=256")


# -- heads ---------------------------------------------------------------------------------------
def test_paper_heads_are_the_published_formulas_on_raw_features() -> None:
    """t̃ = f + MLP2(f), ṽ = f + MLP2(MLP1(f) + f), MLP = Linear→ReLU→Linear→ReLU with
    hidden 512 (MLP1) and 1024 (MLP2), MLP2 shared; no normalisation of the input."""
    torch.manual_seed(0)
    heads = JointHeads(16)
    assert heads.image.mlp2 is heads.text.mlp2
    assert heads.image.mlp1[0].out_features == 512 and heads.text.mlp2[0].out_features == 1024

    def mlp(m: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        h = torch.clamp_min(x @ m[0].weight.T + m[0].bias, 0)
        return torch.clamp_min(h @ m[2].weight.T + m[2].bias, 0)

    f = 7.0 * torch.randn(5, 16)  # raw CLIP features are not unit
    with torch.no_grad():
        torch.testing.assert_close(heads.text(f), f + mlp(heads.text.mlp2, f))
        expected = f + mlp(heads.image.mlp2, mlp(heads.image.mlp1, f) + f)
        torch.testing.assert_close(heads.image(f), expected)
        assert not torch.allclose(heads.text(f), f)  # not the identity at initialisation
    # the extension: identity at init on unit features
    zero = JointHeads(16, 32, form="zero_init")
    unit = F.normalize(f, dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(zero.encode_image(f), unit)
        torch.testing.assert_close(zero.encode_text(f), unit)
    assert {"joint_text", "joint_image"} <= set(COMPONENTS)
    assert all(component_class(kind).kind == kind for kind in COMPONENTS)
    with pytest.raises(ValueError, match="variant"):
        JointHeads(16, 32, "both")
    with pytest.raises(ValueError, match="form='identity'"):
        JointHeads(16, form="identity")


# -- losses against their definitions ------------------------------------------------------------
def _softmax_row(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    return [e / sum(exps) for e in exps]


def test_distillation_targets_equal_the_papers_definition() -> None:
    """i2t_ij = exp(o_v,i · T_j / τ) / Σ_j', T = [o_t; Q_t]; t2i with o_t (factual) against
    [o_v; Q_v]; from the warm-up epoch on 0.4 · momentum + 0.6 · original — element by element."""
    gen = torch.Generator().manual_seed(3)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=gen, dtype=torch.float64), dim=-1)  # noqa: E731
    ov, ot, qv, qt, mv, mt = unit(3, 5), unit(3, 5), unit(4, 5), unit(4, 5), unit(3, 5), unit(3, 5)
    tau = 0.07
    texts, images = torch.cat([ot, qt]).tolist(), torch.cat([ov, qv]).tolist()

    def direct(queries: torch.Tensor, keys: list[list[float]]) -> torch.Tensor:
        rows = []
        for q in queries.tolist():
            rows.append(
                _softmax_row([sum(a * b for a, b in zip(q, k, strict=True)) / tau for k in keys])
            )
        return torch.tensor(rows, dtype=torch.float64)

    i2t, t2i = distillation_targets(ov, ot, qv, qt, tau)
    torch.testing.assert_close(i2t, direct(ov, texts), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(t2i, direct(ot, images), rtol=1e-9, atol=1e-12)
    i2t_m, t2i_m = distillation_targets(ov, ot, qv, qt, tau, momentum=(mv, mt), distill=0.4)
    torch.testing.assert_close(i2t_m, 0.4 * direct(mv, texts) + 0.6 * direct(ov, texts))
    torch.testing.assert_close(t2i_m, 0.4 * direct(mt, images) + 0.6 * direct(ot, images))


def test_joint_loss_equals_a_direct_computation_of_the_paper() -> None:
    """L = 0.3 L_cd + 0.7 L_ba on a fixed batch with a fixed queue, for the factual and the
    counterfactual coin, before and after the warm-up epoch (momentum heads != heads)."""
    torch.manual_seed(1)
    d, b = 8, 4
    trainer = JointTrainer(JointHeads(d, 16, hidden_image=12), loss=JointLossConfig(queue_size=6))
    with torch.no_grad():  # a momentum model that differs from the heads
        for p in trainer.ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fv, ft, ftc = 3 * torch.randn(b, d), 3 * torch.randn(b, d), 3 * torch.randn(b, d)
    trainer.queue.push(
        F.normalize(torch.randn(6, d), dim=-1), F.normalize(torch.randn(6, d), dim=-1)
    )
    qv, qt = trainer.queue.features(fv)
    tau, heads, ema = 0.07, trainer.heads, trainer.ema

    def ce(target: torch.Tensor, logits: torch.Tensor) -> float:
        return float(-(target * logits.log_softmax(-1)).sum() / target.shape[0])

    for epoch, counterfactual in ((0, False), (0, True), (5, False), (7, True)):
        out = {
            k: float(v.detach())
            for k, v in trainer.losses(fv, ft, ftc, epoch, counterfactual).items()
        }
        with torch.no_grad():
            ov, ot = F.normalize(fv, dim=-1), F.normalize(ft, dim=-1)
            dv = F.normalize(heads.image(fv), dim=-1)
            dt = F.normalize(heads.text(ft), dim=-1)
            dtc = F.normalize(heads.text(ftc), dim=-1)
            T, V = torch.cat([ot, qt]), torch.cat([ov, qv])
            i2t, t2i = (ov @ T.T / tau).softmax(-1), (ot @ V.T / tau).softmax(-1)
            if epoch >= 5:
                mv = F.normalize(ema.image(fv), dim=-1)
                mt = F.normalize(ema.text(ft), dim=-1)
                i2t = 0.4 * (mv @ T.T / tau).softmax(-1) + 0.6 * i2t
                t2i = 0.4 * (mt @ V.T / tau).softmax(-1) + 0.6 * t2i
            text = dtc if counterfactual else dt
            l_cd = 0.5 * (ce(i2t, dv @ T.T / tau) + ce(t2i, text @ V.T / tau))
            p_t = ((ot - dt) @ T.T / tau).softmax(-1)
            p_v = ((ov - dv) @ V.T / tau).softmax(-1)
            l_ba = float((p_t * (p_t.log() - p_v.log())).sum() / b)
        assert out["l_cd"] == pytest.approx(l_cd, rel=1e-5)
        assert out["l_ba"] == pytest.approx(l_ba, rel=1e-4, abs=1e-7)
        assert out["loss"] == pytest.approx(0.3 * l_cd + 0.7 * l_ba, rel=1e-5)


def test_queue_is_a_fifo_ring_of_original_unit_features() -> None:
    trainer = JointTrainer(JointHeads(4, 8, hidden_image=8), loss=JointLossConfig(queue_size=5))
    qv, _ = trainer.queue.features(torch.zeros(1, 4))
    assert qv.shape == (5, 4) and torch.allclose(qv.norm(dim=-1), torch.ones(5))  # unit noise
    for step in range(3):  # pushes 1..6, told apart by their first coordinate
        fv = torch.tensor([[2.0 * step + 1, 1, 0, 0], [2.0 * step + 2, 1, 0, 0]])
        trainer.step(fv, -fv, -fv)
    qv, qt = trainer.queue.features(fv)
    # 6 pushed into 5 slots: push 6 overwrote push 1, the oldest
    torch.testing.assert_close(qv[:, 0] / qv[:, 1], torch.tensor([6.0, 2, 3, 4, 5]))
    torch.testing.assert_close(qv.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(qt, -qv)
    empty = JointTrainer(
        JointHeads(4, 8, hidden_image=8), loss=JointLossConfig(queue_size=5, queue_init="empty")
    )
    assert empty.queue.features(torch.zeros(1, 4))[0].shape == (0, 4)


def _fairface_group_batch(n: int = 64) -> tuple[torch.Tensor, CaptionCodes]:
    """FairFace-style label rows in which every caption names a gender, race and age."""
    attributes = {
        "gender": ["female", "male"],
        "race": ["white", "black", "east_asian"],
        "age": ["young", "old"],
    }
    captions = AttributeCaptions.from_config(
        {"template": "a photo of a {age} {race} {gender}.",
         "words": {"gender": {"female": "woman", "male": "man"},
                   "race": {"white": "White", "black": "Black", "east_asian": "East Asian"},
                   "age": {"young": "young", "old": "old"}},
         "swap": ["gender", "race"]},
        attributes,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    groups = torch.stack(
        [torch.randint(0, len(v), (n,), generator=gen) for v in attributes.values()], 1
    )
    return groups, CaptionCodes(captions, attributes)


def test_gradient_at_initialisation_on_a_batch_where_every_caption_names_a_group() -> None:
    """The defect the paper's form fixes: with every caption naming a group, the heads get a
    non-zero gradient on both MLPs at initialisation, and a few steps move them."""
    tiny = create_model("fairclip-tiny")
    model, tokenizer = tiny.model.eval(), tiny.tokenizer
    groups, codes = _fairface_group_batch()
    with torch.no_grad():
        bank = model.encode_text(tokenizer(codes.texts)).float()
        fv = model.encode_image(torch.randn(groups.shape[0], 3, 32, 32)).float()
    phrases = codes.phrase_codes(groups)
    gen = torch.Generator().manual_seed(1)
    ft = bank[codes.index(phrases)]
    ftc = bank[codes.index(codes.counterfactual(phrases, gen))]
    assert not torch.allclose(ft, ftc)
    torch.manual_seed(0)
    trainer = JointTrainer(JointHeads(fv.shape[1]), lr=1e-3, loss=JointLossConfig(queue_size=128))
    for counterfactual in (False, True):
        trainer.opt.zero_grad()
        trainer.losses(fv, ft, ftc, 0, counterfactual)["loss"].backward()
        for name in ("image.mlp1", "text.mlp2"):
            grad = sum(float(p.grad.abs().sum()) for n, p in trainer.heads.named_parameters()
                       if n.startswith(name))  # fmt: skip
            assert grad > 1e-6, (name, counterfactual)
    before = {n: p.detach().clone() for n, p in trainer.heads.named_parameters()}
    for _ in range(3):
        trainer.step(fv, ft, ftc)
    moved = [n for n, p in trainer.heads.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("image.mlp1") for n in moved)
    assert any(n.startswith("text.mlp2") for n in moved)


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
    # quantile matching: pooled values 0.06 0.10 0.20 0.30 become 0.30 0.20 0.06 | 0.20, then
    # scaled so the concept keeps its mass 0.66
    expected = torch.tensor([0.30, 0.20, 0.06, 0.20]) * 0.66 / 0.76
    assert torch.allclose(q[0, :4], expected, atol=1e-6)
    assert q[0, 3] == q[0, 1]  # equal quantile, equal target, whatever the group
    assert torch.allclose(q[:, 4:], p[:, 4:])  # a concept with one group, unlabelled: kept
    assert torch.allclose(q[1], p[1])  # groups already alike: unchanged


def test_trainer_steps_reduce_each_targets_loss_on_fixed_features() -> None:
    torch.manual_seed(0)
    n, d = 64, 16
    fv, ft = torch.randn(n, d), torch.randn(n, d)
    ftc = ft + 0.3 * torch.randn(n, d)
    ftc[: n // 2] = ft[: n // 2]  # captions without group words: balanced targets apply
    groups, concepts = torch.randint(0, 2, (n,)), torch.randint(0, 4, (n,))
    for target, form in (("paper", "paper"), ("balance_groups", "zero_init")):
        loss = JointLossConfig(queue_size=128, target=target, counterfactual_p=0.0)
        trainer = JointTrainer(JointHeads(d, 32, form=form), lr=5e-3, loss=loss)
        first = trainer.step(fv, ft, ftc, 0, groups, concepts, 20.0)
        for _ in range(30):
            last = trainer.step(fv, ft, ftc, 0, groups, concepts, 20.0)
        assert last["loss"] < first["loss"] and {"l_cd", "l_ba", "loss"} <= set(last), target
    with pytest.raises(ValueError, match="target='mean'"):
        JointLossConfig(target="mean")


# -- selection -----------------------------------------------------------------------------------
def test_selection_scores_as_the_paper_or_averaged_over_depths() -> None:
    spec = SimpleNamespace(skew_ks=[1000, 10], able_query_set="concepts")
    able = {"able@1000/gender/eq_opp": 0.9, "able@10/gender/eq_opp": 0.6}
    skew = {"concepts": {"maxskew@1000/gender/eq_opp": 0.2}}
    report = {"metrics": {"able": able, "skew": skew, "zeroshot": {"acc": 0.8}}}
    row = headline(report, spec)
    assert selection_score(row, spec, Selection()) == (0.9, "able@1000")
    assert selection_score(row, spec, Selection(score="able_depths"))[0] == pytest.approx(0.75)
    # no accuracy on the split (FairFace has no concepts): exp(-MaxSkew@1000), said as such
    no_acc = headline({"metrics": {"skew": skew}}, spec)
    score, what = selection_score(no_acc, spec, Selection())
    assert score == pytest.approx(math.exp(-0.2)) and what == "exp(-maxskew@1000)"
    del able["able@10/gender/eq_opp"]
    assert math.isnan(headline(report, spec)[DEPTHS_KEY])  # never a mean over fewer depths
    with pytest.raises(ValueError, match="select.score='best'"):
        Selection(score="best")


def test_fit_evaluates_every_two_epochs_stops_after_patience_and_restores_the_best() -> None:
    """The authors' schedule: evaluate every 2 epochs, keep the best ABLE, stop after
    `patience` evaluations without a better one; scripted scores, real fitting."""
    torch.manual_seed(0)
    n, d = 32, 8
    pairs = PairFeatures(torch.randn(n, d), torch.zeros(n, dtype=torch.long),
                         torch.zeros(n, dtype=torch.long), ft=torch.randn(n, d),
                         ftc=torch.randn(n, d))  # fmt: skip
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.69, 0.9])  # best at the 2nd evaluation (epoch 3)
    seen: list[torch.Tensor] = []

    def evaluate(model: Any) -> dict:
        seen.append(model.heads.text.mlp2[0].weight.detach().clone())
        return {"metrics": {"able": {"able@10/gender/eq_opp": next(scores)},
                            "zeroshot": {"acc": 0.5}}}  # fmt: skip

    model = SimpleNamespace(logit_scale=torch.tensor(math.log(20.0)))
    fit = JointFitConfig(hidden=16, hidden_image=16, epochs=40, batch_size=8, lr=1e-2,
                         select=Selection(every=2, patience=3),
                         loss=JointLossConfig(queue_size=16))  # fmt: skip
    spec = SimpleNamespace(skew_ks=[10], able_query_set="concepts")
    heads, history = fit_joint_heads(model, pairs, fit, spec, evaluate)  # type: ignore[arg-type]
    evaluated = [h["epoch"] for h in history if "score" in h]
    assert evaluated == [1.0, 3.0, 5.0, 7.0, 9.0]  # 3 evaluations after the best: stop
    assert len(history) == 10
    torch.testing.assert_close(heads.text.mlp2[0].weight, seen[1])
    stopping = EarlyStopping(Selection(patience=2))
    stops = [stopping.update(v, "able@10", lambda v=v: v) for v in (0.1, math.nan, 0.05)]
    assert stops == [False, False, True]
    assert stopping.best_state == 0.1


# -- builders and the callback -------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(trained_run: Path) -> dict:
    return {"run": trained_run, "bundle": load_model(str(trained_run))}


def test_debiased_clip_with_joint_heads_saves_and_loads(
    demo: dict, synthetic_dir: Path, tmp_path: Path
) -> None:
    bundle = demo["bundle"]
    context = {"train_shards": str(synthetic_dir / "train"), "attributes": ATTRIBUTES,
               "concepts": CONCEPTS}  # fmt: skip
    fast = {"epochs": 2, "max_samples": 300, "batch_size": 64, "lr": 1e-3}
    model = build_joint(bundle, context, **fast, loss={"queue_size": 256})
    assert isinstance(model, DebiasedCLIP) and len(model.text) == len(model.image) == 1
    # the loss knobs reach the trainer: alpha=1 (L_cd only) fits other heads
    cd_only = build_joint(bundle, context, **fast, loss={"queue_size": 256, "alpha": 1.0})
    assert not torch.allclose(cd_only.text[0].mlp2[2].weight, model.text[0].mlp2[2].weight)
    with pytest.raises(ValueError, match=r"methods.joint.build.loss: .*queue_len"):
        build_joint(bundle, context, **fast, loss={"queue_len": 3})
    images = torch.randn(4, 3, 32, 32)
    tokens = bundle.tokenizer(["a photo of a nurse.", "a man at work."])
    model.save(tmp_path / "joint")
    loaded = DebiasedCLIP.load(tmp_path / "joint")
    assert loaded.text[0].config["form"] == "paper"
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images, normalize=True),
                                   loaded.encode_image(images, normalize=True))  # fmt: skip
        torch.testing.assert_close(model.encode_text(tokens, normalize=True),
                                   loaded.encode_text(tokens, normalize=True))  # fmt: skip


class _Module(SimpleNamespace):
    def log(self, *args: object, **kwargs: object) -> None:
        pass

    def log_dict(self, *args: object, **kwargs: object) -> None:
        pass


def _module(bundle: Any, **kw: Any) -> _Module:
    return _Module(
        model=bundle.model, tokenizer=bundle.tokenizer, preprocess_val=bundle.preprocess_val,
        attributes=ATTRIBUTES, concepts=CONCEPTS, model_name=bundle.name,
        device=torch.device("cpu"), **kw,
    )  # fmt: skip


def test_callback_config_and_both_modes(demo: dict, synthetic_dir: Path, tmp_path: Path) -> None:
    cfg = compose_train(
        small_run_overrides(synthetic_dir, "callbacks=joint", "callbacks.joint.epochs=2",
                            "callbacks.joint.max_samples=300", *FAST),
        tmp_path,
    )  # fmt: skip
    callback = instantiate(cfg.callbacks.joint)
    assert isinstance(callback, JointHeadsCallback) and callback.mode == "train_end"
    assert callback.fit.lr == 5e-6 and callback.fit.loss.queue_size == 256
    bundle = demo["bundle"]
    module = _module(bundle)
    trainer = SimpleNamespace(is_global_zero=True, global_rank=0, world_size=1, current_epoch=0,
                              max_epochs=1)  # fmt: skip
    callback.setup(trainer, module, "fit")
    callback.on_fit_end(trainer, module)
    assert (tmp_path / "joint_heads" / "debias.json").is_file()
    history = json.loads((tmp_path / "joint_heads" / "history.json").read_text())
    assert [("score" in h) for h in history] == [False, True]  # evaluated every 2 epochs

    during = JointHeadsCallback(
        cfg.callbacks.joint.prompts, str(synthetic_dir / "eval"), tmp_path / "during",
        mode="during", variant="image", skew_ks=[10], loss={"queue_size": 256},
    )  # fmt: skip
    during.setup(trainer, module, "fit")
    for i, batch in enumerate(
        iter_batches(synthetic_dir / "train", bundle.preprocess_val, bundle.tokenizer, ATTRIBUTES,
                     CONCEPTS, batch_size=64, max_samples=256)
    ):  # fmt: skip
        during.on_train_batch_end(trainer, module, None, batch, i)
    during.on_train_epoch_end(trainer, module)  # the last epoch is always scored
    during.on_fit_end(trainer, module)
    loaded = DebiasedCLIP.load(tmp_path / "during")
    assert len(loaded.image) == 1 and len(loaded.text) == 0
    with pytest.raises(ValueError, match=r"callbacks.joint.select: .*'every_n'"):
        JointHeadsCallback({}, "x", tmp_path, mode="during", select={"every_n": 2})


def test_during_reuses_the_training_steps_raw_embeddings(
    demo: dict, synthetic_dir: Path, tmp_path: Path
) -> None:
    """mode=during takes the raw image and caption embeddings the training step returned and
    runs only the counterfactual captions through the text tower; the heads it fits equal
    those of encoding the batch again (a module that returns no embeddings)."""
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

    module = _module(bundle)
    trainer = SimpleNamespace(is_global_zero=True, global_rank=0, world_size=1, current_epoch=0)
    batches = list(
        iter_batches(synthetic_dir / "train", bundle.preprocess_val, bundle.tokenizer, ATTRIBUTES,
                     CONCEPTS, batch_size=64, max_samples=192)
    )  # fmt: skip
    with torch.no_grad():
        outputs = [
            {"raw_embeddings": {"image": encode_image(b["image"]), "text": encode_text(b["text"])}}
            for b in batches
        ]
    heads = []
    for given in (outputs, [None] * len(batches)):
        callback = JointHeadsCallback(prompts, str(synthetic_dir / "eval"), tmp_path,
                                      mode="during", lr=1e-3, loss={"queue_size": 256})  # fmt: skip
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
    for name, weight in heads[0].items():
        torch.testing.assert_close(weight, heads[1][name], rtol=1e-4, atol=1e-5)


def test_joint_during_a_real_fit(synthetic_dir: Path, tmp_path: Path) -> None:
    """`fairclip-train callbacks=joint callbacks.joint.mode=during`: the heads are stepped on
    every training batch of a real Lightning fit, logged, scored and saved."""
    from fairclip.training import train

    overrides = small_run_overrides(
        synthetic_dir, "callbacks=joint", "callbacks.joint.mode=during",
        "callbacks.joint.select.every=1", "callbacks.joint.lr=1e-3", *FAST,
        "trainer.max_epochs=2", "trainer.limit_train_batches=6", "trainer.limit_val_batches=1",
    )  # fmt: skip
    train(compose_train(overrides, tmp_path))
    history = json.loads((tmp_path / "joint_heads" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0.0, 1.0]
    assert all(0.0 <= h["acc"] <= 1.0 and math.isfinite(h["score"]) for h in history)
    rows = list(csv.DictReader(next(tmp_path.glob("csv/**/metrics.csv")).open()))
    losses = [float(r["joint/loss"]) for r in rows if r.get("joint/loss")]
    assert losses and all(math.isfinite(v) for v in losses)
    loaded = DebiasedCLIP.load(tmp_path / "joint_heads")
    assert len(loaded.text) == len(loaded.image) == 1


@pytest.mark.slow  # minutes on 2 cores: CI runs it with the slow tests
def test_joint_during_two_process_ddp_keeps_one_set_of_heads(
    synthetic_dir: Path, tmp_path: Path
) -> None:
    """Real 2-process DDP (gloo): every rank steps the heads on its own shard with gradients
    averaged over ranks, so the ranks hold identical heads and the epoch's score (evaluated
    over both ranks' eval shards) scores the heads that are saved."""
    out = tmp_path / "ddp_joint"
    run_train_process(
        synthetic_dir, out, tmp_path,
        "trainer=ddp_cpu", "callbacks=joint", "callbacks.joint.mode=during", *FAST,
        "trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=1",
    )  # fmt: skip
    history = json.loads((out / "joint_heads" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0.0]
    assert history[0]["rank_spread"] < 1e-6
    assert len(DebiasedCLIP.load(out / "joint_heads").text) == 1


def test_encode_pairs_from_attribute_captions(demo: dict, synthetic_dir: Path) -> None:
    """Attribute captions: every labelled image is a pair, its text looked up in the encoded
    captions of the template (no shard captions read)."""
    bundle = demo["bundle"]
    captions = AttributeCaptions.from_config(
        {"template": "a photo of a {age} {gender}.",
         "words": {"gender": {"female": "woman", "male": "man"},
                   "age": {"young": "young", "middle-aged": "middle-aged", "old": "old"}}},
        ATTRIBUTES,
    )  # fmt: skip
    pairs = encode_pairs(bundle.model, bundle.tokenizer, bundle.preprocess_val,
                         synthetic_dir / "train", ATTRIBUTES, CONCEPTS, max_samples=200,
                         captions=captions)  # fmt: skip
    assert pairs.bank is not None and pairs.bank.shape[0] == 6 == len(pairs.codes.texts)
    idx = torch.arange(len(pairs))
    _, ft, ftc, _, _ = pairs.batch(idx, torch.Generator().manual_seed(0))
    with torch.no_grad():
        first = bundle.model.encode_text(bundle.tokenizer([pairs.codes.texts[
            int(pairs.codes.index(pairs.phrases[:1]))]])).float()  # fmt: skip
    torch.testing.assert_close(ft[:1], first, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ft, ftc)


# -- the paper's data: label-only FairFace shards ------------------------------------------------
FAIRFACE_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "fairface_label_val.csv"


@pytest.fixture(scope="module")
def fairface_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FairFace-format shards (no captions) from the real validation labels: 240 train and 96
    val rows, each with a generated face-sized image."""
    import numpy as np
    from PIL import Image

    from fairclip.cli.data import main as data_main
    from tests.conftest import run_app

    if not FAIRFACE_CSV.is_file():
        pytest.skip(f"{FAIRFACE_CSV} not available")
    root = tmp_path_factory.mktemp("fairface_joint")
    lines = FAIRFACE_CSV.read_text().splitlines()
    rng = np.random.default_rng(0)
    (root / "images" / "val").mkdir(parents=True)
    for split, rows in (("train", lines[1:241]), ("val", lines[241:337])):
        (root / f"{split}.csv").write_text("\n".join([lines[0], *rows]) + "\n")
        for row in rows:
            pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / row.split(",")[0], format="JPEG")
        run_app(data_main, ["source=fairface", f"labels={root / f'{split}.csv'}",
                            f"images={root / 'images'}", f"out={root / 'shards'}",
                            f"split={split}"])  # fmt: skip
    return root / "shards"


@pytest.mark.parametrize("mode", ["train_end", "during"])
def test_fairclip_train_fits_joint_heads_on_label_only_fairface_shards(
    fairface_shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    """`fairclip-train data=fairface callbacks=joint callbacks.joint.swap=[race,gender]`: CLIP
    fine-tunes on captions written from the labels, and the heads are fitted on attribute
    captions with race and gender counterfactuals (after training on the frozen model, or
    stepped on every batch), selected on val/ (no concepts there: by exp(-MaxSkew), which the
    log says)."""
    from fairclip.training import train

    overrides = [
        "experiment=demo", "data=fairface", f"data.train_shards={fairface_shards}/train",
        f"data.val_shards={fairface_shards}/val", "data.num_workers=0", "data.batch_size=48",
        "trainer.enable_progress_bar=false", "logger=csv", "trainer.log_every_n_steps=1",
        f"trainer.max_epochs={1 if mode == 'train_end' else 2}", "callbacks=joint",
        f"callbacks.joint.mode={mode}", "prompts@callbacks.joint.prompts=fairface",
        "callbacks.joint.swap=[race,gender]", "callbacks.joint.epochs=4",
        "callbacks.joint.lr=1e-3", "callbacks.joint.batch_size=64", *FAST,
    ]  # fmt: skip
    cfg = compose_train(overrides, tmp_path)
    assert cfg.callbacks.joint.captions.template == "This is the photo of a {age} {race} {gender}."
    with caplog.at_level("WARNING"):
        train(cfg)
    assert "selected by exp(-maxskew@10) alone" in caplog.text
    rows = list(csv.DictReader(next(tmp_path.glob("csv/**/metrics.csv")).open()))
    assert [r for r in rows if r.get("train/loss")]  # CLIP trained on the written captions
    history = json.loads((tmp_path / "joint_heads" / "history.json").read_text())
    loaded = DebiasedCLIP.load(tmp_path / "joint_heads")
    if mode == "during":  # scored at the last epoch (every 2 epochs), stepped on every batch
        assert [h["epoch"] for h in history] == [1.0] and 0 < history[0]["score"] <= 1
        losses = [float(r["joint/loss"]) for r in rows if r.get("joint/loss")]
        steps = [r for r in rows if r.get("train/loss")]
        assert len(losses) == len(steps) and all(math.isfinite(v) for v in losses)  # every step
        return
    assert [h["epoch"] for h in history] == [0.0, 1.0, 2.0, 3.0]
    assert all(h["pairs"] == 240 for h in history)  # every labelled training image
    scored = [h for h in history if "score" in h]
    assert len(scored) == 2 and all(0 < h["score"] <= 1 for h in scored)
    torch.manual_seed(0)  # the heads' initialisation in fit_joint_heads (seed 0)
    init = JointHeads(loaded.text[0].config["dim"])
    assert not torch.allclose(loaded.text[0].mlp2[0].weight, init.text.mlp2[0].weight)
