"""What the debiasing methods of one comparison share: the composed config, the base model's
text encoder, the SAE (loaded or trained once), the prompts, and the evaluation that methods
which choose something (joint heads' epoch) run on the selection split."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fairclip.data.prompts import expand_prompts
from fairclip.data.samples import CaptionCollate, SampleDecoder
from fairclip.data.shards import list_shards, read_captions
from fairclip.data.stream import ShardStream
from fairclip.debias.orth import score_gap_split
from fairclip.eval.encoding import ImageCache
from fairclip.eval.spec import spec_from_cfg
from fairclip.model.encode import encode_prompts
from fairclip.model.factory import ModelBundle
from fairclip.sae import MatryoshkaTopKSAE, SAEConfig, load_sae, sae_metrics, train_sae
from fairclip.sae.corpus import train_sae_on_corpus
from fairclip.sae.presets import sae_settings

SAE_FILE = Path("sae") / "text_sae.safetensors"


log = logging.getLogger(__name__)


@dataclass(eq=False)
class MethodContext(Mapping[str, Any]):
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

    @torch.no_grad()
    def encode_raw(self, prompts: Sequence[str]) -> torch.Tensor:
        """The base model's text embeddings as ``encode_text`` returns them (what a text
        intervention receives, and what the authors' SAEs were trained on)."""
        model, tokenizer = self.bundle.model, self.bundle.tokenizer
        return encode_prompts(model, tokenizer, list(prompts), self.device, normalize=False)

    def prompt_list(self, key: str) -> list[str]:
        """An expanded prompt list of ``cfg.debias.<key>``."""
        return expand_prompts(self.cfg.debias[key], f"debias.{key}")

    def _per_attribute(
        self, raw: Any, key: str, noun: str, attributes: Sequence[str] | None, hint: str = ""
    ) -> list[str]:
        """The attributes wanted (default: ``debias_attributes``), each checked to be in
        ``raw`` (the config node at ``key``) with exactly the data's values."""
        chosen = self.cfg.debias_attributes if attributes is None else attributes
        wanted = [str(a) for a in chosen]
        missing = [a for a in wanted if a not in raw]
        if missing:
            raise ValueError(
                f"debias_attributes={wanted}: {key} has no {noun} for {missing} "
                f"(it has {list(raw)})"
            )
        data_attrs = self.cfg.data.attributes
        for attr in wanted:
            values, expected = list(raw[attr]), list(data_attrs.get(attr, []))
            if attr in data_attrs and set(values) != set(expected):
                raise ValueError(
                    f"{key}.{attr}: {noun} for {values}, but data.attributes.{attr}={expected}"
                    + hint
                )
        return wanted

    def bias_prompts(
        self, attributes: Sequence[str] | None = None
    ) -> dict[str, dict[str, list[str]]]:
        """Bias prompts of ``attributes`` (default: ``debias_attributes``, the ones the methods
        debias)."""
        raw = self.cfg.debias.bias_prompts
        hint = (
            " (pick the debias set of this dataset, e.g. debias=utkface for UTKFace's race groups)"
        )
        wanted = self._per_attribute(raw, "debias.bias_prompts", "prompts", attributes, hint)
        return {
            attr: {v: expand_prompts(p, f"debias.bias_prompts.{attr}.{v}") for v, p in vals.items()}
            for attr, vals in raw.items()
            if attr in wanted
        }

    def group_words(self, attributes: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """``debias.orth_proj.group_words`` of ``attributes`` (default: ``debias_attributes``):
        Orth-Proj/Cali's spurious prompts and pairs, checked against the data's values."""
        raw = self.cfg.debias.orth_proj.get("group_words") or {}
        wanted = self._per_attribute(raw, "debias.orth_proj.group_words", "words", attributes)
        return {a: OmegaConf.to_container(raw[a], resolve=True) for a in wanted}

    def class_prompts(self) -> dict[str, list[str]]:
        templates = list(self.cfg.debias.class_templates)
        return {str(c): [t.format(c) for t in templates] for c in self.cfg.debias.classes}

    def class_prompt_list(self) -> list[str]:
        """The prompts the lean is measured on: the zero-shot class prompts (every template x
        concept) for ``query_set=concepts``, else the table's query set's queries."""
        spec = self.options.get("spec") or spec_from_cfg(eval_view(self.cfg))
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
            explicit = {
                "n_latents": st.n_latents,
                "k_levels": tuple(st.k_levels) if st.k_levels else None,
                "level_weights": st.get("level_weights"),
            }
            preset = str(st.get("preset", "auto"))
            settings = sae_settings(
                preset, self.bundle.name, text.shape[1], explicit, "sae_train.preset"
            )
            sae_cfg = SAEConfig(
                d_in=text.shape[1],
                **settings,
                epochs=int(st.epochs),
                batch_size=int(st.batch_size),
                lr=float(st.lr),
                seed=int(self.options.get("seed", self.cfg.seed)),
            )
            if corpus_file:  # streamed: a caption corpus can hold millions of lines
                sae, hist = train_sae_on_corpus(
                    corpus_file, self.encode, sae_cfg, extra=data,
                    epochs=int(st.get("corpus_epochs", 1)), progress=bool(self.cfg.progress),
                )  # fmt: skip
                rows = data.shape[0] + hist["captions"]
                self.sae_info["corpus_captions"] = hist["captions"]
            else:
                sae, _ = train_sae(data, sae_cfg, progress=False)
                rows = data.shape[0]
            self.sae_info["source"] = f"trained on {rows} embeddings"
        if sae.cfg.input_norm == "raw":  # an authors' SAE: measured on what it was trained on
            text = self._cached("sae_corpus_raw", lambda: self.encode_raw(corpus))
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
        spec = self.options.get("spec") or spec_from_cfg(eval_view(self.cfg))
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
        spec = self.options.get("spec") or spec_from_cfg(eval_view(self.cfg))
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


def query_set(spec: Any, name: str) -> Any:
    """The eval spec's query set ``name`` (the config key ``query_set``), or a clear error."""
    found = {qs.name: qs for qs in spec.query_sets}
    if name not in found:
        raise ValueError(
            f"query_set={name!r}: the prompts have no such query set, expected one of "
            f"{sorted(found)} (prompts.query_sets)"
        )
    return found[name]


def eval_view(cfg: DictConfig) -> DictConfig:
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
            "folds": OmegaConf.to_container(cfg.folds) if cfg.get("folds") else None,
            "whole_ranking": bool(cfg.get("whole_ranking", False)),
        }
    )
