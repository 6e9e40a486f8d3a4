"""Image captioners for SPN's generated positives, and the on-disk cache that makes captioning resumable.

SPN (Feng et al., "Improving Composed Image Retrieval via Contrastive Learning with Scaling
Positives and Negatives", code BUAADreamer/SPN4CIR) captions every training image with a
multimodal LLM ("please briefly describe the image in {k} words") and writes modification texts
from two images' captions. Three captioners share one interface, ``caption(items) -> texts``:

* ``shapes``: the shapes scene graph, described within a budget of ``words`` words (the
  benchmark's stand-in for the LLM: exact, and free);
* ``hf``: any local HF image-to-text checkpoint folder (BLIP, GIT, ...) through ``AutoProcessor``
  and ``AutoModelForImageTextToText``;
* ``chat``: an OpenAI-compatible ``/chat/completions`` endpoint serving a multimodal model
  (LLaVA behind vLLM, for instance), with a timeout, retries and backoff.

:class:`CaptionCache` appends each caption to a JSONL file as soon as it exists and is read back
on the next run, so an interrupted run loses nothing and a rerun never asks for a caption twice.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Literal, Protocol, Sequence

from pydantic import Field

from cirlab.config import Strict
from cirlab.data.images import load_image
from cirlab.utils.crash import crash_point, register
from cirlab.utils.io import read_json


class CaptionerConfig(Strict):
    kind: Literal["shapes", "hf", "chat"] = "shapes"
    words: int = Field(10, ge=1, description="the word budget k: 'describe the image in {k} words' "
                       "(SPN: 5 for FashionIQ, 10 for CIRR)")
    prompt: str = Field("please briefly describe the image in {k} words", description="chat (and hf, if the "
                        "model takes a prompt): {k} is the word budget, {category} the FashionIQ category")
    path: str | None = Field(None, description="hf: the checkpoint folder")
    max_new_tokens: int = 30
    url: str | None = Field(None, description="chat: the API base, e.g. http://127.0.0.1:8000/v1")
    model: str = "llava"
    api_key_env: str = Field("OPENAI_API_KEY", description="chat: the environment variable holding the key, if any")
    temperature: float = 0.2  # SPN's LLaVA setting
    timeout_s: float = Field(60.0, gt=0)
    retries: int = Field(3, ge=0)
    backoff_s: float = Field(1.0, ge=0)
    batch_size: int = Field(16, ge=1)


class Captioner(Protocol):
    signature: str  # what the cache keys on: a caption from another captioner is not reused
    batch_size: int  # images per call, and per write to the cache

    def caption(self, items: Sequence[tuple[str, Path]]) -> list[str]:
        """Captions of ``(image id, image file)`` pairs, in order."""


def word_budget_caption(objects: Sequence[dict], words: int) -> str:
    """A shapes scene in at most ``words`` words: every object's colour and shape first (grid
    order), then sizes, then positions, as far as the budget goes; objects that do not fit at
    all are left out, as a short human caption leaves things out."""
    if not objects:
        return "an empty scene"
    parts = [[o["colour"], o["shape"]] for o in objects]
    while parts and sum(map(len, parts)) > words:
        parts.pop()
    for o, p in zip(objects, parts):  # sizes, then positions, while they fit
        if sum(map(len, parts)) + 1 <= words:
            p.insert(0, o["size"])
    for o, p in zip(objects, parts):
        if sum(map(len, parts)) + 3 <= words:
            p.extend(["at", "the", o["cell"]])
    return ", ".join(" ".join(p) for p in parts) if parts else objects[0]["shape"]


class ShapesCaptioner:
    """Captions from the shapes generator's scene file (``scenes/scenes.shapes.<split>.json``)."""

    def __init__(self, root: str | Path, split: str, words: int):
        path = Path(root) / "scenes" / f"scenes.shapes.{split}.json"
        self.scenes = read_json(path, "shapes scene file")
        self.words, self.path, self.batch_size = words, path, 1024
        self.signature = f"shapes-scene-graph-{words}w"

    def caption(self, items: Sequence[tuple[str, Path]]) -> list[str]:
        out = []
        for image_id, _ in items:
            if image_id not in self.scenes:
                raise KeyError(f"{self.path}: no scene for image {image_id!r}")
            out.append(word_budget_caption(self.scenes[image_id]["objects"], self.words))
        return out


