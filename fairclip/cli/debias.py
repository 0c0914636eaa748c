"""``fairclip-debias``: one table comparing debiasing methods on one model
(``conf/debias_compare.yaml``; the rows are the ``methods`` group)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from fairclip.eval.method_table import compare_methods
from fairclip.runtime import CONF_DIR


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="debias_compare")
def main(cfg: DictConfig) -> None:
    compare_methods(cfg)


if __name__ == "__main__":
    main()
