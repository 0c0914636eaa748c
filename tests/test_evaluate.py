"""fairclip-eval: metric values, the planted bias of a trained run, the callback, errors, DDP."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds
from PIL import Image

from fairclip.callbacks.bias_eval import BiasEvalCallback
from fairclip.data.shards import list_shards, write_shards
from fairclip.data.synthetic import CONCEPTS, SyntheticConfig, generate_samples
from fairclip.debias.debiased_clip import DebiasedCLIP
from fairclip.debias.orth import OrthProj
from fairclip.eval.encoding import ImageCache
from fairclip.eval.run import evaluate_config as run
from fairclip.eval.run import evaluate_model
from fairclip.eval.spec import EvalSpec, resolve_splits
from fairclip.model.encode import encode_prompts
from fairclip.model.factory import create_model
from fairclip.report import flatten_metrics, load_report
from tests.conftest import compose_eval

ATTRS = {"gender": ["female", "male"], "age": ["young", "middle-aged", "old"]}
PROMPTS = {
    "zero_shot_templates": ["a photo of a {}.", "a {} at work."],
    "group_prompts": {"gender": {"female": ["a photo of a woman.", "a woman."],
                                 "male": ["a photo of a man.", "a man."]}},
    "able_query_set": "concepts",
    "query_sets": {
        "concepts": {"split": "eval", "templates": ["a photo of a {}."], "words": list(CONCEPTS)},
        "people": {"split": "neutral", "prompts": ["a photo of a person.", "a person."],
                   "attributes": ["gender"]},
    },
}  # fmt: skip
KS = (5, 40)
BATCH = 37  # batches that do not divide the shards


def eval_overrides(data: Path, *extra: str) -> list[str]:
    return [
        f"data.val_shards={data}/eval",
        "progress=false",
        "num_workers=0",
        "wandb.enabled=false",
        *extra,
    ]


class EncodeOnly:
    """A model seen only through encode_image/encode_text, as a debiasing wrapper would be."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model

    def encode_image(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self._model.encode_image(x, normalize=normalize)

    def encode_text(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self._model.encode_text(x, normalize=normalize)


# -- direct (numpy) reference computations ------------------------------------------------------
def read_split(folder: Path) -> list[dict]:
    urls = [s.url for s in list_shards(folder)]
    return list(wds.WebDataset(urls, shardshuffle=False))


@torch.no_grad()
def embed_split(bundle, samples: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Image and caption embeddings in the evaluator's batches (same float rounding)."""
    imgs, txts = [], []
    for i in range(0, len(samples), BATCH):
        part = samples[i : i + BATCH]
        x = torch.stack(
            [bundle.preprocess_val(Image.open(io.BytesIO(s["png"])).convert("RGB")) for s in part]
        )
        imgs.append(bundle.model.encode_image(x, normalize=True))
        tokens = bundle.tokenizer([s["txt"].decode() for s in part])
        txts.append(bundle.model.encode_text(tokens, normalize=True))
    return torch.cat(imgs).numpy().astype(np.float64), torch.cat(txts).numpy().astype(np.float64)


@torch.no_grad()
def text_classes(bundle, prompt_lists: list[list[str]]) -> np.ndarray:
    out = []
    for prompts in prompt_lists:
        e = bundle.model.encode_text(bundle.tokenizer(prompts), normalize=True).mean(0)
        out.append((e / e.norm()).numpy())
    return np.stack(out).astype(np.float64)


def skew_ref(scores: np.ndarray, groups: np.ndarray, k: int, target: str) -> tuple:
    """Mean MaxSkew@k, MinSkew@k, NDKL@k over the query columns (Berg et al. conventions)."""
    m = int(groups.max()) + 1
    prior = np.bincount(groups, minlength=m) / len(groups)
    p_star = np.full(m, 1 / m) if target == "eq_opp" else prior
    mx, mn, nd = [], [], []
    for q in range(scores.shape[1]):
        order = np.argsort(-scores[:, q], kind="stable")
        top = groups[order[:k]]
        share = np.bincount(top, minlength=m) / k
        share = np.where(share > 0, share, 1 / k)
        s = np.log(share / p_star)
        mx.append(max(0.0, s.max()))
        mn.append(s.min())
        kl = []
        for i in range(1, k + 1):
            d = np.bincount(groups[order[:i]], minlength=m) / i
            kl.append(sum(di * np.log(di / pi) for di, pi in zip(d, p_star, strict=True) if di > 0))
        w = 1 / np.log2(np.arange(2, k + 2))
        nd.append(float((np.array(kl) * w).sum() / w.sum()))
    return float(np.mean(mx)), float(np.mean(mn)), float(np.mean(nd))


def cramers_v_ref(a: np.ndarray, b: np.ndarray) -> float:
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)
    table = table[table.sum(1) > 0][:, table.sum(0) > 0]
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    chi2 = ((table - expected) ** 2 / expected).sum()
    return float(np.sqrt(chi2 / (table.sum() * (min(table.shape) - 1))))


def test_report_values_equal_direct_computation(synthetic_dir: Path) -> None:
    torch.manual_seed(1)  # a random tiny CLIP whose predictions are not all one class
    bundle = create_model("fairclip-tiny")
    bundle.model.eval()
    spec = EvalSpec.from_config(PROMPTS, ATTRS, CONCEPTS, skew_ks=KS, recall_ks=(1, 10))
    report = evaluate_model(
        EncodeOnly(bundle.model),
        bundle.tokenizer,
        bundle.preprocess_val,
        spec,
        resolve_splits(str(synthetic_dir / "eval")),
        batch_size=BATCH,
        num_workers=0,
        progress=False,
    )
    m = report["metrics"]
    assert report["splits"]["neutral"]["shards"] == str(synthetic_dir / "neutral")

    # eval split: zero-shot accuracy per group, concept-query skew, recall, ABLE
    ev = read_split(synthetic_dir / "eval")
    meta = [json.loads(s["json"]) for s in ev]
    img, txt = embed_split(bundle, ev)
    gender = np.array([ATTRS["gender"].index(x["gender"]) for x in meta])
    concept = np.array([CONCEPTS.index(x["concept"]) for x in meta])
    zs = text_classes(
        bundle, [[t.format(c) for t in PROMPTS["zero_shot_templates"]] for c in CONCEPTS]
    )
    hit = (img @ zs.T).argmax(1) == concept
    assert m["zeroshot"]["acc"] == pytest.approx(hit.mean(), abs=1e-6)
    for g, name in enumerate(ATTRS["gender"]):
        assert m["zeroshot"][f"acc/gender={name}"] == pytest.approx(
            hit[gender == g].mean(), abs=1e-6
        )
    accs = [hit[gender == g].mean() for g in range(2)]
    assert m["zeroshot"]["group_gap/gender"] == pytest.approx(max(accs) - min(accs), abs=1e-6)

    queries = text_classes(bundle, [[f"a photo of a {c}."] for c in CONCEPTS])
    for k in KS:
        for target in ("eq_opp", "dem_par"):
            mx, mn, nd = skew_ref(img @ queries.T, gender, k, target)
            got = m["skew"]["concepts"]
            assert got[f"maxskew@{k}/gender/{target}"] == pytest.approx(mx, abs=1e-5)
            assert got[f"minskew@{k}/gender/{target}"] == pytest.approx(mn, abs=1e-5)
            assert got[f"ndkl@{k}/gender/{target}"] == pytest.approx(nd, abs=1e-5)
        acc = hit.mean()
        able = 2 / (1 / acc + np.exp(m["skew"]["concepts"][f"maxskew@{k}/gender/eq_opp"]))
        assert m["able"][f"able@{k}/gender/eq_opp"] == pytest.approx(able, abs=1e-5)

    # captions repeat (templates): tied partners rank by index, as the metric documents
    img32, txt32 = img.astype(np.float32), txt.astype(np.float32)
    earlier = np.tril(np.ones((len(ev), len(ev)), dtype=bool), -1)
    for direction, sims in (("i2t", img32 @ txt32.T), ("t2i", txt32 @ img32.T)):
        pos = np.diag(sims)[:, None]
        rank = (sims > pos).sum(1) + ((sims == pos) & earlier).sum(1)
        for k in (1, 10):
            got = m["retrieval"][f"{direction}_R@{k}"]
            assert got == pytest.approx((rank < k).mean(), abs=1e-6)

    # neutral split: model RB (group prompts), AB and Cramér's V (true group vs predicted class)
    ne = read_split(synthetic_dir / "neutral")
    n_img, _ = embed_split(bundle, ne)
    n_gender = np.array([ATTRS["gender"].index(json.loads(s["json"])["gender"]) for s in ne])
    groups_w = text_classes(bundle, list(PROMPTS["group_prompts"]["gender"].values()))
    pred_group = (n_img @ groups_w.T).argmax(1)
    shares = np.bincount(pred_group, minlength=2) / len(pred_group)
    assert m["bias"]["rb/gender/eq_opp"] == pytest.approx(np.abs(shares - 0.5).max(), abs=1e-6)
    pred_class = (n_img @ zs.T).argmax(1)
    assert len(set(pred_class)) > 1 and len(set(pred_group)) > 1  # a case that can fail
    ab = max(
        abs((pred_class[n_gender == g] == r).mean() - (pred_class[n_gender != g] == r).mean())
        for g in range(2)
        for r in range(len(CONCEPTS))
    )
    assert m["bias"]["ab/gender"] == pytest.approx(ab, abs=1e-6)
    assert m["bias"]["cramers_v/gender"] == pytest.approx(
        cramers_v_ref(n_gender, pred_class), abs=1e-5
    )
    mx, _, _ = skew_ref(n_img @ text_classes(bundle, [["a photo of a person."], ["a person."]]).T,
                        n_gender, 40, "eq_opp")  # fmt: skip
    assert m["skew"]["people"]["maxskew@40/gender/eq_opp"] == pytest.approx(mx, abs=1e-5)
    assert "maxskew@40/age/eq_opp" not in m["skew"]["people"]  # restricted to `attributes`
    assert report["splits"]["eval"]["group_counts"]["gender"] == {"female": 240, "male": 240}


# -- the trained demo checkpoint ----------------------------------------------------------------
def test_image_cache_serves_text_side_models_without_reencoding(synthetic_dir: Path) -> None:
    """A text-only debiased model reads the base model's cached image embeddings: its report
    equals the uncached one, and no image is encoded for it."""
    torch.manual_seed(1)
    bundle = create_model("fairclip-tiny")
    bundle.model.eval()
    spec = EvalSpec.from_config(PROMPTS, ATTRS, CONCEPTS, skew_ks=KS, recall_ks=(1, 10))
    splits = resolve_splits(str(synthetic_dir / "eval"))
    proj = OrthProj(bundle.model.text_projection.shape[1], 1)
    proj.basis[:, 0] = torch.nn.functional.normalize(torch.randn(proj.basis.shape[0]), dim=0)
    debiased = DebiasedCLIP(bundle.model, bundle.name, text=[proj])

    def run_eval(model: object, cache: ImageCache | None) -> dict:
        return evaluate_model(model, bundle.tokenizer, bundle.preprocess_val, spec, splits,
                              batch_size=BATCH, num_workers=0, progress=False,
                              image_cache=cache)  # fmt: skip

    cache = ImageCache()
    base = flatten_metrics(run_eval(bundle.model, cache))
    assert len(cache.passes) == 2  # the eval and neutral splits
    uncached = flatten_metrics(run_eval(debiased, None))
    encoded = []
    encode_image = bundle.model.encode_image
    bundle.model.encode_image = lambda *a, **k: encoded.append(1) or encode_image(*a, **k)
    try:
        cached = flatten_metrics(run_eval(debiased, cache))
    finally:
        del bundle.model.encode_image
    assert not encoded
    assert cached.keys() == uncached.keys()
    for key, value in uncached.items():
        assert cached[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key
    # the projection changed the text side, so the comparison above is not base vs base
    assert any(abs(base[k] - v) > 1e-3 for k, v in uncached.items() if k in base)


def test_evaluation_leaves_every_submodule_in_the_mode_it_had(synthetic_dir: Path) -> None:
    """Evaluating a fresh DebiasedCLIP (an nn.Module, so in train mode) must not switch its
    eval-mode base model to train mode: with a dropout text tower (MiniLM) every embedding the
    comparison table fits a method on afterwards would carry dropout noise. A model with a
    locked tower kept in eval mode keeps it there too, and prompts encode without dropout."""
    torch.manual_seed(1)
    bundle = create_model("fairclip-tiny")
    base = bundle.model.eval()
    wrapped = DebiasedCLIP(base, bundle.name)
    assert wrapped.training and not base.training
    spec = EvalSpec.from_config(PROMPTS, ATTRS, CONCEPTS, skew_ks=KS)
    splits = resolve_splits(str(synthetic_dir / "eval"))
    evaluate_model(wrapped, bundle.tokenizer, bundle.preprocess_val, spec, splits,
                   batch_size=BATCH, num_workers=0, progress=False)  # fmt: skip
    assert wrapped.training
    assert not any(m.training for m in base.modules())

    base.train()
    base.visual.eval()  # a locked LiT tower
    encode_prompts(base, bundle.tokenizer, ["a photo of a nurse."], torch.device("cpu"))
    assert base.training and not any(m.training for m in base.visual.modules())
    assert all(m.training for m in base.transformer.modules())

    dropout = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    dropout.encode_text = lambda x, normalize=False: dropout(x)
    tokens = torch.ones(3, 4)
    first = encode_prompts(dropout, lambda p: tokens[: len(p)], ["a", "b", "c"], "cpu")
    again = encode_prompts(dropout, lambda p: tokens[: len(p)], ["a", "b", "c"], "cpu")
    assert torch.equal(first, again) and dropout.training


@pytest.fixture(scope="module")
def shuffled_dir(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The eval + neutral splits with group labels permuted across images (concepts kept):
    the same images and model, but no group information left for bias to show in."""
    out = tmp_path_factory.mktemp("shuffled")
    rng = np.random.default_rng(0)
    for split in ("eval", "neutral"):
        samples = read_split(synthetic_dir / split)
        metas = [json.loads(s["json"]) for s in samples]
        perm = rng.permutation(len(samples))
        shuffled = []
        for s, meta, other in zip(samples, metas, [metas[i] for i in perm], strict=True):
            meta = {**meta, "gender": other["gender"], "age": other["age"]}
            shuffled.append(
                {"__key__": s["__key__"], "png": s["png"], "txt": s["txt"], "json": meta}
            )
        write_shards(shuffled, out / split, split, shard_size=60, progress=False)
    return out


@pytest.fixture(scope="module")
def cli_report(trained_run: Path, synthetic_dir: Path, tmp_path_factory) -> Path:
    """`fairclip-eval` on the trained run's last.ckpt, with offline wandb logging."""
    out = tmp_path_factory.mktemp("eval_planted")
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    cfg = compose_eval(
        eval_overrides(synthetic_dir, f"model.name={ckpt}", "wandb.enabled=true"), out
    )
    run(cfg)
    return out


@pytest.fixture(scope="module")
def shuffled_report(trained_run: Path, shuffled_dir: Path, tmp_path_factory) -> Path:
    """The same model (given as its run dir: export/ holds the same weights) on the same
    images with the group labels shuffled, under the synthetic benchmark's protocol."""
    out = tmp_path_factory.mktemp("eval_shuffled")
    overrides = [
        f"model.name={trained_run}", f"splits.neutral={shuffled_dir}/neutral", "protocol=synthetic"
    ]  # fmt: skip
    run(compose_eval(eval_overrides(shuffled_dir, *overrides, "plots=false"), out))
    return out


def test_eval_of_trained_checkpoint_shows_planted_bias(
    cli_report: Path, shuffled_report: Path
) -> None:
    report = json.loads((cli_report / "report.json").read_text())
    for name in ("group_accuracy", "skew_concepts", "skew_stereotypes", "skew_neutral"):
        assert (cli_report / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (cli_report / "report.md").read_text()
    key = "skew/concepts/maxskew@10/gender/eq_opp"
    planted = flatten_metrics(report)
    assert f"| `{key}` | {planted[key]:.3f} |" in md
    assert "![skew_concepts](plots/skew_concepts.png)" in md

    # wandb (offline): a run dir with the report's tables
    runs = list((cli_report / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    tables = {
        p.name.split("_0_")[0]: json.loads(p.read_text())
        for p in (runs[0] / "files" / "media" / "table" / "bias_eval").rglob("*.table.json")
    }
    assert {"metrics", "group_accuracy", "concepts", "stereotypes"} <= set(tables)
    logged = dict(tables["metrics"]["data"])
    assert logged[key] == pytest.approx(planted[key])

    # The same model on the same images with the group labels shuffled: the planted
    # association (gender <-> occupation) is what makes the real-label numbers large.
    shuffled = flatten_metrics(load_report(shuffled_report))
    protocol = (shuffled_report / "protocol.md").read_text()  # the protocol's table layout
    assert (
        protocol.startswith("## Protocol synthetic") and "| MaxSkew@10 | MaxSkew@50 |" in protocol
    )
    value = shuffled["skew/concepts/maxskew@10/gender/eq_opp"]
    assert f"| concepts | gender | {value:.4f} |" in protocol
    assert shuffled["zeroshot/acc"] == pytest.approx(planted["zeroshot/acc"])
    for k in ("skew/concepts/maxskew@50/gender/eq_opp", "skew/concepts/ndkl@10/gender/eq_opp"):
        assert planted[k] > shuffled[k] + 0.15, (k, planted[k], shuffled[k])
    assert planted["bias/ab/gender"] > shuffled["bias/ab/gender"] + 0.15
    assert planted["bias/cramers_v/gender"] > shuffled["bias/cramers_v/gender"] + 0.15


def test_callback_report_in_run_dir_matches_cli(cli_report: Path, trained_run: Path) -> None:
    callback = load_report(trained_run / "bias_eval")
    cli = load_report(cli_report)
    assert callback["model"]["global_step"] > 0
    a, b = flatten_metrics(callback), flatten_metrics(cli)
    assert a.keys() == b.keys()
    for key in a:  # same final weights, same batches: the same numbers
        assert a[key] == pytest.approx(b[key], abs=1e-5, nan_ok=True), key
    assert (trained_run / "bias_eval" / "report.md").is_file()
    assert (trained_run / "bias_eval" / "plots" / "group_accuracy.png").is_file()
    # ... and logged to the run's own (offline) wandb logger
    tables = list(trained_run.glob("wandb/offline-run-*/files/media/table/bias_eval/metrics_*"))
    assert len(tables) == 1


def test_compare_cli_renders_both_runs(
    cli_report: Path, shuffled_report: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cmp"
    cmd = [
        str(Path(sys.executable).parent / "fairclip-eval"),
        f"compare=[{cli_report}/report.json,{shuffled_report}]",
        "compare_labels=[planted,shuffled]",
        "wandb.enabled=false",
        f"hydra.run.dir={out}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "comparison.md").read_text()
    a, b = flatten_metrics(load_report(cli_report)), flatten_metrics(load_report(shuffled_report))
    for key in ("zeroshot/acc", "skew/concepts/maxskew@10/gender/eq_opp", "bias/ab/gender"):
        assert f"| `{key}` | {a[key]:.3f} | {b[key]:.3f} | {b[key] - a[key]:+.3f} |" in md
    assert "| planted |" in md and "| shuffled |" in md
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    comparison = json.loads((out / "comparison.json").read_text())
    key = "skew/concepts/maxskew@10/gender/eq_opp"
    assert comparison["metrics"][key] == [pytest.approx(a[key]), pytest.approx(b[key])]
    assert comparison["delta"][key] == pytest.approx(b[key] - a[key])


# -- errors --------------------------------------------------------------------------------------
def test_bad_inputs_give_clear_errors(synthetic_dir: Path, tmp_path: Path) -> None:
    def fails(exc: type[Exception], match: str, *extra: str) -> None:
        cfg = compose_eval(
            eval_overrides(synthetic_dir, "model.name=fairclip-tiny", *extra), tmp_path
        )
        with pytest.raises(exc, match=match):
            run(cfg)

    fails(ValueError, r"prompts\.query_sets\.concepts\.attributes: unknown attribute 'race'.*"
          r"\['gender', 'age'\]", "+prompts.query_sets.concepts.attributes=[race]")  # fmt: skip
    fails(ValueError, r"prompts\.group_prompts: unknown attribute 'race'",
          "+prompts.group_prompts.race={white: [a white person]}")  # fmt: skip
    fails(ValueError, r"prompts\.query_sets\.concepts\.templates: template 'a photo' must contain",
          "prompts.query_sets.concepts.templates=[a photo]")  # fmt: skip
    fails(ValueError, r"skew_ks: expected positive integers, got 0", "skew_ks=[0,10]")
    fails(ValueError, r"skew_ks: expected positive integers, got -5", "skew_ks=[-5]")
    fails(FileNotFoundError, r"model.name='/nonexistent/last.ckpt': file or directory not found",
          "model.name=/nonexistent/last.ckpt")  # fmt: skip
    fails(FileNotFoundError, r"model.name='.*': directory holds no open_clip_config.json",
          f"model.name={tmp_path}")  # fmt: skip
    fails(FileNotFoundError, r"splits\.eval.*not found", f"splits.eval={tmp_path}/none/x.tar")
    # a misspelled label field: an error, not a report without zero-shot accuracy
    fails(ValueError, r"no image has a concept label under 'occupation'", "label_key=occupation")
    typo = [{**x, "json": {("gendr" if k == "gender" else k): v for k, v in x["json"].items()}}
            for x in generate_samples("eval", 48, SyntheticConfig())]  # fmt: skip
    write_shards(typo, tmp_path / "typo", "eval", progress=False)
    fails(ValueError, r"splits\.eval=.*no image has a label for attribute 'gender'.*spell it",
          f"splits.eval={tmp_path}/typo")  # fmt: skip
    fails(ValueError, r"device='gpu': expected auto, cpu, cuda", "device=gpu")
    fails(ValueError, r"compare='runA': expected a list", "+compare=runA")
    # a value listed in data.attributes with no image in the split
    empty = ["data.attributes.gender=[female,male,nonbinary]",
             "+prompts.group_prompts.gender.nonbinary=[a photo of a person.]"]  # fmt: skip
    fails(ValueError, r"splits\.eval=.*attribute 'gender' value\(s\) \['nonbinary'\] have no "
          r"images.*require_all_groups=false", *empty)  # fmt: skip
    report = run(
        compose_eval(eval_overrides(synthetic_dir, "model.name=fairclip-tiny", *empty,
                                    "require_all_groups=false", "plots=false"), tmp_path)
    )  # fmt: skip
    assert np.isnan(report["metrics"]["zeroshot"]["acc/gender=nonbinary"])
    assert (
        json.loads((tmp_path / "report.json").read_text())["metrics"]["zeroshot"][
            "acc/gender=nonbinary"
        ]
        is None
    )  # strict JSON: NaN is written as null

    callback = BiasEvalCallback({"query_sets": {"x": {"prompts": ["a"], "attributes": ["race"]}}},
                                eval_shards=str(synthetic_dir / "eval"), dirpath=tmp_path)  # fmt: skip
    module = SimpleNamespace(attributes=ATTRS, concepts=list(CONCEPTS))
    with pytest.raises(
        ValueError, match=r"callbacks\.bias_eval\.prompts\.query_sets\.x\.attributes"
    ):
        callback.setup(None, module, "fit")  # fails before training, not after


# -- DDP -------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        bundle = create_model("fairclip-tiny")
        spec = EvalSpec.from_config(PROMPTS, ATTRS, CONCEPTS, skew_ks=KS)
        report = evaluate_model(bundle.model, bundle.tokenizer, bundle.preprocess_val, spec,
                                resolve_splits(f"{data}/eval"), batch_size=BATCH, num_workers=0,
                                rank=rank, world_size=world, progress=False)  # fmt: skip
        Path(out, f"rank{rank}.json").write_text(json.dumps(report["metrics"]))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch + open_clip: ~1 min on 2 cores
def test_ddp_ranks_share_the_split_and_agree_with_one_process(
    synthetic_dir: Path, tmp_path: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(synthetic_dir), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    bundle = create_model("fairclip-tiny")
    spec = EvalSpec.from_config(PROMPTS, ATTRS, CONCEPTS, skew_ks=KS)
    single = evaluate_model(bundle.model, bundle.tokenizer, bundle.preprocess_val, spec,
                            resolve_splits(str(synthetic_dir / "eval")), batch_size=BATCH,
                            num_workers=0, progress=False)  # fmt: skip
    ref = flatten_metrics(single)
    for rank in range(2):
        got = flatten_metrics({"metrics": json.loads((tmp_path / f"rank{rank}.json").read_text())})
        assert got.keys() == ref.keys()
        for key, value in ref.items():
            # Recall breaks ties between identical (template) captions by gathered index, and
            # the gather orders pairs rank by rank: only those ties may move.
            tol = 0.01 if key.startswith("retrieval/") else 1e-5
            assert got[key] == pytest.approx(value, abs=tol), (rank, key)
