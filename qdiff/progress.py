"""Progress bars for the long steps (tqdm on stderr), silenced with QDIFF_QUIET=1 or --quiet."""

from __future__ import annotations

import os
from typing import Any

from tqdm.auto import tqdm


def quiet() -> bool:
    return os.environ.get("QDIFF_QUIET", "") not in ("", "0")


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    kwargs.setdefault("disable", quiet())
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def log(message: str) -> None:
    if not quiet():
        print(message, flush=True)
