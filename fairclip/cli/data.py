"""``fairclip-data``: write WebDataset shards from a source (``conf/shards.yaml``; the
``source`` group: the synthetic benchmark or a face dataset's label files)."""

from __future__ import annotations

import time

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fairclip.data.adapters import ADAPTERS
from fairclip.data.synthetic import write_synthetic
from fairclip.runtime import CONF_DIR


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="shards")
def main(cfg: DictConfig) -> None:
    source = HydraConfig.get().runtime.choices["source"]
    start = time.perf_counter()
    written = write_synthetic(cfg) if source == "synthetic" else ADAPTERS[source](cfg)
    seconds = round(time.perf_counter() - start, 1)
    print(OmegaConf.to_yaml({"out": str(cfg.out), "samples": written, "seconds": seconds}))


if __name__ == "__main__":
    main()
