"""What a preprocessing run reports: its counts (``Summary``) and how a terminal shows them.

Shared by ``orchestrator.data.preprocess`` (one shard) and
``orchestrator.data.preprocess_many`` (a shard per file), with the parser that
raises a usage error as ``ValueError`` (the commands print it as one ``error:``
line and exit 2) instead of exiting from inside argparse.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import TextIO

from orchestrator.data.documents import Malformed


@dataclass
class Summary:
    num_records: int = 0
    num_documents: int = 0
    num_tokens: int = 0  # in the shard, one </s> per document included
    num_text_bytes: int = 0  # UTF-8 bytes of the documents written
    num_empty: int = 0
    num_malformed: int = 0
    malformed: list[Malformed] = field(default_factory=list)  # the first few
    input_bytes: int = 0  # size of the input files (compressed size for .gz, .zst)
    bytes_read: int = 0
    elapsed_s: float = 0.0

    @property
    def bytes_per_token(self) -> float:
        """Text bytes per token, the </s> tokens not counted."""
        return self.num_text_bytes / max(1, self.num_tokens - self.num_documents)

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / max(self.elapsed_s, 1e-9)

    def format(self) -> str:
        return "\n".join(
            [
                f"records    {self.num_records:,} = {self.num_documents:,} documents"
                f" + {self.num_empty:,} empty + {self.num_malformed:,} malformed",
                f"tokens     {self.num_tokens:,} ({self.num_documents:,} of them </s>)",
                f"bytes/tok  {self.bytes_per_token:.3f}",
                f"elapsed    {self.elapsed_s:.2f} s",
                f"throughput {self.tokens_per_s:,.0f} tokens/s",
            ]
        )


class ProgressBar:
    """Progress on a terminal, redrawn in place; a plain line now and then elsewhere.

    Also prints each reported malformed record as it comes, with ``draw=False`` too.
    """

    def __init__(self, stream: TextIO, *, draw: bool = True, width: int = 24) -> None:
        self.stream = stream
        self.draw = draw
        self.width = width
        self.tty = stream.isatty()
        self.interval_s = 0.2 if self.tty else 30.0
        self._last_draw = time.monotonic()  # a short run draws only its final line
        self._num_reported = 0
        self._drawn = False

    def __call__(self, summary: Summary) -> None:
        new = summary.malformed[self._num_reported :]
        if new:
            self._clear()
            for malformed in new:
                print(f"warning: {malformed}", file=self.stream)
            self._num_reported += len(new)
        now = time.monotonic()
        if now - self._last_draw >= self.interval_s:
            self._draw(summary)
            self._last_draw = now

    def close(self, summary: Summary) -> None:
        self._draw(summary)
        self.end_line()
        more = summary.num_malformed - self._num_reported
        if more:
            print(f"warning: ... and {more:,} more malformed records", file=self.stream)

    def _draw(self, summary: Summary) -> None:
        if not self.draw:
            return
        fraction = summary.bytes_read / max(1, summary.input_bytes)
        filled = round(self.width * min(1.0, fraction))
        bar = "#" * filled + " " * (self.width - filled)
        line = (
            f"{fraction:4.0%} |{bar}| {summary.num_documents:,} docs"
            f"  {summary.num_tokens:,} tokens  {summary.tokens_per_s:,.0f} tok/s"
            f"  {summary.elapsed_s:.0f} s"
        )
        self.stream.write(f"\r\x1b[K{line}" if self.tty else f"{line}\n")
        self.stream.flush()
        self._drawn = True

    def end_line(self) -> None:
        """Ends a bar drawn in place, so that the next message starts its own line."""
        if self.tty and self._drawn:
            print(file=self.stream)
            self._drawn = False

    def _clear(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[K")


class RaisingArgumentParser(argparse.ArgumentParser):
    """Usage errors raise instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(message)
