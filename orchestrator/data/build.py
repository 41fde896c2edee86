"""From the ``data`` config to this rank's train and validation sources.

``resolve_paths`` runs at the entry point, before any worker starts: it gives
the config with every data path absolute (a relative path is taken from the current
directory, else from this checkout, where the demo corpus lives), checks that
every shard and file exists, and that the model's vocabulary matches the
tokenizer's. Each problem is one ``ValueError`` line naming the field.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch.distributed as dist

from orchestrator.config.schema import Config, DataConfig
from orchestrator.data import MicroBatchSource
from orchestrator.data.run_index import IndexSpec, RunIndex, SourceSpec, ensure_index
from orchestrator.data.shards import check_shard, expand_source

log = logging.getLogger("orchestrator.data.build")
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _absolute(path: str) -> Path:
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return candidate
    here = Path.cwd() / candidate
    if here.exists() or here.with_name(here.name + ".idx").exists():
        return here.resolve()
    return (_PROJECT_ROOT / candidate).resolve()


def resolve_paths(cfg: Config) -> Config:
    """``cfg`` with its data and init paths absolute, checked (and the vocabulary).

    ``cfg`` itself is not changed.
    """
    model, data = cfg.model, cfg.data
    if model.init_from is not None:
        init = _absolute(model.init_from)
        if not init.is_dir():
            raise ValueError(f"model.init_from={model.init_from}: no such directory ({init})")
        model = dataclasses.replace(model, init_from=str(init))
    if data.kind != "synthetic":
        data = _resolve_data(cfg)
    if model is cfg.model and data is cfg.data:
        return cfg
    return dataclasses.replace(cfg, model=model, data=data)


def _resolve_data(cfg: Config) -> DataConfig:
    data = cfg.data
    assert data.tokenizer is not None  # DataConfig.validate
    tokenizer = _absolute(data.tokenizer)
    if not tokenizer.exists():
        raise ValueError(f"data.tokenizer={data.tokenizer}: no such file ({tokenizer})")
    if tokenizer.is_dir() and not (tokenizer / "tokenizer.json").is_file():
        raise ValueError(f"data.tokenizer={data.tokenizer}: a folder without tokenizer.json")
    _check_vocab(cfg, tokenizer)
    resolved = dataclasses.replace(data, tokenizer=str(tokenizer))
    if data.kind == "blended":
        root = _absolute(data.root)
        vocab = cfg.model.vocab_size
        sources = []
        for i, source in enumerate(data.sources):
            field = f"data.sources[{i}].prefix"
            shards = expand_source(source.prefix, root, field=field)
            for shard in shards:
                check_shard(shard, vocab_size=vocab, field=field)
            given = Path(source.prefix).expanduser()
            prefix = str(given if given.is_absolute() else root / given)
            sources.append(dataclasses.replace(source, prefix=prefix))
        cache = Path(data.cache_dir).expanduser() if data.cache_dir else root / "index_cache"
        resolved = dataclasses.replace(
            resolved,
            root=str(root),
            sources=sources,
            cache_dir=str(cache if cache.is_absolute() else Path.cwd() / cache),
        )
    if data.kind == "alpaca":
        assert data.alpaca_path is not None
        path = _absolute(data.alpaca_path)
        if not path.is_file():
            raise ValueError(f"data.alpaca_path={data.alpaca_path}: no such file ({path})")
        resolved = dataclasses.replace(resolved, alpaca_path=str(path))
    return resolved


def _check_vocab(cfg: Config, tokenizer_path: Path) -> None:
    from orchestrator.data.tokenizer import load_tokenizer

    try:
        vocab = load_tokenizer(tokenizer_path).vocab_size
    except (OSError, ValueError) as e:
        raise ValueError(f"data.tokenizer={tokenizer_path}: {e}") from None
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
        from orchestrator.data.tokenizer import load_tokenizer

        assert data.alpaca_path is not None
        records = load_records(Path(data.alpaca_path))
        return (
            AlpacaSource(
                records,
                load_tokenizer(Path(data.tokenizer)),
                seq_len=seq_len,
                packing=data.packing,
                seed=seed,
                **place,
            ),
            None,
        )
    from orchestrator.data.sources import BlendedSource

    found = _run_index_folder(cfg, seq_len=seq_len, global_batch=global_batch)
    if found is None:
        raise RuntimeError("rank 0 could not build the data index (see its log)")
    folder, has_valid = found
    train = BlendedSource(folder, "train", **place)
    return train, (BlendedSource(folder, "valid", **place) if has_valid else None)


def index_spec(cfg: Config, *, seq_len: int, global_batch: int) -> IndexSpec:
    """What the run's indexes are built from: the sources' shards, seeds and sample counts.

    Training reads ``train.steps`` global batches, plus 1% (rollbacks move
    the data forward); validation ``train.eval_iters`` global batches, the
    same ones at every evaluation.
    """
    data, train = cfg.data, cfg.train
    root = Path(data.root)
    sources = tuple(
        SourceSpec(
            s.name,
            float(s.weight),
            tuple(expand_source(s.prefix, root, field=f"data.sources[{i}].prefix")),
        )
        for i, s in enumerate(data.sources)
    )
    steps = train.steps + max(1, train.steps // 100)
    return IndexSpec(
        sources=sources,
        seq_len=seq_len,
        seed=train.seed,
        split_seed=data.split_seed,
        valid_fraction=data.valid_fraction,
        num_train_samples=steps * global_batch,
        num_valid_samples=train.eval_iters * global_batch if train.eval_interval else 0,
    )


def cache_dir(cfg: Config) -> Path:
    data = cfg.data
    return Path(data.cache_dir) if data.cache_dir else Path(data.root) / "index_cache"


def prepare_index(cfg: Config, *, seq_len: int, global_batch: int) -> Path:
    """Build the run's indexes (or find them built); their folder."""
    spec = index_spec(cfg, seq_len=seq_len, global_batch=global_batch)
    return ensure_index(spec, cache_dir(cfg))


def _run_index_folder(cfg: Config, *, seq_len: int, global_batch: int) -> tuple[Path, bool] | None:
    """Rank 0 builds or finds the index; every rank gets (its folder, whether it has a
    validation split), so no other rank reads the manifest before it needs a batch
    (None: rank 0 failed)."""

    def prepare() -> tuple[Path, bool]:
        folder = prepare_index(cfg, seq_len=seq_len, global_batch=global_batch)
        return folder, RunIndex(folder).num_samples("valid") > 0

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return prepare()
    found: list[tuple[Path, bool] | None] = [None]
    if dist.get_rank() == 0:
        try:
            found[0] = prepare()
        finally:
            dist.broadcast_object_list(found, src=0)  # the others are not left waiting
    else:
        log.info("data: waiting for rank 0 to build or find the run's index in %s", cache_dir(cfg))
        dist.broadcast_object_list(found, src=0)
    return found[0]
