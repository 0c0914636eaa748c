"""fairclip vs the libraries it defers to (issue 21 item 4), on fixed tensors.

Where fairclip uses a library (torchmetrics' CramersV, Lightning's ThroughputMonitor,
open_clip's zero-shot classifier, torchmetrics' gather_all_tensors), these tests pin the values
to fairclip's own definition; where fairclip keeps its own code, they pin what differs.
"""

from __future__ import annotations

import os
import socket
import types
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import throughput_monitor
from lightning.pytorch.loggers import Logger
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from torchmetrics.nominal import CramersV as LibraryCramersV
from torchmetrics.utilities.distributed import gather_all_tensors

from fairclip.callbacks.throughput import Throughput
from fairclip.metrics import CramersV, cramers_v

# --------------------------------------------------------------------------------------
# 1. Cramér's V: torchmetrics without bias correction
# --------------------------------------------------------------------------------------

# rows = groups, columns = classes; group 1 and class 1 never occur (dropped by both)
TABLE = torch.tensor([[12, 0, 7, 3], [0, 0, 0, 0], [4, 0, 9, 11], [6, 0, 2, 8]])


def _pairs(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(group, class) per example of a contingency table, in a fixed shuffled order."""
    g, c = table.nonzero(as_tuple=True)
    reps = table[g, c]
    groups, classes = g.repeat_interleave(reps), c.repeat_interleave(reps)
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(0))
    return groups[order], classes[order]


def _random_pairs(num_groups: int, num_classes: int, n: int, seed: int) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, num_groups, (n,), generator=gen)
    noise = torch.randint(0, 3, (n,), generator=gen)
    return groups, (groups + noise) % num_classes  # associated, not determined


def _library_v(num_groups: int, num_classes: int, groups, classes, **kwargs) -> torch.Tensor:
    lib = LibraryCramersV(max(num_groups, num_classes), **kwargs)
    lib.update(classes, groups)
    return lib.compute()


@pytest.mark.parametrize(
    ("num_groups", "num_classes", "n", "seed"),
    [(4, 4, 300, 0), (2, 7, 1000, 1), (3, 2, 50, 2), (5, 9, 20_000, 3)],
)
def test_cramers_v_equals_torchmetrics_without_bias_correction(
    num_groups: int, num_classes: int, n: int, seed: int
) -> None:
    groups, classes = _random_pairs(num_groups, num_classes, n, seed)
    expected = _library_v(num_groups, num_classes, groups, classes, bias_correction=False)
    ours = CramersV(num_groups, num_classes)
    for i in range(0, n, 37):  # several batches, as in evaluation
        ours.update(groups[i : i + 37], classes[i : i + 37])
    torch.testing.assert_close(ours.compute(), expected, rtol=0, atol=1e-6)
    # the table function (float64) is the same definition
    table = torch.zeros(num_groups, num_classes, dtype=torch.long)
    table.index_put_((groups, classes), torch.ones_like(groups), accumulate=True)
    torch.testing.assert_close(cramers_v(table).float(), expected, rtol=0, atol=1e-6)


def test_cramers_v_table_with_empty_rows_and_unknown_groups() -> None:
    groups, classes = _pairs(TABLE)
    expected = _library_v(4, 4, groups, classes, bias_correction=False)
    ours = CramersV(num_groups=4, num_classes=4)
    ours.update(groups, classes)
    ours.update(torch.tensor([-1, -1, -1]), torch.tensor([0, 1, 3]))  # unknown group: skipped
    torch.testing.assert_close(ours.compute(), expected, rtol=0, atol=1e-6)
    assert cramers_v(TABLE).item() == pytest.approx(expected.item(), abs=1e-6)


def test_cramers_v_is_not_torchmetrics_default_bias_corrected() -> None:
    """Why ``bias_correction=False``: the library's default (Bergsma; Yates for 2x2) differs."""
    groups, classes = _pairs(TABLE)
    ours = CramersV(4, 4)
    ours.update(groups, classes)
    corrected = _library_v(4, 4, groups, classes)  # bias_correction=True by default
    assert abs(ours.compute().item() - corrected.item()) > 1e-3
    two_by_two = torch.tensor([[10, 3], [4, 9]])
    g, c = _pairs(two_by_two)
    assert abs(cramers_v(two_by_two).item() - _library_v(2, 2, g, c).item()) > 1e-3


def test_cramers_v_single_column_is_zero_where_torchmetrics_gives_nan() -> None:
    """Why CramersV.compute and cramers_v keep their own rule for a one-column table."""
    one_class = torch.tensor([[5, 0], [7, 0]])
    groups, classes = _pairs(one_class)
    assert _library_v(2, 2, groups, classes, bias_correction=False).isnan()
    ours = CramersV(2, 2)
    ours.update(groups, classes)
    assert ours.compute().item() == 0.0
    assert cramers_v(one_class).item() == 0.0
    empty = CramersV(2, 2)  # nothing seen: NaN in both
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert empty.compute().isnan()
    assert cramers_v(torch.zeros(2, 2)).isnan()


def test_cramers_v_counts_are_float64_and_sync_as_sums() -> None:
    ours = CramersV(3, 5)
    assert ours.confmat.dtype == torch.float64 and ours.confmat.shape == (5, 5)
    assert ours._reductions["confmat"].__name__ == "dim_zero_sum"
    assert ours.num_groups == 3 and ours.num_pred_classes == 5 and not ours.bias_correction
    with pytest.raises(ValueError, match="classes"):
        ours.update(torch.tensor([0]), torch.tensor([5]))
    with pytest.raises(ValueError, match="groups"):
        ours.update(torch.tensor([3]), torch.tensor([0]))


# --------------------------------------------------------------------------------------
# 2. gather_all_tensors (uneven sizes) vs the padded gather in fairclip.callbacks.sae
# --------------------------------------------------------------------------------------

ROWS = {0: 5, 1: 2}


def _rank_rows(rank: int, n: int) -> torch.Tensor:
    return torch.arange(n * 3, dtype=torch.float32).view(n, 3) + 100 * rank


def _gather_worker(rank: int, world: int, port: int, tmp: str) -> None:
    from lightning.fabric.utilities.distributed import _all_gather_ddp_if_available

    from fairclip.callbacks.sae import gather_rows

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # what DDPStrategy.all_gather does: equal shapes in, [world, ...] out
        trainer = types.SimpleNamespace(
            world_size=world,
            strategy=types.SimpleNamespace(all_gather=_all_gather_ddp_if_available),
        )
        out = {}
        for name, n in (("uneven", ROWS[rank]), ("empty_rank", 4 if rank == 0 else 0)):
            x = _rank_rows(rank, n)
            out[f"lib:{name}"] = torch.cat(gather_all_tensors(x))
            out[f"sae:{name}"] = gather_rows(trainer, x)
        torch.save(out, Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_gather_all_tensors_equals_sae_gather_rows(tmp_path: Path) -> None:
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    pytest.importorskip("fairclip.callbacks.sae")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    expected = {
        "uneven": torch.cat([_rank_rows(0, 5), _rank_rows(1, 2)]),
        "empty_rank": _rank_rows(0, 4),
    }
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, value in expected.items():
            torch.testing.assert_close(got[f"lib:{name}"], value, rtol=0, atol=0)
            torch.testing.assert_close(got[f"sae:{name}"], value, rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# 3. Throughput: Lightning's ThroughputMonitor, window restarted every epoch
# --------------------------------------------------------------------------------------

SIZES = [4, 3, 5, 4, 2, 6, 4]  # images per batch, every epoch
DURATIONS = [0.5, 0.25, 0.75, 0.5, 1.0, 0.25, 0.5, 2.0, 0.5, 0.25, 1.5, 0.5, 0.75, 0.25]
GAP = 100.0  # seconds between epochs (checkpointing, workers): must never count
EVERY = 3


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class _FixedSteps(L.LightningModule):
    """Each training step takes DURATIONS[global step] seconds on the fake clock."""

    flops_per_batch = None

    def __init__(self, clock: _Clock) -> None:
        super().__init__()
        self.clock = clock
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.clock.now += DURATIONS[self.global_step]
        return self.layer(batch["image"]).sum()

    def on_train_epoch_end(self) -> None:
        self.clock.now += GAP

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        batches = [{"image": torch.ones(n, 2)} for n in SIZES]
        return torch.utils.data.DataLoader(batches, batch_size=None)


class _Recorder(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if "train/samples" in metrics:
            self.rows.append(dict(metrics))


def test_throughput_equals_samples_over_the_last_every_n_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = _Clock()
    monkeypatch.setattr(throughput_monitor, "time", clock)
    recorder = _Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=recorder,
        log_every_n_steps=1,
        callbacks=[Throughput(every_n_steps=EVERY)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(_FixedSteps(clock))
    assert len(recorder.rows) == 2 * len(SIZES)
    for step, row in enumerate(recorder.rows):
        b = step % len(SIZES)  # batch in its epoch
        assert row["train/batches"] == b + 1 and row["train/samples"] == sum(SIZES[: b + 1])
        if b < EVERY:  # the window needs EVERY steps after the epoch's first batch
            assert "train/device/samples_per_sec" not in row, step
            continue
        samples = sum(SIZES[b - EVERY + 1 : b + 1])
        seconds = sum(DURATIONS[step - EVERY + 1 : step + 1])
        assert row["train/device/samples_per_sec"] == pytest.approx(samples / seconds), step
        assert row["train/device/batches_per_sec"] == pytest.approx(EVERY / seconds), step
        assert "train/samples_per_sec" not in row  # the all-rank key needs world size > 1


def test_throughput_keeps_the_config_arguments() -> None:
    callback = Throughput(every_n_steps=10)  # conf/callbacks/default.yaml
    assert callback.every_n_steps == 10 and callback.kwargs == {"window_size": 11}
    assert callback.batch_size_fn({"image": torch.zeros(7, 3, 4, 4), "text": None}) == 7
    with pytest.raises(ValueError, match="every_n_steps"):
        Throughput(every_n_steps=0)


# --------------------------------------------------------------------------------------
# 4. Zero-shot classifier: open_clip's builder vs class_embeddings
# --------------------------------------------------------------------------------------

CLASSNAMES = ["doctor", "nurse", "pilot", "chef", "teacher"]
TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of the {}, cropped."]


@pytest.fixture(scope="module")
def tiny():
    from fairclip.model.factory import create_model

    torch.manual_seed(0)
    bundle = create_model("fairclip-tiny")
    bundle.model.eval()
    return bundle


def test_zero_shot_classifier_equals_class_embeddings(tiny) -> None:
    from fairclip.model.encode import class_embeddings, zero_shot_classifier

    cpu = torch.device("cpu")
    prompts = [[t.format(c) for t in TEMPLATES] for c in CLASSNAMES]
    ours = class_embeddings(tiny.model, tiny.tokenizer, prompts, cpu)
    library = build_zero_shot_classifier(
        tiny.model, tiny.tokenizer, CLASSNAMES, TEMPLATES, num_classes_per_batch=2, device=cpu
    )
    assert library.shape == (ours.shape[1], len(CLASSNAMES))
    torch.testing.assert_close(ours, library.T, rtol=0, atol=1e-6)
    # the helper, with classes split over several forward passes (chunk of 7 prompts)
    wrapped = zero_shot_classifier(tiny.model, tiny.tokenizer, CLASSNAMES, TEMPLATES, cpu, 7)
    torch.testing.assert_close(wrapped, ours, rtol=0, atol=1e-6)
    assert wrapped.dtype == torch.float32 and wrapped.is_contiguous()


def test_ragged_class_embeddings_follow_open_clips_rule_class_by_class(tiny) -> None:
    """Why class_embeddings stays: open_clip's builder shares one template list across
    classes, so ragged prompt lists only fit it one class per call (prompts as templates)."""
    from fairclip.model.encode import class_embeddings

    cpu = torch.device("cpu")
    ragged = [["a woman.", "a photo of a woman."], ["a man."], ["a person", "someone", "them"]]
    ours = class_embeddings(tiny.model, tiny.tokenizer, ragged, cpu)
    for k, prompts in enumerate(ragged):
        one = build_zero_shot_classifier(tiny.model, tiny.tokenizer, ["-"], prompts, device=cpu)
        torch.testing.assert_close(ours[k], one[:, 0], rtol=0, atol=1e-6)


def test_module_concept_classifier_equals_class_embeddings(tiny) -> None:
    from fairclip.model.encode import class_embeddings
    from fairclip.model.module import FairCLIPModule

    torch.manual_seed(0)
    module = FairCLIPModule(
        model={"name": "fairclip-tiny"},
        concepts=CLASSNAMES,
        attributes={"gender": ["female", "male"]},
        zero_shot_templates=TEMPLATES,
    ).eval()
    prompts = [[t.format(c) for t in TEMPLATES] for c in CLASSNAMES]
    ours = class_embeddings(module.model, module.tokenizer, prompts, torch.device("cpu"))
    torch.testing.assert_close(module.concept_classifier().T, ours, rtol=0, atol=1e-6)
