"""Pictures of relevance: heatmaps on a symmetric scale (zero is the colour map's centre),
overlays, labelled grids, faithfulness curves, PNG files, HTML token heatmaps, and token
matrices (what each generated token drew on, `jaxlrp.explain_generation`) as PNG or HTML.

The colouring is NumPy and returns uint8 RGB arrays; drawing labels, curves and writing PNG
files needs Pillow (`pip install 'jaxlrp[demo]'`).

Example::

    from jaxlrp import viz

    maps = viz.heatmap(relevance, reduce="sum")            # (batch, H, W, C) -> (batch, H, W, 3)
    picture = viz.grid([[viz.image(x[i]), maps[i]] for i in range(4)], column_labels=["input", "LRP"])
    viz.save_png("heatmaps.png", picture)
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["COLORMAPS", "NAN_COLOUR", "curves", "grid", "heatmap", "image", "overlay", "save_png", "text_heatmap",
           "token_matrix", "token_matrix_html"]

NAN_COLOUR: tuple[int, int, int] = (255, 0, 255)
"""Magenta: the colour of a NaN or ±Inf pixel in `heatmap`, `image` and `overlay`, a colour no
colour map of `COLORMAPS` reaches, so a broken pixel is never mistaken for a relevance value."""

COLORMAPS: dict[str, tuple[tuple[float, tuple[int, int, int]], ...]] = {
    # (position in [0, 1], RGB) anchors, linear in between. The diverging maps are white
    # (bwr, seismic) or black (coldnhot) at 0.5, which `symmetric` puts at zero relevance.
    "bwr": ((0.0, (0, 0, 255)), (0.5, (255, 255, 255)), (1.0, (255, 0, 0))),
    "seismic": (
        (0.0, (0, 0, 77)), (0.25, (0, 0, 255)), (0.5, (255, 255, 255)), (0.75, (255, 0, 0)), (1.0, (128, 0, 0))
    ),
    "coldnhot": (
        (0.0, (0, 255, 255)), (0.25, (0, 0, 255)), (0.5, (0, 0, 0)), (0.75, (255, 0, 0)), (1.0, (255, 255, 0))
    ),
    "gray": ((0.0, (0, 0, 0)), (1.0, (255, 255, 255))),
    "hot": ((0.0, (0, 0, 0)), (1 / 3, (255, 0, 0)), (2 / 3, (255, 255, 0)), (1.0, (255, 255, 255))),
}


def heatmap(
    relevance,
    cmap: str = "bwr",
    symmetric: bool = True,
    level: float = 1.0,
    reduce: str | None = None,
) -> np.ndarray:
    """Relevance maps `(..., H, W)` to uint8 RGB `(..., H, W, 3)`, each `(H, W)` map on its own scale.

    * `symmetric=True`: zero is the colour map's centre (white for `bwr`), `+level·max|R|` its
      top (red) and `−level·max|R|` its bottom (blue); beyond that, colours saturate, so
      `level < 1` brings out faint relevance.
    * `symmetric=False`: the map's minimum is the bottom and `min + level·(max − min)` the top.
    * `reduce="sum"` (or `"absmax"`, the value of largest magnitude) first reduces a trailing
      channel axis: `(..., H, W, C)`.

    Colour maps: `COLORMAPS` (`bwr`, `seismic`, `coldnhot`, `gray`, `hot`). A map that is zero
    everywhere gets the centre colour (symmetric) or the bottom colour.

    Pixels that are NaN or ±Inf (after `reduce`: a pixel with any such channel) are drawn in
    `NAN_COLOUR` (magenta); the scale is set by the finite pixels alone, so one broken pixel
    does not spoil the rest of its map.
    """
    r = _reduced(relevance, reduce, "heatmap")
    if r.ndim < 2:
        raise ValueError(f"jaxlrp.viz.heatmap: expected maps of shape (..., H, W), got {r.shape}.")
    if not level > 0:
        raise ValueError(f"jaxlrp.viz.heatmap: level must be positive, got {level}.")
    finite = np.isfinite(r)
    r = np.where(finite, r, 0.0)
    if symmetric:
        scale = level * np.abs(r).max(axis=(-2, -1), keepdims=True)
        v = 0.5 + 0.5 * np.clip(np.divide(r, scale, out=np.zeros_like(r), where=scale > 0), -1, 1)
    else:
        low = np.where(finite, r, np.inf).min(axis=(-2, -1), keepdims=True)
        high = np.where(finite, r, -np.inf).max(axis=(-2, -1), keepdims=True)
        low, high = np.where(np.isfinite(low), low, 0.0), np.where(np.isfinite(high), high, 0.0)  # no finite pixel
        span = level * (high - low)
        v = np.clip(np.divide(r - low, span, out=np.zeros_like(r), where=span > 0), 0, 1)
    return np.where(finite[..., None], _colour(v, cmap), np.array(NAN_COLOUR, np.uint8))


def image(x, invert: bool = False) -> np.ndarray:
    """An input image `(H, W)`, `(H, W, 1)` or `(H, W, 3)` to uint8 RGB, scaled to the range of
    its finite values; `invert` for dark strokes on white (digits). A pixel with a NaN or ±Inf
    channel is drawn in `NAN_COLOUR` (magenta)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if not (x.ndim == 2 or (x.ndim == 3 and x.shape[-1] == 3)):
        raise ValueError(f"jaxlrp.viz.image: expected an image of shape (H, W), (H, W, 1) or (H, W, 3), got {x.shape}.")
    finite = np.isfinite(x) if x.ndim == 2 else np.isfinite(x).all(axis=-1)
    values = x[finite] if x.ndim == 2 else x[finite].reshape(-1)
    low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
    v = np.clip((x - low) / (high - low), 0, 1) if high > low else np.zeros_like(x)
    v = 1 - v if invert else v
    rgb = v if x.ndim == 3 else np.repeat(v[..., None], 3, axis=-1)
    rgb = np.where(finite[..., None], rgb, 0.0)
    return np.where(finite[..., None], np.round(255 * rgb).astype(np.uint8), np.array(NAN_COLOUR, np.uint8))


