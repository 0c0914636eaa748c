"""`fairclip-debias model=<run dir>`: one table comparing debiasing methods.

Why one command: every row (plain CLIP, Orth-Proj, SEM_i, SEM_b, SEM_bi, ...) is a
:class:`DebiasedCLIP` built from the same trained model and judged by the same
:func:`evaluate_model`, so the numbers are comparable by construction.

Adding a row (e.g. joint V-L heads, attention-head ablation) from another module::

    # fairclip/debias/joint.py
    from fairclip.debias.compare import CompareContext, register_method
    from fairclip.debias.pipeline import DebiasedCLIP

    @register_method("joint_vl")
    def build_joint(bundle, ctx: CompareContext) -> DebiasedCLIP:
        heads = ...  # fit with ctx.encode / ctx.cfg / ctx.prompt_list(...)
        return DebiasedCLIP(bundle.model, bundle.name, text=[...], image=[...])

then list it: ``methods=[clip,orth_proj,sem_i,sem_b,sem_bi,joint_vl]``. Modules listed in
:data:`PLUGIN_MODULES` are imported at the end of this file when they exist, and the builder
functions named there are registered for them (``joint_vl``, ``head_ablation``, ...). The
context is also a read-only mapping (see :class:`CompareContext`), so a builder may read
``ctx["train_shards"]``/``ctx.get("epochs", 10)``; method options come from the config key
``context`` (``+context.epochs=5``).
"""

from __future__ import annotations

import importlib
import itertools
import logging
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from fairclip.data.shards import atomic_write_text, list_shards, read_captions
from fairclip.debias.orth import fit_orth_proj, score_gap_split
from fairclip.debias.pipeline import DebiasedCLIP
from fairclip.debias.sae import MatryoshkaTopKSAE, SAEConfig, load_sae, sae_metrics, train_sae
from fairclip.debias.sem import fit_sem, flagged_lean_share
from fairclip.evaluate import (
    ImageCache,
    encode_prompts,
    evaluate_model,
    resolve_device,
    sibling_split,
    spec_from_cfg,
    warn_if_ks_cover_split,
)
from fairclip.evaluate import resolve_splits as _resolve_splits
from fairclip.model.factory import ModelBundle, ModelKeys, load_model
from fairclip.report.io import DEBIAS_TABLE_SCHEMA, to_json
from fairclip.runtime import CONF_DIR

log = logging.getLogger(__name__)

Builder = Callable[[ModelBundle, "CompareContext"], DebiasedCLIP]
METHODS: dict[str, Builder] = {}
# module -> {row name: builder function name}, imported when present (see _load_plugins)
PLUGIN_MODULES: dict[str, dict[str, str]] = {
    "fairclip.debias.joint": {
        "joint_vl": "build_joint",
        "joint_vl_image": "build_joint_image_only",
        "joint_vl_text": "build_joint_text_only",
    },
    "fairclip.debias.heads": {
        "head_ablation": "build_head_ablation",
        "head_ablation_random": "build_random_head_ablation",
    },
}
SAE_FILE = Path("sae") / "text_sae.safetensors"
DEPTH_PLOT = "compare_depth.png"


# Rows whose builder uses no randomness: over several seeds they are evaluated once.
SEEDLESS: set[str] = set()


def register_method(name: str, seeded: bool = True) -> Callable[[Builder], Builder]:
    """Decorator: add a row builder ``(bundle, ctx) -> DebiasedCLIP`` under ``name``.

    ``seeded=False`` says the row is the same for every seed, so ``seeds=[...]`` evaluates
    it once instead of once per seed.
    """

    def wrap(fn: Builder) -> Builder:
        METHODS[name] = fn
        if not seeded:
            SEEDLESS.add(name)
        return fn

    return wrap


def expand_prompts(spec: Any, key: str) -> list[str]:
    """A prompt list from a list of strings, or ``{templates, words}`` (or a list of those):
    every template formatted with every combination of its placeholder words."""
    if OmegaConf.is_config(spec):
        spec = OmegaConf.to_container(spec, resolve=True)
    if isinstance(spec, Mapping):
        templates = spec.get("templates")
        words = spec.get("words") or {}
        if not templates or not isinstance(words, Mapping):
            raise ValueError(f"{key}: expected {{templates: [...], words: {{name: [...]}}}}")
        names = list(words)
        lists = [_flatten(words[n]) for n in names]
        out = []
        for t in templates:
            used = [i for i, n in enumerate(names) if "{" + n + "}" in t]
            for combo in itertools.product(*(lists[i] for i in used)):
                out.append(t.format(**{names[i]: w for i, w in zip(used, combo, strict=True)}))
        return list(dict.fromkeys(out))
    if isinstance(spec, list | tuple):
        if all(isinstance(s, str) for s in spec):
            return list(spec)
        out = []
        for i, item in enumerate(spec):
            out.extend([item] if isinstance(item, str) else expand_prompts(item, f"{key}[{i}]"))
        return list(dict.fromkeys(out))
    raise ValueError(f"{key}: expected a list of prompts or {{templates, words}}, got {spec!r}")


