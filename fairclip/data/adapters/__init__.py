"""Label-file adapters: public face (and Waterbirds) datasets -> labelled eval WebDataset shards.

``fairclip-data source=<source> key=value ...`` composes ``conf/source/<source>.yaml`` and calls
``ADAPTERS[source](cfg)``. Every adapter turns its label format into records (image path,
attribute labels), maps raw labels to the vocabularies of ``conf/data/<source>.yaml`` and
writes them with :func:`write_labelled_shards`: image bytes copied as they are (no
re-encoding), ``json`` labels, ``sizes.json``, and a ``summary.json`` with the counts.

Missing image files: ``missing_images=error`` (default) stops with the count and examples,
because a wrong ``images=`` folder is the usual cause; ``missing_images=skip`` skips them
with a warning and reports ``missing_images`` in the output.
"""

from collections.abc import Callable

from omegaconf import DictConfig

from fairclip.data.adapters.celeba import write_celeba
from fairclip.data.adapters.fairface import write_fairface
from fairclip.data.adapters.utkface import write_utkface
from fairclip.data.adapters.waterbirds import write_waterbirds

# source name (conf/source/<name>.yaml) -> writer
ADAPTERS: dict[str, Callable[[DictConfig], dict[str, int]]] = {
    "fairface": write_fairface,
    "utkface": write_utkface,
    "celeba": write_celeba,
    "waterbirds": write_waterbirds,
}
