"""Synthetic generator, shard I/O and the DDP-safe WebDataset stream."""

from __future__ import annotations

import io
import itertools
import json
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from fairclip.data.datamodule import ShardDataModule
from fairclip.data.samples import Collate, SampleDecoder
from fairclip.data.shards import list_shards, read_captions, write_shards
from fairclip.data.stream import ShardStream, StreamLoader, stream_loader, worker_quotas
from fairclip.data.synthetic import (
    BACKGROUNDS,
    CONCEPT_BACKGROUND,
    CONCEPTS,
    SyntheticConfig,
    generate_samples,
)

ATTRS = {"gender": ["female", "male"], "age": ["young", "middle-aged", "old"]}


def read_labels(folder: Path) -> list[dict]:
    urls = [s.url for s in list_shards(folder)]
    return [json.loads(s["json"]) for s in wds.WebDataset(urls, shardshuffle=False)]


def read_images(folder: Path) -> set[bytes]:
    urls = [s.url for s in list_shards(folder)]
    return {s["png"] for s in wds.WebDataset(urls, shardshuffle=False)}


def test_synthetic_is_seeded_and_biased_as_configured(synthetic_dir: Path) -> None:
    a = list(generate_samples("train", 50, SyntheticConfig(seed=3)))
    b = list(generate_samples("train", 50, SyntheticConfig(seed=3)))
    c = list(generate_samples("train", 50, SyntheticConfig(seed=4)))
    assert [s["png"] for s in a] == [s["png"] for s in b]
    assert [s["png"] for s in a] != [s["png"] for s in c]

    labels = read_labels(synthetic_dir / "train")
    assert len(labels) == 4000
    male = Counter(lab["concept"] for lab in labels if lab["gender"] == "male")
    total = Counter(lab["concept"] for lab in labels)
    # logit P(male | c) = logit(male_share) ± logit(association); fixture: 0.6 and 0.9
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    sigmoid = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    expected_doctor = sigmoid(logit(0.6) + logit(0.9))  # 0.931
    expected_nurse = sigmoid(logit(0.6) - logit(0.9))  # 0.143
    assert male["doctor"] / total["doctor"] == pytest.approx(expected_doctor, abs=0.04)
    assert male["nurse"] / total["nurse"] == pytest.approx(expected_nurse, abs=0.04)
    ages = Counter(lab["age"] for lab in labels)
    assert ages["young"] / 4000 == pytest.approx(0.5, abs=0.04)