def read_corpus_file(path: str | Path, key: str) -> list[str]:
    """Captions of a UTF-8 text file, one per line (blank lines skipped): a general text corpus
    for the SAE of a real CLIP, which needs far more text than prompt templates give."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{key}={str(path)!r}: no such file (expected UTF-8 text, one caption per line)"
        )
    lines = []
    with path.open("rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as err:
                raise ValueError(f"{key}: {path}:{i} is not UTF-8 ({err.reason})") from err
            if line:
                lines.append(line)
    if not lines:
        raise ValueError(f"{key}: {path} holds no caption (expected one per line)")
    return lines


def _flatten(value: Any) -> list[str]:
    if isinstance(value, list | tuple):
        return [w for v in value for w in _flatten(v)]
    return [str(value)]


@dataclass(eq=False)
class CompareContext(Mapping[str, Any]):
    """What builders share: the composed config, a text encoder, and a lazily trained SAE.

    It is also a read-only mapping (``ctx["train_shards"]``, ``ctx.get("seed")``) over
    :attr:`options`: ``attributes``, ``concepts``, ``attribute``, ``spec``, ``splits``,
    ``eval_shards``, ``neutral_shards``, ``train_shards``, ``seed``, ``batch_size``,
    ``group_prompts`` and everything under the config key ``context`` (method options, e.g.
    ``+context.epochs=5``), so builders written against a plain dict work unchanged.
    """

    cfg: DictConfig
    bundle: ModelBundle
    device: torch.device
    run_dir: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)
    sae_info: dict[str, Any] = field(default_factory=dict)
    # embeddings that do not depend on the seed (SAE corpus, image samples), shared by the
    # contexts of one run so that a multi-seed table encodes them once
    cache: dict[str, torch.Tensor] = field(default_factory=dict)
    # the base model's eval image embeddings, reused by every row that leaves images alone
    images: ImageCache = field(default_factory=ImageCache)
    _sae: MatryoshkaTopKSAE | None = None
    _lean_basis: tuple[torch.Tensor, torch.Tensor] | None = None

    def __getitem__(self, key: str) -> Any:
        try:
            return self.options[key]
        except KeyError:
            raise KeyError(
                f"compare context has no {key!r}; set it with +context.{key}=..."
            ) from None

    def __iter__(self):
        return iter(self.options)

    def __len__(self) -> int:
        return len(self.options)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings of the *base* model (interventions fit on these)."""
        return encode_prompts(self.bundle.model, self.bundle.tokenizer, list(prompts), self.device)

    def prompt_list(self, key: str) -> list[str]:
        """An expanded prompt list of ``cfg.debias.<key>``."""
        return expand_prompts(self.cfg.debias[key], f"debias.{key}")

    def bias_prompts(
        self, attributes: Sequence[str] | None = None
    ) -> dict[str, dict[str, list[str]]]:
        """Bias prompts of ``attributes`` (default: ``debias_attributes``, the ones the methods
        debias)."""
        raw = self.cfg.debias.bias_prompts
        chosen = self.cfg.debias_attributes if attributes is None else attributes
        wanted = [str(a) for a in chosen]
        missing = [a for a in wanted if a not in raw]
        if missing:
            raise ValueError(
                f"debias_attributes={wanted}: debias.bias_prompts has no prompts for {missing} "
                f"(it has {list(raw)})"
            )
        data_attrs = self.cfg.data.attributes
        for attr in wanted:
            values, expected = list(raw[attr]), list(data_attrs.get(attr, []))
            if attr in data_attrs and set(values) != set(expected):
                raise ValueError(
                    f"debias.bias_prompts.{attr}: prompts for {values}, but "
                    f"data.attributes.{attr}={expected} (pick the debias set of this dataset, "
                    "e.g. debias=utkface for UTKFace's race groups)"
                )
        return {
            attr: {v: expand_prompts(p, f"debias.bias_prompts.{attr}.{v}") for v, p in vals.items()}
            for attr, vals in raw.items()
            if attr in wanted
        }

    def class_prompts(self) -> dict[str, list[str]]:
        templates = list(self.cfg.debias.class_templates)
        return {str(c): [t.format(c) for t in templates] for c in self.cfg.debias.classes}

    def class_prompt_list(self) -> list[str]:
        """The prompts the lean is measured on: the zero-shot class prompts (every template x
        concept) for ``query_set=concepts``, else the table's query set's queries."""
        spec = self.options.get("spec") or spec_from_cfg(_eval_view(self.cfg))
        if str(self.cfg.query_set) == "concepts":
            return [t.format(c) for c in spec.concepts for t in spec.zero_shot_templates]
        return list(query_set(spec, str(self.cfg.query_set)).prompts)

    def lean_basis(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What the class-prompt lean is measured against, encoded once per context.

        ``(directions [V, D], base [P, D])``: per value of ``cfg.attribute``, its bias
        prompts' mean minus the other values' mean, and the base model's class prompts (unit
        embeddings). None without bias prompts for >= 2 values of the attribute. Measured on
        the table's attribute whatever ``debias_attributes`` the methods use.
        """
        if self._lean_basis is None:
            attr = str(self.cfg.attribute)
            if attr not in self.cfg.debias.bias_prompts:
                return None
            values = self.bias_prompts([attr])[attr]
            prompts = self.class_prompt_list()
            if len(values) < 2 or not prompts:
                return None
            means = torch.stack([self.encode(p).mean(0) for p in values.values()])
            others = (means.sum(0, keepdim=True) - means) / (len(means) - 1)
            self._lean_basis = (means - others, self.encode(prompts))
        return self._lean_basis

    @property
    def sae(self) -> MatryoshkaTopKSAE:
        if self._sae is None:
            self._sae = self._load_or_train_sae()
        return self._sae

    def _load_or_train_sae(self) -> MatryoshkaTopKSAE:
        choice = str(self.cfg.sae)
        corpus = self.prompt_list("sae_corpus")
        captions = int(self.cfg.sae_train.caption_samples)
        if captions > 0:
            found = read_captions(self.cfg.data.train_shards, captions, "data.train_shards")
            if not found:
                raise ValueError(
                    f"sae_train.caption_samples={captions}: data.train_shards="
                    f"{self.cfg.data.train_shards!r} has no .txt captions"
                )
            corpus += found
        corpus_file = self.cfg.sae_train.get("corpus_file")
        if corpus_file:
            corpus += read_corpus_file(corpus_file, "sae_train.corpus_file")
        corpus = list(dict.fromkeys([*corpus, *self.prompt_list("reference_prompts")]))
        if len(corpus) > 10_000:
            log.info("encoding %d prompts for the SAE", len(corpus))
        text = self._cached("sae_corpus", lambda: self.encode(corpus))
        if choice == "auto" and self.run_dir is not None and (self.run_dir / SAE_FILE).is_file():
            choice = str(self.run_dir / SAE_FILE)
        if choice != "auto":
            sae = load_sae(choice, device=self.device)
            if sae.cfg.d_in != text.shape[1]:
                raise ValueError(
                    f"sae={choice!r}: d_in={sae.cfg.d_in} but the model's text embeddings "
                    f"have {text.shape[1]} dims"
                )
            self.sae_info["source"] = choice
        else:
            st = self.cfg.sae_train
            data = text
            if st.image_samples > 0:
                n = int(st.image_samples)
                data = torch.cat([text, self._cached("images", lambda: self._image_embeddings(n))])
            sae_cfg = SAEConfig(
                d_in=text.shape[1],
                n_latents=int(st.n_latents),
                k_levels=tuple(st.k_levels) if st.k_levels else None,
                epochs=int(st.epochs),
                batch_size=int(st.batch_size),
                lr=float(st.lr),
                seed=int(self.options.get("seed", self.cfg.seed)),
            )
            sae, _ = train_sae(data, sae_cfg, progress=False)
            self.sae_info["source"] = f"trained on {data.shape[0]} embeddings"
        self.sae_info.update(
            {k: v for k, v in sae_metrics(sae, text).items() if k in _SAE_KEYS},
            corpus_prompts=len(corpus),
        )
        return sae.eval()

    def _cached(self, key: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    @torch.no_grad()
    def _eval_batches(self) -> Iterator[tuple[torch.Tensor, dict]]:
        """(unit image embeddings of the base model, batch) over the eval split, in order."""
        from fairclip.data.samples import CaptionCollate, SampleDecoder
        from fairclip.data.stream import ShardStream

        spec = self.options.get("spec") or spec_from_cfg(_eval_view(self.cfg))
        decode = SampleDecoder(
            self.bundle.preprocess_val, spec.attributes, spec.concepts, spec.label_key,
            require_caption=False,
        )  # fmt: skip
        stream = ShardStream(
            list_shards(self.cfg.splits.eval, "splits.eval"), decode,
            CaptionCollate(self.bundle.tokenizer), 256, train=False, num_workers=0,
            config_key="splits.eval",
        )  # fmt: skip
        for batch in stream:
            img = self.bundle.model.encode_image(batch["image"].to(self.device), normalize=True)
            yield img.float(), batch

    def _image_embeddings(self, n: int) -> torch.Tensor:
        out, seen = [], 0
        for img, _ in self._eval_batches():
            out.append(img)
            seen += img.shape[0]
            if seen >= n:
                break
        return torch.cat(out)[:n]

    def score_gap(self) -> dict[str, float] | None:
        """:func:`score_gap_split` of the base model on the eval split, for ``cfg.attribute``
        (None without concept labels or bias prompts for the attribute)."""
        basis = self.lean_basis()
        spec = self.options.get("spec") or spec_from_cfg(_eval_view(self.cfg))
        if basis is None or str(self.cfg.query_set) != "concepts":
            return None
        directions, base = basis
        attr = list(spec.attributes).index(str(self.cfg.attribute))
        images, concepts, groups = [], [], []
        for img, batch in self._eval_batches():
            images.append(img)
            concepts.append(batch["concept"])
            groups.append(batch["groups"][:, attr])
        per_template = base.reshape(len(spec.concepts), len(spec.zero_shot_templates), -1)
        class_emb = torch.nn.functional.normalize(per_template.mean(1), dim=-1)
        return score_gap_split(
            class_emb, torch.cat(images), torch.cat(concepts).to(self.device),
            torch.cat(groups).to(self.device), directions,
        )  # fmt: skip


_SAE_KEYS = ("fvu", "cos", "l0", "dead_fraction", "dead_fraction_inference")


# -- built-in rows -------------------------------------------------------------------------------
@register_method("clip", seeded=False)
def build_clip(bundle: ModelBundle, ctx: CompareContext) -> DebiasedCLIP:
    """The model as trained (no intervention)."""
    return DebiasedCLIP(bundle.model, bundle.name)


@register_method("orth_proj", seeded=False)
def build_orth_proj(bundle: ModelBundle, ctx: CompareContext) -> DebiasedCLIP:
    """Chuang et al. 2023: project the group directions out of text embeddings."""
    oc = ctx.cfg.debias.orth_proj
    proj = fit_orth_proj(
        ctx.encode, ctx.bias_prompts(), rank=oc.rank, rel_tol=float(oc.rel_tol),
        key="debias.orth_proj",
    )  # fmt: skip
    return DebiasedCLIP(bundle.model, bundle.name, text=[proj])


def _sem_builder(variant: str) -> Builder:
    def build(bundle: ModelBundle, ctx: CompareContext) -> DebiasedCLIP:
        sem = fit_sem(
            variant,
            ctx.sae,
            ctx.encode,
            ctx.prompt_list("reference_prompts"),
            bias_prompts=ctx.bias_prompts() if variant != "i" else None,
            class_prompts=ctx.class_prompts() if variant != "b" else None,
            match_threshold=float(ctx.cfg.debias.match_threshold),
            keep_residual=bool(ctx.cfg.debias.keep_residual),
            key="debias",
        )
        basis = ctx.lean_basis()
        if variant != "i" and basis is not None:
            directions, base = basis
            ctx.sae_info["flagged_lean_share"] = flagged_lean_share(sem, base, directions)
        return DebiasedCLIP(bundle.model, bundle.name, text=[sem])

    build.__doc__ = f"SEM_{variant} (Guimard et al. 2026) on the model's text SAE."
    return build


for _v in ("i", "b", "bi"):
    register_method(f"sem_{_v}")(_sem_builder(_v))


# -- table -------------------------------------------------------------------------------------
def query_set(spec: Any, name: str) -> Any:
    """The eval spec's query set ``name`` (the config key ``query_set``), or a clear error."""
    found = {qs.name: qs for qs in spec.query_sets}
    if name not in found:
        raise ValueError(
            f"query_set={name!r}: the prompts have no such query set, expected one of "
            f"{sorted(found)} (prompts.query_sets)"
        )
    return found[name]


