"""Preprocessing against hand-computed sizes, offsets and values (torchvision / CLIP4Cir arithmetic)."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from cirlab.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    CenterCrop,
    Resize,
    SquarePad,
    TargetPad,
    build_transform,
    to_tensor,
)

WHITE = (255, 255, 255)


def white(w, h):
    return Image.new("RGB", (w, h), WHITE)


def coords(w, h):
    """Pixel (x, y) holds R=x, G=y, so a crop's offsets can be read off its first pixel."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[..., 0] = np.arange(w)[None, :]
    a[..., 1] = np.arange(h)[:, None]
    return Image.fromarray(a)


def test_targetpad_wide_image_pads_top_and_bottom():
    # 100x50: ratio 2 >= 1.25; scaled = 100 / 1.25 = 80; hp = max(int((80-100)/2), 0) = 0; vp = int(30/2) = 15
    out = TargetPad(1.25)(white(100, 50))
    assert out.size == (100, 80)
    a = np.asarray(out)
    assert (a[:15] == 0).all() and (a[65:] == 0).all()
    assert (a[15:65] == 255).all()


def test_targetpad_tall_and_odd_sizes():
    # 50x200: scaled = 160; hp = int(110/2) = 55, vp = max(int(-40/2), 0) = 0
    assert TargetPad(1.25)(white(50, 200)).size == (160, 200)
    # 101x50: scaled = 80.8; vp = int(30.8/2) = 15 (truncated, not rounded)
    assert TargetPad(1.25)(white(101, 50)).size == (101, 80)
    # 2:1 with ratio 1.5: scaled = 133.33; vp = int(33.33/2) = 16
    assert TargetPad(1.5)(white(200, 100)).size == (200, 132)


def test_targetpad_leaves_near_square_images_alone():
    image = white(110, 100)  # ratio 1.1 < 1.25
    assert TargetPad(1.25)(image) is image
    # exactly 1.25 is padded "to" 1.25, i.e. by zero pixels
    assert TargetPad(1.25)(white(125, 100)).size == (125, 100)


def test_squarepad():
    out = SquarePad()(white(100, 50))
    assert out.size == (100, 100)
    a = np.asarray(out)
    assert (a[:25] == 0).all() and (a[25:75] == 255).all() and (a[75:] == 0).all()
    assert SquarePad()(white(101, 50)).size == (101, 100)  # vp = int(51/2) = 25 on each side
    assert SquarePad()(white(30, 70)).size == (70, 70)


def test_resize_shorter_side_keeps_aspect():
    assert Resize(20)(white(100, 50)).size == (40, 20)
    assert Resize(16)(white(30, 70)).size == (16, 37)  # int(16 * 70 / 30) = int(37.33)
    assert Resize(16)(white(16, 40)).size == (16, 40)


def test_center_crop_offsets():
    def offsets(w, h, dim):
        r, g, _ = CenterCrop(dim)(coords(w, h)).getpixel((0, 0))
        return r, g

    assert offsets(40, 20, 20) == (10, 0)
    assert offsets(40, 23, 20) == (10, 2)  # round(1.5) = 2
    assert offsets(40, 21, 20) == (10, 0)  # round(0.5) = 0: Python rounds half to even, as torchvision
    assert offsets(25, 40, 20) == (2, 10)  # round(2.5) = 2
    assert CenterCrop(20)(coords(40, 23)).size == (20, 20)


def test_to_tensor_scales_to_unit_range():
    t = to_tensor(Image.new("RGB", (3, 2), (255, 0, 51)))
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    assert torch.allclose(t[0], torch.ones(2, 3))
    assert torch.allclose(t[1], torch.zeros(2, 3))
    assert torch.allclose(t[2], torch.full((2, 3), 0.2))


@pytest.mark.parametrize("kind", ["targetpad", "squarepad", "resize"])
def test_constant_image_is_normalised_with_clip_statistics(kind):
    out = build_transform(kind, 16)(Image.new("RGB", (30, 20), (128, 64, 200)))
    assert out.shape == (3, 16, 16)
    center = out[:, 8, 8]
    expected = [(v / 255 - m) / s for v, m, s in zip((128, 64, 200), CLIP_MEAN, CLIP_STD)]
    assert torch.allclose(center, torch.tensor(expected), atol=1e-5)


def test_targetpad_pipeline_shows_black_bars_that_resize_does_not():
    image = white(100, 50)
    black = torch.tensor([(0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    white_value = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    # padded to 100x80, resized to 50x40, cropped to 40x40: the top 7.5 rows are padding
    padded = build_transform("targetpad", 40)(image)
    assert torch.allclose(padded[:, 0, :], black[:, None].expand(3, 40), atol=1e-5)
    assert torch.allclose(padded[:, 20, :], white_value[:, None].expand(3, 40), atol=1e-5)
    plain = build_transform("resize", 40)(image)
    assert torch.allclose(plain[:, 0, :], white_value[:, None].expand(3, 40), atol=1e-5)


def test_near_square_image_targetpad_equals_plain_resize():
    image = coords(44, 40)
    assert torch.equal(build_transform("targetpad", 24)(image), build_transform("resize", 24)(image))


def test_transform_pickles_for_dataloader_workers():
    t = build_transform("targetpad", 8, target_ratio=1.5)
    image = coords(30, 12)
    assert torch.equal(pickle.loads(pickle.dumps(t))(image), t(image))


def test_unknown_kind():
    with pytest.raises(ValueError, match="targetpad"):
        build_transform("crop", 8)


def _denormalised(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)


def test_an_rgba_file_is_padded_transparent_and_converted_last_as_the_official_pipeline(tmp_path):
    """torchvision's pipeline in the official code pads and resizes the image in its own mode and
    converts to RGB after the crop: an RGBA image's padding is transparent, and Pillow resamples
    RGBA with premultiplied alpha, so the red next to the padding stays red. Decoding to RGB first
    (cirlab did, found against the official code: docs/compat.md) blends it with black."""
    from cirlab.composers import QueryRecipe, ZeroShotComposer
    from cirlab.models import build_small_blip

    Image.new("RGBA", (100, 40), (255, 0, 0, 255)).save(tmp_path / "red.png")  # TargetPad adds rows above and below
    composer = ZeroShotComposer(build_small_blip(image_size=64, stage_channels=(8, 8, 8, 8)), QueryRecipe())
    ours = _denormalised(composer.pixels([tmp_path / "red.png"])[0])
    first = _denormalised(build_transform("targetpad", 64)(Image.open(tmp_path / "red.png").convert("RGB")))
    inside = ours[0].max(dim=1).values > 0.5  # the rows with red in them
    assert 0 < inside.sum() < 64 and ours[0][inside].min() > 0.98  # fully red up to the padding
    assert first[0][inside].min() < 0.9  # converting first darkens the edge rows
    assert ours[:, ~inside].abs().max() < 1e-6  # the padding is black once the alpha is dropped


def test_a_palette_image_is_resampled_nearest_like_pillow_does_in_mode_p():
    palette = Image.new("P", (50, 50))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (0, 0, 25, 50))  # left half blue, right half red
    x = _denormalised(build_transform("resize", 32)(palette))
    colours = {tuple(round(v, 2) for v in x[:, i, j].tolist()) for i in range(32) for j in range(32)}
    assert colours == {(0.0, 0.0, 1.0), (1.0, 0.0, 0.0)}  # no blend of the two: nearest, not bicubic