def test_eval_split_is_exactly_balanced(synthetic_dir: Path) -> None:
    labels = read_labels(synthetic_dir / "eval")
    cells = Counter((lab["concept"], lab["gender"], lab["age"]) for lab in labels)
    assert len(cells) == len(CONCEPTS) * 2 * 3
    assert set(cells.values()) == {480 // 48}
    val = read_labels(synthetic_dir / "val")  # balanced too, but other images than eval
    assert set(Counter((lab["concept"], lab["gender"], lab["age"]) for lab in val).values()) == {5}
    assert not read_images(synthetic_dir / "eval") & read_images(synthetic_dir / "val")
    neutral = read_labels(synthetic_dir / "neutral")
    assert all("concept" not in lab for lab in neutral)
    assert Counter(lab["gender"] for lab in neutral) == {"female": 60, "male": 60}


def test_compositional_captions_vary_the_wording_and_keep_the_labels(tmp_path: Path) -> None:
    cfg = SyntheticConfig(seed=0, captions="compositional", group_word_rate=0.5)
    samples = list(generate_samples("train", 2000, cfg))
    texts = [s["txt"] for s in samples]
    plain = [s["txt"] for s in generate_samples("train", 2000, SyntheticConfig(seed=0))]
    assert len(set(texts)) > 1000 > 5 * len(set(plain))  # ~200 template captions at most
    other = {"female": ("man", "gentleman", "male"), "male": ("woman", "lady", "female")}
    for s in samples:  # every caption names its own occupation, and only a true gender
        assert s["json"]["concept"] in s["txt"]
        words = set(s["txt"].rstrip(".").replace(",", "").split())
        assert not words & set(other[s["json"]["gender"]]), s["txt"]
    named = [t for t in texts if {"woman", "lady", "man", "gentleman", "male", "female"} & set(
        t.rstrip(".").replace(",", "").split())]  # fmt: skip
    assert len(named) / len(texts) == pytest.approx(0.5, abs=0.05)
    assert "a photo of a doctor." in texts  # the zero-shot prompt is in the vocabulary

    write_shards(iter(samples[:30]), tmp_path / "c", prefix="c", shard_size=8, total=30)
    assert read_captions(tmp_path / "c", 20) == texts[:20]
    assert read_captions(tmp_path / "c", 100) == texts[:30]
    with pytest.raises(ValueError, match=r"synthetic.captions='poetry'"):
        SyntheticConfig(captions="poetry").validate()


def test_spurious_background_is_labelled_tied_in_train_and_free_in_eval() -> None:
    cfg = SyntheticConfig(seed=0, spurious_rate=0.9, background_word_rate=1.0, noise=0.0)
    train = list(generate_samples("train", 1600, cfg))
    tied = [BACKGROUNDS[CONCEPT_BACKGROUND[CONCEPTS.index(s["json"]["concept"])]] for s in train]
    share = np.mean([s["json"]["background"] == t for s, t in zip(train, tied, strict=True)])
    assert share == pytest.approx(0.95, abs=0.02)  # 0.9 tied + half of the untied rest
    for s in train[:200]:  # the label is the pixels' family, and the caption names it
        corner = np.asarray(Image.open(io.BytesIO(s["png"])))[0, 0].astype(int)
        assert s["json"]["background"] == ("warm" if corner[0] > corner[2] else "cool")
        assert s["txt"].endswith(f" on a {s['json']['background']} background."), s["txt"]
    evals = list(generate_samples("eval", 2400, cfg))
    for concept in CONCEPTS:  # no shortcut in the reported split
        cool = [s["json"]["background"] == "cool" for s in evals if s["json"]["concept"] == concept]
        assert np.mean(cool) == pytest.approx(0.5, abs=0.1), concept
    plain = list(generate_samples("train", 200, SyntheticConfig(seed=0)))
    assert {s["json"]["background"] for s in plain} == set(BACKGROUNDS)
    assert not any("background" in s["txt"] for s in plain)
    with pytest.raises(ValueError, match=r"synthetic.background_word_rate=2"):
        SyntheticConfig(background_word_rate=2).validate()


def test_write_shards_records_sizes_and_leaves_no_temp_files(tmp_path: Path) -> None:
    shards = write_shards(
        generate_samples("eval", 48, SyntheticConfig()), tmp_path, "eval", 20, progress=False
    )
    assert [s.size for s in shards] == [20, 20, 8]
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sizes == {"eval-000000.tar": 20, "eval-000001.tar": 20, "eval-000002.tar": 8}
    assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob(".*"))
    # a smaller rewrite of the split leaves none of the earlier write's shards behind
    fewer = itertools.islice(generate_samples("eval", 48, SyntheticConfig()), 25)
    write_shards(fewer, tmp_path, "eval", 20, progress=False)
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sizes == {"eval-000000.tar": 20, "eval-000001.tar": 5}
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == list(sizes)
    assert sum(s.size for s in list_shards(tmp_path)) == 25


def _identity_stream(folder: Path, train: bool, workers: int, batch: int = 16, **kw) -> ShardStream:
    """A stream that yields sample keys only (fast): decoding is tested separately."""
    return ShardStream(
        list_shards(folder),
        decode=lambda s: {"key": s["__key__"]},
        collate=lambda b: {"key": [x["key"] for x in b]},
        batch_size=batch,
        train=train,
        num_workers=workers,
        **kw,
    )


def _run_rank(
    folder: Path, rank: int, world: int, workers: int, epoch: int = 0, train: bool = True, **kw
):
    stream = _identity_stream(folder, train, workers, **kw)
    stream.set_distributed(rank, world)
    stream.set_epoch(epoch)
    batches = list(DataLoader(stream, batch_size=None, num_workers=workers))
    return stream, [k for b in batches for k in b["key"]], len(batches)


