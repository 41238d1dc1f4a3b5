"""Every notebook runs top to bottom on CPU at its tiny setting (``DIBJAX_NOTEBOOK_TINY=1``).

The Colab TPU notebook (02) also runs on 8 simulated CPU devices, as on a TPU v2-8 or v3-8 (marked slow).
"""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_three_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == [
        "01_entropy_quickstart.ipynb",
        "02_greedy_dib_cifar10.ipynb",
        "03_information_plane.ipynb",
    ]


CASES = [pytest.param(path, 1, id=path.stem) for path in NOTEBOOKS] + [
    pytest.param(path, 8, id=f"{path.stem}-8-devices", marks=pytest.mark.slow)
    for path in NOTEBOOKS
    if path.stem == "02_greedy_dib_cifar10"
]


@pytest.mark.parametrize("path,devices", CASES)
def test_notebook_runs_at_its_tiny_setting(path, devices, tmp_path, monkeypatch):
    monkeypatch.setenv("DIBJAX_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count={devices}")
    notebook = nbformat.read(path, as_version=4)
    # Runs in a scratch folder: the notebooks write their runs under ./runs.
    NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.output_type == "error"
    ]
    assert not errors
    printed = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )
    if path.stem == "02_greedy_dib_cifar10":
        assert f"{devices} device(s)" in printed
