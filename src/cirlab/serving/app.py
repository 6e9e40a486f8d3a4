"""The HTTP API and web page: ``create_app(searcher, config)`` -> a FastAPI app.

Endpoints: ``POST /search`` (an uploaded image or a gallery id, a text, k, optional re-ranking),
``GET /images/{id}`` (gallery images only), ``GET /gallery`` (ids, for the page's picker),
``GET /healthz``, ``GET /metrics`` (Prometheus text), and with an API key ``POST /index/images``
and ``DELETE /index/images/{id}``; ``/`` is the web page (static files, no build step).

Every bound is checked before work is spent on a request: the body size before it is read
(413), the declared type and the decoded format against allow-lists (415), the pixel count from
the image header before decoding (413: a decompression bomb is never decoded), the text length
and k (422), the queue (429) and a per-request timeout (504).
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, Header, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError

from cirlab.config import ServeConfig
from cirlab.retrieval.search import Query as SearchQuery
from cirlab.retrieval.search import Searcher
from cirlab.serving.batching import Batcher, QueueFull
from cirlab.serving.metrics import Metrics

STATIC = Path(__file__).parent / "static"


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
    """The uploaded image, decoded only once its type, format and size are within the bounds."""
    if content_type not in cfg.allowed_types:
        raise HTTPException(415, f"image type {content_type!r} not accepted; send one of {cfg.allowed_types}")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:  # Pillow's own check of the header, at twice max_pixels
        raise HTTPException(413, f"image refused unread: {e}") from None
    except (UnidentifiedImageError, OSError):
        raise HTTPException(415, "the upload is not a readable image") from None
    if image.format not in cfg.allowed_formats:
        raise HTTPException(415, f"image format {image.format} not accepted; send one of {cfg.allowed_formats}")
    width, height = image.size
    if width * height > cfg.max_pixels:
        raise HTTPException(413, f"image of {width}x{height} pixels is over the limit of {cfg.max_pixels} pixels")
    try:
        image.load()
    except (OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise HTTPException(415, f"the image could not be decoded: {e}") from None
    return image.convert("RGB")


def create_app(searcher: Searcher, cfg: ServeConfig | None = None, *, api_key: str | None = None) -> FastAPI:
    cfg = cfg or ServeConfig()
    Image.MAX_IMAGE_PIXELS = cfg.max_pixels  # Pillow's own bomb guard, behind the header check

    def run(items: list[tuple[SearchQuery, int, int | None]]) -> list[Any]:
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

    app = FastAPI(title="cirlab", description="Composed image retrieval over one index", lifespan=lifespan)
    app.state.searcher, app.state.batcher, app.state.config = searcher, batcher, cfg

    @app.middleware("http")
    async def count(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.request(request.method, getattr(route, "path", "unmatched"), response.status_code,
                        time.perf_counter() - start)
        return response

    app.add_middleware(BodyLimit, max_bytes=cfg.max_upload_bytes)

    def hit_json(hits) -> list[dict[str, Any]]:
        return [{"id": h.id, "score": h.score, "url": f"/images/{h.id}"} for h in hits]

    @app.post("/search")
    async def search(text: str = Form(...), k: int = Form(10), id: str | None = Form(None),
                     rerank: int | None = Form(None), image: UploadFile | None = File(None)):
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
            raise HTTPException(429, "too many queries waiting; retry shortly") from None
        except asyncio.TimeoutError:
            raise HTTPException(504, f"no answer within {cfg.request_timeout_s} s") from None
        return {"reference": id, "text": text, "k": k, "rerank": rerank, "results": hit_json(hits),
                "ms": round(1000 * (time.perf_counter() - start), 2)}

    @app.get("/images/{image_id:path}")
    async def images(image_id: str):
        if image_id not in searcher.index:  # only gallery ids: no path from the request reaches the disk
            raise HTTPException(404, f"unknown gallery id {image_id!r}")
        path = searcher.image_path(image_id)
        if not path.is_file():
            raise HTTPException(404, f"the image file of {image_id!r} is gone")
        return FileResponse(path)

    @app.get("/gallery")
    async def gallery(offset: int = Query(0, ge=0), limit: int = Query(48, ge=1, le=1000)):
        ids = searcher.index.ids()
        return {"total": len(ids), "offset": offset, "ids": ids[offset:offset + limit]}

    @app.get("/healthz")
    async def healthz():
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
        return await asyncio.get_running_loop().run_in_executor(batcher.executor, fn, *args)

    @app.post("/index/images")
    async def add_image(id: str = Form(..., min_length=1, max_length=256), image: UploadFile = File(...),
                        x_api_key: str | None = Header(None)):
        authorize(x_api_key)
        if any(part in ("", ".", "..") for part in id.split("/")) or "\\" in id:
            raise HTTPException(422, f"gallery id {id!r} is not a clean relative name")
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
    return app