def test_train_stream_equal_batches_and_disjoint_ranks(synthetic_dir: Path) -> None:
    seen, counts = [], []
    for rank in range(2):
        stream, keys, n_batches = _run_rank(synthetic_dir / "train", rank, world=2, workers=2)
        assert n_batches == len(stream)  # exactly the advertised length on every rank
        assert len(keys) == len(set(keys))  # no sample twice within a rank
        seen.append(set(keys))
        counts.append(n_batches)
    assert counts[0] == counts[1]
    assert not seen[0] & seen[1]  # ranks see disjoint data
    # 16 shards x 250, 2 ranks x 2 workers x batch 16: lower bound (2000 - 2*15) // 16 = 123
    assert counts[0] == 123
    assert len(seen[0] | seen[1]) == 2 * 123 * 16


def test_train_stream_reshuffles_shards_per_epoch(synthetic_dir: Path) -> None:
    _, keys0, _ = _run_rank(synthetic_dir / "train", 0, world=1, workers=1, epoch=0)
    _, keys0b, _ = _run_rank(synthetic_dir / "train", 0, world=1, workers=1, epoch=0)
    _, keys1, _ = _run_rank(synthetic_dir / "train", 0, world=1, workers=1, epoch=1)
    assert keys0 == keys0b  # deterministic for a given (seed, epoch)
    assert keys0[:50] != keys1[:50]


@pytest.mark.parametrize("resampled", [False, True])
def test_train_stream_resumes_mid_epoch_with_the_next_batch(
    synthetic_dir: Path, resampled: bool
) -> None:
    """Resuming after n batches yields exactly the rest of the uninterrupted epoch, through a
    real 3-worker loader whose workers have unequal quotas (two run out before batch 240)."""
    kw = {"resampled": True, "samples_per_epoch": 4000} if resampled else {}
    folder = synthetic_dir / "train"
    stream, ref, n = _run_rank(folder, 0, world=1, workers=3, epoch=1, **kw)
    if not resampled:
        quotas = worker_quotas(np.array([93, 78, 78]), n)  # 6/5/5 shards of 250, batch 16
        assert len(set(quotas.tolist())) > 1 and 3 * quotas.min() < 240
    for done in (1, 37, 240):  # mid-round, mid-round, after a worker ran out
        stream.resume(1, done)
        resumed = [
            k for b in StreamLoader(stream, batch_size=None, num_workers=3) for k in b["key"]
        ]
        assert resumed == ref[done * 16 :]
    stream.set_epoch(2)  # other epochs are whole
    assert sum(len(b["key"]) for b in DataLoader(stream, batch_size=None, num_workers=3)) == n * 16


def test_resampled_stream_has_fixed_length(synthetic_dir: Path) -> None:
    stream, keys, n = _run_rank(
        synthetic_dir / "train", 1, world=2, workers=2, resampled=True, samples_per_epoch=1000
    )
    assert n == len(stream) == 1000 // (16 * 2)


def test_eval_stream_covers_every_sample_once(synthetic_dir: Path) -> None:
    all_keys = []
    for rank in range(2):
        stream, keys, n = _run_rank(synthetic_dir / "eval", rank, world=2, workers=2, train=False)
        assert n == len(stream)
        all_keys += keys
    assert len(all_keys) == len(set(all_keys)) == 480


def test_worker_quotas_sum_and_caps() -> None:
    quotas = worker_quotas(np.array([5, 9, 2]), 12)
    assert quotas.sum() == 12 and (quotas <= [5, 9, 2]).all()
    with pytest.raises(RuntimeError):
        worker_quotas(np.array([1, 1]), 3)


def _decoder() -> SampleDecoder:
    from torchvision.transforms import ToTensor

    return SampleDecoder(ToTensor(), ATTRS, list(CONCEPTS))


