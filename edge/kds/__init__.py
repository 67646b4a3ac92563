"""The kitchen display: a static web page (HTML, JS, CSS; no build step, no CDN) for ``/kds``.

The page lives in this package's data files, so a non-editable install carries it; the edge
serves it (``edge.api.live``), and it talks to the edge only: the REST kitchen routes and the
live WebSocket (docs/live.md).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

#: the files the edge serves, by name, with their content type (``index.html`` is ``/kds``)
FILES: dict[str, str] = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "kds.css": "text/css",
}


@cache
def read(name: str) -> bytes:
    """The bytes of one of ``FILES`` (KeyError for any other name)."""
    if name not in FILES:  # only the page's own files, whatever a URL asks for
        raise KeyError(name)
    return resources.files(__package__).joinpath(name).read_bytes()
