"""HEST-1k (Jaume et al. 2024): reader of the published directory layout and SPADE's sample selection.

Layout of a HEST-1k download (``huggingface.co/datasets/MahmoodLab/hest``)::

    root/
      HEST_v1_1_0.csv            # one row per sample (id, organ, species, st_technology, nb_genes, ...)
      st/{id}.h5ad               # raw counts; obsm['spatial'] = spot centres in full-resolution pixels
      wsis/{id}.tif              # pyramidal (Big)TIFF, full resolution
      patches/{id}.h5            # img (n, 224, 224, 3) uint8 at 0.5 µm/px, coords (n, 2) top-left corners, barcode
      metadata/{id}.json         # the sample's row, incl. pixel_size_um_estimated, spot_diameter (µm)
      tissue_seg/, thumbnails/, spatial_plots/, cellvit_seg/, ...   # optional
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .. import _keys
from .._logging import logger

__all__ = ["HEST_PRESETS", "read_hest", "read_hest_metadata", "read_hest_patches", "select_hest_samples"]

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
_SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "gene_name", "gene_names", "symbol", "feature_name", "gene")

#: Sample selections. ``spade``: SPADE's pre-training set (Redekop, Pleasure et al. 2025).
HEST_PRESETS: dict[str, dict] = {
    "spade": {
        "st_technology": ["Visium"],
        "species": ["Homo sapiens"],
        "organ_exclude": ["Brain", "Embryo", "Lung/Brain", "Kidney/Brain"],
        "min_genes": 10000,  # nb_genes > 10000
        "id_exclude": ["INT17"],
        "hest_version_added": ["v1_0_0"],
    }
}


def read_hest_metadata(meta) -> pd.DataFrame:
    """The HEST metadata table (``HEST_v*.csv``) as a DataFrame (a DataFrame is returned unchanged).

    Parameters
    ----------
    meta
        Path of the table, or of a directory holding it (the HEST root; the newest ``HEST_v*.csv`` there, by
        name, is read), or the table as a :class:`pandas.DataFrame`.

    Returns
    -------
    One row per HEST sample with HEST's columns (``id``, ``organ``, ``species``, ``st_technology``,
    ``nb_genes``, ``spots_under_tissue``, ...).

    Raises
    ------
    FileNotFoundError
        If the file does not exist, or the directory holds no ``HEST_v*.csv``.

    Examples
    --------
    >>> import spade_sc as ss
    >>> meta = ss.io.read_hest_metadata("../shared/data/hest")  # doctest: +SKIP
    >>> meta.shape  # doctest: +SKIP
    (1229, 28)
    >>> meta.loc[meta["organ"] == "Breast", "id"].tolist()[:3]  # doctest: +SKIP
    ['TENX99', 'TENX98', 'TENX97']
    """
    if isinstance(meta, pd.DataFrame):
        return meta
    path = Path(meta)
    if path.is_dir():
        found = sorted(path.glob("HEST_v*.csv"))
        if not found:
            raise FileNotFoundError(f"no HEST_v*.csv in {str(path)!r}; pass the path of the metadata table.")
        path = found[-1]
    if not path.is_file():
        raise FileNotFoundError(f"HEST metadata table {str(path)!r} does not exist.")
    return pd.read_csv(path, encoding="utf-8-sig")


def select_hest_samples(meta, *, preset: str | None = "spade", query: str | None = None) -> pd.DataFrame:
    """Filter the HEST-1k metadata table.

    Parameters
    ----------
    meta
        Path of ``HEST_v*.csv`` (or of the HEST root holding it), or the table as a DataFrame.
    preset
        ``'spade'``: SPADE's pre-training selection — Visium, *Homo sapiens*, organ not Brain, Embryo,
        Lung/Brain or Kidney/Brain, ``nb_genes > 10000``, ``id != 'INT17'``, samples added in HEST v1.0.0
        (``hest_version_added == 'v1_0_0'``). ``None``: no preset.
    query
        Extra :meth:`pandas.DataFrame.query` condition, e.g. ``"organ == 'Breast'"``.

    Returns
    -------
    The selected rows (a copy, original index kept).

    Examples
    --------
    >>> import spade_sc as ss
    >>> sel = ss.io.select_hest_samples("../shared/data/hest/HEST_v1_1_0.csv")  # doctest: +SKIP
    >>> len(sel), sel["organ"].nunique(), int(sel["spots_under_tissue"].sum())  # doctest: +SKIP
    (293, 15, 627688)
    """
    df = read_hest_metadata(meta)
    if preset is not None:
        if preset not in HEST_PRESETS:
            raise ValueError(f"unknown `preset={preset!r}`; choose one of {list(HEST_PRESETS)} or None.")
        rules = HEST_PRESETS[preset]
        needed = {"st_technology", "species", "organ", "nb_genes", "id", "hest_version_added"}
        missing = sorted(needed - set(df.columns))
        if missing:
            raise KeyError(f"the HEST metadata table lacks columns {missing}; is this a HEST_v*.csv?")
        mask = (
            df["st_technology"].isin(rules["st_technology"])
            & df["species"].isin(rules["species"])
            & ~df["organ"].isin(rules["organ_exclude"])
            & (pd.to_numeric(df["nb_genes"], errors="coerce") > rules["min_genes"])
            & ~df["id"].isin(rules["id_exclude"])
            & df["hest_version_added"].isin(rules["hest_version_added"])
        )
        df = df[mask]
    if query is not None:
        df = df.query(query)
    return df.copy()


def _fix_gene_names(adata: AnnData, sample: str) -> None:
    """Swap Ensembl ids for gene symbols when ``var`` has a symbol column (HEST has a few such samples)."""
    names = adata.var_names.astype(str)
    is_ens = np.fromiter((bool(_ENSEMBL.match(n)) for n in names), dtype=bool, count=len(names))
    if len(names) == 0 or is_ens.mean() < 0.5:
        return
    for col in _SYMBOL_COLUMNS:
        if col in adata.var.columns:
            sym = adata.var[col].astype(str)
            ok = sym.notna() & (sym != "") & (sym != "nan") & ~sym.str.match(_ENSEMBL.pattern)
            if ok.mean() > 0.5:
                adata.var["gene_ids"] = names.to_numpy()
                adata.var_names = np.where(ok.to_numpy(), sym.to_numpy(), names.to_numpy())
                adata.var_names_make_unique()
                logger.info("HEST sample %s: gene names taken from `var[%r]` (Ensembl ids kept in `var['gene_ids']`)",
                            sample, col)  # fmt: skip
                return
    logger.warning(
        "HEST sample %s uses Ensembl ids as gene names and has no gene-symbol column; map them to symbols "
        "before combining it with other samples",
        sample,
    )


def _scalars(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if v is None or (isinstance(v, float) and np.isnan(v)):
            continue
        if isinstance(v, (str, int, float, bool, np.integer, np.floating, np.bool_)):
            out[str(k)] = v
    return out


def _read_one(root: Path, sid: str, meta_row: dict | None) -> AnnData:
    import anndata as ad

    st = root / "st" / f"{sid}.h5ad"
    if not st.is_file():
        raise FileNotFoundError(f"HEST sample {sid!r}: {str(st)!r} does not exist (download `st/` for it).")
    adata = ad.read_h5ad(st)
    meta = {}
    mfile = root / "metadata" / f"{sid}.json"
    if mfile.is_file():
        meta = json.loads(mfile.read_text())
    elif meta_row is not None:
        meta = dict(meta_row)
    else:
        logger.warning("HEST sample %s has no metadata/%s.json and no row in HEST_v*.csv", sid, sid)
    mpp = meta.get("pixel_size_um_estimated") or meta.get("pixel_size_um_embedded")
    if mpp is None or not np.isfinite(float(mpp)):
        raise ValueError(
            f"HEST sample {sid!r}: no `pixel_size_um_estimated` in metadata/{sid}.json or the HEST csv; "
            "download `metadata/` (or pass `meta=` with the HEST_v*.csv table)."
        )
    mpp = float(mpp)
    if "spatial" not in adata.obsm:
        if {"pxl_col_in_fullres", "pxl_row_in_fullres"} <= set(adata.obs.columns):
            adata.obsm["spatial"] = adata.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(
                np.float64
            )
        else:
            raise KeyError(f"HEST sample {sid!r}: no spot centres (`obsm['spatial']`) in st/{sid}.h5ad.")
    adata.obsm[_keys.SPATIAL] = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    if not sp.issparse(adata.X):
        adata.X = sp.csr_matrix(adata.X)
    _fix_gene_names(adata, sid)
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    adata.obs[_keys.LIBRARY_ID] = pd.Categorical([sid] * adata.n_obs)
    # uns['spatial']: HEST stores one library 'ST' with the downscaled image; rename it to the sample id
    old = (adata.uns.get("spatial", {}) or {}).get("ST", {}) or {}
    images = dict(old.get("images", {}) or {})
    sf = {k: float(v) for k, v in (old.get("scalefactors", {}) or {}).items() if np.isscalar(v)}
    sf[_keys.MICRONS_PER_PIXEL] = mpp
    if meta.get("spot_diameter") is not None and np.isfinite(float(meta["spot_diameter"])):
        sf[_keys.SPOT_DIAMETER] = float(meta["spot_diameter"]) / mpp
    md = _scalars(meta)
    wsi = root / "wsis" / f"{sid}.tif"
    if wsi.is_file():
        md[_keys.SOURCE_IMAGE_PATH] = str(wsi.resolve())
    else:
        logger.warning("HEST sample %s has no wsis/%s.tif; only the downscaled image is available", sid, sid)
    patches = root / "patches" / f"{sid}.h5"
    if patches.is_file():
        md["patches_path"] = str(patches.resolve())
    seg = root / "tissue_seg"
    if seg.is_dir():
        found = sorted(p.name for p in seg.glob(f"{sid}_*"))
        if found:
            md["tissue_seg"] = ";".join(found)
    adata.uns["spatial"] = {sid: {"images": images, "scalefactors": sf, "metadata": md}}
    return adata


def read_hest(
    root,
    ids: str | Sequence[str] | None = None,
    *,
    meta=None,
    as_spatialdata: bool = False,
):
    """Read HEST-1k samples from a local download in the published layout.

    Parameters
    ----------
    root
        The HEST directory (holding ``st/``, ``wsis/``, ``patches/``, ``metadata/``, ``HEST_v*.csv``).
    ids
        One sample id (returns one object), several, or ``None`` for every ``st/*.h5ad`` (returns a dict).
    meta
        The HEST metadata table (path or DataFrame) used when ``metadata/{id}.json`` is missing; default:
        ``root/HEST_v*.csv`` when present.
    as_spatialdata
        Return :class:`spatialdata.SpatialData` (lazy pyramidal WSI ``'{id}_image'``, spot circles
        ``'{id}_spots'``, table ``'table'``) instead of AnnData.

    Returns
    -------
    AnnData per sample: raw counts in ``.X`` (CSR); gene symbols as ``var_names`` (Ensembl ids moved to
    ``var['gene_ids']`` when the sample used them); ``obs`` as in HEST plus ``obs['library_id']`` = id;
    ``obsm['spatial']`` spot centres in full-resolution WSI pixels; ``uns['spatial'][id]`` with HEST's
    downscaled image (``images['downscaled_fullres']``), ``scalefactors`` (``tissue_downscaled_fullres_scalef``,
    ``spot_diameter_fullres``, ``microns_per_pixel`` = ``pixel_size_um_estimated``) and ``metadata`` (the
    sample's metadata, ``source_image_path`` = the WSI, read lazily later, ``patches_path`` = the patch file).
    A single object for a single id, else a dict ``{id: object}``.

    Notes
    -----
    HEST's ``patches/{id}.h5`` store the *top-left corners* of the patches in ``coords``, while
    ``obsm['spatial']`` holds spot *centres*; :func:`read_hest_patches` keeps the corners and
    :func:`spade_sc.pp.extract_features` (``patches=``) matches patches to spots by barcode, so the two are
    never confused. Optional folders (``wsis/``, ``patches/``, ``tissue_seg/``, ...) may be missing.

    Examples
    --------
    >>> import spade_sc as ss
    >>> adata = ss.io.read_hest("hest_data", "TENX95")  # doctest: +SKIP
    >>> ss.pp.extract_features(adata, model="uni")  # crops 224 px at 0.5 µm/px from the WSI  # doctest: +SKIP
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"HEST directory {str(root)!r} does not exist.")
    single = isinstance(ids, str)
    if ids is None:
        ids = sorted(p.stem for p in (root / "st").glob("*.h5ad"))
        if not ids:
            raise FileNotFoundError(f"no st/*.h5ad in {str(root)!r}; is this a HEST download?")
    elif single:
        ids = [ids]
    table = None
    if meta is not None:
        table = read_hest_metadata(meta)
    elif sorted(root.glob("HEST_v*.csv")):
        table = read_hest_metadata(root)
    rows = {}
    if table is not None and "id" in table.columns:
        rows = {str(r["id"]): r for r in table.to_dict("records")}
    out = {}
    for sid in ids:
        adata = _read_one(root, str(sid), rows.get(str(sid)))
        if as_spatialdata:
            from ._spatialdata import to_spatialdata

            adata = to_spatialdata(adata)
        out[str(sid)] = adata
    return out[ids[0]] if single else out


def read_hest_patches(root, sample_id: str | None = None):
    """HEST's precomputed patches of one sample, opened lazily.

    Parameters
    ----------
    root
        The HEST directory (with ``sample_id``) or the path of a ``patches/{id}.h5`` file.
    sample_id
        Sample id when ``root`` is the HEST directory.

    Returns
    -------
    :class:`spade_sc.pp.Patches` (224 × 224 px at 0.5 µm/px): ``images`` read on demand, ``obs_names`` =
    barcodes, ``coords`` = top-left corners in WSI pixels (centres are ``coords + 112 · 0.5 / mpp``).

    Examples
    --------
    >>> import spade_sc as ss
    >>> patches = ss.io.read_hest_patches("data/hest", "TENX95")  # doctest: +SKIP
    >>> patches = ss.io.read_hest_patches("data/hest/patches/TENX95.h5")  # doctest: +SKIP
    >>> patches[0].shape, patches.obs_names[:2]  # doctest: +SKIP
    """
    from ..pp._patches import Patches

    path = Path(root)
    if sample_id is not None:
        path = path / "patches" / f"{sample_id}.h5"
    return Patches.from_h5(path, mpp=0.5)