class HFCaptioner:
    """A local HF image-to-text checkpoint; ``prompt`` conditions it where the model takes one."""

    def __init__(self, folder: str | Path, *, prompt: str | None = None, max_new_tokens: int = 30,
                 batch_size: int = 16):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"captioner.path: {folder} is not a HF checkpoint folder (no config.json)")
        self.processor = AutoProcessor.from_pretrained(folder)
        self.model = AutoModelForImageTextToText.from_pretrained(folder).eval()
        self.torch, self.prompt, self.max_new_tokens, self.batch_size = torch, prompt, max_new_tokens, batch_size
        self.signature = f"hf:{folder.resolve()}:{prompt}:{max_new_tokens}"

    def caption(self, items: Sequence[tuple[str, Path]]) -> list[str]:
        images = [load_image(path) for _, path in items]
        kwargs = {"text": [self.prompt] * len(images)} if self.prompt else {}
        inputs = self.processor(images=images, return_tensors="pt", **kwargs)
        with self.torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]


class ChatCaptioner:
    """An OpenAI-compatible chat endpoint: one request per image, the image as a data URL."""

    batch_size = 1  # every answer is cached as soon as it arrives

    def __init__(self, cfg: CaptionerConfig):
        if not cfg.url:
            raise ValueError("captioner.url: the chat captioner needs the API base URL")
        self.cfg = cfg
        self.endpoint = cfg.url.rstrip("/") + "/chat/completions"
        self.prompt = cfg.prompt.replace("{k}", str(cfg.words))
        self.signature = f"chat:{cfg.url}:{cfg.model}:{self.prompt}:{cfg.temperature}"

    def _request(self, image_path: Path) -> urllib.request.Request:
        buf = io.BytesIO()
        load_image(image_path).save(buf, format="PNG")
        data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        body = {"model": self.cfg.model, "temperature": self.cfg.temperature, "max_tokens": self.cfg.max_new_tokens,
                "messages": [{"role": "user", "content": [{"type": "text", "text": self.prompt},
                                                          {"type": "image_url", "image_url": {"url": data_url}}]}]}
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.cfg.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return urllib.request.Request(self.endpoint, data=json.dumps(body).encode(), headers=headers, method="POST")

    def _one(self, image_id: str, image_path: Path) -> str:
        last = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(self._request(image_path), timeout=self.cfg.timeout_s) as r:
                    reply = json.loads(r.read())
                return str(reply["choices"][0]["message"]["content"]).strip()
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
                if e.code < 500 and e.code != 429:  # a bad request does not get better by retrying
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (KeyError, IndexError, TypeError, ValueError) as e:
                last = f"unexpected reply ({type(e).__name__}: {e})"
        raise RuntimeError(f"captioner {self.endpoint}: no caption for image {image_id!r} after "
                           f"{attempt + 1} attempt(s): {last}")

    def caption(self, items: Sequence[tuple[str, Path]]) -> list[str]:
        return [self._one(i, p) for i, p in items]


def build_captioner(cfg: CaptionerConfig, root: str | Path, split: str) -> Captioner:
    if cfg.kind == "shapes":
        return ShapesCaptioner(root, split, cfg.words)
    if cfg.kind == "hf":
        if not cfg.path:
            raise ValueError("captioner.path: the hf captioner needs a checkpoint folder")
        prompt = cfg.prompt.replace("{k}", str(cfg.words)) if "{k}" in cfg.prompt else cfg.prompt
        return HFCaptioner(cfg.path, prompt=prompt or None, max_new_tokens=cfg.max_new_tokens,
                           batch_size=cfg.batch_size)
    return ChatCaptioner(cfg)


CACHE_APPENDED = register("caption_cache:appended", "data/captioners.py CaptionCache.add: a batch of captions "
                          "appended and flushed")


class CaptionCache:
    """Captions by image id for one captioner, in an append-only JSONL file.

    Each batch of captions is written and flushed to disk as soon as the captioner returns it. A
    line cut short by a crash is ignored when the file is read back, so at most the batch being
    written is lost."""

    def __init__(self, path: str | Path, signature: str):
        self.path, self.signature = Path(path), signature
        self.captions: dict[str, str] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the torn last line of an interrupted run
                if record.get("captioner") == signature:
                    self.captions[record["id"]] = record["caption"]

    def add(self, captions: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for image_id, caption in captions.items():
                f.write(json.dumps({"id": image_id, "caption": caption, "captioner": self.signature}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        crash_point(CACHE_APPENDED, str(self.path))
        self.captions.update(captions)


def caption_images(captioner: Captioner, items: Sequence[tuple[str, Path]], cache: CaptionCache) -> dict[str, str]:
    """Captions of every ``(id, path)``, asking the captioner only for those the cache lacks."""
    from cirlab.utils.progress import progress

    todo = [(i, p) for i, p in dict(items).items() if i not in cache.captions]
    starts = range(0, len(todo), captioner.batch_size)
    for s in progress(starts, desc=f"captioning {len(todo)} images") if todo else starts:
        chunk = todo[s:s + captioner.batch_size]
        cache.add({image_id: text for (image_id, _), text in zip(chunk, captioner.caption(chunk), strict=True)})
    return {i: cache.captions[i] for i, _ in items}
