"""The shards of a many-file corpus: which files each holds, its name, finished or not.

Shard names. The inputs (files and globs) are expanded and sorted by path, so
every run and every array task agrees on the list. A file's shard is named
after the file without its format and compression suffixes
(``cc/part-00017.jsonl.zst`` -> ``OUT/part-00017.{bin,idx}``). Files that share
such a stem in different folders are each named by their folder relative to
the folder those files have in common, joined with ``__``
(``cc/2019-30/en_0.jsonl.zst`` -> ``2019-30__en_0``); a name still not unique
(``a.jsonl`` beside ``a.jsonl.gz``) is refused. With K > 1 a group is named
after its first file and its group number: ``part-00000.g00000``,
``part-00002.g00001``, ... Changing K, or adding a file with a colliding stem,
changes names: the old shards stay where they are.

Restarts. A shard is finished when its ``.idx`` exists beside a ``.bin`` of the
size the index gives (the writer renames ``.bin`` then ``.idx``, so a killed
run never leaves an ``.idx`` that looks finished). A rerun skips finished
shards and remakes the others from scratch, first removing their ``.tmp``
leftovers; each shard is a pure function of its input files, so the result is
byte-identical to one clean run. Input files changed since are not detected:
delete a shard to have it remade. Two runs must not work on the same shards
at once (array tasks never do: their slices are disjoint).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator.data.documents import COMPRESSIONS
from orchestrator.data.indexed import IndexedDataset, shard_paths


@dataclass(frozen=True)
class Shard:
    name: str  # the shard is OUTPUT_DIR/NAME.{bin,idx}
    inputs: tuple[Path, ...]
    input_bytes: int


def _stem(path: Path) -> str:
    name = path.name
    if path.suffix in COMPRESSIONS:
        name = name[: -len(path.suffix)]
    return Path(name).stem


def shard_names(inputs: Sequence[Path]) -> list[str]:
    """Each input's shard name (see the module docstring); raises when two would clash."""
    stems = [_stem(path) for path in inputs]
    names = list(stems)
    for stem in set(stems):
        clashing = [i for i, s in enumerate(stems) if s == stem]
        if len(clashing) < 2:
            continue
        folders = [os.path.abspath(inputs[i].parent) for i in clashing]
        common = os.path.commonpath(folders)
        for i, folder in zip(clashing, folders, strict=True):
            names[i] = "__".join([*Path(os.path.relpath(folder, common)).parts, stem])
    first: dict[str, Path] = {}
    for path, name in zip(inputs, names, strict=True):
        if name in first:
            raise ValueError(
                f"inputs {first[name]} and {path} would both make shard {name!r}: rename one"
            )
        first[name] = path
    return names


def plan_shards(inputs: Sequence[Path], *, files_per_shard: int = 1) -> list[Shard]:
    """The shards of the sorted ``inputs``, in order: groups of ``files_per_shard`` files."""
    if files_per_shard < 1:
        raise ValueError(f"files_per_shard={files_per_shard}: must be >= 1")
    inputs = sorted(inputs, key=str)
    names = shard_names(inputs)
    shards = []
    for group, start in enumerate(range(0, len(inputs), files_per_shard)):
        files = tuple(inputs[start : start + files_per_shard])
        name = names[start] if files_per_shard == 1 else f"{names[start]}.g{group:05d}"
        shards.append(Shard(name, files, sum(path.stat().st_size for path in files)))
    return shards


def task_shards(shards: Sequence[Shard], task: tuple[int, int] | None) -> list[Shard]:
    """Array task ``(i, n)``'s shards: i, i+n, i+2n, ... (all of them for None)."""
    if task is None:
        return list(shards)
    index, count = task
    if count < 1:
        raise ValueError(f"array_task_count={count}: must be >= 1")
    if not 0 <= index < count:
        raise ValueError(f"array_task_id={index}: must be in [0, array_task_count={count})")
    return list(shards[index::count])


def is_finished(prefix: Path) -> bool:
    """Whether ``PREFIX.idx`` exists beside a ``PREFIX.bin`` of the size it gives."""
    bin_path, idx_path = shard_paths(prefix)
    if not (idx_path.is_file() and bin_path.is_file()):
        return False
    try:
        dataset = IndexedDataset(prefix)
        itemsize = dataset[0].dtype.itemsize if len(dataset) else 0
        expected = dataset.num_tokens * itemsize
    except Exception:  # any index that cannot be read is not a finished one
        return False
    return bin_path.stat().st_size == expected


def remove_partial(prefix: Path, *, finished: bool = False) -> None:
    """Removes what a killed run may have left: the temporaries, and an unfinished shard."""
    for path in shard_paths(prefix)[::-1]:  # the .idx first: nothing looks finished
        path.with_name(path.name + ".tmp").unlink(missing_ok=True)
        if not finished:
            path.unlink(missing_ok=True)
