"""What a user brings: a folder tree (one class per subfolder) or a CSV `path,label[,start,end]` of videos
or images. Turned into an ordered list of `Item`s; the order fixes which shard each item lands in."""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

VIDEO_EXTS = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".3gp", ".ogv", ".wmv"}
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Item:
    index: int
    path: str
    label: int = -1
    start: float = 0.0  # seconds; trimming applies to videos only
    end: float = 0.0  # 0 = to the end

    @property
    def key(self) -> str:
        """Unique, and free of dots: webdataset splits a member name at the first dot of its basename."""
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", Path(self.path).stem)[:60]
        return f"{self.index:08d}_{stem}"


def kind_of(path: str | Path) -> str | None:
    ext = Path(path).suffix.lower()
    return "video" if ext in VIDEO_EXTS else "image" if ext in IMAGE_EXTS else None


def load_classes(path: Path) -> list[str]:
    """A class list: a manifest.json (its "classes") or a text file with one class name per line."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"cannot read class list '{path}': {e}") from e
    if str(path).endswith(".json"):
        try:
            classes = json.loads(text).get("classes")
        except (json.JSONDecodeError, AttributeError):
            classes = None
        if not classes:
            raise ValueError(f"'{path}' has no 'classes' list (a manifest written by make_shards has one)")
        return [str(c) for c in classes]
    classes = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"class list '{path}' is empty or names a class twice")
    return classes


def _fixed_labels(classes: list[str], seen: list[str], where: str) -> dict[str, int]:
    label_of = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(seen) - set(label_of) - {str(i) for i in range(len(classes))})
    if unknown:
        raise ValueError(f"{where}: class {unknown[0]!r} is not in the given class list ({len(classes)} classes: "
                         f"{', '.join(classes[:5])}{', …' if len(classes) > 5 else ''}); add it to the list")
    return {**{str(i): i for i in range(len(classes))}, **label_of}


def from_folder(root: Path, kind: str, classes: list[str] | None = None) -> tuple[list[Item], list[str]]:
    """Class per immediate subfolder (sorted → label, or the ids of `classes`); files directly under `root`
    get label -1."""
    if not root.is_dir():
        raise ValueError(f"input folder '{root}' does not exist")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = folders
        label_of = {c: i for i, c in enumerate(classes)}
    else:  # a fixed list: a split lacking a class keeps everyone else's ids
        label_of = _fixed_labels(classes, folders, f"input folder '{root}'")
    files = sorted(p for p in root.rglob("*") if p.is_file() and kind_of(p) == kind)
    items = []
    for i, f in enumerate(files):
        top = f.relative_to(root).parts
        items.append(Item(i, str(f), label_of[top[0]] if len(top) > 1 else -1))
    if not items:
        raise ValueError(f"no {kind} files under '{root}' (known extensions: "
                         f"{sorted(VIDEO_EXTS if kind == 'video' else IMAGE_EXTS)})")
    return items, classes


def from_csv(path: Path, root: Path | None = None, classes: list[str] | None = None) -> tuple[list[Item], list[str]]:
    """Rows `path,label[,start,end]`, an optional header row starting with `path`. Labels are integers or
    class names (names are sorted → integers, or take their id in `classes` when a fixed list is given, so that
    every split numbers classes alike). Relative paths resolve against `root` (default: the CSV's folder)."""
    root = root or path.parent
    try:
        rows = [r for r in csv.reader(path.read_text().splitlines()) if r and not r[0].startswith("#")]
    except OSError as e:
        raise ValueError(f"cannot read CSV '{path}': {e}") from e
    if rows and rows[0][0].strip().lower() == "path":
        rows = rows[1:]
    parsed = []
    for n, row in enumerate(rows, start=1):
        if len(row) not in (1, 2, 3, 4):
            raise ValueError(f"CSV '{path}' row {n}: expected path,label[,start,end], got {len(row)} fields: {row}")
        row = [c.strip() for c in row] + [""] * (4 - len(row))
        try:
            start, end = float(row[2] or 0), float(row[3] or 0)
        except ValueError:
            raise ValueError(f"CSV '{path}' row {n}: start/end must be seconds, got {row[2]!r}, {row[3]!r}") from None
        if end and end <= start:
            raise ValueError(f"CSV '{path}' row {n}: end {end} is not after start {start}")
        p = Path(row[0])
        parsed.append((str(p if p.is_absolute() else root / p), row[1], start, end))
    if not parsed:
        raise ValueError(f"CSV '{path}' has no rows")
    labels = [r[1] for r in parsed if r[1] != ""]
    numeric = all(re.fullmatch(r"-?\d+", s) for s in labels)
    if classes is not None:
        label_of = _fixed_labels(classes, labels, f"CSV '{path}'")
    elif numeric:
        classes = [str(i) for i in range(max((int(s) for s in labels), default=-1) + 1)]
        label_of = {s: int(s) for s in labels}
    else:
        classes = sorted(set(labels))
        label_of = {c: i for i, c in enumerate(classes)}
    items = [Item(i, p, label_of.get(lab, -1), s, e) for i, (p, lab, s, e) in enumerate(parsed)]
    return items, classes
