"""The report's picture of a path: a strip of boxes, one per path position, coloured by source model."""

from __future__ import annotations

import html
from collections.abc import Sequence

from evomerge.dataflow.path import LayerPath

PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")
BOX, GAP, HEIGHT = 46, 6, 40


def path_svg(path: LayerPath, names: Sequence[str]) -> str:
    """An inline SVG: embeddings, then each layer as `model.layer` (its input scale below when not 1),
    then the head; a legend names the colours."""
    boxes = [_box(0, "#cccccc", "embed", f"embeddings of {names[path.owner]}")]
    for i, step in enumerate(path.steps, start=1):
        scale = "" if step.scale == 1.0 else f"x{step.scale:.2f}"
        title = (
            f"position {i - 1}: layer {step.layer} of {names[step.model]}, input scaled by {step.scale:.4g}"
        )
        boxes.append(_box(i, PALETTE[step.model % len(PALETTE)], f"L{step.layer}", title, scale))
    boxes.append(_box(len(path.steps) + 1, "#cccccc", "head", f"norm and head of {names[path.owner]}"))
    width = (len(path.steps) + 2) * (BOX + GAP)
    legend = " ".join(
        f'<span style="color:{PALETTE[i % len(PALETTE)]}">&#9632;</span> {html.escape(name)}'
        for i, name in enumerate(names)
    )
    svg = f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{HEIGHT + 18}">{"".join(boxes)}</svg>'
    return f"<div>{svg}<p>{legend}; {len(path.steps)} layers: {html.escape(path.describe(names))}</p></div>"


def _box(i: int, colour: str, label: str, title: str, below: str = "") -> str:
    x = i * (BOX + GAP)
    return (
        f'<g><title>{html.escape(title)}</title><rect x="{x}" y="0" width="{BOX}" height="{HEIGHT}" rx="4" '
        f'fill="{colour}"/><text x="{x + BOX / 2}" y="{HEIGHT / 2 + 4}" text-anchor="middle" font-size="12" '
        f'fill="white">{html.escape(label)}</text><text x="{x + BOX / 2}" y="{HEIGHT + 14}" '
        f'text-anchor="middle" font-size="10">{html.escape(below)}</text></g>'
    )