def overlay(x, relevance, cmap: str = "bwr", alpha: float = 0.8, level: float = 1.0, reduce: str | None = None) -> np.ndarray:
    """The heatmap of `relevance` `(H, W)` (`(H, W, C)` with `reduce`, as in `heatmap`) over a
    grey version of the image `x` of the same height and width: each pixel's heat colour is
    blended in with weight `alpha · |R| / (level · max|R|)`, so the image shows where relevance
    is zero. The maximum is over the finite pixels; a pixel whose relevance or image is NaN or
    ±Inf is drawn in `NAN_COLOUR` (magenta), unblended."""
    r = _reduced(relevance, reduce, "overlay")
    shown = image(x)
    if r.shape != shown.shape[:2]:
        raise ValueError(
            f"jaxlrp.viz.overlay: expected relevance of the image's height and width {shown.shape[:2]} "
            f"(after reduce), got {r.shape}."
        )
    heat = heatmap(r, cmap, True, level).astype(np.float64)
    grey = shown.astype(np.float64).mean(axis=-1, keepdims=True)
    finite = np.isfinite(r)
    magnitude = np.where(finite, np.abs(r), 0.0)
    scale = level * magnitude.max()
    weight = alpha * (np.clip(magnitude / scale, 0, 1) if scale > 0 else np.zeros_like(r))[..., None]
    blended = np.round((1 - weight) * grey + weight * heat).astype(np.uint8)
    x = np.asarray(x, dtype=np.float64)
    broken = ~finite | ~(np.isfinite(x) if x.ndim == 2 else np.isfinite(x).all(axis=-1))
    return np.where(broken[..., None], np.array(NAN_COLOUR, np.uint8), blended)


