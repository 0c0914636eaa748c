"""``fairclip-train``: fine-tune a CLIP/SigLIP model (``conf/train.yaml``)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from fairclip.runtime import CONF_DIR, sweep_job_scope
from fairclip.training import train


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    with sweep_job_scope():
        metrics = train(cfg)
    # a scalar for Hydra sweepers (e.g. Optuna): zero-shot accuracy when available
    return metrics.get("val/acc")


if __name__ == "__main__":
    main()
