"""Preprocessing: gene panel selection, spot patches and image features."""

from ._encoders import (
    ENCODERS,
    EncoderAccessError,
    EncoderInfo,
    build_encoder,
    get_encoder_info,
    list_encoders,
)
from ._features import extract_features
from ._image_readers import open_image
from ._patches import Patches, extract_patches
from ._select_genes import select_genes

__all__ = [
    "select_genes",
    "extract_patches",
    "extract_features",
    "Patches",
    "open_image",
    "ENCODERS",
    "EncoderInfo",
    "EncoderAccessError",
    "build_encoder",
    "get_encoder_info",
    "list_encoders",
]
