"""The README.md model card of a merged model, in the shape the Hugging Face Hub shows.

YAML front matter (`base_model`, `library_name`, `tags`) lets the Hub link the sources and list the
model under merges; the body says how it was made and holds the recipe, so anyone can re-run it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import yaml

from evomerge.io.atomic import atomic_write_text

README = "README.md"
# Where each method was introduced, for the reader who wants the definition.
_METHOD_PAPERS = {
    "task_arithmetic": ("Editing Models with Task Arithmetic", "https://arxiv.org/abs/2212.04089"),
    "ties": ("TIES-Merging", "https://arxiv.org/abs/2306.01708"),
    "dare_ties": ("DARE (Language Models are Super Mario)", "https://arxiv.org/abs/2311.03099"),
    "dare_linear": ("DARE (Language Models are Super Mario)", "https://arxiv.org/abs/2311.03099"),
    "breadcrumbs": ("Model Breadcrumbs", "https://arxiv.org/abs/2312.06795"),
    "breadcrumbs_ties": ("Model Breadcrumbs", "https://arxiv.org/abs/2312.06795"),
    "model_stock": ("Model Stock", "https://arxiv.org/abs/2403.19522"),
    "della": ("DELLA-Merging", "https://arxiv.org/abs/2406.11617"),
    "della_linear": ("DELLA-Merging", "https://arxiv.org/abs/2406.11617"),
    "sce": ("FuseChat (SCE)", "https://arxiv.org/abs/2408.07990"),
    "ram": ("Reinforced Agent Merging (RAM)", "https://arxiv.org/abs/2601.13572"),
    "ramplus_tl": ("Reinforced Agent Merging (RAM+)", "https://arxiv.org/abs/2601.13572"),
    "nearswap": ("NearSwap (QuartetAnemoi)", "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"),
}


def write_model_card(
    dest_dir: str | os.PathLike[str],
    *,
    title: str,
    sources: list[str],
    method: str,
    recipe_yaml: str | None,
    scores: Mapping[str, float] | None = None,
    extra: str = "",
) -> Path:
    """Write `dest_dir/README.md` (through a temporary file) and return its path."""
    text = render_model_card(
        title=title, sources=sources, method=method, recipe_yaml=recipe_yaml, scores=scores, extra=extra
    )
    path = Path(dest_dir) / README
    return atomic_write_text(path, text)


def render_model_card(
    *,
    title: str,
    sources: list[str],
    method: str,
    recipe_yaml: str | None,
    scores: Mapping[str, float] | None = None,
    extra: str = "",
) -> str:
    """The card's text: front matter, then title, provenance, sources, method, recipe, scores, extra.

    `recipe_yaml` None: a whole model bred by an evolutionary search (no recipe rebuilds it)."""
    sections = [
        _front_matter(sources),
        f"# {title}\n",
        f"This model was made with **evomerge** (evolutionary model merging) "
        f"{'by merging' if recipe_yaml is not None else 'by breeding the weights of'} {len(sources)} "
        f"model{'s' if len(sources) != 1 else ''} with the `{method}` method.\n",
        "## Sources\n\n" + "".join(f"- {source}\n" for source in sources),
        _method_section(method),
        _recipe_section(recipe_yaml),
    ]
    if scores:
        sections.append(_scores_section(scores))
    if extra.strip():
        sections.append(extra.strip() + "\n")
    return "\n".join(sections)


def _front_matter(sources: list[str]) -> str:
    metadata = {"base_model": list(sources), "library_name": "transformers", "tags": ["merge", "evomerge"]}
    return f"---\n{yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)}---\n"


def _recipe_section(recipe_yaml: str | None) -> str:
    if recipe_yaml is None:
        return (
            "## Recipe\n\nNone: its weights were bred directly (crossover and mutation of whole models), "
            "so no merge recipe rebuilds it; the run dir that found it keeps every evaluation.\n"
        )
    return (
        "## Recipe\n\nRe-create this model with `evomerge merge recipe.yaml OUT_DIR` "
        f"(or mergekit's `mergekit-yaml`):\n\n```yaml\n{recipe_yaml.strip()}\n```\n"
    )


def _method_section(method: str) -> str:
    paper = _METHOD_PAPERS.get(method)
    reference = f" ([{paper[0]}]({paper[1]}))" if paper else ""
    return f"## Method\n\n`{method}`{reference}.\n"


def _scores_section(scores: Mapping[str, float]) -> str:
    rows = "".join(f"| {task} | {score:.4f} |\n" for task, score in scores.items())
    return f"## Scores\n\n| task | score |\n|---|---|\n{rows}"
