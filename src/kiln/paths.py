"""Where Kiln keeps things: ``KILN_HOME`` for state, a shared download cache."""

import os
from pathlib import Path


def kiln_home() -> Path:
    env = os.environ.get("KILN_HOME")
    home = Path(env) if env else Path.home() / ".kiln"
    return home.absolute()


def download_cache() -> Path:
    """Downloads (Debian packages) never change a digest, so homes share them."""
    env = os.environ.get("KILN_CACHE")
    if env:
        return Path(env).absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kiln"