def grid(
    rows: Sequence[Sequence[np.ndarray]],
    column_labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    cell: int = 64,
    pad: int = 4,
) -> np.ndarray:
    """Tiles images (`(H, W)`, `(H, W, 1)`, `(H, W, 3)` or `(H, W, 4)`, the alpha dropped;
    uint8, or as `save_png` reads them: integers in 0..255, floats in [0, 1]) into one uint8
    RGB picture: one row per entry of `rows`, each image scaled to `cell` pixels (nearest
    neighbour), with labels above the columns and left of the rows. A float tile holding NaN or
    values outside [0, 1] is an error (make it with `image` or `heatmap`, which colour NaN)."""
    Image, ImageDraw = _pillow()
    n_cols = max(len(row) for row in rows)
    top = 16 if column_labels else 0
    left = 8 + 6 * max(len(label) for label in row_labels) if row_labels else 0
    width = left + n_cols * (cell + pad) + pad
    height = top + len(rows) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(column_labels or ()):
        draw.text((left + pad + c * (cell + pad), 2), label[: max(1, (cell + pad) // 6)], fill="black")
    for r, row in enumerate(rows):
        y = top + pad + r * (cell + pad)
        if row_labels:
            draw.text((2, y + cell // 2 - 5), row_labels[r], fill="black")
        for c, picture in enumerate(row):
            picture = _as_uint8(picture, "grid", f"the tile in row {r}, column {c}")
            if picture.ndim == 2:
                picture = picture[..., None]
            if picture.shape[-1] == 1:
                picture = np.repeat(picture, 3, axis=-1)
            tile = Image.fromarray(picture[..., :3].copy()).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (left + pad + c * (cell + pad), y))
    return np.asarray(canvas)


def curves(
    lines: Mapping[str, np.ndarray],
    title: str = "",
    xlabel: str = "regions replaced",
    ylabel: str = "target output",
    size: tuple[int, int] = (640, 400),
) -> np.ndarray:
    """A line plot as uint8 RGB, drawn with Pillow: one line per entry `name -> values` (e.g. the
    mean MoRF and LeRF curves of each method, its ABPC in the name), x from 0 to the number of
    steps, with axes, ticks and a legend. NaN and ±Inf values are left out (the line breaks
    there; a NaN curve from `evaluate.region_perturbation` draws nothing) and the axis spans the
    finite values."""
    Image, ImageDraw = _pillow()
    width, height = size
    names = list(lines)
    values = [np.asarray(lines[n], dtype=np.float64).reshape(-1) for n in names]
    legend_width = 12 + 6 * max(len(n) for n in names) + 24
    x0, y0, x1, y1 = 56, 28, width - legend_width - 12, height - 40
    finite = np.concatenate([v[np.isfinite(v)] for v in values])
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
    low, high = (low - 0.5, high + 0.5) if high == low else (low, high)
    steps = max(len(v) for v in values) - 1
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)

    def at(k, value):
        return x0 + (x1 - x0) * k / max(steps, 1), y1 - (y1 - y0) * (value - low) / (high - low)

    draw.rectangle((x0, y0, x1, y1), outline="black")
    for i in range(5):
        value = low + (high - low) * i / 4
        _, y = at(0, value)
        draw.line((x0 - 4, y, x0, y), fill="black")
        draw.text((4, y - 5), f"{value:.3g}", fill="black")
        k = round(steps * i / 4)
        x, _ = at(k, low)
        draw.line((x, y1, x, y1 + 4), fill="black")
        draw.text((x - 6, y1 + 6), str(k), fill="black")
    draw.text(((x0 + x1) // 2 - 3 * len(xlabel), height - 16), xlabel, fill="black")
    draw.text((x0, 4), f"{title}   ({ylabel})" if title else ylabel, fill="black")
    for i, (name, v) in enumerate(zip(names, values)):
        colour = _LINE_COLOURS[i % len(_LINE_COLOURS)]
        dashed = i >= len(_LINE_COLOURS)
        points = [at(k, value) for k, value in enumerate(v)]
        for j, segment in enumerate(zip(points[:-1], points[1:])):
            if not (dashed and j % 2) and np.isfinite(v[j : j + 2]).all():
                draw.line(segment, fill=colour, width=2)
        ly = y0 + 6 + 14 * i
        draw.line((x1 + 16, ly + 5, x1 + 34, ly + 5), fill=colour, width=2)
        draw.text((x1 + 38, ly), name, fill="black")
    return np.asarray(canvas)


def save_png(path, picture: np.ndarray) -> None:
    """Writes one picture, `(H, W)`, `(H, W, 1)` (grey), `(H, W, 3)` (RGB) or `(H, W, 4)`
    (RGBA), as a PNG file. uint8 values are written as they are, other integers must lie in
    0..255, floats in [0, 1] are scaled to 0..255 (rounded). Float values outside [0, 1], NaN
    or Inf, other dtypes and other shapes (a batch: pass one picture, or tile them with `grid`)
    are errors, nothing is clipped and nothing is written."""
    picture = _as_uint8(picture, "save_png", "the picture")
    Image, _ = _pillow()
    Image.fromarray(picture[..., 0] if picture.ndim == 3 and picture.shape[-1] == 1 else picture).save(path, format="PNG")


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
        raise ValueError(f"jaxlrp.viz.text_heatmap: {len(tokens)} tokens but {relevance.size} relevance values.")
    colours = heatmap(relevance[None])[0]
    spans = "".join(
        f'<span title="{value:.4g}" style="background:rgb({r},{g},{b})">{html.escape(token)}</span>'
        for token, value, (r, g, b) in zip(tokens, relevance, colours.tolist())
    )
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>jaxlrp token relevance</title>'
        "<style>body{font-family:monospace;line-height:1.8}span{padding:1px 2px;margin:0 1px;"
        "white-space:pre}</style></head>\n<body>" + spans + "</body></html>\n"
    )


def token_matrix(
    tokens: Sequence[str],
    relevance,
    rows: Sequence[str] | None = None,
    cell: int = 22,
    cmap: str = "bwr",
    level: float = 1.0,
) -> np.ndarray:
    """A `(K, T)` relevance matrix as a uint8 RGB picture: one row per explained (generated)
    token, one column per token of the sequence, labelled with `rows` on the left (default
    `0 … K−1`) and `tokens` on top, written vertically. Each row is coloured on its own
    symmetric scale (as `heatmap`: red positive, blue negative, white zero, `level·max|R|` of
    that row saturating), so a token that draws little relevance still shows where it looked;
    NaN or ±Inf cells are `NAN_COLOUR` (magenta). Needs Pillow.

    Example::

        matrix = jaxlrp.explain_generation(model, composites.AttnLRP())(variables, ids, generated=5)
        words = [vocabulary[i] for i in ids[0]]
        viz.save_png("generation.png", viz.token_matrix(words, matrix[0], rows=words[5:]))
    """
    r = _token_matrix(tokens, relevance, rows, "token_matrix")
    rows = [str(k) for k in range(r.shape[0])] if rows is None else [str(row) for row in rows]
    if not (isinstance(cell, int) and cell >= 4):
        raise ValueError(f"jaxlrp.viz.token_matrix: cell is the side of a cell in pixels, an int >= 4; got {cell!r}.")
    Image, ImageDraw = _pillow()
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def width(text: str) -> int:
        left, _, right, _ = measure.textbbox((0, 0), text, font=font)
        return right - left

    pad = 4
    left = max(width(row) for row in rows) + 2 * pad
    top = max(width(str(t)) for t in tokens) + 2 * pad
    k, t = r.shape
    picture = Image.new("RGB", (left + t * cell + pad, top + k * cell + pad), (255, 255, 255))
    colours = heatmap(r[:, None, :], cmap=cmap, level=level)[:, 0]  # (K, T, 3), a scale per row
    cells = np.repeat(np.repeat(colours, cell, axis=0), cell, axis=1)
    picture.paste(Image.fromarray(cells), (left, top))
    draw = ImageDraw.Draw(picture)
    for i, row in enumerate(rows):
        draw.text((left - pad - width(row), top + i * cell + cell // 2), row, fill=(0, 0, 0), font=font, anchor="lm")
    for j, token in enumerate(tokens):  # each label drawn sideways, reading upwards
        label = Image.new("RGB", (width(str(token)) + 2, cell), (255, 255, 255))
        ImageDraw.Draw(label).text((1, cell // 2), str(token), fill=(0, 0, 0), font=font, anchor="lm")
        label = label.rotate(90, expand=True)
        picture.paste(label, (left + j * cell, top - pad - label.height))
    for i in range(k + 1):  # thin grid lines between cells
        draw.line([(left, top + i * cell), (left + t * cell, top + i * cell)], fill=(220, 220, 220))
    for j in range(t + 1):
        draw.line([(left + j * cell, top), (left + j * cell, top + k * cell)], fill=(220, 220, 220))
    return np.asarray(picture)


def token_matrix_html(tokens: Sequence[str], relevance, rows: Sequence[str] | None = None) -> str:
    """The `(K, T)` relevance matrix of `token_matrix` as a self-contained HTML page: a table
    with the tokens as column headers, `rows` as row headers, each cell coloured on its row's
    symmetric scale with its value in the tooltip."""
    r = _token_matrix(tokens, relevance, rows, "token_matrix_html")
    rows = [str(k) for k in range(r.shape[0])] if rows is None else [str(row) for row in rows]
    colours = heatmap(r[:, None, :])[:, 0]
    header = "".join(f"<th><span>{html.escape(str(t))}</span></th>" for t in tokens)
    body = "".join(
        f"<tr><th>{html.escape(row)}</th>" + "".join(
            f'<td title="{value:.4g}" style="background:rgb({c[0]},{c[1]},{c[2]})"></td>'
            for value, c in zip(values, row_colours.tolist())
        ) + "</tr>"
        for row, values, row_colours in zip(rows, r, colours)
    )
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>jaxlrp token relevance matrix</title>'
        "<style>body{font-family:monospace}table{border-collapse:collapse}td{width:18px;height:18px;"
        "border:1px solid #ddd}th{font-weight:normal;padding:0 4px;text-align:right}thead th span{"
        "writing-mode:vertical-rl;transform:rotate(180deg)}</style></head>\n<body><table><thead><tr><th></th>"
        + header + "</tr></thead><tbody>" + body + "</tbody></table></body></html>\n"
    )


def _token_matrix(tokens, relevance, rows, caller: str) -> np.ndarray:
    r = np.asarray(relevance, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(
            f"jaxlrp.viz.{caller}: expected one sequence's matrix of shape (K, T), got {r.shape}; "
            f"explain_generation returns (batch, K, T): pass matrix[b]."
        )
    if len(tokens) != r.shape[1]:
        raise ValueError(f"jaxlrp.viz.{caller}: {len(tokens)} tokens but the matrix has {r.shape[1]} columns.")
    if rows is not None and len(rows) != r.shape[0]:
        raise ValueError(f"jaxlrp.viz.{caller}: {len(rows)} row labels but the matrix has {r.shape[0]} rows.")
    return r


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1: the bitmap font alone
        return ImageFont.load_default()


_LINE_COLOURS = ((214, 39, 40), (31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189),
                 (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def _reduced(relevance, reduce, caller: str) -> np.ndarray:
    """The relevance as float64, its trailing channel axis reduced by `"sum"` or `"absmax"` (a
    NaN channel makes the pixel NaN either way)."""
    r = np.asarray(relevance, dtype=np.float64)
    if reduce is None:
        return r
    if reduce not in ("sum", "absmax") or r.ndim < 1:
        raise ValueError(f"jaxlrp.viz.{caller}: reduce must be None, 'sum' or 'absmax', got {reduce!r}.")
    if reduce == "sum":
        return r.sum(axis=-1)
    picked = np.take_along_axis(r, np.nan_to_num(np.abs(r), nan=-1.0).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    return np.where(np.isnan(r).any(axis=-1), np.nan, picked)


def _as_uint8(picture, caller: str, what: str) -> np.ndarray:
    """One picture `(H, W)` or `(H, W, 1 | 3 | 4)` as uint8: uint8 as it is, integers in 0..255,
    floats in [0, 1] times 255, rounded; anything else an error naming `caller`."""
    a = np.asarray(picture)
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (1, 3, 4))) or 0 in a.shape:
        raise ValueError(
            f"jaxlrp.viz.{caller}: expected {what} of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got "
            f"{a.shape}; a batch is written one picture at a time, or tiled with viz.grid."
        )
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.integer) and not np.issubdtype(a.dtype, np.bool_):
        if a.min() < 0 or a.max() > 255:
            raise ValueError(f"jaxlrp.viz.{caller}: expected {what}'s integers in 0..255, got values in [{a.min()}, {a.max()}].")
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise ValueError(
                f"jaxlrp.viz.{caller}: {what} holds NaN or Inf ({int(np.sum(~np.isfinite(a)))} values); expected "
                f"floats in [0, 1]. Colour it with viz.heatmap or viz.image, which draw them in NAN_COLOUR."
            )
        if a.min() < 0 or a.max() > 1:
            raise ValueError(
                f"jaxlrp.viz.{caller}: expected {what}'s floats in [0, 1] (or uint8 in 0..255), got values in "
                f"[{a.min():.6g}, {a.max():.6g}]; nothing is clipped: scale it first (viz.image does)."
            )
        return np.round(a.astype(np.float64) * 255).astype(np.uint8)
    raise ValueError(f"jaxlrp.viz.{caller}: expected {what} as uint8, integers in 0..255 or floats in [0, 1], got dtype {a.dtype}.")


def _colour(v: np.ndarray, cmap: str) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB through the colour map's anchors."""
    if cmap not in COLORMAPS:
        raise ValueError(f"jaxlrp.viz: unknown colour map {cmap!r}; the colour maps are {sorted(COLORMAPS)}.")
    positions = np.array([p for p, _ in COLORMAPS[cmap]])
    colours = np.array([c for _, c in COLORMAPS[cmap]], dtype=np.float64)
    rgb = np.stack([np.interp(v, positions, colours[:, i]) for i in range(3)], axis=-1)
    return np.round(rgb).astype(np.uint8)


def _pillow():
    try:
        from PIL import Image, ImageDraw
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("jaxlrp.viz needs Pillow to draw and write pictures: pip install 'jaxlrp[demo]'") from error
    return Image, ImageDraw
