"""Reading DeepSpeed's checkpoint files without running code from them.

``torch.load(weights_only=True)`` unpickles only tensors and plain Python
types; DeepSpeed's files hold four more plain records, allowed by name here.
Everything else in them (the lr schedule, our client state, the ds_config) is
plain types, so a file that names any other class is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def allowed_globals() -> list[Any]:
    """DeepSpeed's record types that its checkpoint files pickle."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def safe_load(path: Path | str, *, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` and DeepSpeed's record types allowed.

    With ``mmap=True`` tensors are views of the file: only the bytes a caller
    copies out are read.
    """
    with torch.serialization.safe_globals(allowed_globals()):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def use_safe_loading(engine: Any) -> None:
    """Make DeepSpeed's own loader of ``engine`` read its files with :func:`safe_load`."""
    checkpoint_engine = engine.checkpoint_engine

    def load(path: str, map_location: Any = None) -> Any:
        return safe_load(path, map_location=map_location if map_location is not None else "cpu")

    checkpoint_engine.load = load
