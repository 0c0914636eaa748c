"""``fairclip-balance``: balance training shards with M4 or the group-balanced baseline
(``conf/balance.yaml``)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from fairclip.balance.pipeline import (
    balance_shards,
    balance_table_file,
    is_table,
    summarize_balance,
)
from fairclip.runtime import CONF_DIR


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="balance")
def main(cfg: DictConfig) -> None:
    if cfg.balance.method == "none":
        print("balance.method=none: nothing to do")
        return
    if is_table(cfg.input):
        out = balance_table_file(cfg.balance, cfg.input, cfg.get("table"))
        print(summarize_balance(out, out))
        return
    print(summarize_balance(balance_shards(cfg.balance, cfg.input)))


if __name__ == "__main__":
    main()
