"""Export a checkpoint to Hugging Face's format.

    python -m orchestrator.state.export RUN_DIR OUT_DIR [--tag step_00000400]

Reads ``RUN_DIR/config.yaml`` for the model and layout, the newest complete
checkpoint (or ``--tag``), and writes ``OUT_DIR`` with ``model.safetensors``,
``config.json`` and the tokenizer, which ``LlamaForCausalLM.from_pretrained``
loads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orchestrator.config.schema import load_config
from orchestrator.planning.plan import resolve_plan
from orchestrator.state.checkpoint import LayoutRecord, checkpoint_dir, latest_tag, read_layout
from orchestrator.state.weights import read_checkpoint, write_hf


def export(run_dir: Path, out: Path, *, tag: str | None = None) -> Path:
    cfg = load_config(run_dir / "config.yaml")
    tag = tag or latest_tag(run_dir)
    if tag is None:
        raise ValueError(f"{run_dir}: no complete checkpoint (checkpoints/latest)")
    path = checkpoint_dir(run_dir) / tag
    # The checkpoint's own layout (a re-sharded run's config may have moved on).
    layout = read_layout(path) or LayoutRecord.from_plan(resolve_plan(cfg))
    if layout.zero_stage == 3:
        raise ValueError(
            "ZeRO-3 checkpoints keep the weights in partitioned optimiser files; "
            "export supports ZeRO 0-2"
        )
    args = cfg.model.to_args()
    state = read_checkpoint(path, args, tp=layout.tp, pp=layout.pp)
    tokenizer = Path(cfg.data.tokenizer) if cfg.data.tokenizer else None
    write_hf(state, args, out, tokenizer=tokenizer)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.state.export", description=__doc__
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--tag", default=None, help="checkpoint name (default: latest)")
    ns = parser.parse_args(argv)
    try:
        out = export(ns.run_dir, ns.out_dir, tag=ns.tag)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
