"""notebooks/quickstart.ipynb runs top to bottom (on the embedded default model), so it cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    import circuit_finder as cf

    try:
        cf.default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert (tmp_path / "quickstart-sweep.jsonl").exists()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the heatmap cell shows no picture"
    assert any("combined_val_delta" in str(o.get("data", {})) for o in outputs)
    assert any("router - best fixed" in o.get("text", "") for o in outputs), "the router cell reports nothing"
    assert (tmp_path / "quickstart-router.json").exists()
