"""``fairclip-eval``: bias evaluation of one model, or a comparison of reports
(``conf/eval.yaml``)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from fairclip.eval.run import evaluate_config
from fairclip.runtime import CONF_DIR


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate_config(cfg)


if __name__ == "__main__":
    main()
