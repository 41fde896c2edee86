"""Hugging Face ``tokenizer.json`` tokenizers (Llama 3's kind), built here, nothing downloaded.

A small byte-level BPE with Llama 3's special tokens goes through
preprocessing and back; a 70,000-token WordLevel vocabulary forces int32
shards; the vocabulary check and the bos/eos lookup fail in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from orchestrator.config.compose import compose_config
from orchestrator.data.build import resolve_paths
from orchestrator.data.hf_tokenizer import HFTokenizer
from orchestrator.data.indexed import IndexedDataset
from orchestrator.data.preprocess import preprocess
from orchestrator.data.preprocess_many import preprocess_many
from orchestrator.data.run_index import IndexSpec, RunIndex, SourceSpec, ensure_index
from orchestrator.data.shards import check_shard
from orchestrator.data.tokenizer import Tokenizer, load_tokenizer
from tests.test_tokenizer import make_documents, train_small_tokenizer, write_jsonl

REPO = Path(__file__).resolve().parents[1]
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>"]
WIDE_WORDS = 70_000


def build_byte_bpe(folder: Path, *, specials: list[str] = SPECIALS) -> Path:
    """A byte-level BPE like Llama 3's, trained on a few hundred documents."""
    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(make_documents(200), trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def build_wide_word_level(folder: Path) -> Path:
    """Words ``w0 .. w69999`` then the two special tokens: ids up to 70,001."""
    vocab = {f"w{i}": i for i in range(WIDE_WORDS)}
    tok = RawTokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


@pytest.fixture(scope="module")
def byte_bpe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_byte_bpe(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wide_word_level(tmp_path_factory.mktemp("wide"))


def test_loads_by_file_name_or_folder(byte_bpe: Path, tmp_path: Path) -> None:
    assert isinstance(load_tokenizer(byte_bpe), HFTokenizer)
    assert isinstance(load_tokenizer(byte_bpe.parent), HFTokenizer)
    assert isinstance(load_tokenizer(train_small_tokenizer(tmp_path)), Tokenizer)


def test_special_ids_and_round_trip(byte_bpe: Path) -> None:
    tok = load_tokenizer(byte_bpe)
    assert (tok.bos_id, tok.eos_id) == (0, 1)  # the trainer puts special tokens first
    assert tok.vocab_size == 500
    text = "Kato riing 12345.\n\nPre con"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == 0 and ids[-1] == 1 and 0 not in ids[1:-1] and 1 not in ids[1:-1]
    assert tok.decode(ids[1:-1]) == text
    expected = [tok.encode(text, eos=True), tok.encode("er", eos=True)]
    assert tok.encode_batch([text, "er"], eos=True) == expected
    assert tok.encode_batch([text, "er"], eos=True, num_threads=2) == expected


def test_special_token_in_text_is_plain_text(byte_bpe: Path) -> None:
    tok = load_tokenizer(byte_bpe)
    ids = tok.encode("an <|end_of_text|> en")
    assert tok.eos_id not in ids
    assert tok.decode(ids) == "an <|end_of_text|> en"


def test_tokenizer_config_names_bos_and_eos(tmp_path: Path) -> None:
    path = build_byte_bpe(tmp_path, specials=[*SPECIALS, "<|eot_id|>"])
    config = {"bos_token": {"content": "<|begin_of_text|>"}, "eos_token": "<|eot_id|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(path)
    assert (tok.bos_id, tok.eos_id) == (0, 2)


def test_no_eos_token_is_one_line(tmp_path: Path) -> None:
    path = build_byte_bpe(tmp_path, specials=["<|begin_of_text|>"])
    with pytest.raises(ValueError, match=r"^eos_token: .* has no eos token") as e:
        load_tokenizer(path)
    assert "\n" not in str(e.value)


def test_not_a_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tokenizer.json") as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without tokenizer.json"):
        load_tokenizer(tmp_path / "empty")


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.timeout(60)
def test_preprocess_round_trip(tmp_path: Path, byte_bpe: Path, workers: int) -> None:
    texts = [*make_documents(50, seed=3), "😀 unseen 漢字", " leading space\r\nand\ttabs  "]
    corpus = write_jsonl(tmp_path / "c.jsonl", texts)
    preprocess([corpus], tmp_path / "out", byte_bpe.parent, workers=workers, batch_size=8)
    tok = load_tokenizer(byte_bpe)
    shard = IndexedDataset(tmp_path / "out")
    assert shard.dtype == np.uint16
    decoded = []
    for tokens in (shard[i] for i in range(len(shard))):
        assert tokens[-1] == tok.eos_id and tok.eos_id not in tokens[:-1]  # eos only, as configured
        decoded.append(tok.decode(tokens[:-1].tolist()))
    assert decoded == texts


@pytest.mark.timeout(60)
def test_preprocess_many_with_a_tokenizer_folder(tmp_path: Path, byte_bpe: Path) -> None:
    inputs = [write_jsonl(tmp_path / f"{n}.jsonl", make_documents(20, seed=n)) for n in (1, 2)]
    run = preprocess_many(inputs, tmp_path / "shards", byte_bpe.parent, workers=2)
    assert not run.failed
    tok = load_tokenizer(byte_bpe)
    for n in (1, 2):
        shard = IndexedDataset(tmp_path / "shards" / str(n))
        texts = [tok.decode(shard[i][:-1].tolist()) for i in range(len(shard))]
        assert texts == make_documents(20, seed=n)


@pytest.mark.timeout(120)
def test_wide_vocabulary_writes_and_reads_int32(tmp_path: Path, wide: Path) -> None:
    tok = load_tokenizer(wide)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (WIDE_WORDS + 2, WIDE_WORDS, WIDE_WORDS + 1)
    rng = np.random.default_rng(0)
    docs = [[int(i) for i in rng.integers(60_000, WIDE_WORDS, size=40)] for _ in range(30)]
    docs[0][:3] = [65_535, 65_536, WIDE_WORDS - 1]
    texts = [" ".join(f"w{i}" for i in doc) for doc in docs]
    preprocess([write_jsonl(tmp_path / "c.jsonl", texts)], tmp_path / "wide", wide)
    shard = IndexedDataset(tmp_path / "wide")
    assert shard.dtype == np.int32
    assert (tmp_path / "wide.idx").read_bytes()[17] == 4  # Megatron's dtype code for int32
    assert [t.tolist() for t in (shard[i] for i in range(len(shard)))] == [
        [*doc, tok.eos_id] for doc in docs
    ]
    check_shard(str(tmp_path / "wide"), vocab_size=tok.vocab_size, field="data.sources[0].prefix")
    with pytest.raises(ValueError, match="token id 70001, outside"):
        check_shard(str(tmp_path / "wide"), vocab_size=70_001, field="data.sources[0].prefix")
    _run_index_reads_int32(tmp_path, docs, eos=tok.eos_id)


def _run_index_reads_int32(tmp_path: Path, docs: list[list[int]], *, eos: int) -> None:
    """The run index's samples (what the data loader reads) keep ids above 65,535 intact."""
    known = {eos, *(t for doc in docs for t in doc)}
    spec = IndexSpec(
        sources=(SourceSpec("wide", 1.0, (str(tmp_path / "wide"),)),),
        seq_len=16,
        seed=0,
        split_seed=0,
        valid_fraction=0.0,
        num_train_samples=8,
        num_valid_samples=0,
    )
    samples = RunIndex(ensure_index(spec, tmp_path / "cache")).split("train")
    for i in range(8):
        sample = samples[i]
        assert sample.dtype == np.int64 and len(sample) == 17
        assert set(sample.tolist()) <= known and sample.max() > 65_535


def test_vocab_check_fails_in_one_line(byte_bpe: Path) -> None:
    cfg = compose_config(
        [
            "data=alpaca",
            f"data.tokenizer={byte_bpe.parent}",
            "data.alpaca_path=x.json",
            "model=tiny",
        ],
        conf_dir=REPO / "conf",
    )
    with pytest.raises(ValueError, match=r"^model.vocab_size=2000: .* has 500 tokens") as e:
        resolve_paths(cfg)
    assert "\n" not in str(e.value)


def test_export_writes_a_tokenizer_json_that_transformers_loads(
    tmp_path: Path, byte_bpe: Path
) -> None:
    """Hugging Face export of a run on a tokenizer.json: the tokenizer transformers reads back."""
    import torch
    from transformers import AutoTokenizer

    from model_parallel.args import ModelArgs
    from orchestrator.state.weights import write_hf

    tok = load_tokenizer(byte_bpe)
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=tok.vocab_size, multiple_of=8)
    state = {
        name: torch.zeros(shape)
        for name, shape in {
            "tok_embeddings.weight": (tok.vocab_size, 16),
            "norm.weight": (16,),
            "output.weight": (tok.vocab_size, 16),
            "layers.0.attention_norm.weight": (16,),
            "layers.0.ffn_norm.weight": (16,),
            "layers.0.attention.wq.weight": (16, 16),
            "layers.0.attention.wk.weight": (16, 16),
            "layers.0.attention.wv.weight": (16, 16),
            "layers.0.attention.wo.weight": (16, 16),
            "layers.0.feed_forward.w1.weight": (args.hidden_dim, 16),
            "layers.0.feed_forward.w2.weight": (16, args.hidden_dim),
            "layers.0.feed_forward.w3.weight": (args.hidden_dim, 16),
        }.items()
    }
    out = tmp_path / "hf"
    write_hf(state, args, out, tokenizer=byte_bpe)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_id, tok.eos_id)
    hf = AutoTokenizer.from_pretrained(out)
    text = "Grouped-query attention, 8 KV heads."
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.convert_tokens_to_ids(hf.eos_token) == tok.eos_id