def summarize(
    report: Mapping[str, Any],
    attribute: str,
    target: str,
    k: int,
    recall_k: int,
    queries: str = "concepts",
) -> dict[str, float]:
    """The table's columns from an evaluate_model report; skew of the query set ``queries``."""
    m = report["metrics"]
    zs, skew = m.get("zeroshot", {}), m.get("skew", {}).get(queries, {})
    able, bias, rec = m.get("able", {}), m.get("bias", {}), m.get("retrieval", {})
    nan = float("nan")
    return {
        "acc": zs.get("acc", nan),
        "worst_group_acc": zs.get(f"worst_group_acc/{attribute}", nan),
        "worst_class_group_acc": zs.get(f"worst_class_group_acc/{attribute}", nan),
        "class_group_gap": zs.get(f"class_group_gap/{attribute}", nan),
        f"maxskew@{k}": skew.get(f"maxskew@{k}/{attribute}/{target}", nan),
        f"ndkl@{k}": skew.get(f"ndkl@{k}/{attribute}/{target}", nan),
        f"able@{k}": able.get(f"able@{k}/{attribute}/{target}", nan),
        "cramers_v": bias.get(f"cramers_v/{attribute}", nan),
        f"i2t_R@{recall_k}": rec.get(f"i2t_R@{recall_k}", nan),
        f"t2i_R@{recall_k}": rec.get(f"t2i_R@{recall_k}", nan),
    }


