"""The ``spade_sc`` logger. No handlers are added at import; :func:`logging.lastResort` prints warnings."""

from __future__ import annotations

import logging

logger = logging.getLogger("spade_sc")


def log_added(where: str, key: str) -> None:
    """Log one write the same way everywhere: ``added `adata.obsm['X_spade']```."""
    logger.info("added `adata.%s[%r]`", where, key)
