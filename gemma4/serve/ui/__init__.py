"""The chat page at `/`: plain HTML, CSS and JavaScript shipped as package data (no build step, no
CDN), read once when the app is built. The page is public (a browser cannot send a bearer token
to load a page); everything it does goes through the API, which still needs the key. The Host
check applies as to every route. Each file is served with a Content-Security-Policy that allows
only this origin's scripts, styles and connections, so even a rendering bug could not run a
script that model output smuggled into the page.
"""

from __future__ import annotations

from importlib.resources import files

from starlette.responses import Response

FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/ui/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
    "/ui/markdown.js": ("markdown.js", "text/javascript; charset=utf-8"),
    "/ui/chat.css": ("chat.css", "text/css; charset=utf-8"),
}
PATHS = frozenset(FILES)
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; media-src 'self' data:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def add_routes(app) -> None:
    """GET (and HEAD) routes for the page's files on the FastAPI `app`."""
    for path, (name, media_type) in FILES.items():
        app.router.add_route(path, _page(files(__name__).joinpath(name).read_bytes(), media_type), methods=["GET"],
                             include_in_schema=False)


def _page(body: bytes, media_type: str):
    async def page(request):
        return Response(body, media_type=media_type, headers=HEADERS)

    return page
