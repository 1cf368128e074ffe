"""her2st (Andersson et al. 2021): HER2-positive breast cancer, original ST arrays with full-resolution H&E."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .. import _keys
from .._logging import logger

__all__ = ["HER2ST_PITCH_UM", "HER2ST_SPOT_UM", "her2st_files", "read_her2st"]

HER2ST_PITCH_UM = 200.0  # centre-to-centre distance of the ST array
HER2ST_SPOT_UM = 100.0  # spot diameter


def her2st_files(path, section: str, patient: str | None = None) -> dict[str, Path]:
    """Paths of the counts, spot file and image of ``section`` in the her2st layout (they must exist)."""
    root = Path(path)
    patient = patient or section[0]
    files = {
        "counts": root / "ST-cnts" / f"{section}.tsv.gz",
        "spots": root / "ST-spotfiles" / f"{section}_selection.tsv",
    }
    img_dir = root / "ST-imgs" / patient / section
    imgs = sorted(img_dir.glob("*.jpg")) if img_dir.is_dir() else []
    files["image"] = imgs[0] if imgs else img_dir / "*.jpg"
    missing = [str(p) for p in files.values() if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"her2st section {section!r}: missing {missing}. Expected the layout of github.com/almaan/her2st "
            "(data/ST-cnts, data/ST-spotfiles, data/ST-imgs/{patient}/{section}); `ss.datasets.her2st(section)` "
            "downloads it."
        )
    return files


def _fit_pixel_size(spots: pd.DataFrame) -> tuple[float, float]:
    """µm/px from the 200 µm array pitch: least squares of pixel on (new_x, new_y); also the RMS residual (px)."""
    a = np.c_[spots["new_x"].to_numpy(float), spots["new_y"].to_numpy(float), np.ones(len(spots))]
    pix = spots[["pixel_x", "pixel_y"]].to_numpy(float)
    coef, *_ = np.linalg.lstsq(a, pix, rcond=None)
    lin = coef[:2]  # maps (new_x, new_y) → (pixel_x, pixel_y)
    px_per_unit = float(np.sqrt(abs(np.linalg.det(lin))))
    resid = pix - a @ coef
    return HER2ST_PITCH_UM / px_per_unit, float(np.sqrt((resid**2).sum(1).mean()))


def read_her2st(path, section: str, *, patient: str | None = None, load_image: bool = True,
                hires_max_px: int = 2000, as_spatialdata: bool = False):  # fmt: skip
    """Read one her2st section (counts, spot positions, full-resolution H&E).

    Parameters
    ----------
    path
        The her2st ``data`` directory (holding ``ST-cnts/``, ``ST-spotfiles/``, ``ST-imgs/``).
    section
        Section name, e.g. ``'C2'``.
    patient
        Patient folder under ``ST-imgs`` (default: the section's first letter).
    load_image
        Store a downscaled copy of the H&E (longest side ≤ ``hires_max_px``) as ``images['hires']`` for
        plotting. The full-resolution JPEG is only referenced and is read when patches are extracted.
    hires_max_px
        Longest side of the downscaled image.
    as_spatialdata
        Return a SpatialData (image, spot circles, table) instead of AnnData.

    Returns
    -------
    AnnData with raw counts in ``.X`` and ``.layers['counts']`` (CSR, spots under the spot file's selection,
    present in both counts and spot file), ``obs`` ``array_x``, ``array_y`` (array coordinates),
    ``new_x``, ``new_y``, ``library_id`` (= section); ``obsm['spatial']`` spot centres in full-resolution
    image pixels; ``uns['spatial'][section]`` with ``scalefactors`` (``microns_per_pixel`` estimated from the
    200 µm array pitch, ``spot_diameter_fullres`` = 100 µm in pixels, ``tissue_hires_scalef``), ``images``
    (``hires``) and ``metadata`` (``source_image_path``, ``pitch_fit_rms_px``, source and licence).

    Examples
    --------
    >>> import spade_sc as ss
    >>> adata = ss.io.read_her2st("../shared/data/her2st", "C2")  # doctest: +SKIP
    >>> round(adata.uns["spatial"]["C2"]["scalefactors"]["microns_per_pixel"], 3)  # doctest: +SKIP
    0.688
    """
    files = her2st_files(path, section, patient)
    counts = pd.read_csv(files["counts"], sep="\t", index_col=0)
    spots = pd.read_csv(files["spots"], sep="\t")
    need = {"x", "y", "new_x", "new_y", "pixel_x", "pixel_y"}
    if not need <= set(spots.columns):
        raise KeyError(f"{files['spots']} lacks columns {sorted(need - set(spots.columns))}.")
    if "selected" in spots.columns:
        spots = spots[spots["selected"].astype(int) == 1]
    spots.index = spots["x"].astype(int).astype(str) + "x" + spots["y"].astype(int).astype(str)
    common = [i for i in counts.index.astype(str) if i in set(spots.index)]
    dropped = (len(counts) - len(common), len(spots) - len(common))
    if dropped != (0, 0):
        logger.info("her2st %s: %d count rows without a selected spot and %d spots without counts dropped",
                    section, *dropped)  # fmt: skip
    counts.index = counts.index.astype(str)
    counts = counts.loc[common]
    spots = spots.loc[common]
    mpp, rms = _fit_pixel_size(spots)
    x = sp.csr_matrix(counts.to_numpy(dtype=np.float32))
    obs = pd.DataFrame(
        {
            "array_x": spots["x"].astype(int).to_numpy(),
            "array_y": spots["y"].astype(int).to_numpy(),
            "new_x": spots["new_x"].to_numpy(float),
            "new_y": spots["new_y"].to_numpy(float),
            _keys.LIBRARY_ID: pd.Categorical([section] * len(common)),
        },
        index=pd.Index([f"{section}_{i}" for i in common]),
    )
    var = pd.DataFrame(index=pd.Index(counts.columns.astype(str)))
    adata = AnnData(X=x, obs=obs, var=var)
    adata.var_names_make_unique()
    adata.layers["counts"] = x.copy()
    adata.obsm[_keys.SPATIAL] = spots[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    image = Path(files["image"]).resolve()
    sf = {_keys.MICRONS_PER_PIXEL: mpp, _keys.SPOT_DIAMETER: HER2ST_SPOT_UM / mpp}
    images = {}
    if load_image:
        from ..pp._image_readers import PILReader

        reader = PILReader(image)
        w = reader.shape[1]
        level = max(
            i for i, (lh, lw) in enumerate(reader.level_shapes) if i == 0 or max(lh, lw) >= hires_max_px
        )
        img = reader.read_region(level, 0, 0, reader.level_shapes[level][1], reader.level_shapes[level][0])
        scale = min(1.0, hires_max_px / max(img.shape[:2]))
        if scale < 1.0:
            from PIL import Image

            size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
            img = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BILINEAR))
        reader.close()
        images["hires"] = img
        sf["tissue_hires_scalef"] = img.shape[1] / w
    adata.uns["spatial"] = {
        section: {
            "images": images,
            "scalefactors": sf,
            "metadata": {
                _keys.SOURCE_IMAGE_PATH: str(image),
                "technology": "Spatial Transcriptomics (100 µm spots, 200 µm pitch)",
                "pitch_fit_rms_px": rms,
                "source": "github.com/almaan/her2st (Andersson et al., Nat Commun 12, 6012, 2021)",
                "license": "CC BY 4.0",
            },
        }
    }
    if as_spatialdata:
        from ._spatialdata import to_spatialdata

        return to_spatialdata(adata)
    return adata
