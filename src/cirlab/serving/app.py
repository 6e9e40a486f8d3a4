"""The HTTP API and web page: ``create_app(searcher, config)`` -> a FastAPI app.

Endpoints: ``POST /search`` (an uploaded image or a gallery id, a text, k, optional re-ranking),
``GET /images/{id}`` (gallery images only, from inside the gallery's folder), ``GET /gallery``
(ids and file names, for the page's picker), ``GET /model`` (the model's name and kind, for the
page's header), ``GET /healthz`` (probes the vector backend), ``GET /metrics`` (Prometheus text),
and with an API key ``POST /index/images`` and ``DELETE /index/images/{id}``; ``/`` is the web page
(static files, no build step). ``/openapi.json`` describes the API; ``/docs`` (Swagger UI) is
served with its scripts from this server when the package ``fastapi-offline`` is installed
(:func:`docs_assets`), and answers 404 otherwise; ``/redoc`` is off (its page fetches a logo from
its vendor's CDN): never a page that loads from another server.

Files are named to the client relative to the gallery root (:func:`file_namer`), never by their
absolute path on the server.

Every bound is checked before work is spent on a request: the body size before it is read
(413), the declared type and the decoded format against allow-lists (415), the pixel count from
the image header before decoding (413: a decompression bomb is never decoded), the text length
and k (422), the queue (429, with Retry-After) and a per-request timeout (504). A vector backend
that is away answers 503, on ``/healthz`` too. Every answer says ``nosniff`` and forbids
framing; the page has a content security policy that its own static files satisfy.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import math
import os
import time
import unicodedata
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, Header, HTTPException, Query, Request, UploadFile
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from cirlab.config import ServeConfig
from cirlab.data import images
from cirlab.retrieval.gallery import IMAGE_SUFFIXES
from cirlab.retrieval.search import Query as SearchQuery
from cirlab.retrieval.search import Searcher
from cirlab.serving.batching import Batcher, QueueFull
from cirlab.serving.metrics import Metrics

STATIC = Path(__file__).parent / "static"
SERVED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}  # gallery files, by content
HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY")]
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
FORM_FIELDS = {"text": "the change to make", "image": "the image file", "id": "the gallery id"}


class SecurityHeaders:
    """ASGI middleware, outermost, so that every answer (the body limit's 413 included) says
    ``nosniff`` and forbids framing; the page (``/``) also gets :data:`PAGE_POLICY` (only the
    page: FastAPI's own ``/docs`` page needs inline scripts)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        extra = HEADERS + ([(b"content-security-policy", PAGE_POLICY.encode())] if scope["path"] == "/" else [])

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` gets 413 before the app reads it (declared
    Content-Length) or as soon as the streamed bytes pass the limit (chunked uploads)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(send)
        state = {"received": 0, "refused": False}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes and not state["refused"]:
                    state["refused"] = True
                    await self._refuse(send)
                if state["refused"]:
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not state["refused"]:  # after a 413 the app's own answer is dropped
                await send(message)

        await self.app(scope, limited_receive, guarded_send)

    async def _refuse(self, send) -> None:
        body = json.dumps({"detail": f"request body over the limit of {self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def decode_upload(data: bytes, content_type: str | None, cfg: ServeConfig) -> Image.Image:
    """The uploaded image as a viewer shows it (:func:`cirlab.data.images.to_rgb`: upright, 8-bit,
    transparency on white, the first frame), decoded only once its type, format and size are
    within the bounds."""
    if content_type not in cfg.allowed_types:
        raise HTTPException(415, f"image type {content_type!r} not accepted; send one of {cfg.allowed_types}")
    limit = min(cfg.max_pixels, images.MAX_PIXELS)
    try:
        image = images.open_image(io.BytesIO(data), "the upload")  # reads the header only
    except images.ImageTooLarge:
        raise HTTPException(413, f"image refused unread: its header declares over {limit} pixels") from None
    except images.UnreadableImage:
        raise HTTPException(415, "the upload is not a readable image") from None
    if image.format not in cfg.allowed_formats:
        raise HTTPException(415, f"image format {image.format} not accepted; send one of {cfg.allowed_formats}")
    width, height = image.size
    if width * height > limit:
        raise HTTPException(413, f"image of {width}x{height} pixels is over the limit of {limit} pixels")
    try:
        return images.to_rgb(images.decoded(image, "the upload"))
    except images.UnreadableImage as e:
        raise HTTPException(415, f"the image could not be decoded: {e}") from None


def gallery_root(searcher: Searcher) -> Path | None:
    """The deepest folder holding every gallery image outside the index folder, as the gallery
    names them at start (``index build`` writes real absolute paths); None when there is none.
    Entries without an image suffix are left out, so that a hand-written ``/etc/passwd`` entry
    cannot widen it to ``/``."""
    folder = searcher.folder.resolve()
    parents = {os.path.dirname(p) for p in searcher.index.gallery.values()  # str functions: 1M entries in ~1 s
               if os.path.isabs(p) and os.path.splitext(p)[1].lower() in IMAGE_SUFFIXES}
    outside = [p for p in parents if not Path(p).is_relative_to(folder)]
    return Path(os.path.commonpath(outside)).resolve() if outside else None


def servable(path: Path, roots: list[Path]) -> tuple[Path, str] | None:
    """The real path and media type of gallery file ``path`` if it may be served, else None: its
    name has an image suffix, its real path (symlinks resolved) lies inside one of ``roots``, and
    Pillow reads its header as PNG, JPEG or WEBP (the type comes from the content, not the name)."""
    real = path.resolve()
    if path.suffix.lower() not in IMAGE_SUFFIXES or not any(real.is_relative_to(r) for r in roots):
        return None
    try:
        with images.open_image(real) as image:
            return (real, SERVED_FORMATS[image.format]) if image.format in SERVED_FORMATS else None
    except OSError:  # absent, not an image, too large
        return None


def file_namer(searcher: Searcher, root: Path | None):
    """``name(id)``: a gallery image's file as the page shows it: relative to the gallery root
    (``shoes/red-1.jpg``), or to the index folder for images added through the API
    (``added/x.png``), else its file name alone; never an absolute server path. String
    operations only: no filesystem call per hit."""
    bases = [str(b) + os.sep for b in (root, searcher.folder.resolve())
             if b is not None and b.parent != b]  # "/" as a base would name the whole path
    folder = str(searcher.folder.resolve())

    def name(image_id: str) -> str:
        path = os.path.normpath(os.path.join(folder, searcher.index.gallery[image_id]))
        base = next((b for b in bases if path.startswith(b)), None)
        return Path(path[len(base):]).as_posix() if base else os.path.basename(path)

    return name


def model_info(searcher: Searcher) -> dict[str, Any]:
    """What the page's header says of the model: its name (the model folder's name, or the run's
    for an exported ``<run>/model``, as the index recorded it; never the path), its kind, the
    row name it has in result tables, its backbone and whether it re-ranks."""
    recorded = Path(str(searcher.index.model.get("path") or ""))
    folder = recorded.parent if recorded.name == "model" and recorded.parent.name else recorded
    composer = searcher.composer
    return {"name": folder.name or composer.name, "kind": composer.kind, "row": composer.name,
            "backbone": getattr(composer.backbone, "kind", None), "rerank": searcher.can_rerank}


def docs_assets() -> Path | None:
    """The folder holding Swagger UI's script and style sheet (the package ``fastapi-offline``),
    or None when it is not installed: then ``/docs`` is off (404), since FastAPI's own page loads
    them from a CDN and stays blank offline."""
    try:
        import fastapi_offline
    except ImportError:
        return None
    folder = Path(fastapi_offline.__file__).parent / "static"
    needed = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")
    return folder if all((folder / f).is_file() for f in needed) else None


def check_new_id(image_id: str) -> None:
    """Refuse (422) an id that is not a clean relative name, or that the filesystem would refuse as
    ``added/<id>.png``: a control character (NUL included) or a part over 255 bytes."""
    parts = image_id.split("/")
    if any(part in ("", ".", "..") for part in parts) or "\\" in image_id:
        raise HTTPException(422, f"gallery id {image_id!r} is not a clean relative name")
    control = next((c for c in image_id if unicodedata.category(c) == "Cc"), None)
    if control is not None:
        raise HTTPException(422, f"gallery id {image_id!r} holds the control character {control!r}")
    parts[-1] += ".png"
    long = next((part for part in parts if len(os.fsencode(part)) > 255), None)
    if long is not None:
        raise HTTPException(422, f"gallery id {image_id!r}: the file name {long[:20]!r}... would be "
                                 f"{len(os.fsencode(long))} bytes, over the filesystem's 255 (with '.png')")


def missing_field(field: str) -> str:
    return f"{field} is empty; send {FORM_FIELDS[field]} as the form field {field!r} of a multipart/form-data body"


def sentence(error: dict[str, Any]) -> str:
    """One of FastAPI's validation errors as a sentence naming the field."""
    loc = [str(part) for part in error.get("loc", ())] or ["body", "request"]
    where, field = loc[0], loc[-1]
    if error.get("type") == "missing" and field in FORM_FIELDS:
        return missing_field(field)
    kind = {"body": "form field", "query": "query parameter", "path": "path parameter"}.get(where, where)
    return f"{kind} {field!r}: {error.get('msg', 'invalid')}"


def create_app(searcher: Searcher, cfg: ServeConfig | None = None, *, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving ``searcher`` within ``cfg``'s bounds; ``api_key`` enables index changes."""
    cfg = cfg or ServeConfig()
    root = Path(cfg.gallery_root).resolve() if cfg.gallery_root else gallery_root(searcher)
    roots = [searcher.folder.resolve(), *([root] if root else [])]  # where served images may lie
    pace = {"batch_s": 0.0}  # how long the last batch took: what a 429's Retry-After is computed from

    def run(items: list[tuple[SearchQuery, int, int | None]]) -> list[Any]:
        start = time.perf_counter()
        try:
            return run_batch(items)
        finally:
            pace["batch_s"] = time.perf_counter() - start

    def run_batch(items: list[tuple[SearchQuery, int, int | None]]) -> list[Any]:
        """One model call per batch: plain queries together, re-ranked ones one by one."""
        out: list[Any] = [None] * len(items)
        plain = [n for n, (_, _, rerank) in enumerate(items) if not rerank]
        if plain:
            hits = searcher.search([items[n][0] for n in plain], k=max(items[n][1] for n in plain))
            for n, h in zip(plain, hits):
                out[n] = h[:items[n][1]]
        for n, (query, k, rerank) in enumerate(items):
            if rerank:
                try:
                    out[n] = searcher.search([query], k=k, rerank=rerank)[0]
                except Exception as e:
                    out[n] = e
        return out

    metrics = Metrics(lambda: batcher.depth)
    batcher = Batcher(run, max_batch=cfg.max_batch, wait_ms=cfg.batch_wait_ms, max_queue=cfg.max_queue,
                      on_batch=metrics.batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="cirlab", description="Composed image retrieval over one index", lifespan=lifespan,
                  docs_url=None, redoc_url=None)  # FastAPI's own pages load from CDNs: see add_docs
    app.state.searcher, app.state.batcher, app.state.config = searcher, batcher, cfg
    file_name = file_namer(searcher, root)

    @app.middleware("http")
    async def count(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.request(request.method, getattr(route, "path", "unmatched"), response.status_code,
                        time.perf_counter() - start)
        return response

    app.add_middleware(BodyLimit, max_bytes=cfg.max_upload_bytes)
    app.add_middleware(SecurityHeaders)  # added last: outermost

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"detail": "; ".join(sentence(e) for e in exc.errors())}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400:  # only the form parser answers 400
            exc = HTTPException(400, f"the request body could not be read as multipart/form-data: {exc.detail}")
        return await http_exception_handler(request, exc)

    def retry_after() -> dict[str, str]:
        """Seconds until the queue has drained at the last batch's pace (at least 1)."""
        batches = math.ceil(batcher.depth / cfg.max_batch)
        return {"Retry-After": str(max(1, math.ceil(batches * pace["batch_s"])))}

    def unavailable(e: Exception) -> HTTPException:
        return HTTPException(503, f"the vector backend ({searcher.index.backend}) is unavailable: {e}; retry shortly")

    def hit_json(hits) -> list[dict[str, Any]]:
        return [{"id": h.id, "score": h.score, "url": f"/images/{h.id}", "file": file_name(h.id)} for h in hits]

    @app.post("/search")
    async def search(text: str = Form(...), k: int = Form(10), id: str | None = Form(None),
                     rerank: int | None = Form(None), image: UploadFile | None = File(None)):
        if not text.strip():
            raise HTTPException(422, missing_field("text"))
        if len(text) > cfg.max_text_chars:
            raise HTTPException(422, f"text of {len(text)} characters is over the limit of {cfg.max_text_chars}")
        if not 1 <= k <= cfg.max_k:
            raise HTTPException(422, f"k must be between 1 and {cfg.max_k}, got {k}")
        if (image is None) == (id is None):
            raise HTTPException(422, "send exactly one reference: an image upload or a gallery id")
        if rerank is not None:
            if not searcher.can_rerank:
                raise HTTPException(422, f"this model ({searcher.composer.kind}) has no re-ranking stage")
            if not 1 <= rerank <= cfg.max_k:
                raise HTTPException(422, f"rerank must be between 1 and {cfg.max_k}, got {rerank}")
        if id is not None:
            if id not in searcher.index:
                raise HTTPException(404, f"unknown gallery id {id!r}")
            query = SearchQuery(text, id=id)
        else:
            data = await image.read()
            query = SearchQuery(text, image=await asyncio.to_thread(decode_upload, data, image.content_type, cfg))
        start = time.perf_counter()
        try:
            hits = await batcher.submit((query, k, rerank), timeout=cfg.request_timeout_s)
        except QueueFull:
            raise HTTPException(429, "too many queries waiting; retry after the seconds in Retry-After",
                                headers=retry_after()) from None
        except asyncio.TimeoutError:
            raise HTTPException(504, f"no answer within {cfg.request_timeout_s} s") from None
        except ConnectionError as e:
            raise unavailable(e) from None
        return {"reference": id, "text": text, "k": k, "rerank": rerank, "results": hit_json(hits),
                "ms": round(1000 * (time.perf_counter() - start), 2)}

    @app.get("/images/{image_id:path}")
    async def images(image_id: str):
        if image_id not in searcher.index:  # only gallery ids: no path from the request reaches the disk
            raise HTTPException(404, f"unknown gallery id {image_id!r}")
        served = await asyncio.to_thread(servable, searcher.image_path(image_id), roots)
        if served is None:
            raise HTTPException(404, f"the image file of {image_id!r} is gone, or not an image inside the gallery")
        return FileResponse(served[0], media_type=served[1])

    @app.get("/gallery")
    async def gallery(offset: int = Query(0, ge=0), limit: int = Query(48, ge=1, le=1000)):
        ids = searcher.index.ids()
        page = ids[offset:offset + limit]
        return {"total": len(ids), "offset": offset, "ids": page, "files": [file_name(i) for i in page]}

    @app.get("/model")
    async def model():
        """The model's name, kind, row name, backbone and whether it re-ranks (no backend probe)."""
        return model_info(searcher)

    @app.get("/healthz")
    async def healthz():
        """200 while the backend answers its probe within ``health_timeout_s``, else 503."""
        try:
            await asyncio.wait_for(asyncio.to_thread(searcher.index.probe), cfg.health_timeout_s)
        except asyncio.TimeoutError:
            return JSONResponse({"status": "unavailable", "detail": f"the vector backend ({searcher.index.backend}) "
                                 f"did not answer within {cfg.health_timeout_s} s"}, status_code=503)
        except Exception as e:  # ConnectionError, or whatever a client library raises while its server is away
            return JSONResponse({"status": "unavailable", "detail": str(e)}, status_code=503)
        return {"status": "ok", "images": len(searcher.index), "model": searcher.composer.name,
                "backend": searcher.index.backend, "rerank": searcher.can_rerank}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    def authorize(key: str | None) -> None:
        if api_key is None:
            raise HTTPException(403, "index changes are disabled: start the server with --api-key")
        if key is None or not hmac.compare_digest(key, api_key):
            raise HTTPException(401, "a valid X-API-Key header is needed to change the index")

    async def in_model_thread(fn, *args):
        """Index changes run on the model's thread, between batches, never during a search."""
        try:
            return await asyncio.get_running_loop().run_in_executor(batcher.executor, fn, *args)
        except ConnectionError as e:
            raise unavailable(e) from None

    @app.post("/index/images")
    async def add_image(id: str = Form(..., min_length=1, max_length=256), image: UploadFile = File(...),
                        x_api_key: str | None = Header(None)):
        authorize(x_api_key)
        check_new_id(id)
        picture = await asyncio.to_thread(decode_upload, await image.read(), image.content_type, cfg)

        def add() -> None:
            file = Path("added") / f"{id}.png"
            (searcher.folder / file).parent.mkdir(parents=True, exist_ok=True)
            picture.save(searcher.folder / file, format="PNG")
            vector = searcher.composer.encode_gallery([picture]).cpu().numpy()
            searcher.index.add([id], vector, [file.as_posix()])
            searcher.index.save(searcher.folder)

        await in_model_thread(add)
        return {"added": id, "images": len(searcher.index)}

    @app.delete("/index/images/{image_id:path}")
    async def remove_image(image_id: str, x_api_key: str | None = Header(None)):
        authorize(x_api_key)
        if image_id not in searcher.index:
            raise HTTPException(404, f"unknown gallery id {image_id!r}")

        def remove() -> None:
            searcher.index.remove([image_id])
            searcher.index.save(searcher.folder)

        await in_model_thread(remove)
        return {"removed": image_id, "images": len(searcher.index)}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    add_docs(app)
    return app


def add_docs(app: FastAPI) -> None:
    """``/docs`` (Swagger UI) with its files served from ``/docs-assets``, when
    :func:`docs_assets` finds them; no request leaves this server (the online validator's badge
    is off too). ``/redoc`` stays off: ReDoc's page fetches its vendor's logo from a CDN."""
    from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html

    assets = docs_assets()
    if assets is None:
        return
    app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="cirlab API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon.png",
                                   oauth2_redirect_url=app.swagger_ui_oauth2_redirect_url,
                                   swagger_ui_parameters={"validatorUrl": None})

    @app.get(app.swagger_ui_oauth2_redirect_url, include_in_schema=False)
    async def swagger_redirect():
        return get_swagger_ui_oauth2_redirect_html()
