"""``fairclip-heads``: audit the vision tower's attention heads for group information, and
ablate the top ones against a layer-matched random control (``conf/heads.yaml``)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from fairclip.eval.head_audit import audit_config
from fairclip.runtime import CONF_DIR


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="heads")
def main(cfg: DictConfig) -> None:
    # returns None: a console script exits with main()'s value
    audit_config(cfg)


if __name__ == "__main__":
    main()
