"""Training an SAE on a caption corpus file (one caption per line), streamed: captions are read,
encoded and trained on a chunk at a time, so a corpus of millions of captions never sits in
memory as text or as embeddings."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fairclip.sae.model import EPS, MatryoshkaTopKSAE, SAEConfig, check_int
from fairclip.sae.train import lr_schedule, make_optimizer, sae_step

Encoder = Callable[[Sequence[str]], Tensor]


def _existing(path: str | Path, key: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{key}={str(path)!r}: no such file (expected UTF-8 text, one caption per line)"
        )
    return path


def caption_chunks(path: str | Path, chunk: int, key: str) -> Iterator[list[str]]:
    """Non-blank lines of a UTF-8 file, ``chunk`` at a time; a bad line names file and line."""
    path = _existing(path, key)
    buf: list[str] = []
    with path.open("rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as err:
                raise ValueError(f"{key}: {path}:{i} is not UTF-8 ({err.reason})") from err
            if line:
                buf.append(line)
            if len(buf) == chunk:
                yield buf
                buf = []
    if buf:
        yield buf


def count_captions(path: str | Path, key: str) -> int:
    """Non-blank lines (one fast pass, for the step count of the learning-rate schedule)."""
    with _existing(path, key).open("rb") as f:
        n = sum(1 for raw in f if raw.strip())
    if n == 0:
        raise ValueError(f"{key}: {path} holds no caption (expected one per line)")
    return n


def train_sae_on_corpus(
    path: str | Path,
    encode: Encoder,
    cfg: SAEConfig,
    extra: Tensor | None = None,
    epochs: int = 1,
    chunk: int = 8192,
    key: str = "sae_train.corpus_file",
    progress: bool = True,
) -> tuple[MatryoshkaTopKSAE, dict[str, Any]]:
    """Train on ``encode``'s embeddings of the file's captions and on ``extra`` embeddings (e.g.
    the prompt corpus, one more chunk per epoch): ``epochs`` passes, each chunk shuffled.

    The first chunk initialises ``b_pre`` and the input scale. The ragged end of each chunk
    is dropped (tiny batches give noisy FVU denominators), so is a chunk smaller than a batch.
    """
    check_int("epochs", epochs, 1)
    check_int("chunk", chunk, 1)
    n_file = count_captions(path, key)
    n_extra = 0 if extra is None else extra.shape[0]
    bs = cfg.batch_size
    full, tail = divmod(n_file, chunk)
    per_epoch = full * (chunk // bs) + tail // bs + n_extra // bs
    if per_epoch == 0:
        raise ValueError(
            f"{key}: {n_file + n_extra} captions do not fill one batch of {bs} "
            "(sae_train.batch_size)"
        )
    total = epochs * per_epoch
    sae = MatryoshkaTopKSAE(cfg)
    opt = make_optimizer(sae)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(cfg, total))
    gen = torch.Generator().manual_seed(cfg.seed)
    hist: dict[str, Any] = {"step": [], "fvu": [], "dead_fraction": []}
    step = seen = 0
    t0 = time.perf_counter()

    def chunks() -> Iterator[Tensor]:
        if extra is not None:
            yield extra
        for captions in caption_chunks(path, chunk, key):
            with torch.no_grad():  # not around the yield: the SAE step needs autograd
                emb = encode(captions).float()
            yield emb

    with tqdm(total=total, disable=not progress, desc="SAE on corpus", unit="step") as bar:
        for _ in range(epochs):
            for x in chunks():
                x = x.to(sae.W_dec.device)
                if not bool(sae.initialized):
                    sae.init_from_data(x)
                perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
                logs = None
                for b in range(x.shape[0] // bs):
                    logs = sae_step(sae, opt, x[perm[b * bs : (b + 1) * bs]], sched)
                    step += 1
                    seen += bs
                    bar.update(1)
                if logs is not None:
                    hist["step"].append(step)
                    hist["fvu"].append(logs["fvu"])
                    hist["dead_fraction"].append(logs["dead_fraction"])
                    bar.set_postfix(fvu=f"{logs['fvu']:.4f}")
    elapsed = time.perf_counter() - t0
    hist.update(
        steps=step,
        samples=seen,
        captions=n_file,
        seconds=elapsed,
        samples_per_s=seen / max(elapsed, EPS),
    )
    return sae.eval(), hist
