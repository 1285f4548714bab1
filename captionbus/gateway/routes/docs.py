"""The API documents: `/openapi.json`, and the Swagger UI (`/docs`) and ReDoc (`/redoc`) pages
that render it, served with their scripts from this gateway, never from a CDN.

Why: FastAPI's own pages load Swagger UI and ReDoc from cdn.jsdelivr.net. A page that runs a
third party's script on the gateway's origin hands that party the key typed into "Authorize", and
the pages did not work on a host without internet access. The scripts come from the
`fastapi-offline` wheel (MIT; Swagger UI, ReDoc and the favicon, 2.8 MB, no dependency but
FastAPI); this module uses its files, not its `FastAPIOffline` app factory, so the routes stay
ours to guard.

Who may read them (`GatewayConfig.docs`, `captionbus gateway --docs`):
- `open`: everyone (the pages, the document, the scripts). The default on a loopback listen
  address (a keyless gateway is loopback's only; web.auth.LoopbackOnly still guards it).
- `key`: `/openapi.json` needs an API key (`curl -H "Authorization: Bearer KEY" .../openapi.json`,
  or a client generator given the header), and there are no HTML pages: a browser's navigation
  sends no bearer key, so a page could not load the document. The default off loopback: a
  stranger learns neither the routes nor the version.
- `off`: none of them (404).
"""
from __future__ import annotations

from importlib.resources import files
from typing import Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from captionbus.gateway.deps import CallerDep

DocsMode = Literal["open", "key", "off"]
DOCS_MODES: tuple[DocsMode, ...] = ("open", "key", "off")
ASSETS = "/docs-assets"  # swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js, favicon.png
OAUTH2_REDIRECT = "/docs/oauth2-redirect"


def open_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/openapi.json")
    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(request.app.openapi())

    @router.get("/docs")
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title=f"{request.app.title} - Swagger UI",
                                   oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT}",
                                   swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{ASSETS}/favicon.png")

    @router.get(OAUTH2_REDIRECT)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @router.get("/redoc")
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(openapi_url=f"{root}/openapi.json", title=f"{request.app.title} - ReDoc",
                              redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=f"{root}{ASSETS}/favicon.png", with_google_fonts=False)

    return router


def keyed_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/openapi.json")
    async def openapi(request: Request, caller: CallerDep) -> JSONResponse:
        del caller  # any key: the document is the same for every caller
        return JSONResponse(request.app.openapi())

    return router


def install(app: FastAPI, mode: DocsMode) -> None:
    """The documents on `app` (made with docs_url, redoc_url and openapi_url None) as `mode` says."""
    if mode == "open":
        app.include_router(open_router())
        app.mount(ASSETS, StaticFiles(directory=str(files("fastapi_offline") / "static")), name="docs-assets")
    elif mode == "key":
        app.include_router(keyed_router())
    elif mode != "off":
        raise ValueError(f"docs mode {mode!r}: one of {', '.join(DOCS_MODES)}")
