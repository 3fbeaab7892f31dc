"""notebooks/*.ipynb: stored without outputs, each executed top to bottom in a fresh kernel.
Their assertions live in their own cells, so a broken API fails the notebook."""

import json
import os
import sys

import pytest
from conftest import ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def kernel(tmp_path) -> KernelManager:
    """A kernel on this interpreter (not whatever `python3` kernel the machine has installed)."""
    spec = tmp_path / "kernels" / "shardtrain"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "shardtrain",
                                                  "language": "python"}))  # fmt: skip
    specs = KernelSpecManager(kernel_dirs=[str(spec.parent)])
    return KernelManager(kernel_name="shardtrain", kernel_spec_manager=specs)


def test_the_notebooks_are_stored_without_outputs_and_say_what_they_show():
    assert [p.stem for p in NOTEBOOKS] == [
        "01_quickstart", "02_parallelism", "03_hugging_face", "04_tuning"
    ]  # fmt: skip
    readme = (ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        first = nb.cells[0]
        assert first.cell_type == "markdown" and "**Time:**" in first.source, path.name
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), path.name
        assert any("assert" in c.source for c in code), path.name
        assert f"notebooks/{path.name}" in readme, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    work = tmp_path / "work"
    work.mkdir()
    client = nbclient.NotebookClient(
        nb, km=kernel(tmp_path), timeout=300, resources={"metadata": {"path": str(work)}}
    )
    # Everything a notebook writes (tempfile run directories) lands under tmp_path.
    client.execute(env={**os.environ, "TMPDIR": str(work)})
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
