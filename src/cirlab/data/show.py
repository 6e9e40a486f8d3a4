"""Pictures of triplets (one row per reference, text, target) and of search results."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..utils.io import atomic_path

PAD = 8
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
FRAME = (190, 190, 190)
HIT = (0, 160, 60)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable default font
    except TypeError:
        return ImageFont.load_default()


def _wrap(text: str, draw: ImageDraw.ImageDraw, font, width: float) -> list[str]:
    """Greedy word wrap to ``width`` pixels (a single over-long word keeps its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def _thumbnail(path: Path, thumb: int) -> Image.Image:
    if not Path(path).is_file():
        raise FileNotFoundError(f"triplet image not found: {path}")
    with Image.open(path) as im:
        return im.convert("RGB").resize((thumb, thumb), Image.Resampling.LANCZOS)


def draw_triplets(rows: list[tuple[Path, str, Path]], out_png: Path, *, thumb: int = 128) -> None:
    """Write a PNG grid with one row per triplet: reference, wrapped text, target."""
    if not rows:
        raise ValueError("draw_triplets: no triplets to draw")
    font = _font(max(10, thumb // 8))
    header_font = _font(max(10, thumb // 9))
    text_width = 2 * thumb
    line_height = int(font.size * 1.3) if hasattr(font, "size") else 14
    header = line_height + PAD
    width = 2 * thumb + text_width + 4 * PAD
    height = header + len(rows) * (thumb + PAD) + PAD
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    columns = (PAD, 2 * PAD + thumb, 3 * PAD + thumb + text_width)
    titles = ("reference", "modification", "target")
    for x, title, w in zip(columns, titles, (thumb, text_width, thumb)):
        draw.text((x + w / 2, PAD / 2), title, fill=INK, font=header_font, anchor="ma")
    for i, (reference, text, target) in enumerate(rows):
        y = header + i * (thumb + PAD)
        for x, path in ((columns[0], reference), (columns[2], target)):
            sheet.paste(_thumbnail(path, thumb), (x, y))
            draw.rectangle((x - 1, y - 1, x + thumb, y + thumb), outline=FRAME)
        lines = _wrap(text, draw, font, text_width - PAD)
        top = y + (thumb - len(lines) * line_height) / 2
        for k, line in enumerate(lines):
            draw.text((columns[1] + PAD / 2, top + k * line_height), line, fill=INK, font=font)
    with atomic_path(out_png) as tmp:
        sheet.save(tmp, format="PNG")


def draw_results(reference: Path, text: str, results: list[tuple[Path, str]], out_png: Path, *,
                 thumb: int = 128, columns: int = 5) -> None:
    """Write a PNG: the reference and the wrapped text on the left, the ranked results in a grid
    (``columns`` per row), each with its caption (id and score) under it."""
    font = _font(max(10, thumb // 10))
    line_height = int(font.size * 1.3) if hasattr(font, "size") else 14
    cell_w, cell_h = thumb + PAD, thumb + line_height + 2 * PAD
    rows = max(1, -(-len(results) // columns))
    left = thumb + 2 * PAD
    width = left + PAD + columns * cell_w + PAD
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_lines = _wrap(text, probe, font, thumb)
    height = max(PAD + thumb + PAD + len(text_lines) * line_height + PAD, PAD + rows * cell_h)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    sheet.paste(_thumbnail(reference, thumb), (PAD, PAD))
    draw.rectangle((PAD - 1, PAD - 1, PAD + thumb, PAD + thumb), outline=INK)
    for k, line in enumerate(text_lines):
        draw.text((PAD, 2 * PAD + thumb + k * line_height), line, fill=INK, font=font)
    for n, (path, caption) in enumerate(results):
        x = left + PAD + (n % columns) * cell_w
        y = PAD + (n // columns) * cell_h
        sheet.paste(_thumbnail(path, thumb), (x, y))
        draw.rectangle((x - 1, y - 1, x + thumb, y + thumb), outline=FRAME)
        draw.text((x, y + thumb + PAD / 2), f"{n + 1}. {caption}"[:40], fill=INK, font=font)
    with atomic_path(out_png) as tmp:
        sheet.save(tmp, format="PNG")


@dataclass(frozen=True)
class Example:
    """One query of :func:`draw_examples`: its reference, text and target, and each method's
    ranked results as (image, whether it counts as a hit), best first."""

    reference: Path
    text: str
    target: Path
    results: dict[str, list[tuple[Path, bool]]]


def draw_examples(examples: list[Example], out_png: Path, *, thumb: int = 72) -> None:
    """Write a PNG with one block per query: the reference, text and target on the left, then one
    line per method with its top results, hits outlined in green, so that what each method
    changes on the same query reads across the lines."""
    if not examples:
        raise ValueError("draw_examples: no queries to draw")
    font = _font(max(10, thumb // 6))
    line = int(font.size * 1.3) if hasattr(font, "size") else 14
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    methods = list(dict.fromkeys(m for e in examples for m in e.results))
    label_w = int(max(probe.textlength(m, font=font) for m in methods)) + 2 * PAD
    left = 2 * thumb + 3 * PAD
    k = max(len(r) for e in examples for r in e.results.values())
    width = left + label_w + k * (thumb + PAD) + PAD
    blocks = [_example_height(e, methods, probe, font, line, thumb) for e in examples]
    sheet = Image.new("RGB", (width, sum(blocks) + PAD), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    y = PAD
    for example, height in zip(examples, blocks):
        _draw_example(sheet, draw, example, methods, (y, left, label_w), font, line, thumb)
        y += height
        draw.line((PAD, y - PAD // 2, width - PAD, y - PAD // 2), fill=FRAME)
    with atomic_path(out_png) as tmp:
        sheet.save(tmp, format="PNG")


def _example_height(example: Example, methods: list[str], probe, font, line: int, thumb: int) -> int:
    """A block is as tall as its method lines or its reference, target and wrapped text."""
    text_h = len(_wrap(example.text, probe, font, 2 * thumb + PAD)) * line
    return max(len(methods) * (thumb + PAD), line + thumb + PAD + text_h) + 2 * PAD


def _draw_example(sheet, draw, example: Example, methods: list[str], at: tuple[int, int, int],
                  font, line: int, thumb: int) -> None:
    y, left, label_w = at
    for x, title, path in ((PAD, "reference", example.reference), (2 * PAD + thumb, "target", example.target)):
        draw.text((x, y), title, fill=INK, font=font)
        sheet.paste(_thumbnail(path, thumb), (x, y + line))
        draw.rectangle((x - 1, y + line - 1, x + thumb, y + line + thumb), outline=HIT if title == "target" else INK)
    for n, text in enumerate(_wrap(example.text, draw, font, 2 * thumb + PAD)):
        draw.text((PAD, y + line + thumb + PAD + n * line), text, fill=INK, font=font)
    for i, method in enumerate(methods):
        top = y + i * (thumb + PAD)
        draw.text((left, top + thumb / 2), method, fill=INK, font=font, anchor="lm")
        for j, (path, hit) in enumerate(example.results.get(method, [])):
            x = left + label_w + j * (thumb + PAD)
            sheet.paste(_thumbnail(path, thumb), (x, top))
            colour, w = (HIT, 3) if hit else (FRAME, 1)
            draw.rectangle((x - w, top - w, x + thumb + w - 1, top + thumb + w - 1), outline=colour, width=w)
