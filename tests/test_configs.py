"""Every option of every config group composes and instantiates through the code path that
uses it: fairclip-train's ``build`` for the training groups, the method builders and the
bias-prompt reader of fairclip-debias, the eval spec of fairclip-eval, the Slurm and local
launchers, and fairclip-data's adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from fairclip.cli.data import main as data_main
from fairclip.data.adapters import ADAPTERS
from fairclip.eval.method_context import MethodContext
from fairclip.eval.method_table import method_builders
from fairclip.eval.spec import spec_from_cfg
from fairclip.model.factory import create_model, export_open_clip
from fairclip.runtime import CONF_DIR
from fairclip.training import build
from tests.conftest import compose_entry, run_app, small_run_overrides

CONF = Path(CONF_DIR)
# The app whose config uses each group (a group several apps share is tested in one of them).
GROUP_APP = {
    "balance": "train",
    "callbacks": "train",
    "data": "train",
    "experiment": "train",
    "hydra": "train",
    "hydra/launcher": "train",
    "logger": "train",
    "model": "train",
    "module": "train",
    "paths": "train",
    "trainer": "train",
    "debias": "debias_compare",
    "methods": "debias_compare",
    "prompts": "eval",
    "protocol": "eval",
    "source": "shards",
}
# The dataset vocabulary each prompt set and debias set is written for.
DATA_FOR = {
    "synthetic": "synthetic",
    "synthetic_per_class": "synthetic",
    "social": "fairface",
    "fairface": "fairface",
    "utkface": "utkface",
    "celeba": "celeba",
    "celeba_blond": "celeba_blond",
    "celeba_hair": "celeba_hair",
    "waterbirds": "waterbirds",
}
# The table attribute a debias set is written for, where it is not gender.
ATTRIBUTE_FOR = {"waterbirds": "background"}


def _assert_spec_makes(spec: Any, source: str, key: str) -> None:
    """A protocol column ``key`` under ``source`` is a metric the eval spec computes."""
    metric, _, rest = key.partition("@")
    if source == "skew":
        k, _, target = rest.split("/")
        ks = [*spec.skew_ks, *(["all"] if spec.whole_ranking else [])]
        assert metric in ("maxskew", "ndkl") and target in spec.targets
        assert (int(k) if k != "all" else k) in ks
    elif source == "folds.retrieval":
        assert spec.folds is not None and metric in ("kl", "maxskew", "precision")
        assert int(rest.split("/")[0]) == spec.folds.k
    else:
        assert source in ("zeroshot", "folds.zeroshot"), source
        assert key in ("acc", "wg_acc/{attribute}", "worst_group_acc/{attribute}")


def config_groups() -> dict[str, list[str]]:
    """``group -> options``: every folder of conf/ holding YAML files, recursively."""
    groups = {}
    for folder in sorted(p for p in CONF.rglob("*") if p.is_dir() and "__pycache__" not in p.parts):
        options = sorted(f.stem for f in folder.glob("*.yaml"))
        if options:
            groups[folder.relative_to(CONF).as_posix()] = options
    return groups


# folders of shared fragments that other options of their group pull in by their defaults
FRAGMENTS = {"hydra/job_logging", "debias/sets"}
OPTIONS = [(g, o) for g, opts in config_groups().items() for o in opts if g not in FRAGMENTS]


def test_every_config_group_has_an_app() -> None:
    """A new group of conf/ must be added to GROUP_APP, so the test below covers it."""
    assert set(config_groups()) - FRAGMENTS == set(GROUP_APP)


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Weights files of the packaged architectures at random init, for configs that lock a
    pretrained tower (the LiT experiments name a file a previous demo run writes)."""
    out = tmp_path_factory.mktemp("weights")
    files = {}
    for name in ("fairclip-tiny", "fairclip-minilm"):
        folder = export_open_clip(create_model(name).model, name, out / name)
        files[name] = next(folder.glob("*.safetensors"))
    return files


