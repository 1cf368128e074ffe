"""Every key that :mod:`spade_sc` reads from or writes to AnnData, in one place."""

from __future__ import annotations

# inputs
IMAGE_REP = "X_image"  # .obsm, patch features from pp.extract_features
SPATIAL = "spatial"  # .obsm, spot centres in full-resolution image pixels

# pp.select_genes
GENE_MASK = "spade_gene"  # .var, bool
HVG_RANK = "spade_hvg_batches"  # .var, number of batches in which the gene is a top HVG

# fit / embed (prefixed by key_added, default "spade")
DEFAULT_PREFIX = "spade"


def prototype_key(prefix: str = DEFAULT_PREFIX) -> str:
    """``.obs`` column of stage-1 prototypes."""
    return f"{prefix}_prototype"


def expert_key(prefix: str = DEFAULT_PREFIX) -> str:
    """``.obs`` column of stage-2 experts."""
    return f"{prefix}_expert"


def embedding_key(prefix: str = DEFAULT_PREFIX, modality: str = "image") -> str:
    """``.obsm`` key of the joint-space embedding."""
    return f"X_{prefix}" if modality == "image" else f"X_{prefix}_{modality}"


def weights_key(prefix: str = DEFAULT_PREFIX) -> str:
    """``.obsm`` key of the routing weights."""
    return f"{prefix}_expert_weights"


def predicted_key(prefix: str = DEFAULT_PREFIX) -> str:
    """``.obsm`` key of predicted expression and ``.uns`` key of its gene names (``tl.predict_expression``)."""
    return f"{prefix}_predicted"


def uns_key(prefix: str = DEFAULT_PREFIX) -> str:
    """``.uns`` key holding ``params`` of fit/embed."""
    return prefix


# pp.extract_features records the encoder here
FEATURES_UNS = "spade_features"
# pp.extract_features / extract_patches: fraction of each spot's patch that lies inside the image
PATCH_COVERAGE = "spade_patch_coverage"

# scanpy/squidpy spatial layout: .uns['spatial'][library_id]['scalefactors'|'metadata'|'images']
MICRONS_PER_PIXEL = "microns_per_pixel"  # scalefactors: µm per full-resolution pixel
SOURCE_IMAGE_PATH = "source_image_path"  # metadata: path of the full-resolution image (squidpy's key)
SPOT_DIAMETER = "spot_diameter_fullres"  # scalefactors: spot diameter in full-resolution pixels

# io readers (SpatialData tables)
REGION_KEY = "region"
INSTANCE_KEY = "spot_id"

# datasets.toy ground truth
DOMAIN = "domain"
SLIDE = "slide"
LIBRARY_ID = "library_id"
