"""The optional apex path: an unrelated package named ``apex`` is detected and ignored."""

from __future__ import annotations

import logging
import sys
import types

import pytest

from model_parallel import fused


def test_unrelated_apex_package_warns_and_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake = types.ModuleType("apex")
    fake.__file__ = "/site-packages/apex/__init__.py"  # the PyPI web toolkit of that name
    monkeypatch.setitem(sys.modules, "apex", fake)
    fused._nvidia_apex_module.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=fused.__name__):
            assert fused.fused_rms_norm_affine() is None
            assert fused.fused_adam_class() is None
            assert fused.fused_rms_norm_affine() is None
        warnings = [r for r in caplog.records if "not NVIDIA apex" in r.getMessage()]
        assert len(warnings) == 2  # once per submodule looked up, not once per call
    finally:
        fused._nvidia_apex_module.cache_clear()


def test_no_apex_means_torch_path() -> None:
    fused._nvidia_apex_module.cache_clear()
    if "apex" not in sys.modules:
        assert fused.fused_rms_norm_affine() is None
