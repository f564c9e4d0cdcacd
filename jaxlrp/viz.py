"""Pictures of relevance: colours (red positive, blue negative, white zero, on a symmetric
scale), PNG grids of image heatmaps, and HTML token heatmaps.

Needs Pillow (`pip install jaxlrp[demo]`) only to write PNG files; the colouring is NumPy.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np

__all__ = ["relevance_to_rgb", "gray_to_rgb", "save_grid", "text_heatmap"]


def relevance_to_rgb(relevance: np.ndarray) -> np.ndarray:
    """`(H, W)` relevance -> `(H, W, 3)` uint8, on a symmetric scale `[-max|R|, max|R|]`."""
    relevance = np.asarray(relevance, dtype=np.float64)
    scale = np.abs(relevance).max()
    v = relevance / scale if scale > 0 else np.zeros_like(relevance)
    pos, neg = np.clip(v, 0, 1), np.clip(-v, 0, 1)
    rgb = np.stack([1 - neg, 1 - pos - neg, 1 - pos], axis=-1)
    return np.round(255 * rgb).astype(np.uint8)


def gray_to_rgb(image: np.ndarray) -> np.ndarray:
    """`(H, W)` image -> `(H, W, 3)` uint8, dark strokes on white, scaled to its own range."""
    image = np.asarray(image, dtype=np.float64)
    low, high = image.min(), image.max()
    v = (image - low) / (high - low) if high > low else np.zeros_like(image)
    return np.round(255 * np.repeat((1 - v)[..., None], 3, axis=-1)).astype(np.uint8)


def save_grid(path, rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str], cell: int = 64) -> None:
    """Writes a PNG: one row per sample, one column per title; each cell an `(H, W, 3)` image."""
    try:
        from PIL import Image, ImageDraw
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("Writing PNG heatmaps needs Pillow: pip install 'jaxlrp[demo]'") from error
    pad, header = 4, 16
    width = len(titles) * (cell + pad) + pad
    height = header + len(rows) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        draw.text((pad + c * (cell + pad), 2), title[: cell // 6], fill="black")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            tile = Image.fromarray(image).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (pad + c * (cell + pad), header + pad + r * (cell + pad)))
    canvas.save(path)


def text_heatmap(tokens: Sequence[str], relevance) -> str:
    """A self-contained HTML page: each token on a background coloured by its relevance (red
    positive, blue negative, white zero, on the symmetric scale `[-max|R|, max|R|]`), its
    value in the tooltip.

    Example::

        page = jaxlrp.viz.text_heatmap(["the", "cat", "sat"], relevance[0])
        pathlib.Path("tokens.html").write_text(page)
    """
    relevance = np.asarray(relevance, dtype=np.float64).reshape(-1)
    if len(tokens) != relevance.size:
        raise ValueError(f"text_heatmap: {len(tokens)} tokens but {relevance.size} relevance values.")
    colours = relevance_to_rgb(relevance[None])[0]
    spans = "".join(
        f'<span title="{value:.4g}" style="background:rgb({r},{g},{b})">{html.escape(token)}</span>'
        for token, value, (r, g, b) in zip(tokens, relevance, colours.tolist())
    )
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>jaxlrp token relevance</title>'
        "<style>body{font-family:monospace;line-height:1.8}span{padding:1px 2px;margin:0 1px;"
        "white-space:pre}</style></head>\n<body>" + spans + "</body></html>\n"
    )
