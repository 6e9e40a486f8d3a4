"""Shared fixtures: a tiny shapes benchmark and a tiny BLIP briefly pretrained on it.

A randomly initialised image tower barely tells scenes apart, so composed-retrieval tests that
must show recall rising start from a backbone given a few seconds of ITC pretraining."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from cirlab.data.registry import load_split
from cirlab.data.shapes import synthesize
from cirlab.data.transforms import build_transform
from cirlab.methods import pretrain
from cirlab.models import build_small_blip, save_backbone

TINY_BLIP = dict(embed_dim=32, text_hidden=32, text_layers=2, text_heads=2, vision_hidden=32,
                 stage_channels=(8, 8, 16, 16))


@pytest.fixture(scope="session", autouse=True)
def feature_cache(tmp_path_factory):
    """Every test shares one feature cache in a temporary folder, never the user's."""
    import os

    path = tmp_path_factory.mktemp("feature-cache")
    old = os.environ.get("CIRLAB_CACHE")
    os.environ["CIRLAB_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("CIRLAB_CACHE")
    else:
        os.environ["CIRLAB_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-shapes")
    synthesize(root, train_scenes=60, val_scenes=8, test_scenes=8, workers=1, seed=5)
    return root


@pytest.fixture(scope="session")
def tiny_random_blip(tmp_path_factory):
    """Folder of a randomly initialised tiny BLIP (seconds to make, where no training is needed)."""
    torch.manual_seed(0)
    return save_backbone(build_small_blip(**TINY_BLIP), tmp_path_factory.mktemp("tiny-random-blip") / "blip")


@pytest.fixture(scope="session")
def tiny_pretrained_blip(tiny_shapes, tmp_path_factory):
    """Folder of a tiny BLIP after a short ITC pretraining on the tiny shapes train images."""
    torch.manual_seed(0)
    backbone = build_small_blip(**TINY_BLIP)
    model = pretrain.Pretrainer(backbone, pretrain.PretrainConfig(itm=False))
    split = load_split("shapes", tiny_shapes, "train")
    data = pretrain.CaptionedImages(split, pretrain.scene_captions(tiny_shapes, "train"),
                                    build_transform("targetpad", backbone.image_size))
    items = [data[i] for i in range(len(data))]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(PRETRAIN_EPOCHS):
        for batch in torch.randperm(len(items), generator=g).split(64):
            out = model.training_step({"image": torch.stack([items[i]["image"] for i in batch]),
                                       "caption": [items[i]["caption"] for i in batch]})
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
    return save_backbone(backbone.eval(), tmp_path_factory.mktemp("tiny-blip") / "blip")


PRETRAIN_EPOCHS = 25


@pytest.fixture(scope="session")
def cirr_test1(tmp_path_factory):
    """``(root, queries)``: a CIRR layout with only test1 (no targets), 56 noise images, 4 queries
    with 6-member sets: what a test submission is written from."""
    import json

    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("cirr") / "cirr_dataset"
    rng = np.random.default_rng(0)
    images = {}
    for i in range(56):
        path = root / "test1" / f"t{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        images[f"t{i}"] = f"./test1/t{i}.png"
    queries = [{"pairid": 100 + q, "reference": f"t{6 * q}", "caption": "make it blue",
                "img_set": {"id": q, "members": [f"t{6 * q + j}" for j in range(6)]}} for q in range(4)]
    for sub, name, obj in (("captions", "cap", queries), ("image_splits", "split", images)):
        (root / "cirr" / sub).mkdir(parents=True, exist_ok=True)
        (root / "cirr" / sub / f"{name}.rc2.test1.json").write_text(json.dumps(obj))
    return root, queries


@pytest.fixture(scope="session")
def tiny_index(tiny_shapes, tiny_pretrained_blip, tmp_path_factory):
    """``(model folder, index folder)``: a zero-shot composer over the tiny shapes test gallery,
    indexed with ``cirlab index build`` (exact faiss)."""
    from cirlab.cli import main
    from cirlab.composers import QueryRecipe, ZeroShotComposer
    from cirlab.models import load_backbone

    tmp = tmp_path_factory.mktemp("tiny-index")
    model = ZeroShotComposer(load_backbone(tiny_pretrained_blip), QueryRecipe(), "sum").save(tmp / "model")
    assert main(["index", "build", "--model", str(model), "--dataset", "shapes", "--root", str(tiny_shapes),
                 "--split", "test", "--out", str(tmp / "index")]) == 0
    return model, tmp / "index"


class StubChat(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions stub: fails as ``server.plan`` says, then answers."""

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        action = self.server.plan.pop(0) if self.server.plan else "ok"
        if action == "500" or action == "400":
            self.send_response(int(action))
            self.end_headers()
            return
        if action == "slow":
            threading.Event().wait(1.0)
        content = body["messages"][0]["content"]
        reply = {"choices": [{"message": {"content": f" caption {len(self.server.requests)} "
                                                      f"({content[0]['text']}) "}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture()
def stub_chat():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubChat)
    server.requests, server.plan = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
