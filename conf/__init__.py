"""fairclip's Hydra configs, installed as the package ``fairclip.conf`` (see pyproject.toml)."""
