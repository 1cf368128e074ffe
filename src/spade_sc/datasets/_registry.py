"""Public data fetched with :mod:`pooch` and checked against sha256 hashes; cached in ``ss.settings.datadir``."""

from __future__ import annotations

from .._settings import settings

__all__ = ["HER2ST_REGISTRY", "HER2ST_SECTIONS", "HER2ST_URL", "her2st", "her2st_registry"]

#: almaan/her2st, pinned to one commit; files under ``data/``
HER2ST_COMMIT = "85df7411b987a7dec3feff9718b869a7a82091ec"
HER2ST_URL = f"https://raw.githubusercontent.com/almaan/her2st/{HER2ST_COMMIT}/data/"

#: image file of each section (patient C)
HER2ST_SECTIONS = {
    "C2": "5714_HE_BT_C2.jpg",
    "C3": "5714_HE_BT_D1.jpg",
    "C4": "5714_HE_BT_D2.jpg",
    "C5": "5714_HE_BT_E1.jpg",
    "C6": "5714_HE_BT_E2.jpg",
}

#: relative path under ``data/`` → sha256
HER2ST_REGISTRY = {
    "ST-cnts/C2.tsv.gz": "c1c59ea6cffae36b9ecb561b8e2a97e3aa5f4085f748e991a0e330ed9d09773d",
    "ST-cnts/C3.tsv.gz": "e00c55a3eb9caac5d9c71b8906aae8be8b38f93e23938f4a0ebee17683ef6a2a",
    "ST-cnts/C4.tsv.gz": "33201f76d41d7131dc600a0f87d9a70383af3503e81698b4d11e6f2e8d73e9da",
    "ST-cnts/C5.tsv.gz": "c0f310315ca6110d74dbdf7011e5b42432ba0b8eb5f001824764911988f39338",
    "ST-cnts/C6.tsv.gz": "60478b0d2411501866685f41312c65c6591e499d64d5b719be8ee9bab25c9bc8",
    "ST-spotfiles/C2_selection.tsv": "235b5f4306b3b57c628ffc82c98c7109602474fbcc79a917b9c50517f99b6b1c",
    "ST-spotfiles/C3_selection.tsv": "7fd76c13370b7804ac3bb377b846d22485cf9223f9dd8dfc25be06e5aaf65755",
    "ST-spotfiles/C4_selection.tsv": "47e79f3b9dbfa3a8c18af9e948ba7ba4bf0a75ea1b4c292bc714ced7d0917d4c",
    "ST-spotfiles/C5_selection.tsv": "2114cc3b4da759772112897f1e247d5443c9f8c808e6a9a952eb4fda379a194c",
    "ST-spotfiles/C6_selection.tsv": "efdbbc6759c6af43baa966505c31705f09c087c1dccf1ea3e0d1db7b55717117",
    "ST-imgs/C/C2/5714_HE_BT_C2.jpg": "26e2f73ae840cdd46c5bba405aae181f13a56a376b9848dff23f7a9c5de7f19e",
    "ST-imgs/C/C3/5714_HE_BT_D1.jpg": "0005a92674014d473040a28f0afca89ce5fa5c44019b479b638ceb3272ceb568",
    "ST-imgs/C/C4/5714_HE_BT_D2.jpg": "f40607eb1d5f0d125decd71c48b0c5d29cf6776ad92297fd185631208c82d6f2",
    "ST-imgs/C/C5/5714_HE_BT_E1.jpg": "34028ea41e376396b50c42b0a11a7e689c85be4a8022e668d0a09cc128c04c65",
    "ST-imgs/C/C6/5714_HE_BT_E2.jpg": "dddd87232589648861a9b6776dc1749be8306213f6589aeef0e805fb2b1ee263",
}


def her2st_registry(path=None):
    """A :class:`pooch.Pooch` for the her2st files, caching under ``path`` (default ``datadir/her2st``)."""
    import pooch

    return pooch.create(
        path=path if path is not None else settings.datadir / "her2st",
        base_url=HER2ST_URL,
        registry={k: f"sha256:{v}" for k, v in HER2ST_REGISTRY.items()},
    )


def her2st(section: str = "C2", *, downloader=None, progressbar: bool = False, **kwargs):
    """HER2-positive breast cancer section of her2st (Andersson et al. 2021), downloaded once and cached.

    Fetches the counts, spot file and full-resolution H&E of ``section`` from the public repository
    ``almaan/her2st`` (pinned commit) with :mod:`pooch`, checks their sha256, caches them in
    ``ss.settings.datadir / 'her2st'`` in the upstream layout and reads them with
    :func:`spade_sc.io.read_her2st`. Licence CC BY 4.0 — cite the paper.

    Parameters
    ----------
    section
        One of ``'C2'``, ``'C3'``, ``'C4'``, ``'C5'``, ``'C6'`` (patient C; HEST-1k ids SPA141…SPA137).
    downloader
        A pooch downloader ``(url, output_file, pooch, check_only=False)``; default HTTP. Tests pass one that
        copies local files.
    progressbar
        Show download progress.
    **kwargs
        Passed to :func:`spade_sc.io.read_her2st` (e.g. ``as_spatialdata=True``).

    Returns
    -------
    What :func:`spade_sc.io.read_her2st` returns (AnnData by default).

    Examples
    --------
    >>> import spade_sc as ss
    >>> adata = ss.datasets.her2st("C2")  # doctest: +SKIP
    >>> adata.n_obs  # doctest: +SKIP
    187
    """
    from ..io._her2st import read_her2st

    if section not in HER2ST_SECTIONS:
        raise ValueError(f"unknown her2st `section={section!r}`; choose one of {list(HER2ST_SECTIONS)}.")
    reg = her2st_registry()
    names = [
        f"ST-cnts/{section}.tsv.gz",
        f"ST-spotfiles/{section}_selection.tsv",
        f"ST-imgs/{section[0]}/{section}/{HER2ST_SECTIONS[section]}",
    ]
    for name in names:
        reg.fetch(name, downloader=downloader, progressbar=progressbar)
    return read_her2st(reg.abspath, section, **kwargs)
