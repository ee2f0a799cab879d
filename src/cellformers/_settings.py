from __future__ import annotations

import os
from pathlib import Path


class CellformersSettings:
    """Package-wide settings.

    Attributes
    ----------
    cache_dir
        Folder where downloaded checkpoints and datasets are kept. Defaults to the
        ``CELLFORMERS_CACHE`` environment variable, else ``~/.cache/cellformers``.
    data_dir
        Optional folder searched first for registry datasets (files are used when their
        sha256 matches). Defaults to the ``CELLFORMERS_DATA`` environment variable.
    pretrained_url
        Optional base URL of a mirror of the pretrained-weight registry: when set, file
        ``<fname>`` of model ``<name>`` is downloaded from ``<pretrained_url>/<name>/<fname>``
        instead of its published location (the pinned sha256 is checked either way). Defaults
        to the ``CELLFORMERS_PRETRAINED_URL`` environment variable.

    """

    def __init__(self) -> None:
        self._cache_dir: Path | None = None
        self._data_dir: Path | None = None
        self._pretrained_url: str | None = None

    @property
    def cache_dir(self) -> Path:
        if self._cache_dir is not None:
            return self._cache_dir
        env = os.environ.get("CELLFORMERS_CACHE")
        return Path(env) if env else Path.home() / ".cache" / "cellformers"

    @cache_dir.setter
    def cache_dir(self, path: str | os.PathLike | None) -> None:
        self._cache_dir = None if path is None else Path(path)

    @property
    def data_dir(self) -> Path | None:
        if self._data_dir is not None:
            return self._data_dir
        env = os.environ.get("CELLFORMERS_DATA")
        return Path(env) if env else None

    @data_dir.setter
    def data_dir(self, path: str | os.PathLike | None) -> None:
        self._data_dir = None if path is None else Path(path)

    @property
    def pretrained_url(self) -> str | None:
        if self._pretrained_url is not None:
            return self._pretrained_url
        return os.environ.get("CELLFORMERS_PRETRAINED_URL") or None

    @pretrained_url.setter
    def pretrained_url(self, url: str | None) -> None:
        if url is not None and not isinstance(url, str):
            raise TypeError(f"pretrained_url must be a URL string or None, got {type(url)!r}.")
        self._pretrained_url = url

    def __repr__(self) -> str:
        return (
            f"CellformersSettings(cache_dir={self.cache_dir!s}, data_dir={self.data_dir!s}, "
            f"pretrained_url={self.pretrained_url!s})"
        )


settings = CellformersSettings()
