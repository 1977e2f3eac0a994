"""Test tiers: `scripts/test.sh --fast` runs the modules below (`-m fast`): no native build, no
model training beyond a step on a tiny random model, under a minute on 2 cores — what a person
runs while editing. The full suite (`scripts/test.sh`, CI) runs everything."""

from __future__ import annotations

from pathlib import Path

import pytest

FAST_MODULES = {
    "test_arch.py", "test_checkpoint.py", "test_cli_args.py", "test_codec.py", "test_fakequant.py", "test_format.py",
    "test_gguf_io.py", "test_obs_allocation.py", "test_oneshot.py",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "fast: in the fast tier (no native build, no training; scripts/test.sh --fast)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).name in FAST_MODULES:
            item.add_marker(pytest.mark.fast)


@pytest.fixture(scope="module")
def llama_cpp():
    """llama_cpp bound to the GQSA-patched libraries; fails (never skips) when they are missing."""
    from gqsa_gguf import runtime

    if not runtime.check_patched():
        pytest.fail(f"the llama.cpp libraries in {runtime.lib_dir()} do not know the gqsa4 type — rebuild them "
                    f"(bash scripts/setup.sh)")
    return runtime.import_llama_cpp()
