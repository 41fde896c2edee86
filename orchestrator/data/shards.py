"""Which shards make up a source, and whether they fit the tokenizer.

A source's ``prefix`` names one shard (``PREFIX.bin`` + ``PREFIX.idx``), a
folder (every finished shard in it, not recursive) or a glob of shard files
or prefixes (``common_crawl/*``, ``c4/part-0*.idx``). Shards are listed
sorted, so every process agrees on the order. Only finished shards count: an
``.idx`` beside a ``.bin`` (preprocessing renames the ``.idx`` last).

Each problem is one ``ValueError`` naming the field, the value and the rule.
"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np

from orchestrator.data.indexed import IndexedDataset, shard_paths

_GLOB_CHARS = set("*?[")
_PROBE_TOKENS = 4096  # tokens read from each shard's first document to check the vocabulary


def expand_source(prefix: str, root: Path, *, field: str) -> list[str]:
    """The shard prefixes of one source, absolute and sorted; raises ``ValueError``."""
    path = Path(prefix).expanduser()
    path = path if path.is_absolute() else root / path
    if _GLOB_CHARS & set(str(path)):
        matches = sorted({_strip(Path(m)) for m in glob.glob(str(path))})
        shards = [m for m in matches if _is_shard(m)]
        if not shards:
            raise ValueError(
                f"{field}={prefix}: the glob {path} matches no shard (PREFIX.bin + PREFIX.idx)"
            )
        return shards
    if path.is_dir():
        shards = sorted(str(p.with_suffix("")) for p in path.glob("*.idx"))
        shards = [s for s in shards if _is_shard(s)]
        if not shards:
            raise ValueError(
                f"{field}={prefix}: the folder {path} holds no shard (PREFIX.bin + PREFIX.idx); "
                "make them with python -m orchestrator.data.preprocess_many"
            )
        return shards
    if _is_shard(str(path)):
        return [str(path)]
    raise ValueError(
        f"{field}={prefix}: no shard at {path}.bin/.idx and no such folder "
        "(set data.root, or make shards with python -m orchestrator.data.preprocess_many)"
    )


def _strip(path: Path) -> str:
    return str(path.with_suffix("")) if path.suffix in (".bin", ".idx") else str(path)


def _is_shard(prefix: str) -> bool:
    bin_path, idx_path = shard_paths(prefix)
    return bin_path.is_file() and idx_path.is_file()


def check_shard(prefix: str, *, vocab_size: int, field: str) -> None:
    """The shard opens, and its token type and first tokens fit ``vocab_size``."""
    try:
        shard = IndexedDataset(prefix)
    except (OSError, ValueError) as e:
        raise ValueError(f"{field}: shard {prefix}: {e}") from None
    if shard.dtype == np.uint16 and vocab_size > 65536:
        raise ValueError(
            f"{field}: shard {prefix} holds uint16 tokens, too narrow for the tokenizer's "
            f"{vocab_size:,} tokens (it was made with another tokenizer)"
        )
    # Megatron writes uint16 below 65,500 tokens, this project up to 65,536.
    if shard.dtype != np.uint16 and vocab_size < 65500:
        raise ValueError(
            f"{field}: shard {prefix} holds {shard.dtype.name} tokens, as made for a vocabulary "
            f"over 65,500; the tokenizer has {vocab_size:,} (it was made with another tokenizer)"
        )
    if len(shard):
        probe = np.asarray(shard.tokens[: min(_PROBE_TOKENS, shard.num_tokens)])
        if probe.size and int(probe.max()) >= vocab_size:
            raise ValueError(
                f"{field}: shard {prefix} has token id {int(probe.max())}, outside the "
                f"tokenizer's vocabulary of {vocab_size:,} (it was made with another tokenizer)"
            )
