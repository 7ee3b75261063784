"""The library never needs torch or transformers at run time."""

import subprocess
import sys


def test_no_torch_or_transformers_imported():
    code = ("import sys, transformer.pretrained, transformer.hf, transformer.inference, "
            "transformer.convert, transformer.generate, transformer.score; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; print(bad)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"JAX_PLATFORMS": "cpu", "PATH": "", "PYTHONPATH": "."})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
