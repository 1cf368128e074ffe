"""``toy()``: a seeded, offline, synthetic multi-slide ST + H&E data set with known tissue domains.

Hidden tissue domains (and a continuous cellularity within each) drive both an H&E-like image and the
counts. The image features in ``.obsm['X_image']`` are computed from the image patches themselves by
:func:`patch_statistics` followed by a fixed random non-linear expansion, so the image path is real and the
core does not depend on a deep encoder.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from .. import _keys

__all__ = ["toy", "patch_statistics", "DOMAINS"]

DOMAINS = ("tumour", "stroma", "immune", "adipose", "necrosis")
# (background RGB, nucleus RGB, nuclei per 1000 px² at cellularity 1, nucleus radius px)
_LOOK = {
    "tumour": ((222, 170, 210), (70, 30, 120), 9.0, 2.6),
    "stroma": ((235, 150, 180), (90, 50, 130), 2.0, 1.6),
    "immune": ((215, 175, 215), (40, 20, 90), 16.0, 1.3),
    "adipose": ((248, 240, 245), (120, 80, 150), 0.6, 1.5),
    "necrosis": ((238, 200, 215), (150, 110, 160), 3.0, 1.0),
}


def _smooth_field(rng, shape, n_fields, scale):
    """``n_fields`` smooth random fields on a ``shape`` grid (Gaussian-filtered white noise)."""
    from scipy.ndimage import gaussian_filter

    f = rng.standard_normal((n_fields, *shape))
    f = np.stack([gaussian_filter(x, scale, mode="wrap") for x in f])
    return (f - f.mean(axis=(1, 2), keepdims=True)) / f.std(axis=(1, 2), keepdims=True)


def _render_slide(rng, size, domain_px, cell_px, ecm_px, illum_px, stain):
    """Render an RGB uint8 H&E-like image from per-pixel domain, cellularity and fibre-density maps."""
    img = np.zeros((size, size, 3), dtype=np.float32)
    for d, name in enumerate(DOMAINS):
        bg = np.asarray(_LOOK[name][0], dtype=np.float32)
        img[domain_px == d] = bg
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    # adipose: white vacuoles with thin pink membranes
    yy, xx = np.mgrid[0:size, 0:size]
    cells = ((np.sin(xx / 5.0) * np.sin(yy / 5.0)) > 0.85) & (domain_px == DOMAINS.index("adipose"))
    img[cells] = (225, 160, 190)
    # stroma: collagen fibres, darker and denser where the fibre-density field is high
    stroma = domain_px == DOMAINS.index("stroma")
    fibres = (np.sin((xx + 0.5 * yy) / 2.5) > 0.2) & stroma
    img[fibres] -= (ecm_px[fibres, None] * np.array([20.0, 90.0, 60.0], dtype=np.float32))
    # nuclei: Poisson number per domain and cellularity, drawn as dark discs
    for d, name in enumerate(DOMAINS):
        _, nuc, dens, rad = _LOOK[name]
        ys, xs = np.nonzero(domain_px == d)
        if len(ys) == 0:
            continue
        n = rng.poisson(len(ys) / 1000.0 * dens * 1.5)
        pick = rng.integers(0, len(ys), n)
        keep = rng.random(n) < np.clip(cell_px[ys[pick], xs[pick]], 0.05, 1.0)
        cy, cx = ys[pick][keep], xs[pick][keep]
        r = max(1, int(np.ceil(rad + 1)))
        oy, ox = np.mgrid[-r : r + 1, -r : r + 1]
        disc = (oy**2 + ox**2) <= rad**2
        dy, dx = oy[disc], ox[disc]
        py = np.clip(cy[:, None] + dy[None], 0, size - 1).ravel()
        px = np.clip(cx[:, None] + dx[None], 0, size - 1).ravel()
        img[py, px] = np.asarray(nuc, dtype=np.float32) + rng.normal(0, 8, (len(py), 3))
    # uneven illumination / section thickness: a smooth multiplicative field unrelated to the tissue
    img = img * stain[None, None, :] * illum_px[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def patch_statistics(patches: np.ndarray) -> np.ndarray:
    """Hand-made colour/texture statistics of RGB patches ``[n, h, w, 3]`` (uint8) → ``[n, 18]`` float32.

    Mean and s.d. of each channel, fractions of dark (nuclear), white and pink pixels, mean gradient
    energy, and an 8-bin hue-like histogram.
    """
    x = patches.astype(np.float32) / 255.0
    n = len(x)
    flat = x.reshape(n, -1, 3)
    mean = flat.mean(1)
    std = flat.std(1)
    lum = flat.mean(2)
    dark = (lum < 0.45).mean(1, keepdims=True)
    white = (lum > 0.9).mean(1, keepdims=True)
    pink = ((flat[..., 0] - flat[..., 2]) > 0.12).mean(1, keepdims=True)
    gy = np.abs(np.diff(x.mean(-1), axis=1)).mean((1, 2))[:, None]
    gx = np.abs(np.diff(x.mean(-1), axis=2)).mean((1, 2))[:, None]
    angle = np.arctan2(flat[..., 2] - flat[..., 1], flat[..., 0] - flat[..., 1])
    hist = np.stack([((angle >= a) & (angle < a + np.pi / 4)).mean(1) for a in np.linspace(-np.pi, np.pi, 9)[:-1]], 1)
    return np.concatenate([mean, std, dark, white, pink, gx + gy, hist], axis=1).astype(np.float32)


def toy(
    random_state: int = 0,
    *,
    n_slides: int = 4,
    grid: int = 20,
    n_genes: int = 300,
    n_features: int = 64,
    spot_pitch_px: int = 32,
    feature_gain: float = 1.0,
    illumination: float = 0.0,
) -> AnnData:
    """Synthetic multi-slide spatial transcriptomics with H&E images and known tissue domains.

    Parameters
    ----------
    random_state
        Seed; the same seed always gives the same data.
    n_slides
        Number of slides (``obs['slide']``, also ``obs['library_id']``).
    grid
        Spots per side of each slide's square array (``grid²`` spots per slide).
    n_genes
        Number of genes (5 domain programmes of 20 markers, a 15-gene proliferation programme driven by
        cellularity in tumour, a 10-gene matrix programme driven by fibre density in stroma, the rest
        background).
    n_features
        Size of the image features in ``.obsm['X_image']``.
    feature_gain
        Gain of the ``tanh`` expansion of the patch statistics: larger values make the image features a
        more strongly non-linear (saturating) function of the tissue, as deep-encoder features are.
    illumination
        Amplitude of a smooth multiplicative illumination field (uneven lighting / section thickness,
        unrelated to the tissue) applied to the images; 0 disables it.
    spot_pitch_px
        Centre-to-centre spot distance in image pixels (the image is ``grid × pitch`` pixels square,
        at 1 µm/px: the pitch stands for a 32 µm array).

    Returns
    -------
    AnnData with raw counts in ``.X`` (CSR int) and ``.layers['counts']``; ``.obs['slide', 'library_id',
    'domain', 'cellularity']``; ``.obsm['spatial']`` (spot centres, image pixels), ``.obsm['X_image']``;
    ``.uns['spatial'][slide]`` with the H&E image (``images['hires']``, scale factor 1) in scanpy/squidpy's
    layout; ``.uns['toy']`` with the generating parameters.

    Examples
    --------
    >>> import spade_sc as ss
    >>> adata = ss.datasets.toy()
    >>> adata
    AnnData object with n_obs × n_vars = 1600 × 300 ...
    """
    if n_genes < 5 * 20 + 25 + 1:
        raise ValueError(f"`n_genes` must be at least {5 * 20 + 26} (programmes + background), got {n_genes}.")
    rng = np.random.default_rng(random_state)
    size = grid * spot_pitch_px
    n_dom = len(DOMAINS)
    # shared expression programmes
    base = rng.gamma(0.6, 1.0, n_genes) + 0.05
    programme = np.zeros((n_dom, n_genes))
    for d in range(n_dom):
        programme[d, d * 20 : (d + 1) * 20] = rng.uniform(2.0, 6.0, 20)
    prolif = np.zeros(n_genes)
    prolif[100:115] = rng.uniform(2.0, 5.0, 15)
    ecm = np.zeros(n_genes)
    ecm[115:125] = rng.uniform(2.0, 4.0, 10)
    # fixed random non-linear expansion of the patch statistics (same for every slide)
    w = rng.standard_normal((18, n_features)) * 0.9
    b = rng.uniform(-1, 1, n_features)

    obs, counts, spatial, feats, uns_spatial = [], [], [], [], {}
    stat_rows = []
    for s in range(n_slides):
        name = f"slide{s}"
        low = _smooth_field(rng, (size // 8, size // 8), n_dom, scale=size / 8 / 6)
        low[DOMAINS.index("stroma")] += 0.4  # stroma most common, necrosis rarest
        low[DOMAINS.index("necrosis")] -= 0.3
        up = np.repeat(np.repeat(low, 8, axis=1), 8, axis=2)
        domain_px = up.argmax(0)
        cell_low = _smooth_field(rng, (size // 8, size // 8), 1, scale=size / 8 / 8)[0]
        cell_px = 1 / (1 + np.exp(-np.repeat(np.repeat(cell_low, 8, 0), 8, 1)))
        stain = rng.uniform(0.9, 1.05, 3)
        ecm_low = _smooth_field(rng, (size // 8, size // 8), 1, scale=size / 8 / 8)[0]
        ecm_px = 1 / (1 + np.exp(-2 * np.repeat(np.repeat(ecm_low, 8, 0), 8, 1)))
        illum_low = _smooth_field(rng, (size // 8, size // 8), 1, scale=size / 8 / 5)[0]
        illum_px = 1.0 + illumination * np.tanh(np.repeat(np.repeat(illum_low, 8, 0), 8, 1))
        img = _render_slide(rng, size, domain_px, cell_px, ecm_px, illum_px, stain)
        half = spot_pitch_px // 2
        cy, cx = np.mgrid[0:grid, 0:grid] * spot_pitch_px + half
        cy, cx = cy.ravel(), cx.ravel()
        dom = domain_px[cy, cx]
        # composition of each spot: fractions of domains inside its footprint
        frac = np.zeros((len(cy), n_dom))
        cell = np.zeros(len(cy))
        fib = np.zeros(len(cy))
        patches = np.empty((len(cy), spot_pitch_px, spot_pitch_px, 3), dtype=np.uint8)
        for i, (y, x) in enumerate(zip(cy, cx, strict=True)):
            win = domain_px[y - half : y + half, x - half : x + half]
            frac[i] = np.bincount(win.ravel(), minlength=n_dom) / win.size
            cell[i] = cell_px[y - half : y + half, x - half : x + half].mean()
            fib[i] = ecm_px[y - half : y + half, x - half : x + half].mean()
            patches[i] = img[y - half : y + half, x - half : x + half]
        stat_rows.append(patch_statistics(patches))
        # counts: negative binomial around the spot's mixture of programmes
        lib = rng.lognormal(np.log(8000), 0.3, len(cy))
        # domain programmes, plus two programmes that act within one domain only (an interaction that a
        # linear read-out of the image cannot express): proliferation ∝ cellularity in tumour, matrix genes
        # ∝ fibre density in stroma
        log_mu = (
            np.log(base)[None]
            + frac @ programme
            + (cell[:, None] * 2 - 1) * prolif[None] * frac[:, [0]]
            + (fib[:, None] * 2 - 1) * ecm[None] * frac[:, [1]]
        )
        mu = np.exp(log_mu)
        mu = mu / mu.sum(1, keepdims=True) * lib[:, None]
        r = 10.0
        lam = rng.gamma(r, mu / r)
        counts.append(sp.csr_matrix(rng.poisson(lam).astype(np.float32)))
        spatial.append(np.stack([cx, cy], 1).astype(np.float64))
        obs.append(
            pd.DataFrame(
                {
                    _keys.SLIDE: name,
                    _keys.DOMAIN: np.asarray(DOMAINS)[dom],
                    "cellularity": cell.astype(np.float32),
                    "fibre_density": fib.astype(np.float32),
                    "array_row": np.repeat(np.arange(grid), grid),
                    "array_col": np.tile(np.arange(grid), grid),
                },
                index=[f"{name}_{i}" for i in range(len(cy))],
            )
        )
        uns_spatial[name] = {
            "images": {"hires": img},
            "scalefactors": {
                "tissue_hires_scalef": 1.0,
                "spot_diameter_fullres": float(spot_pitch_px * 0.8),
                "microns_per_pixel": 1.0,
            },
            "metadata": {"source": "spade_sc.datasets.toy"},
        }
    stats = np.concatenate(stat_rows)
    z = (stats - stats.mean(0)) / (stats.std(0) + 1e-6)
    feats = np.tanh(feature_gain * (z @ w) + b) + rng.normal(0, 0.05, (len(z), n_features))
    obs = pd.concat(obs)
    obs[_keys.LIBRARY_ID] = obs[_keys.SLIDE]
    for c in (_keys.SLIDE, _keys.LIBRARY_ID):
        obs[c] = pd.Categorical(obs[c])
    obs[_keys.DOMAIN] = pd.Categorical(obs[_keys.DOMAIN], categories=list(DOMAINS))
    x = sp.vstack(counts).tocsr()
    var = pd.DataFrame(index=_gene_names(n_genes))
    adata = AnnData(X=x, obs=obs, var=var)
    adata.layers["counts"] = x.copy()
    adata.obsm[_keys.SPATIAL] = np.concatenate(spatial)
    adata.obsm[_keys.IMAGE_REP] = feats.astype(np.float32)
    adata.uns["spatial"] = uns_spatial
    adata.uns["toy"] = {
        "random_state": random_state,
        "n_slides": n_slides,
        "grid": grid,
        "spot_pitch_px": spot_pitch_px,
        "domains": list(DOMAINS),
    }
    return adata


def _gene_names(n_genes: int) -> list[str]:
    names = []
    for d in DOMAINS:
        names += [f"{d[:3].upper()}{i + 1}" for i in range(20)]
    names += [f"PROLIF{i + 1}" for i in range(15)]
    names += [f"ECM{i + 1}" for i in range(10)]
    names += [f"BG{i + 1}" for i in range(n_genes - len(names))]
    return names
