"""A DeepSpeed checkpoint of any layout, read by slices of full tensors.

DeepSpeed's optimiser files are per rank. Under ZeRO 1 and 2 (and bf16's
``BF16_Optimizer``, which writes ``bf16_zero_pp_rank_*`` files) the fp32
master weights and Adam moments of one model-parallel rank (a pipeline stage
x a tp shard) are flattened, parameter after parameter, into one buffer per
parameter group, and dp rank ``j`` holds the ``j``-th equal slice of it::

    group buffer  [ p0 | p1 | p2 ......... | p3 | pad ]
    dp slices     [  rank 0  |  rank 1  |  rank 2  |  ]

Under ZeRO-3 every parameter is split on its own: dp rank ``j`` holds
elements ``[j*P, (j+1)*P)`` of each flattened parameter (``P = ceil(n/dp)``),
and its buffer is those pieces one after the other. Under ZeRO-0 (fp32 only)
the module's weights are whole tensors in the model-states (or pipeline layer)
files and the moments whole tensors in the optimiser's state, numbered over
its parameter groups.

:class:`SourceCheckpoint` maps every parameter (Meta's name, unpadded full
shape) to the pieces of files that hold it, from the small parts of a few
files (the parameter shapes in a model-states file, one buffer length per
group), and reads a rectangle of a full tensor by memory-mapping the files
(``torch.load(mmap=True)``) and copying only the pieces that overlap it. No
file is loaded whole; a reader holds at most the rectangle it was asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model_parallel.args import ModelArgs
from orchestrator.runtime.ds_compat import (
    BASE_OPTIMIZER_STATE,
    FP32_SLICES,
    OPTIMIZER_STATE_DICT,
    PARAM_SHAPES,
    SLICE_MAPPINGS,
)
from orchestrator.state.checkpoint import LayoutRecord, read_layout
from orchestrator.state.safe_load import safe_load
from orchestrator.state.weights import global_name, tp_dim, tp_replicas

KEYS = ("fp32", "exp_avg", "exp_avg_sq")
_VOCAB_PADDED = ("tok_embeddings.weight", "output.weight")


@dataclass(frozen=True)
class Piece:
    """A run of one tp shard's flattened tensor stored in one file's flat buffer."""

    file: str
    group: int
    offset: int  # where the run starts in the file's buffer of that group
    start: int  # where it starts in the flattened tp shard
    numel: int


@dataclass
class Param:
    """Where one parameter's tp shards are."""

    name: str
    full_shape: tuple[int, ...]  # unpadded
    dim: int | None  # tp split axis
    local_shape: tuple[int, ...]  # a tp shard's shape in the source layout (padded)
    shards: list[list[Piece] | None] = field(default_factory=list)  # per source tp rank
    replicas: int = 1  # consecutive source tp ranks holding the same shard (KV heads)


class UnsupportedCheckpoint(ValueError):
    """The checkpoint cannot be re-sharded (its layout is unknown, or its files are not
    laid out as this reader expects)."""


