"""Every ``tests/test_*.py`` is named after what it tests, so a module's tests are found by name.

The name is ``test_<module>.py`` or ``test_<module>_<aspect>.py``, where
``<module>`` is the last component of a module or subpackage under
``orchestrator/`` or ``model_parallel/`` (``numerics``, ``ds_compat``,
``config``), of a script in ``bench/`` (``gpu_check``) or of a helper module
in ``tests/`` (the SLURM harness, ``slurm_cluster``). The few tests of the
project as a whole rather than of one part are listed in ``CROSS_CUTTING``
with the reason. Read from the file system alone: nothing is imported.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"

# Test files named after no one module, each with why.
CROSS_CUTTING = {
    "test_import_graph.py": "the import graph of both packages, every module at once",
    "test_llama3.py": "the Llama 2 and 3 family through args, rotary, convert, weights, "
    "the conf/model presets and the CLI",
    "test_test_names.py": "this naming rule itself",
}


def module_names() -> set[str]:
    """What a test may be named after: modules and subpackages of the two packages,
    bench scripts and the helper modules of ``tests/``."""
    names = set()
    for package in ("orchestrator", "model_parallel"):
        for path in (REPO / package).rglob("*.py"):
            if path.stem in ("__init__", "__main__"):
                names.add(path.parent.name)  # a (sub)package
            else:
                names.add(path.stem)
    names.update(path.stem for path in (REPO / "bench").glob("*.py"))
    names.update(
        path.stem
        for path in TESTS.glob("*.py")
        if not path.stem.startswith("test_") and path.stem != "__init__"
    )
    return names


def misnamed(files: Iterable[str], names: set[str]) -> list[str]:
    """The test files in ``files`` whose name starts with none of ``names``."""
    bad = []
    for file in files:
        subject = file.removeprefix("test_").removesuffix(".py")
        if subject in names or any(subject.startswith(f"{name}_") for name in names):
            continue
        bad.append(file)
    return sorted(bad)


def test_every_test_file_names_its_module() -> None:
    files = [p.name for p in TESTS.glob("test_*.py") if p.name not in CROSS_CUTTING]
    bad = misnamed(files, module_names())
    assert not bad, (
        f"{bad}: name a test file test_<module>.py or test_<module>_<aspect>.py after the "
        "module, subpackage, bench script or tests/ helper it tests (or, for a test of the "
        "whole project, add it to CROSS_CUTTING in tests/test_test_names.py with the reason)"
    )


def test_cross_cutting_entries_exist_and_are_needed() -> None:
    """No stale entry, and none that the rule would accept anyway."""
    assert all((TESTS / name).is_file() for name in CROSS_CUTTING), CROSS_CUTTING
    assert misnamed(CROSS_CUTTING, module_names()) == sorted(CROSS_CUTTING)


def test_the_rule_tells_names_apart() -> None:
    names = {"numerics", "ds_compat", "config"}
    files = ["test_numerics.py", "test_numerics_bad_steps.py", "test_ds_compat.py"]
    files += ["test_config_sizes.py", "test_nonsense.py", "test_numericsx.py", "test_ds.py"]
    assert misnamed(files, names) == ["test_ds.py", "test_nonsense.py", "test_numericsx.py"]
