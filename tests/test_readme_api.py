"""README's Python API snippet runs as written (from the repository root), on the tiny checkpoints in place of the hub
ids; it replaces the removed model.py CLI test as the check that chat and translation work end to end."""
import os
import re
import subprocess
import sys

from conftest import ROOT


def test_readme_python_api_snippet_runs(llama_dir, m2m_dir):
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "import torch" in code and "D.load_translator" in code and "M.load_model" in code
    code = code.replace('"HuggingFaceTB/SmolLM2-135M-Instruct"', repr(llama_dir))
    code = code.replace('"facebook/nllb-200-distilled-600M"', repr(m2m_dir))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) >= 3  # the chat answer, the translation, the raw decoding
