"""Paper recipes: TOML files that hold a paper's training settings for ``emolens benchmark --recipe`` and the
figures the paper reports, so that a run prints what it measured beside what it should reproduce.

A recipe has these tables::

    [recipe]      paper, title, reproduces (table and row), dataset (the data kind the paper used; ``a+b`` for a
                  joint run), cannot (what emolens cannot reproduce offline), cpu_protocol (only in a recipe
                  that runs this project's CPU protocol instead of the paper's GPU one: how it differs)
    [settings]    benchmark options by name (``models``, ``epochs``, ``lr_steps``, ...), each as the CLI takes it
    [requires]    options (or ``model_arg.KEY``) the user must give, each with what to give
    [reported]    the paper's figures, by metric name (``accuracy``, ``map8``, ...), as fractions
    [paper_table] the rows of the paper's own table on this dataset (its method, its baselines, its ablations),
                  each a row name with its figures by metric name, as fractions
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SECTIONS = {"recipe", "settings", "requires", "reported", "paper_table"}
#: Where a required model argument is named in ``[requires]``.
MODEL_ARG = "model_arg."


@dataclass(frozen=True)
class Recipe:
    path: Path
    paper: str
    title: str
    reproduces: str
    dataset: str
    cannot: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    requires: dict[str, str] = field(default_factory=dict)
    reported: dict[str, float] = field(default_factory=dict)
    cpu_protocol: str = ""
    paper_table: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem

    def about(self) -> dict[str, Any]:
        """What a results file records of the recipe it ran."""
        return {"file": self.path.name, "paper": self.paper, "reproduces": self.reproduces,
                "dataset": self.dataset, "reported": self.reported, "cpu_protocol": self.cpu_protocol,
                "paper_table": self.paper_table}


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe file (its settings are checked against the command that runs it)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no recipe file {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from None
    unknown = set(data) - SECTIONS
    if unknown:
        raise ValueError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}; a recipe has {', '.join(sorted(SECTIONS))}")
    head = data.get("recipe", {})
    missing = [k for k in ("paper", "title", "reproduces", "dataset") if k not in head]
    if missing:
        raise ValueError(f"{path}: [recipe] lacks {', '.join(missing)}")
    reported = fractions(path, "[reported]", data.get("reported", {}))
    rows = data.get("paper_table", {})
    if not all(isinstance(v, dict) for v in rows.values()):
        raise ValueError(f"{path}: each [paper_table] row is a table of figures, e.g. \"ResNet-101\" = {{ accuracy = 0.7392 }}")
    return Recipe(path, str(head["paper"]), head["title"], head["reproduces"], head["dataset"], head.get("cannot", ""),
                  dict(data.get("settings", {})), {k: str(v) for k, v in data.get("requires", {}).items()},
                  reported, head.get("cpu_protocol", ""),
                  {row: fractions(path, f"[paper_table] {row!r}", figures) for row, figures in rows.items()})


def fractions(path: Path, where: str, figures: dict) -> dict[str, float]:
    """``figures`` as floats, refused unless each is a fraction (the papers print percentages)."""
    bad = [k for k, v in figures.items() if not isinstance(v, (int, float)) or not 0 <= v <= 1]
    if bad:
        raise ValueError(f"{path}: {where} {', '.join(bad)} must be fractions in [0, 1]")
    return {k: float(v) for k, v in figures.items()}


def with_model_args(specs: list[str], args: dict[str, str]) -> list[str]:
    """Model specs with ``args`` set in each (replacing a value the spec gives)."""
    from .models import parse_model_spec

    out = []
    for spec in specs:
        name, _, rest = spec.partition(":")
        items = [item for item in rest.split(",") if item.strip() and item.partition("=")[0].strip() not in args]
        items += [f"{k}={v}" for k, v in args.items()]
        parse_model_spec(f"{name}:{','.join(items)}")  # a malformed argument fails here, naming the spec
        out.append(f"{name}:{','.join(items)}" if items else name)
    return out