@torch.no_grad()
def class_lean(model: DebiasedCLIP, bundle: ModelBundle, ctx: CompareContext) -> float:
    """Mean lean of the class prompts along ``cfg.attribute``'s bias-prompt directions.

    Each (prompt, value) lean is signed by the base model's, so the clip row reads the mean
    |lean| and a method reads lower when it removes the lean (negative: flipped it). A text-
    side diagnostic: how far each class prompt sits toward one group. NaN without bias prompts.
    """
    basis = ctx.lean_basis()
    if basis is None:
        return float("nan")
    directions, base = basis
    emb = encode_prompts(model, bundle.tokenizer, ctx.class_prompt_list(), ctx.device)
    return float(((emb @ directions.T) * (base @ directions.T).sign()).mean())


def skew_by_depth(
    report: Mapping[str, Any],
    attribute: str,
    target: str,
    ks: Sequence[int],
    queries: str = "concepts",
) -> dict[str, float]:
    """MaxSkew@k and NDKL@k of the query set ``queries`` at every depth ``k`` of ``ks``.

    Why: one k hides where in the ranking a method moves the groups; on the demo the top of a
    concept's ranking is counter-stereotypical and its tail stereotypical, so a text-side fix
    that flattens the tail (MaxSkew@300) can make the top one-sided (MaxSkew@10).
    """
    skew = report["metrics"].get("skew", {}).get(queries, {})
    nan = float("nan")
    return {
        f"{name}@{k}": skew.get(f"{name}@{k}/{attribute}/{target}", nan)
        for name in ("maxskew", "ndkl")
        for k in ks
    }


