"""JupyterLab 4 in headless Chromium: the pool widget shows the pool's nodes, and the
progress bar moves and reaches 100 % while the cell that runs the map is still running."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import nbformat

from .conftest import ARTIFACTS, shot
from .servers import jupyter_lab

MAP_CELL = """\
def work(x):
    import time
    time.sleep(0.05)
    return x * x

results = pool.map(work, range(400))   # ~5 s on 4 slots; the progress widget shows itself
time.sleep(5)                          # the cell keeps running after the map returns
assert results == [x * x for x in range(400)]
"""


def write_notebook(path: Path) -> None:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell(
            "import time\nimport cloudmap\n"
            "pool = cloudmap.Pool(nodes=2, slots_per_node=2)\npool.wait_for_nodes()"
        ),
        nbformat.v4.new_code_cell("pool"),
        nbformat.v4.new_code_cell(MAP_CELL),
        nbformat.v4.new_code_cell("pool.close()\nprint('closed')"),
    ]
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(notebook, path)


def kernel_status(page: Any) -> str | None:
    status: str | None = page.evaluate(
        """() => {
            const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
            const kernel = panel && panel.sessionContext && panel.sessionContext.session
                && panel.sessionContext.session.kernel;
            return kernel ? kernel.status : null;
        }"""
    )
    return status


def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def node_counts(page: Any) -> dict[str, int]:
    """The numbers in the pool widget's node table, keyed 'state/kind' and 'target/kind'."""
    counts: dict[str, int] = page.evaluate(
        """() => {
            const out = {};
            const table = document.querySelector('.cloudmap-pool-widget .cloudmap-node-table');
            if (!table) return out;
            for (const cell of table.querySelectorAll('td[data-kind]'))
                out[cell.dataset.state + '/' + cell.dataset.kind] = Number(cell.textContent);
            for (const cell of table.querySelectorAll('td[data-target]'))
                out['target/' + cell.dataset.target] = Number(cell.textContent);
            for (const cell of table.querySelectorAll('td[data-current]'))
                out['current/' + cell.dataset.current] = Number(cell.textContent);
            return out;
        }"""
    )
    return counts


def map_cell_state(page: Any) -> dict[str, Any]:
    """The map cell's prompt ('[*]:' while it runs) and its progress bar's numbers."""
    state: dict[str, Any] = page.evaluate(
        """() => {
            const cells = document.querySelectorAll('.jp-Notebook .jp-CodeCell');
            const cell = cells[2];
            if (!cell) return {prompt: null, bar: null};
            const prompt = cell.querySelector('.jp-InputPrompt').textContent.trim();
            const bar = cell.querySelector('.cloudmap-progress-bar');
            return {prompt, bar: bar ? {...bar.dataset} : null};
        }"""
    )
    return state


def test_pool_and_progress_widgets_live_in_jupyterlab(tmp_path: Path, page: Any) -> None:
    write_notebook(tmp_path / "live.ipynb")
    with jupyter_lab(tmp_path) as server:
        page.goto(f"{server.url}/lab/tree/live.ipynb?token={server.token}")
        wait_for(lambda: kernel_status(page) == "idle", 120, "the notebook's kernel")
        # Not awaited: the command's promise settles only when every cell has run.
        page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")

        # The pool widget: 2 dedicated nodes, idle, target 2, before the map starts.
        wait_for(lambda: node_counts(page).get("idle/dedicated") == 2, 120, "2 idle nodes shown")
        counts = node_counts(page)
        assert counts["target/dedicated"] == 2 and counts["target/spot"] == 0
        assert counts["current/dedicated"] == 2
        pool_view = page.locator(".cloudmap-pool-widget").first
        shot(page, "jupyterlab-pool-widget-idle", pool_view)

        # The progress bar, sampled while the map cell runs (scrolled into view, as a user
        # would look at it).
        wait_for(lambda: map_cell_state(page)["bar"], 120, "the progress widget")
        page.locator(".jp-Notebook .jp-CodeCell").nth(2).scroll_into_view_if_needed()
        samples: list[tuple[str, float, dict[str, int]]] = []
        shots: dict[str, Path] = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            state = map_cell_state(page)
            bar = state["bar"]
            if bar and bar.get("percent"):
                percent = float(bar["percent"].split()[0])
                samples.append((state["prompt"], percent, node_counts(page)))
                if 20 <= percent < 80 and "running" not in shots:
                    shots["running"] = shot(page, "jupyterlab-progress-running")
                if percent == 100.0 and state["prompt"] == "[*]:" and "done" not in shots:
                    shots["done"] = shot(page, "jupyterlab-progress-done-cell-running")
            if state["prompt"] not in (None, "[*]:", "[ ]:") and samples:
                break
            time.sleep(0.1)

        running = [(p, c) for prompt, p, c in samples if prompt == "[*]:"]
        partial = sorted({p for p, _ in running if 0 < p < 100})
        assert len(partial) >= 3, f"the bar should move while the cell runs: {samples}"
        assert any(p == 100.0 for p, _ in running), "100 % shown while the cell still runs"
        percents = [p for _, p, _ in samples]
        assert percents == sorted(percents), f"the bar went backwards: {percents}"
        busy = [c.get("running/dedicated", 0) for _, c in running]
        assert max(busy) == 2, f"the pool widget should show both nodes running: {busy}"

        # The notebook ends by closing the pool; the widget says so.
        wait_for(
            lambda: "closed" in page.locator(".cloudmap-pool-header").first.inner_text(),
            60,
            "the pool widget to show the pool closed",
        )
        shot(page, "jupyterlab-notebook-finished")
        stderr = page.locator("[data-mime-type='application/vnd.jupyter.stderr']")
        assert "Traceback" not in " ".join(stderr.all_inner_texts())
    ARTIFACTS.joinpath("jupyterlab-progress-samples.json").write_text(json.dumps(samples))
