import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tiny  # noqa: E402

EOS_BIAS = 0.7  # with seed 2: some outputs stop early, some run to the limit (see tests/test_translator.py)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return tiny.make_llama(str(tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="session")
def m2m_dir(tmp_path_factory):
    return tiny.make_m2m100(str(tmp_path_factory.mktemp("m2m")), seed=2, eos_bias=EOS_BIAS)


def smollm2_path():
    """The real SmolLM2-135M-Instruct folder from ../shared/tools/smollm2.sh, or None when it is not available."""
    script = os.path.join(ROOT, "..", "shared", "tools", "smollm2.sh")
    default = os.path.expanduser("~/.cache/clo-assets/smollm2-135m-instruct")
    if os.path.exists(os.path.join(default, "model.safetensors")):
        return default
    if os.environ.get("CLO_BUILD_SMOLLM2") and os.path.exists(script):
        out = subprocess.run(["bash", script], capture_output=True, text=True)
        if out.returncode == 0:
            return out.stdout.strip().splitlines()[-1]
    return None