def markdown_table(rows: Mapping[str, Mapping[str, float]], sae_info: Mapping[str, Any]) -> str:
    lines = _rows_markdown(rows)
    if sae_info:
        lines.append("")
        lines.append(
            "SAE (text, SEM rows): "
            + ", ".join(
                f"{k}={_fmt(v) if isinstance(v, float) else v}" for k, v in sae_info.items()
            )
        )
    return "\n".join(lines)


def _rows_markdown(rows: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Rows as a markdown table; a column that is NaN in every row (e.g. accuracy on a face
    dataset without concepts) is left out (compare.json keeps it)."""
    cols = [
        c
        for c in next(iter(rows.values()))
        if any(not (isinstance(r[c], float) and math.isnan(r[c])) for r in rows.values())
    ]
    return [
        "| method | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
        *(
            f"| {name} | " + " | ".join(_fmt(vals[c]) for c in cols) + " |"
            for name, vals in rows.items()
        ),
    ]


def plot_skew_by_depth(
    depth: Mapping[str, Mapping[str, float]],
    ks: Sequence[int],
    path: Path,
    queries: str = "concepts",
) -> Path:
    """MaxSkew@k and NDKL@k against k, one line per method (``compare_depth.png``)."""
    from matplotlib.figure import Figure

    from fairclip.report.plots import save_figure

    fig = Figure(figsize=(9, 3.6))
    axes = fig.subplots(1, 2)
    for ax, name in zip(axes, ("maxskew", "ndkl"), strict=True):
        for method, vals in depth.items():
            ax.plot(ks, [vals[f"{name}@{k}"] for k in ks], marker="o", label=method)
        ax.set_xscale("log")
        ax.set_xticks(list(ks), [str(k) for k in ks])
        ax.set_xlabel("k (ranking depth)")
        ax.set_title(f"{'MaxSkew' if name == 'maxskew' else 'NDKL'}@k of the {queries} queries")
    axes[1].legend(fontsize=7)
    return save_figure(fig, path)


def _fmt(v: float) -> str:
    return "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.4f}"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Build and evaluate every method of ``cfg.methods``; write compare.{md,json}."""
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods: unknown {unknown}, registered: {sorted(METHODS)}")
    for key in ("table_k", "recall_k"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{key}={value!r}: expected a positive integer")
    spec = spec_from_cfg(_eval_view(cfg))
    if cfg.attribute not in spec.attributes:
        raise ValueError(f"attribute={cfg.attribute!r}: expected one of {list(spec.attributes)}")
    if str(cfg.query_set) == "concepts" and not spec.concepts:
        raise ValueError(
            "query_set=concepts: data.concepts is empty (a face dataset without concept "
            "labels); set query_set to one of the prompts' query sets: "
            f"{[q.name for q in spec.query_sets]}"
        )
    query_set(spec, str(cfg.query_set))
    torch.manual_seed(int(cfg.seed))
    device = resolve_device(cfg.device)
    pretrained = cfg.get("pretrained")
    bundle = load_model(
        str(cfg.model_path), pretrained=None if pretrained is None else str(pretrained),
        device=device, keys=ModelKeys(name="model", pretrained="pretrained", config_file=None),
    )  # fmt: skip
    path = Path(str(cfg.model_path))
    run_dir = path if path.is_dir() else None
    if path.is_file() and path.parent.name == "checkpoints":  # <run dir>/checkpoints/last.ckpt
        run_dir = path.parent.parent
    if run_dir is not None and run_dir.name == "export" and not (run_dir / SAE_FILE).exists():
        run_dir = run_dir.parent
    splits = _resolve_splits(cfg.splits.eval, cfg.splits.neutral)
    depth_ks = _depth_ks(cfg, splits["eval"])
    select = _selection_split(cfg.splits.get("select", "auto"), splits["eval"])
    options = {
        "attributes": spec.attributes,
        "concepts": spec.concepts,
        "attribute": str(cfg.attribute),
        "spec": spec,
        "splits": splits,
        "eval_shards": splits["eval"],
        "neutral_shards": splits["neutral"],
        "select_shards": select,
        "train_shards": OmegaConf.select(
            cfg, "data.train_shards", throw_on_resolution_failure=False
        ),
        "seed": int(cfg.seed),
        "batch_size": int(cfg.batch_size),
        "group_prompts": spec.group_prompts.get(str(cfg.attribute)),
        **(OmegaConf.to_container(cfg.context, resolve=True) if cfg.get("context") else {}),
    }
    out_dir = Path(cfg.output_dir)
    seeds = _seeds(cfg)
    runs: list[SeedRun] = []
    cache: dict[str, torch.Tensor] = {}
    images = ImageCache()
    for seed in seeds:
        torch.manual_seed(seed)
        ctx = CompareContext(
            cfg, bundle, device, run_dir=run_dir, options={**options, "seed": seed}, cache=cache,
            images=images,
        )  # fmt: skip
        models_dir = out_dir / "models" / (f"seed{seed}" if len(seeds) > 1 else "")
        first = runs[0] if runs else None
        runs.append(_evaluate_methods(cfg, bundle, ctx, spec, splits, depth_ks, models_dir, first))
    rows, depth, sae_info, spread = runs[0].rows, runs[0].depth, runs[0].sae, {}
    if len(seeds) > 1:
        rows = _mean_rows([r.rows for r in runs])
        depth = _mean_rows([r.depth for r in runs])
        sae_info = _mean_sae_info([r.sae for r in runs])
        spread = _spread([r.rows for r in runs])
    table = markdown_table(rows, sae_info)
    if len(seeds) > 1:
        table += _seeds_note(seeds, spread)
    selected_on = options["select_shards"] or splits["eval"]
    if any(str(m).startswith("joint") for m in cfg.methods):
        leaks = str(selected_on) == str(splits["eval"])
        leak = " (the reported split itself: set splits.select)" if leaks else ""
        depths = ", ".join(str(k) for k in spec.skew_ks)  # what the heads were scored on
        table += (
            f"\n\nJoint heads: epoch selected by ABLE averaged over k = {depths} on "
            f"{selected_on}{leak}."
        )
    result = {
        "schema": DEBIAS_TABLE_SCHEMA,
        "model": str(cfg.model_path),
        "attribute": cfg.attribute,
        "query_set": str(cfg.query_set),
        "target": cfg.target,
        "k": int(cfg.table_k),
        "selected_on": selected_on,
        "rows": rows,
        "depth_ks": depth_ks,
        "depth": depth,
        "sae": sae_info,
        "metrics": runs[0].reports,
    }
    if len(seeds) > 1:
        result["seeds"] = seeds
        result["per_seed"] = [
            {"seed": seed, "rows": r.rows, "depth": r.depth, "sae": r.sae}
            for seed, r in zip(seeds, runs, strict=True)
        ]
        result["spread"] = spread
    gap = ctx.score_gap()  # the base model's: the same in every seed's context
    if gap is not None:
        result["score_gap"] = gap
        table += _score_gap_note(gap, str(cfg.attribute))
    queries = "" if cfg.query_set == "concepts" else f", query set {cfg.query_set}"
    table += (
        f"\n\nBy ranking depth ({cfg.attribute}, {cfg.target}{queries}; plot: {DEPTH_PLOT}):\n\n"
        + "\n".join(_rows_markdown(depth))
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_skew_by_depth(depth, depth_ks, out_dir / DEPTH_PLOT, str(cfg.query_set))
    atomic_write_text(out_dir / "compare.md", table + "\n")
    atomic_write_text(out_dir / "compare.json", to_json(result) + "\n")
    _log_to_wandb(cfg, result, out_dir)
    print(table)
    return result


def _score_gap_note(gap: Mapping[str, float], attribute: str) -> str:
    return (
        f"\n\nWhere clip's {attribute} score gap lives (class prompts vs each value's images "
        f"of the class, `score_gap` in compare.json): {gap['gap']:.4f} in all; "
        f"{gap['gap_lean']:.4f} along the bias-prompt directions (the prompts' lean: what "
        f"Orth-Proj removes and SEM targets), {gap['gap_rest']:.4f} elsewhere, which cancels "
        f"{gap['offset']:.0%} of the lean (near 100%: the model is fair only because the two "
        "cancel, and removing the lean flips the gap)."
    )


def _log_to_wandb(cfg: DictConfig, result: Mapping[str, Any], out_dir: Path) -> None:
    """The table, depth table, per-seed rows and plot to a wandb run in ``out_dir`` (offline
    unless logged in), as ``fairclip-eval`` does with its report; ``wandb.enabled=false``
    turns it off."""
    w = cfg.get("wandb") or {}
    if not w.get("enabled"):
        return
    from fairclip.report.wandb_log import log_to_wandb
    from fairclip.runtime import stable_id

    settings = {
        "methods": list(cfg.methods), "attribute": str(cfg.attribute),
        "query_set": str(cfg.query_set), "target": str(cfg.target), "k": int(cfg.table_k),
        "seeds": result.get("seeds", [int(cfg.seed)]),
    }  # fmt: skip
    log_to_wandb(
        {**result, "settings": settings},
        {f"plot:{DEPTH_PLOT.removesuffix('.png')}": out_dir / DEPTH_PLOT},
        out_dir,
        project=str(w.get("project", "fairclip")),
        name=w.get("name"),
        group=w.get("group"),
        tags=list(w.get("tags") or []),
        offline=bool(w.get("offline", True)),
        run_id=stable_id(str(out_dir.resolve())),
    )


@dataclass
class SeedRun:
    """Every row of one seed: table columns, skew by depth, full metrics, the SAE line."""

    rows: dict[str, dict[str, float]]
    depth: dict[str, dict[str, float]]
    reports: dict[str, Any]
    sae: dict[str, Any]


def embeds_images_as_base(model: Any, bundle: ModelBundle) -> bool:
    """Whether ``model`` embeds images exactly as the base model does (a row that edits only
    text), so that it may reuse the base model's image embeddings."""
    if model is bundle.model:
        return True
    return (
        isinstance(model, DebiasedCLIP)
        and model.model is bundle.model
        and not model.image
        and not model.vision_patches
    )


def _evaluate_methods(
    cfg: DictConfig,
    bundle: ModelBundle,
    ctx: CompareContext,
    spec: Any,
    splits: Mapping[str, Any],
    depth_ks: Sequence[int],
    models_dir: Path,
    first: SeedRun | None = None,
) -> SeedRun:
    """Build and evaluate every row of ``cfg.methods`` with one context (one seed).

    Rows in :data:`SEEDLESS` are copied from ``first`` (the first seed's run) when given.
    """
    rows, reports, depth = {}, {}, {}
    for name in cfg.methods:
        if first is not None and name in SEEDLESS:
            rows[name], depth[name] = dict(first.rows[name]), dict(first.depth[name])
            reports[name] = first.reports[name]
            continue
        model = METHODS[name](bundle, ctx)
        report = evaluate_model(
            model, bundle.tokenizer, bundle.preprocess_val, spec, splits, device=ctx.device,
            batch_size=int(cfg.batch_size), num_workers=int(cfg.num_workers),
            progress=bool(cfg.progress),
            image_cache=ctx.images if embeds_images_as_base(model, bundle) else None,
        )  # fmt: skip
        reports[name] = {**report["metrics"], "cells": report["cells"]}
        queries = str(cfg.query_set)
        rows[name] = summarize(
            report, cfg.attribute, cfg.target, int(cfg.table_k), int(cfg.recall_k), queries
        )
        rows[name]["class_lean"] = class_lean(model, bundle, ctx)
        depth[name] = skew_by_depth(report, cfg.attribute, cfg.target, depth_ks, queries)
        if cfg.save_models:
            model.save(models_dir / name)
        log.info("seed %s, %s: %s", ctx["seed"], name, rows[name])
    return SeedRun(rows, depth, reports, dict(ctx.sae_info))


def _seeds(cfg: DictConfig) -> list[int]:
    """``seeds`` (a list: one refit of every row per seed, the table their mean) or ``[seed]``.

    Why: the SAE behind SEM, the joint heads and the random heads are trained from a random
    start, and on a small model one seed's row can differ from the next by more than the
    effect being measured; the mean and the per-seed spread say how much a row depends on it.
    """
    seeds = cfg.get("seeds")
    if seeds is None:
        return [int(cfg.seed)]
    if (
        not OmegaConf.is_list(seeds)
        or not seeds
        or any(isinstance(v, bool) or not isinstance(v, int) for v in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise ValueError(f"seeds={seeds!r}: expected null or a list of distinct integers")
    return [int(v) for v in seeds]


def _mean_rows(per_seed: Sequence[Mapping[str, Mapping[str, float]]]) -> dict:
    """Row-wise, column-wise mean over seeds."""
    first = per_seed[0]
    return {
        name: {col: sum(r[name][col] for r in per_seed) / len(per_seed) for col in cols}
        for name, cols in first.items()
    }


def _spread(per_seed: Sequence[Mapping[str, Mapping[str, float]]]) -> dict:
    """``{row: {column: {"std", "min", "max"}}}`` over seeds (population std)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, cols in per_seed[0].items():
        out[name] = {}
        for col in cols:
            vals = torch.tensor([r[name][col] for r in per_seed], dtype=torch.float64)
            out[name][col] = {
                "std": float(vals.std(unbiased=False)),
                "min": float(vals.min()),
                "max": float(vals.max()),
            }
    return out


def _mean_sae_info(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The SAE line under the table: numeric values averaged over seeds."""
    if not per_seed[0]:
        return {}
    return {
        k: sum(i[k] for i in per_seed) / len(per_seed) if isinstance(v, float) else v
        for k, v in per_seed[0].items()
    }


def _seeds_note(seeds: Sequence[int], spread: Mapping[str, Mapping[str, Any]]) -> str:
    """Under a mean table: the seeds and each row's range (min..max) of the main columns
    (from :func:`_spread`)."""
    cols = [c for c in next(iter(spread.values())) if c != "cramers_v"]
    lines = [
        "",
        "",
        f"Mean over seeds {list(seeds)} (every row refit per seed); range min..max over seeds:",
        "",
        "| method | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for name, by_col in spread.items():
        cells = [f"{by_col[c]['min']:.3f}..{by_col[c]['max']:.3f}" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _depth_ks(cfg: DictConfig, eval_shards: Any) -> list[int]:
    """``table_k`` and ``skew_ks`` (validated by the eval spec), sorted; a k beyond the eval
    split's size is warned about (the whole balanced split has no skew: that column is moot)."""
    ks = [int(cfg.table_k), *(int(k) for k in cfg.skew_ks)]
    warn_if_ks_cover_split(ks, eval_shards)
    return sorted(set(ks))


def _selection_split(select: Any, eval_shards: Any) -> Any:
    """``splits.select``: where methods make choices (joint heads' epoch). ``auto`` is the eval
    split's sibling ``val`` folder when there is one, else None (choices on the eval split)."""
    if select is None:
        return None
    if select != "auto":
        select = OmegaConf.to_container(select) if OmegaConf.is_config(select) else select
        list_shards(select, "splits.select")  # a missing split fails now, naming this key
        return select
    found = sibling_split(eval_shards, "val")
    if found is None:
        log.warning("splits.select: no val/ beside %s; joint heads select on the eval split",
                    eval_shards)  # fmt: skip
    return found


def _eval_view(cfg: DictConfig) -> DictConfig:
    """The keys :func:`spec_from_cfg` reads (concept queries over the balanced eval split)."""
    return OmegaConf.create(
        {
            "prompts": OmegaConf.to_container(cfg.prompts, resolve=True),
            "data": {
                "attributes": OmegaConf.to_container(cfg.data.attributes, resolve=True),
                "concepts": OmegaConf.to_container(cfg.data.concepts, resolve=True),
            },
            # table_k first: it is also the k that methods select by (joint heads' ABLE)
            "skew_ks": list(dict.fromkeys([int(cfg.table_k), *cfg.skew_ks])),
            "recall_ks": [int(cfg.recall_k)],
            "targets": [cfg.target],
            "require_all_groups": True,
            "label_key": cfg.label_key,
        }
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="debias_compare")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``model=<path>`` names the model (``model`` is also a config group, so it is
    passed to Hydra as ``model_path``); every other argument is a Hydra override."""
    args = list(sys.argv[1:] if argv is None else argv)
    args = [f"model_path={a[len('model=') :]}" if a.startswith("model=") else a for a in args]
    sys.argv = [sys.argv[0], *args]
    _hydra_main()


def _load_plugins() -> None:
    """Import the optional method modules; register their known builders under row names
    (unless the module registered them itself with :func:`register_method`)."""
    for module_name, builders in PLUGIN_MODULES.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        for row, attr in builders.items():
            if row not in METHODS and callable(getattr(module, attr, None)):
                METHODS[row] = getattr(module, attr)


_load_plugins()

if __name__ == "__main__":
    # Delegate to the imported module so plugin registrations land in the same METHODS.
    from fairclip.debias.compare import main as _main

    _main()
