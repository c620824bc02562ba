"""``GET /playground``: a page to try the served models in a browser (``serve.playground``).

Three package files (``static/playground.html``, ``.js``, ``.css``), served as
they are: no build step and nothing fetched from elsewhere, so the page works on
a machine without internet. The page holds no data and needs no API key; every
call it makes goes to this app's own routes with the key the user typed (kept
in ``sessionStorage``). A Content-Security-Policy lets it load and call nothing
but its own origin, and run no inline script or style.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

PLAYGROUND_PATHS = ("/playground", "/playground/app.js", "/playground/app.css")
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                           "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_FILES = {  # path -> (package file, media type)
    "/playground": ("playground.html", "text/html; charset=utf-8"),
    "/playground/app.js": ("playground.js", "text/javascript; charset=utf-8"),
    "/playground/app.css": ("playground.css", "text/css; charset=utf-8"),
}


def page_headers() -> dict[str, str]:
    """The headers of every playground file: own origin only, no sniffing, no referrer, not framed."""
    return {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}


def read_page_files() -> dict[str, tuple[bytes, str]]:
    """Path -> (content, media type) of the playground's files, read from the installed package."""
    static = resources.files("raylm.serving") / "static"
    return {path: (static.joinpath(name).read_bytes(), media) for path, (name, media) in _FILES.items()}


def add_playground(api: FastAPI) -> None:
    """Add the playground's GET routes to ``api`` (the files are read once, when the replica builds its app)."""
    files = read_page_files()
    headers = page_headers()

    def route(path: str):
        content, media = files[path]

        async def serve_file() -> Response:
            return Response(content, media_type=media, headers=headers)

        serve_file.__name__ = "playground_" + (path.rsplit("/", 1)[1].replace(".", "_") or "page")
        return serve_file

    for path in PLAYGROUND_PATHS:
        api.add_api_route(path, route(path), methods=["GET"], include_in_schema=False)
