"""Image thumbnails for the report: small JPEGs inlined as data URIs, read through the feature
file's data root; an image no longer on disk becomes a placeholder showing its path."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image

from ..images import open_rgb
from .svg import text

MAX_SIDE = 128
JPEG_QUALITY = 80


class Thumbnails:
    """Thumbnails of the images under ``root`` (the data root), each made once."""

    def __init__(self, root):
        self.root = Path(root) if root else None
        self._uris: dict[str, str | None] = {}
        self.missing = 0

    def uri(self, path: str) -> str | None:
        """A ``data:image/jpeg`` URI of the image at ``path`` (relative to the root), at most
        ``MAX_SIDE`` pixels on its longer side; None when it cannot be read."""
        if path not in self._uris:
            self._uris[path] = self._make(path)
            self.missing += self._uris[path] is None
        return self._uris[path]

    def _make(self, path: str) -> str | None:
        if self.root is None:
            return None
        try:
            image = open_rgb(self.root / path, draft_size=MAX_SIDE)
            image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=JPEG_QUALITY)
        except (OSError, ValueError, Image.DecompressionBombError):
            return None
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

    def figure(self, path: str, caption: str) -> str:
        """A ``<figure>`` with the thumbnail (or a placeholder naming ``path``) and ``caption``
        (already HTML)."""
        uri = self.uri(path)
        picture = (f'<img src="{uri}" alt="{text(path)}" title="{text(path)}">' if uri else
                   f'<div class="missing" title="{text(path)}">image not found<br>{text(path)}</div>')
        return f'<figure class="thumb">{picture}<figcaption>{caption}</figcaption></figure>'
