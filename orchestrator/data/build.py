"""From the ``data`` config to this rank's train and validation sources.

``resolve_paths`` runs at the entry point, before any worker starts: it makes
every data path absolute (a relative path is taken from the current
directory, else from this checkout, where the demo corpus lives), checks that
every shard and file exists, and that the model's vocabulary matches the
tokenizer's. Each problem is one ``ValueError`` line naming the field.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import Config
from orchestrator.data import MicroBatchSource
from orchestrator.data.indexed import shard_paths

_PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _absolute(path: str) -> Path:
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return candidate
    here = Path.cwd() / candidate
    if here.exists() or here.with_name(here.name + ".idx").exists():
        return here.resolve()
    return (_PROJECT_ROOT / candidate).resolve()


def resolve_paths(cfg: Config) -> None:
    """Make the data and init paths absolute and check them (and the vocabulary) in place."""
    if cfg.model.init_from is not None:
        init = _absolute(cfg.model.init_from)
        if not init.is_dir():
            raise ValueError(f"model.init_from={cfg.model.init_from}: no such directory ({init})")
        cfg.model.init_from = str(init)
    data = cfg.data
    if data.kind == "synthetic":
        return
    assert data.tokenizer is not None  # DataConfig.validate
    tokenizer = _absolute(data.tokenizer)
    if not tokenizer.is_file():
        raise ValueError(f"data.tokenizer={data.tokenizer}: no such file ({tokenizer})")
    data.tokenizer = str(tokenizer)
    _check_vocab(cfg, tokenizer)
    if data.kind == "blended":
        root = _absolute(data.root)
        data.root = str(root)
        for i, source in enumerate(data.sources):
            prefix = Path(source.prefix)
            prefix = prefix if prefix.is_absolute() else root / prefix
            bin_path, idx_path = shard_paths(prefix)
            if not (bin_path.is_file() and idx_path.is_file()):
                raise ValueError(
                    f"data.sources[{i}].prefix={source.prefix}: no shard at {prefix}.bin/.idx "
                    "(set data.root, or make it with python -m orchestrator.data.preprocess)"
                )
            source.prefix = str(prefix)
    if data.kind == "alpaca":
        assert data.alpaca_path is not None
        path = _absolute(data.alpaca_path)
        if not path.is_file():
            raise ValueError(f"data.alpaca_path={data.alpaca_path}: no such file ({path})")
        data.alpaca_path = str(path)


def _check_vocab(cfg: Config, tokenizer_path: Path) -> None:
    from orchestrator.data.tokenizer import Tokenizer

    vocab = Tokenizer(tokenizer_path).vocab_size
    if vocab != cfg.model.vocab_size:
        raise ValueError(
            f"model.vocab_size={cfg.model.vocab_size}: the tokenizer {tokenizer_path.name} "
            f"has {vocab} tokens; they must match (set model.vocab_size={vocab})"
        )


def build_sources(
    cfg: Config, *, seq_len: int, dp_rank: int, dp_size: int, global_batch: int, micro_batch: int
) -> tuple[MicroBatchSource, MicroBatchSource | None]:
    """This dp rank's (train, validation) sources; validation is None where nothing is held out."""
    data, seed = cfg.data, cfg.train.seed
    place = dict(
        global_batch=global_batch, micro_batch=micro_batch, dp_rank=dp_rank, dp_size=dp_size
    )
    if data.kind == "synthetic":
        from orchestrator.data.synthetic import SyntheticData

        synthetic = SyntheticData(
            vocab_size=cfg.model.vocab_size,
            seq_len=seq_len,
            seed=seed,
            num_samples=data.num_samples,
            **place,
        )
        return synthetic, None
    assert data.tokenizer is not None
    if data.kind == "alpaca":
        from orchestrator.data.alpaca import AlpacaSource, load_records
        from orchestrator.data.tokenizer import Tokenizer

        assert data.alpaca_path is not None
        records = load_records(Path(data.alpaca_path))
        return (
            AlpacaSource(
                records,
                Tokenizer(Path(data.tokenizer)),
                seq_len=seq_len,
                packing=data.packing,
                seed=seed,
                **place,
            ),
            None,
        )
    from orchestrator.data.sources import BlendedSource, ShardSpec, packed_splits

    trains, valids, weights = [], [], []
    for source in data.sources:
        train, valid = packed_splits(
            ShardSpec(source.name, source.prefix, source.weight),
            seq_len=seq_len,
            valid_fraction=data.valid_fraction,
            split_seed=data.split_seed,
            seed=seed,
        )
        trains.append(train)
        weights.append(source.weight)
        if valid is not None:
            valids.append((valid, source.weight))
    validation = (
        BlendedSource([v for v, _ in valids], [w for _, w in valids], **place) if valids else None
    )
    return BlendedSource(trains, weights, **place), validation
