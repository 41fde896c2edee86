"""The config schema's shared rules: the allowed choices and the field checks.

Each check raises (or ``fail`` returns) a ``ValueError`` with one line naming
the field, the value and the rule: what a user sees for a bad setting.
"""

from __future__ import annotations

import re
from typing import Any

ACTIVATION_CHECKPOINTING = ("none", "full")
PRECISIONS = ("fp32", "bf16", "fp16")
LAUNCHERS = ("auto", "local", "slurm")
SCHEDULERS = ("none", "slurm")
CPU_ALLOCATORS = ("auto", "tcmalloc", "system")
DATA_KINDS = ("synthetic", "blended", "alpaca")
RESUME_MODES = ("auto", "never")

# SLURM --time formats: "minutes", "minutes:seconds", "hours:minutes:seconds",
# "days-hours", "days-hours:minutes", "days-hours:minutes:seconds".
SLURM_TIME = re.compile(r"^\d+(:\d{1,2}){0,2}$|^\d+-\d{1,2}(:\d{1,2}){0,2}$")
# SLURM names as #SBATCH lines take them unquoted: accounts, partitions (a
# comma-separated list), job names. Anything else is refused rather than escaped.
SLURM_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
SLURM_NAME_LIST = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*(,[A-Za-z0-9_][A-Za-z0-9_.+-]*)*$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def slurm_name(field_name: str, value: str | None, pattern: re.Pattern[str] = SLURM_NAME) -> None:
    if value is not None and not pattern.match(value):
        raise fail(field_name, value, "must be a SLURM name: letters, digits and _ . + - only")


def fail(field_name: str, value: Any, rule: str) -> ValueError:
    return ValueError(f"{field_name}={value}: {rule}")


def positive(field_name: str, value: Any) -> None:
    # bool is an int subclass; a flag is never a size.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(field_name, value, "must be a positive integer")


def non_negative(field_name: str, value: int) -> None:
    if value < 0:
        raise fail(field_name, value, "must be >= 0")


def positive_float(field_name: str, value: float) -> None:
    if not value > 0:
        raise fail(field_name, value, "must be > 0")


def one_of(field_name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise fail(field_name, value, f"must be one of {', '.join(choices)}")


def has_control(text: str) -> bool:
    return any(ord(c) < 32 or c == "\x7f" for c in text)
