"""The notebooks in colabs/ run top to bottom on a CPU, offline, without a cell error.

Each notebook executes in a fresh Jupyter kernel (nbclient) whose working directory is colabs/ of
a read-only copy of the checkout (tests/conftest.py checks that nothing is written into it) and
whose PYTHONPATH holds that copy's root; JAX sees the plain CPU (the 8 simulated devices of
conftest.py are removed: 05_scaling.ipynb sets them up itself), and HTTP(S) goes to a dead proxy, so
nothing is downloaded. The executed copies, with their outputs, are written to pytest's tmp_path;
the notebooks that plot must have produced PNG images. The repository copies carry no outputs.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import FAST_COMPILE

REPO = pathlib.Path(__file__).resolve().parents[1]
COLABS = REPO / "colabs"
NOTEBOOKS = sorted(p.stem for p in COLABS.glob("*.ipynb"))
# Notebooks that draw matplotlib figures, and how many PNG outputs each must have at least.
PNG_OUTPUTS = {
    "01_quickstart": 2,  # similarity heatmap, loss curve
    "02_transformer_step_by_step": 3,  # masks, attention maps, attention of one token
    "03_pretrain_gpt": 1,  # loss curve
    "04_finetune": 1,  # confusion matrix
    "07_responsible": 3,  # ε against steps, token attributions, CrowS-Pairs scores
}
CELL_TIMEOUT_S = 300
DEAD_PROXY = "http://127.0.0.1:9"  # The discard port: any download fails at once.


def kernel_env(repo: pathlib.Path) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = FAST_COMPILE  # Without the 8 simulated devices.
    env.update(
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(repo), *filter(None, [env.get("PYTHONPATH")])]),
        # Bytecode elsewhere, as for an installed package whose directory is not writable.
        PYTHONPYCACHEPREFIX=str(repo.parent / "pycache"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TF_CPP_MIN_LOG_LEVEL="3",
        TQDM_DISABLE="1",
        HTTP_PROXY=DEAD_PROXY, HTTPS_PROXY=DEAD_PROXY, http_proxy=DEAD_PROXY,
        https_proxy=DEAD_PROXY, NO_PROXY="", no_proxy="",
    )
    return env


def execute(name: str, out_dir: pathlib.Path, repo: pathlib.Path) -> nbformat.NotebookNode:
    colabs = repo / "colabs"
    notebook = nbformat.read(colabs / f"{name}.ipynb", as_version=4)
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(colabs)}})
    start = time.perf_counter()
    try:
        client.execute(env=kernel_env(repo))
    finally:  # Keep the executed copy, also when a cell failed, to read its outputs.
        nbformat.write(notebook, out_dir / f"{name}.ipynb")
        print(f"{name}: {time.perf_counter() - start:.1f} s → {out_dir / f'{name}.ipynb'}",
              file=sys.stderr)
    return notebook


def outputs(notebook: nbformat.NotebookNode) -> list[dict]:
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]


def test_there_are_six_notebooks():
    assert NOTEBOOKS == ["01_quickstart", "02_transformer_step_by_step", "03_pretrain_gpt",
                         "04_finetune", "05_scaling", "07_responsible"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_clean_with_a_colab_badge(name):
    notebook = nbformat.read(COLABS / f"{name}.ipynb", as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), \
        f"{name}.ipynb has outputs: clear them before committing"
    first = notebook.cells[0]
    assert first.cell_type == "markdown"
    assert f"colab.research.google.com/github/OWNER/REPO/blob/main/colabs/{name}.ipynb" in first.source
    assert '"google.colab" in sys.modules' in code[0].source  # The Colab-only set-up cell.


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_on_cpu(name, tmp_path, read_only_repo):
    # Raises CellExecutionError, with the cell, on an error.
    notebook = execute(name, tmp_path, read_only_repo)
    errors = [o for o in outputs(notebook) if o.output_type == "error"]
    assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]
    images = [o for o in outputs(notebook) if "image/png" in o.get("data", {})]
    assert len(images) >= PNG_OUTPUTS.get(name, 0), f"{name}: {len(images)} PNG outputs"