def _tar(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return path


def _sample_key(sample: dict) -> dict:
    return {"key": sample["__key__"]}  # module level: forkserver workers unpickle it


def _batch_keys(batch: list[dict]) -> dict:
    return {"key": [x["key"] for x in batch]}


def _alive(pid: int) -> bool:
    """Running or sleeping, not dead or a zombie (a dead child of ours stays a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_loader_workers_outlive_the_requeue_signals_slurm_sends_to_the_whole_job(
    synthetic_dir: Path,
) -> None:
    """`scancel --signal=USR1` (and `--signal=USR1@90`) reach every process of a Slurm step.
    Only the trainer may act on them: the forkserver, its resource tracker and the workers
    must go on, or the job dies instead of being requeued."""
    stream = ShardStream(
        list_shards(synthetic_dir / "eval"), _sample_key, _batch_keys, 16, train=False,
        num_workers=2,
    )  # fmt: skip
    loader = iter(stream_loader(stream, num_workers=2))
    keys = next(loader)["key"]
    server = multiprocessing.forkserver._forkserver._forkserver_pid
    tracker = multiprocessing.resource_tracker._resource_tracker._pid
    helpers = [server, tracker, *(w.pid for w in loader._workers)]
    for pid in helpers:
        os.kill(pid, signal.SIGUSR1)
        os.kill(pid, signal.SIGUSR2)
    keys += [k for batch in loader for k in batch["key"]]
    assert len(set(keys)) == stream.total_samples == 480  # every sample once, none lost
    assert all(_alive(pid) for pid in (server, tracker))
    assert len(list(stream_loader(stream, num_workers=2))) == len(stream)  # the next epoch


def _good(key: str) -> dict:
    sample = next(generate_samples("eval", 48, SyntheticConfig()))
    return {**sample, "__key__": key}


def test_corrupt_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    samples = [_good(f"s{i:03d}") for i in range(40)]
    samples[3] = {**samples[3], "png": b"not a png"}
    samples[7] = {k: v for k, v in samples[7].items() if k != "txt"}
    samples[9] = {**samples[9], "txt": b"a nurse \xff\xfe"}  # not UTF-8
    _tar(tmp_path / "d-000000.tar", samples)
    stream = ShardStream(
        list_shards(tmp_path), _decoder(), Collate(lambda t: torch.zeros(len(t), 4)), 8, train=False
    )
    batches = list(DataLoader(stream, batch_size=None))
    assert sum(int(b["skipped"]) for b in batches) == 3
    assert sum(len(b["key"]) for b in batches) == 37


@pytest.mark.parametrize("train", [True, False])
def test_truncated_shard_stops_the_run_with_its_name(tmp_path: Path, train: bool) -> None:
    """A shard cut short after it was counted (an interrupted copy) is not skipped: skipping
    it topped the epoch up with repeats and evaluated part of the split without a word."""
    _tar(tmp_path / "d-000000.tar", [_good(f"a{i:03d}") for i in range(40)])
    _tar(tmp_path / "d-000001.tar", [_good(f"b{i:03d}") for i in range(40)])
    shards = list_shards(tmp_path)  # records 40 + 40 in sizes.json
    data = (tmp_path / "d-000001.tar").read_bytes()
    (tmp_path / "d-000001.tar").write_bytes(data[: len(data) // 2])
    stream = ShardStream(
        shards, _decoder(), Collate(lambda t: torch.zeros(len(t), 4)), 8, train=train,
        config_key="data.val_shards",
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"data.val_shards: shard '.*d-000001.tar' is unreadable"):
        list(DataLoader(stream, batch_size=None))


def test_missing_empty_and_malformed_inputs_have_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"data.train_shards.*not found.*missing-000000.tar"
    ):
        list_shards(str(tmp_path / "missing-000000.tar"), "data.train_shards")
    (tmp_path / "empty").mkdir()
    with tarfile.open(tmp_path / "empty" / "e-000000.tar", "w"):
        pass
    with pytest.raises(ValueError, match=r"e-000000.tar.* is empty"):
        list_shards(tmp_path / "empty", "data.val_shards")
    (tmp_path / "empty" / "sizes.json").write_text('{"e-000000.tar": 3,')  # cut short
    with pytest.raises(ValueError, match=r"data.val_shards: .*sizes.json is not a \{shard name"):
        list_shards(tmp_path / "empty", "data.val_shards")
    (tmp_path / "empty" / "sizes.json").unlink()
    (tmp_path / "empty" / "e-000000.tar").write_bytes(b"\0" * 100 + b"not a tar")
    with pytest.raises(ValueError, match=r"data.val_shards: shard .* is not a readable tar"):
        list_shards(tmp_path / "empty", "data.val_shards")

    decoder = _decoder()
    bad_json = {**_good("k1"), "json": b"{gender: female", "__url__": "x.tar"}
    with pytest.raises(ValueError, match=r"x.tar: sample 'k1': malformed JSON label"):
        decoder({**bad_json, "png": bad_json["png"], "txt": b"a"})
    unknown = {
        **_good("k2"),
        "json": json.dumps({"gender": "robot"}).encode(),
        "__url__": "y.tar",
        "txt": b"a",
    }
    with pytest.raises(ValueError, match=r"'gender'='robot' is not in data.attributes.gender"):
        decoder(unknown)


def test_datamodule_rejects_bad_config(synthetic_dir: Path) -> None:
    with pytest.raises(ValueError, match="data.attributes.gender: expected a non-empty list"):
        ShardDataModule(None, None, {"gender": []}, list(CONCEPTS))
    dm = ShardDataModule(
        str(synthetic_dir / "train"),
        None,
        ATTRS,
        list(CONCEPTS),
        num_workers=32,
        preprocess_train=lambda x: x,
        preprocess_val=lambda x: x,
        tokenizer=lambda x: x,
    )
    with pytest.raises(ValueError, match="16 shard.*1 rank.*32 worker"):
        dm.setup("fit")


def _val_module(val: Path) -> ShardDataModule:
    return ShardDataModule(
        None, str(val), ATTRS, list(CONCEPTS), preprocess_train=lambda x: x,
        preprocess_val=lambda x: x, tokenizer=lambda x: x,
    )  # fmt: skip


def test_val_labels_are_checked_before_training(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Validation first runs after an epoch: a bad val label must stop the run at setup."""
    samples = [_good(f"s{i:03d}") for i in range(40)]
    samples[30] = {**samples[30], "json": {**samples[30]["json"], "gender": "robot"}}
    (tmp_path / "bad").mkdir()
    _tar(tmp_path / "bad" / "v-000000.tar", samples)
    with pytest.raises(ValueError, match=r"v-000000.tar: sample 's030': field 'gender'='robot'"):
        _val_module(tmp_path / "bad").setup("fit")

    # a misspelled field reads as unlabelled everywhere: said once, with the fields found
    renamed = [
        {**s, "json": {("gendr" if k == "gender" else k): v for k, v in s["json"].items()}}
        for s in samples[:30]
    ]
    (tmp_path / "typo").mkdir()
    _tar(tmp_path / "typo" / "v-000000.tar", renamed)
    dm = _val_module(tmp_path / "typo")
    with caplog.at_level("WARNING", logger="fairclip.data.samples"):
        dm.setup("fit")
    assert "field(s) ['gender']" in caplog.text and "'gendr'" in caplog.text
    assert dm.val_stream is not None and dm.val_stream.total_samples == 30
    counts = dm.val_stream.decode.check_labels(str(tmp_path / "typo"), "data.val_shards")
    assert counts == {"gender": 0, "age": 30, "concept": 30}


def test_decoder_maps_labels_and_png_to_tensors() -> None:
    sample = _good("k")
    out = _decoder()(
        {**sample, "json": json.dumps(sample["json"]).encode(), "txt": sample["txt"].encode()}
    )
    assert out["image"].shape == (3, 32, 32)
    assert out["concept"] == CONCEPTS.index(sample["json"]["concept"])
    assert out["groups"] == [
        ATTRS["gender"].index(sample["json"]["gender"]),
        ATTRS["age"].index(sample["json"]["age"]),
    ]
    assert isinstance(io.BytesIO(sample["png"]).read(4), bytes)
