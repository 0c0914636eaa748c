"""``fairclip-export``: write plain open_clip weights from a fairclip run, checkpoint or any
loadable model (``conf/export.yaml``)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from fairclip.loading import load_model
from fairclip.model.factory import export_open_clip
from fairclip.runtime import CONF_DIR


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    bundle = load_model(
        str(cfg.model.name), pretrained=cfg.model.pretrained, config_file=cfg.model.config_file
    )
    out = export_open_clip(bundle.model, bundle.name, cfg.out)
    print(f"exported {bundle.name} to {out} (load with open_clip 'local-dir:{out}')")


if __name__ == "__main__":
    main()
