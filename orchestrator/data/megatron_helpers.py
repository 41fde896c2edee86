"""Megatron-LM's compiled dataset helpers, loaded without the rest of megatron-core.

``megatron.core.datasets.helpers_cpp`` (shipped compiled in the
``megatron-core`` wheel) holds the C++ builders of the sample index and the
blending index (the blending one is not used here: see
``orchestrator.data.blend``). Importing it the usual way runs ``megatron/core/__init__.py``,
which imports Megatron's models, optimisers and their warnings (seconds of
start-up on every rank); this loads the extension module file directly.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np


@functools.cache
def helpers() -> ModuleType:
    """The ``helpers_cpp`` extension module; ``ImportError`` if megatron-core is missing."""
    spec = importlib.util.find_spec("megatron")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("megatron-core is not installed (pip install megatron-core)")
    for location in spec.submodule_search_locations:
        folder = Path(location) / "core" / "datasets"
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = folder / f"helpers_cpp{suffix}"
            if path.is_file():
                loader = importlib.machinery.ExtensionFileLoader("helpers_cpp", str(path))
                module_spec = importlib.util.spec_from_file_location(
                    "helpers_cpp", path, loader=loader
                )
                assert module_spec is not None
                module = importlib.util.module_from_spec(module_spec)
                loader.exec_module(module)
                return module
    raise ImportError("megatron-core has no compiled helpers_cpp for this Python")


def build_sample_idx(
    sizes: np.ndarray, doc_idx: np.ndarray, *, seq_len: int, num_samples: int
) -> np.ndarray:
    """Megatron's sample index for the first ``num_samples`` samples of ``doc_idx``.

    Row ``j`` is (position in ``doc_idx``, offset in that document) of token
    ``j * seq_len`` of the documents concatenated in ``doc_idx``'s order:
    sample ``j`` is the ``seq_len + 1`` tokens from there (consecutive samples
    share one token). ``num_samples + 1`` rows; the documents must hold
    ``num_samples * seq_len + 1`` tokens.
    """
    assert sizes.dtype == np.int32 and doc_idx.dtype == np.int32  # no silent copies
    wide = max(len(doc_idx), int(sizes.max()) if len(sizes) else 0) > np.iinfo(np.int32).max
    build = helpers().build_sample_idx_int64 if wide else helpers().build_sample_idx_int32
    # One "epoch" of exactly the tokens needed: the walk stops after num_samples rows.
    tokens = num_samples * seq_len + 1
    result: np.ndarray = build(sizes, doc_idx, seq_len, 1, tokens, True, 1)
    return result
