"""`fairclip-export SOURCE OUT`: write plain open_clip weights from a fairclip run or checkpoint.

SOURCE is anything :func:`fairclip.model.factory.load_model` accepts (a run dir, a Lightning
``.ckpt``, an export dir, an open_clip name with ``--pretrained``). OUT receives
``open_clip_config.json`` + ``open_clip_model.safetensors``, loadable with
``open_clip.create_model_and_transforms('local-dir:OUT')``. Runs export automatically at the
end of training (``export=true``); this command is for older checkpoints or a chosen epoch.
"""

from __future__ import annotations

import argparse

from fairclip.model.factory import ModelKeys, export_open_clip, load_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fairclip-export", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="run dir, .ckpt, export dir, or open_clip model name")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--pretrained", default=None, help="open_clip tag or weights file")
    args = parser.parse_args(argv)
    bundle = load_model(
        args.source,
        pretrained=args.pretrained,
        keys=ModelKeys("SOURCE", "--pretrained", config_file=None),
    )
    out = export_open_clip(bundle.model, bundle.name, args.out)
    print(f"exported {bundle.name} to {out} (load with open_clip 'local-dir:{out}')")


if __name__ == "__main__":
    main()
