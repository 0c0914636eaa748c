"""`fairclip-data <source> key=value ...`: write WebDataset shards.

Sources: ``synthetic`` (the embedded benchmark) and the label-file adapters registered in
:data:`fairclip.data.adapters.ADAPTERS`. Options are Hydra overrides of
``conf/datagen/<source>.yaml`` so config errors name the key.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from fairclip.data.shards import write_shards
from fairclip.data.synthetic import SyntheticConfig, generate_samples
from fairclip.runtime import CONF_DIR


def write_synthetic(cfg: DictConfig) -> dict[str, int]:
    """Generate the requested synthetic splits into ``cfg.out/<split>/``."""
    synth = SyntheticConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.synthetic.items()}
    )
    sizes = {
        "train": cfg.train_size,
        "eval": cfg.eval_size,
        "neutral": cfg.neutral_size,
        "val": cfg.val_size,
    }
    written = {}
    for split in cfg.splits:
        if split not in sizes:
            raise ValueError(
                f"splits: unknown split {split!r}, expected a subset of {sorted(sizes)}"
            )
        if not isinstance(sizes[split], int) or sizes[split] <= 0:
            raise ValueError(f"{split}_size={sizes[split]!r}: expected a positive integer")
        shard_size = cfg.shard_size if split == "train" else cfg.eval_shard_size
        shards = write_shards(
            generate_samples(split, int(sizes[split]), synth),
            Path(cfg.out) / split,
            prefix=split,
            shard_size=shard_size,
            total=int(sizes[split]),
        )
        written[split] = sum(s.size for s in shards)
    return written


def available_sources() -> list[str]:
    return sorted(p.stem for p in Path(CONF_DIR, "datagen").glob("*.yaml"))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    sources = available_sources()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in sources:
        given = f"unknown source {argv[0]!r}. " if argv and argv[0] not in ("-h", "--help") else ""
        print(
            f"{given}usage: fairclip-data {{{','.join(sources)}}} [key=value ...]", file=sys.stderr
        )
        raise SystemExit(2 if given or not argv else 0)
    source, overrides = argv[0], argv[1:]
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=f"datagen/{source}", overrides=overrides)
    start = time.perf_counter()
    if source == "synthetic":
        written = write_synthetic(cfg)
    else:
        from fairclip.data.adapters import ADAPTERS

        written = ADAPTERS[source](cfg)
    print(
        OmegaConf.to_yaml(
            {
                "out": str(cfg.out),
                "samples": written,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