class SourceCheckpoint:
    """Reads full-tensor slices of the optimiser state of checkpoint ``path``."""

    def __init__(self, path: Path, args: ModelArgs) -> None:
        layout = read_layout(path)
        if layout is None:
            raise UnsupportedCheckpoint(f"{path}: no layout.json; its layout is unknown")
        if layout.zero_stage not in (0, 1, 2, 3):
            raise UnsupportedCheckpoint(
                f"{path}: saved with parallel.zero_stage={layout.zero_stage}; re-sharding reads "
                f"ZeRO 0-3 (resume it under {layout.describe()})"
            )
        self.path = path
        self.layout: LayoutRecord = layout
        self.args = args
        self.bytes_read = 0  # of tensor data copied out of the files
        self._open: dict[str, Any] = {}
        self._prefix = (
            "bf16_" if (path / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file() else ""
        )
        self.params: dict[str, Param] = {}  # indexed so far (lazily, by stage and tp rank)
        self._indexed: set[int] = set()
        self._zero0: dict[tuple[str, int], tuple[str, str]] = {}  # -> (weights file, name)
        self.meta = self._meta()

    # -- the index ---------------------------------------------------------

    def _stage_of(self, name: str) -> int:
        if self.layout.zero_stage == 3 or name == "tok_embeddings.weight":
            return 0  # ZeRO-3 runs with pp = 1
        if not name.startswith("layers."):
            return self.layout.pp - 1  # norm, output
        layer = int(name.split(".")[1])
        for stage, (first, last) in enumerate(self.layout.stage_layers):
            if first <= layer <= last:
                return stage
        raise KeyError(f"{self.path}: layer {layer} is in no stage of {self.layout.stage_layers}")

    def _index(self, stage: int, tp_rank: int) -> None:
        """Index model-parallel rank (``stage``, ``tp_rank``): two small reads, done once."""
        mp = stage * self.layout.tp + tp_rank
        if mp in self._indexed:
            return
        self._indexed.add(mp)
        if self.layout.zero_stage == 3:
            self._index_zero3(tp_rank)
        elif self.layout.zero_stage == 0:
            self._index_zero0(mp, stage, tp_rank)
        else:
            self._index_zero12(mp, tp_rank)

    def param(self, name: str) -> Param:
        """Where parameter ``name`` (Meta's name) is; KeyError if the checkpoint has none."""
        if name not in self.params:
            try:
                self._index(self._stage_of(name), 0)
            except (KeyError, ValueError, IndexError) as exc:
                raise KeyError(f"{self.path}: no parameter {name} ({exc})") from exc
        if name not in self.params:
            raise KeyError(f"{self.path}: no parameter {name} in this checkpoint")
        return self.params[name]

    def _shard(self, param: Param, tp_rank: int) -> list[Piece]:
        if param.shards[tp_rank] is None:
            self._index(self._stage_of(param.name), tp_rank)
        pieces = param.shards[tp_rank]
        assert pieces is not None
        return pieces

    def names(self) -> list[str]:
        """Every parameter (indexes every rank: for tests and inspection)."""
        stages = 1 if self.layout.zero_stage == 3 else self.layout.pp
        for stage in range(stages):
            self._index(stage, 0)
        return list(self.params)

    def optim_file(self, dp_rank: int, mp_rank: int) -> str:
        return f"{self._prefix}zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_optim_states.pt"

    def _states_file(self, mp_rank: int = 0) -> str:
        if self.layout.zero_stage == 3:
            return f"zero_pp_rank_0_mp_rank_{mp_rank:02d}_model_states.pt"
        return f"mp_rank_{mp_rank:02d}_model_states.pt"

    def _file(self, name: str) -> Any:
        if name not in self._open:
            self._open[name] = safe_load(self.path / name, mmap=True)
        return self._open[name]

    def _optim(self, name: str) -> dict[str, Any]:
        return dict(self._file(name)[OPTIMIZER_STATE_DICT])

    def _add(
        self, name: str, local_shape: tuple[int, ...], tp_rank: int, pieces: list[Piece]
    ) -> None:
        param = self.params.get(name)
        if param is None:
            dim = tp_dim(name)
            full = list(local_shape)
            replicas = 1
            if dim is not None:
                replicas = tp_replicas(name, self.args, self.layout.tp)
                full[dim] *= self.layout.tp // replicas
                if name in _VOCAB_PADDED:
                    full[dim] = self.args.vocab_size
            param = Param(name, tuple(full), dim, tuple(local_shape), replicas=replicas)
            param.shards = [None] * self.layout.tp
            self.params[name] = param
        param.shards[tp_rank] = pieces

    def _index_zero12(self, mp: int, tp_rank: int) -> None:
        """One model-parallel rank: a parameter's run in the group buffer, cut at dp slices."""
        shapes = self._file(f"mp_rank_{mp:02d}_model_states.pt")[PARAM_SHAPES]
        first = self._optim(self.optim_file(0, mp))
        slice_len = [int(t.numel()) for t in first[FP32_SLICES]]
        for group, names in enumerate(shapes):
            offset = 0
            for local_name, shape in names.items():
                numel = math.prod(shape)
                pieces = []
                at = offset
                while at < offset + numel:
                    dp_rank, inside = divmod(at, slice_len[group])
                    run = min(offset + numel - at, slice_len[group] - inside)
                    pieces.append(
                        Piece(self.optim_file(dp_rank, mp), group, inside, at - offset, run)
                    )
                    at += run
                name = global_name(local_name, self.args.n_layers, self.layout.pp)
                self._add(name, tuple(shape), tp_rank, pieces)
                offset += numel
        self._check_against_mappings(mp, first)

    def _check_against_mappings(self, mp: int, first: dict[str, Any]) -> None:
        """DeepSpeed records dp rank 0's fragments: they must be where we computed them."""
        for group, mapping in enumerate(first[SLICE_MAPPINGS]):
            for local_name, addr in mapping.items():
                name = global_name(local_name, self.args.n_layers, self.layout.pp)
                tp_rank = mp % self.layout.tp
                piece = self._shard(self.params[name], tp_rank)[0]
                if (piece.file, piece.group, piece.offset, piece.numel) != (
                    self.optim_file(0, mp),
                    group,
                    addr.start,
                    addr.numel,
                ):
                    raise UnsupportedCheckpoint(
                        f"{self.path}: {name} is at {addr} in {self.optim_file(0, mp)}, not at "
                        f"{piece}: this DeepSpeed flattens parameters differently"
                    )

    def _index_zero3(self, tp_rank: int) -> None:
        """ZeRO-3: each flattened parameter in dp slices of ``ceil(n / dp)``."""
        dp = self.layout.dp
        shapes = self._file(self._states_file(tp_rank))[PARAM_SHAPES]
        for group, names in enumerate(shapes):
            offset = 0
            for name, shape in names.items():
                numel = math.prod(shape)
                part = math.ceil(numel / dp)
                pieces = []
                for dp_rank in range(dp):
                    start = dp_rank * part
                    run = max(0, min(part, numel - start))
                    if run:
                        pieces.append(
                            Piece(self.optim_file(dp_rank, tp_rank), group, offset, start, run)
                        )
                offset += part
                self._add(name, tuple(shape), tp_rank, pieces)

    def _index_zero0(self, mp: int, stage: int, tp_rank: int) -> None:
        """ZeRO-0 in fp32: whole tensors; the weights are the module's, the moments the
        optimiser's, numbered over its groups (matrices, then vectors: ``param_groups``)."""
        states_file = f"mp_rank_{mp:02d}_model_states.pt"
        states = self._file(states_file)
        optimizer = states["optimizer"]
        if set(optimizer) != {"state", "param_groups"}:
            raise UnsupportedCheckpoint(
                f"{self.path}: {states_file} holds a wrapped optimiser ({sorted(optimizer)}); "
                "re-sharding reads ZeRO-0 in fp32 only"
            )
        weights: list[tuple[str, str, torch.Tensor]] = []  # (file, local name, tensor)
        if states["module"] is not None:
            weights = [(states_file, n, t) for n, t in states["module"].items()]
        else:  # a pipeline: one file per layer of this stage, in layer order
            for index in self._pipeline_layers(stage, tp_rank):
                file = f"layer_{index:02d}-model_{tp_rank:02d}-model_states.pt"
                weights += [(file, f"{index}.{n}", t) for n, t in self._file(file).items()]
        ordered = [w for w in weights if w[2].dim() >= 2] + [w for w in weights if w[2].dim() < 2]
        numbered = [i for group in optimizer["param_groups"] for i in group["params"]]
        if len(numbered) != len(ordered):
            raise UnsupportedCheckpoint(
                f"{self.path}: {states_file}: {len(numbered)} optimiser entries for "
                f"{len(ordered)} parameters"
            )
        for index, (file, local_name, tensor) in zip(numbered, ordered, strict=True):
            moment = optimizer["state"][index]["exp_avg"]
            if moment.shape != tensor.shape:
                raise UnsupportedCheckpoint(f"{self.path}: {local_name}: moments do not match")
            self._zero0[(states_file, index)] = (
                file,
                local_name.split(".", 1)[1] if states["module"] is None else local_name,
            )
            name = global_name(local_name, self.args.n_layers, self.layout.pp)
            piece = Piece(states_file, index, 0, 0, tensor.numel())
            self._add(name, tuple(tensor.shape), tp_rank, [piece])

    def _pipeline_layers(self, stage: int, tp_rank: int) -> list[int]:
        """The pipeline layer indices stored for ``stage`` (0: embedding, last: the head)."""
        first, last = self.layout.stage_layers[stage]
        indices = list(range(first + 1, last + 2))
        if stage == 0:
            indices.insert(0, 0)
        if stage == self.layout.pp - 1:
            indices.append(last + 2)
        return [
            i
            for i in indices
            if (self.path / f"layer_{i:02d}-model_{tp_rank:02d}-model_states.pt").is_file()
        ]

    def _meta(self) -> dict[str, Any]:
        states = self._file(self._states_file())
        if self.layout.zero_stage == 0:
            adam_state = states["optimizer"]["state"][0]
        else:
            optim = self._optim(self.optim_file(0, 0))
            key = OPTIMIZER_STATE_DICT if self.layout.zero_stage == 3 else BASE_OPTIMIZER_STATE
            adam_state = optim[key]["state"][0]
        return {
            "adam_step": int(adam_state["step"]),
            "step": int(states["step"]),
            "consumed_tokens": int(states["consumed_tokens"]),
            "position": int(states["data"]["position"]),
            "skipped_steps": int(states["skipped_steps"]),
            "lr_scheduler": states["lr_scheduler"],
        }

    @property
    def consumed_samples(self) -> int:
        return self.meta["position"] * self.layout.micro_batch_size * self.layout.dp

    # -- reading -----------------------------------------------------------

    def _buffer(self, file: str, key: str, group: int) -> torch.Tensor:
        if self.layout.zero_stage == 0:  # ``group`` numbers the parameter in the optimiser
            if key != "fp32":
                return self._file(file)["optimizer"]["state"][group][key].flatten()
            weights_file, local_name = self._zero0[(file, group)]
            weights = self._file(weights_file)
            return weights.get("module", weights)[local_name].flatten()
        optim = self._optim(file)
        if self.layout.zero_stage == 3:
            if key == "fp32":
                return optim["fp32_flat_groups"][group]
            return optim[OPTIMIZER_STATE_DICT]["state"][group][key]
        if key == "fp32":
            return optim[FP32_SLICES][group]
        return optim[BASE_OPTIMIZER_STATE]["state"][group][key]

    def _shard_flat(
        self, param: Param, tp_rank: int, key: str, start: int, end: int
    ) -> torch.Tensor:
        """Elements ``[start, end)`` of source tp shard ``tp_rank``, flattened.

        A range inside one piece is a view of the memory-mapped file (the caller's
        copy is the read); one across pieces is gathered into a new tensor.
        """
        pieces = self._shard(param, tp_rank)
        for piece in pieces:
            if piece.start <= start and end <= piece.start + piece.numel:
                buffer = self._buffer(piece.file, key, piece.group)
                self.bytes_read += (end - start) * buffer.element_size()
                at = piece.offset + start - piece.start
                return buffer.detach()[at : at + end - start]
        out = torch.empty(end - start, dtype=torch.float32)
        for piece in pieces:
            lo, hi = max(start, piece.start), min(end, piece.start + piece.numel)
            if lo >= hi:
                continue
            buffer = self._buffer(piece.file, key, piece.group)
            out[lo - start : hi - start] = buffer.detach()[
                piece.offset + lo - piece.start : piece.offset + hi - piece.start
            ]
            self.bytes_read += (hi - lo) * buffer.element_size()
        return out

    def read(
        self, name: str, key: str, rows: tuple[int, int], cols: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Rows ``rows`` (and columns ``cols`` of a matrix) of the full, unpadded tensor ``name``.

        A 1-D tensor is read as a column (``rows`` index its elements).
        """
        param = self.param(name)
        full = param.full_shape if len(param.full_shape) == 2 else (*param.full_shape, 1)
        local = param.local_shape if len(param.local_shape) == 2 else (*param.local_shape, 1)
        r0, r1 = rows
        c0, c1 = cols if cols is not None else (0, full[1])
        assert 0 <= r0 <= r1 <= full[0] and 0 <= c0 <= c1 <= full[1], (name, rows, cols, full)
        out = torch.empty(r1 - r0, c1 - c0, dtype=torch.float32)
        if param.dim == 1:  # column blocks: full rows of each overlapping shard
            width = local[1]
            for tp_rank in range(c0 // width, (c1 - 1) // width + 1 if c1 > c0 else 0):
                lo, hi = max(c0, tp_rank * width), min(c1, (tp_rank + 1) * width)
                block = self._shard_flat(param, tp_rank, key, r0 * width, r1 * width).view(
                    -1, width
                )
                out[:, lo - c0 : hi - c0] = block[:, lo - tp_rank * width : hi - tp_rank * width]
            return out
        height = local[0] if param.dim == 0 else full[0]
        for tp_rank in range(r0 // height, (r1 - 1) // height + 1 if r1 > r0 else 0):
            lo, hi = max(r0, tp_rank * height), min(r1, (tp_rank + 1) * height)
            base = tp_rank * height if param.dim == 0 else 0
            block = self._shard_flat(
                param,
                tp_rank * param.replicas if param.dim == 0 else 0,  # shard -> its first rank
                key,
                (lo - base) * local[1],
                (hi - base) * local[1],
            ).view(-1, local[1])
            out[lo - r0 : hi - r0] = block[:, c0:c1]
        return out

    def read_full(self, name: str, key: str) -> torch.Tensor:
        """The whole unpadded tensor (for tests and inspection; a re-shard never needs it)."""
        param = self.param(name)
        return self.read(name, key, (0, param.full_shape[0])).view(param.full_shape)

    def close(self) -> None:
        self._open.clear()
