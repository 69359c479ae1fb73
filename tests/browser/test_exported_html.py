"""An executed notebook exported to HTML with its widget state, rendered offline by the
standalone widget manager from npm (@jupyter-widgets/html-manager): what a reader of an
exported report sees, with no CDN and no kernel."""

from __future__ import annotations

import mimetypes
import sys
from pathlib import Path
from typing import Any

import nbclient
import nbformat
from nbconvert import HTMLExporter

from .conftest import ROOT, shot

NODE_MODULES = ROOT / "node_modules"
HTML_MANAGER_DIST = NODE_MODULES / "@jupyter-widgets" / "html-manager" / "dist"
#: The AMD bundles that widget packages install for classic front ends (bqplot, bqscales):
#: what the widget manager would fetch from a CDN for a third-party widget.
NBEXTENSIONS = Path(sys.prefix) / "share" / "jupyter" / "nbextensions"

CELLS = [
    "import cloudmap\npool = cloudmap.Pool(nodes=2, slots_per_node=2)\npool.wait_for_nodes()",
    "pool",
    "def check(x):\n"
    "    if x == 13:\n"
    "        raise ValueError('unlucky 13')\n"
    "    return x\n"
    "results = pool.map(check, range(200), on_error='return')",
    "import time\ntime.sleep(1.5)  # let the pool widget draw its last state",
]


def executed_notebook(tmp_path: Path) -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in CELLS]
    client = nbclient.NotebookClient(
        notebook,
        timeout=180,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
        store_widget_state=True,
    )
    client.execute()
    return notebook


def serve_cdn_locally(page: Any) -> list[str]:
    """Answer the page's CDN requests from node_modules and bqplot's own bundle."""
    served: list[str] = []

    def answer(route: Any) -> None:
        url = route.request.url
        package = url.split("/npm/", 1)[-1].rsplit("@", 1)[0] if "@" in url else ""
        if url.endswith("require.min.js"):
            path = NODE_MODULES / "requirejs" / "require.js"
        elif package.endswith("@jupyter-widgets/html-manager"):
            path = (
                NODE_MODULES / "@jupyter-widgets" / "html-manager" / "dist" / url.split("/dist/")[1]
            )
        elif url.endswith("/dist/index.js") and (NBEXTENSIONS / package / "index.js").exists():
            path = NBEXTENSIONS / package / "index.js"
        else:
            route.abort()
            return
        served.append(url)
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        # Fonts from another origin need CORS; the page itself is a file:// URL.
        route.fulfill(
            path=str(path), content_type=kind, headers={"Access-Control-Allow-Origin": "*"}
        )

    page.route("https://**/*", answer)
    return served


def test_exported_notebook_renders_widgets_offline(tmp_path: Path, page: Any) -> None:
    notebook = executed_notebook(tmp_path)
    assert "application/vnd.jupyter.widget-state+json" in notebook.metadata.get("widgets", {})
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(notebook)
    export = tmp_path / "report.html"
    export.write_text(body)

    served = serve_cdn_locally(page)
    page.goto(export.as_uri())
    pool_view = page.locator(".cloudmap-pool-widget").first
    pool_view.wait_for(timeout=60_000)

    # The pool widget as the kernel last drew it: two dedicated idle nodes, target two.
    idle = page.locator(".cloudmap-pool-widget td[data-state='idle'][data-kind='dedicated']")
    assert idle.first.inner_text() == "2"
    target = page.locator(".cloudmap-pool-widget td[data-target='dedicated']")
    assert target.first.inner_text() == "2"
    # Its chart, drawn by bqplot's own code: the nodes, spot and target lines.
    page.wait_for_function(
        """() => Array.from(document.querySelectorAll(
                '.cloudmap-pool-widget .cloudmap-node-chart svg path'))
            .filter(p => !(p.getAttribute('class') || '').includes('domain')
                         && (p.getAttribute('d') || '').length > 10).length >= 3""",
        timeout=30_000,
    )

    # The progress widget finished: 100 %, one failure with its traceback inside.
    bar = page.locator(".cloudmap-progress-widget .cloudmap-progress-bar").first
    assert bar.get_attribute("data-percent") == "100.0 %"
    assert bar.get_attribute("data-done") == "199"
    assert bar.get_attribute("data-failed") == "1"
    failures = page.locator(".cloudmap-progress-widget .cloudmap-failures").first
    assert failures.get_attribute("data-count") == "1"
    assert "unlucky 13" in failures.inner_html()

    shot(page, "exported-html-offline", None)
    shot(page, "exported-html-offline-pool-widget", pool_view)
    assert any("html-manager" in url for url in served), served
    assert any("bqplot" in url for url in served), served
    errors = [line for line in page.console_lines if "Could not" in line or "Error" in line]
    assert not errors, errors