@pytest.fixture(scope="module")
def mild_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic split with a mild association, on which M4 is feasible."""
    out = tmp_path_factory.mktemp("mild")
    run_app(
        data_main,
        ["source=synthetic", f"out={out}", "train_size=1000", "shard_size=250", "eval_size=240",
         "eval_shard_size=60", "neutral_size=60", "val_size=60", "synthetic.association=0.6"],
    )  # fmt: skip
    return out


def _offline_model(cfg: DictConfig, weights: dict[str, Path]) -> None:
    """Hub weights (``pretrained: openai``) are not reachable in tests: the same architecture
    at random init. A locked tower needs a weights file (the LiT experiments ask for the
    export of an earlier run): random weights of the same architecture."""
    pretrained = cfg.model.get("pretrained")
    locked = cfg.module.get("lock_image") or cfg.module.get("lock_text")
    with open_dict(cfg):
        if pretrained and not Path(str(pretrained)).suffix:
            cfg.model.pretrained = None
        if locked and not cfg.model.pretrained:
            cfg.model.pretrained = str(weights[cfg.model.name])


def _train_option(
    group: str, option: str, data: dict[str, Path], out: Path, weights: dict[str, Path]
) -> None:
    # M4 runs on the mildly biased data: at the options' eta the fixture's is infeasible
    balancing = (group == "balance" and option != "none") or option == "demo_m4"
    overrides = small_run_overrides(data["mild" if balancing else "biased"])
    if group == "experiment":
        overrides = [o for o in overrides if not o.startswith("experiment=")]
    if group == "data" and option != "synthetic":  # face data: its own vocabulary, no shards
        overrides = [o for o in overrides if not o.startswith("data.")]
    if group == "logger":
        overrides = [o for o in overrides if not o.startswith("logger=")]
    overrides.append(f"{group}={option}")
    if balancing:  # not beside the shared fixture data
        overrides.append(f"++balance.output={out}/balanced")
    if (group, option) == ("balance", "m4"):  # the synthetic age shares: feasible up to ~0.7
        overrides.append("balance.eta=0.5")
    cfg = compose_entry("train", overrides, out)
    if group == "hydra/launcher":  # what Hydra instantiates when a sweep starts
        launcher = hydra.utils.get_class(cfg.hydra.launcher._target_)
        assert launcher.__name__ == {"slurm": "SlurmLauncher", "local": "BasicLauncher"}[option]
        if option == "slurm":  # the basic launcher refuses declarative instantiation
            assert hydra.utils.instantiate(cfg.hydra.launcher).params["timeout_min"] > 0
        return
    if cfg.trainer.accelerator == "gpu":  # this machine has none: the rest as configured
        with open_dict(cfg):
            cfg.trainer.accelerator = "cpu"
    _offline_model(cfg, weights)
    module, datamodule, trainer = build(cfg)
    assert module.model is not None and trainer is not None
    assert datamodule.batch_size == cfg.data.batch_size
    if balancing:
        assert Path(cfg.data.train_shards, "sizes.json").is_file()


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_instantiates(
    group: str,
    option: str,
    synthetic_dir: Path,
    mild_data: Path,
    tmp_path: Path,
    random_weights: dict[str, Path],
) -> None:
    app = GROUP_APP.get(group)
    if app is None:  # hydra/job_logging: applied by Hydra itself when an app starts
        assert "handlers" in OmegaConf.load(CONF / group / f"{option}.yaml")
        return
    if app == "train":
        data = {"biased": synthetic_dir, "mild": mild_data}
        _train_option(group, option, data, tmp_path, random_weights)
    elif app == "debias_compare":
        overrides = ["model.name=fairclip-tiny", f"output_dir={tmp_path}"]
        if group == "methods":
            cfg = compose_entry("debias_compare", [*overrides, f"methods=[{option}]"], tmp_path)
            methods = method_builders(cfg)
            assert list(methods) == [option] and callable(methods[option].build)
        else:
            data = DATA_FOR[option]
            cfg = compose_entry(
                "debias_compare",
                [
                    *overrides,
                    f"debias={option}",
                    f"data={data}",
                    f"prompts={data}",
                    f"attribute={ATTRIBUTE_FOR.get(option, 'gender')}",
                ],  # fmt: skip
                tmp_path,
            )
            ctx = MethodContext(cfg, None, torch.device("cpu"))  # type: ignore[arg-type]
            # every attribute the set debiases has prompts and Orth words for each data value
            covered = [a for a in cfg.data.attributes if a in cfg.debias.bias_prompts]
            assert cfg.attribute in covered
            prompts, words = ctx.bias_prompts(covered), ctx.group_words(covered)
            for attr in covered:
                assert set(prompts[attr]) == set(words[attr]) == set(cfg.data.attributes[attr])
            classes = ctx.class_prompts()
            assert set(classes) == {str(c) for c in cfg.debias.classes}
            if data != "synthetic":  # the real-data sets are at the SEM authors' scale
                assert len(set(ctx.prompt_list("reference_prompts"))) >= 300
                assert all(len(p) >= 20 for v in prompts.values() for p in v.values())
                assert all(len(p) == 10 for p in classes.values())
    elif group == "protocol":  # a paper's protocol sets the ks and targets of both apps
        cfg = compose_entry("eval", ["model.name=fairclip-tiny", f"protocol={option}"], tmp_path)
        spec = spec_from_cfg(cfg)
        assert cfg.protocol.name == option and list(spec.skew_ks) == list(cfg.skew_ks)
        assert list(spec.targets) == list(cfg.targets)
        for table in cfg.protocol.tables.values():  # every column is a metric the spec makes
            for key in table.columns.values():
                _assert_spec_makes(spec, str(table.source), str(key))
        compare = compose_entry(
            "debias_compare", ["model.name=fairclip-tiny", f"protocol={option}"], tmp_path
        )
        assert compare.table_k == cfg.table_k and compare.target in spec.targets
    elif app == "eval":
        data = DATA_FOR[option]
        cfg = compose_entry(
            "eval", ["model.name=fairclip-tiny", f"prompts={option}", f"data={data}"], tmp_path
        )
        spec = spec_from_cfg(cfg)
        assert spec.query_sets and set(spec.attributes) == set(cfg.data.attributes)
    else:  # shards: the adapter the source names reads its config
        GlobalHydra.instance().clear()
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            cfg = compose("shards", [f"source={option}", f"out={tmp_path}"])
        OmegaConf.to_container(cfg, resolve=True)
        assert option == "synthetic" or option in ADAPTERS
