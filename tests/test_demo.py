"""The demo end to end: `vsotools demo` through the real server, crawler, filter, sharder, trainer.

One small demo run (90 photos, 2 epochs) is shared by the tests of this module; the README's
demo command runs the full-size one.
"""

from __future__ import annotations

import functools
import http.server
import json
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import run_vsotools

pytestmark = pytest.mark.slow

ARGS = ("--photos", "90", "--set", "train.epochs=2")
MODELS = ("Text CNN (ST)", "Image CNN (SV)", "Deep fusion CNN")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    workdir = tmp_path_factory.mktemp("demo") / "work"
    done = run_vsotools("demo", "--workdir", workdir, *ARGS, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, done.stdout


def _table(stdout: str) -> dict[str, list[float]]:
    rows = {}
    for line in stdout.splitlines():
        for name in MODELS:
            if line.startswith(name):
                rows[name] = [float(x) for x in re.findall(r"\d\.\d{3}", line)]
    return rows


def test_demo_runs_every_stage_and_prints_table_1(demo):
    workdir, stdout = demo
    for stage in ("corpus", "fetch", "filter", "shard", "train text", "train image"):
        assert f"[{stage}] done" in stdout
    assert "[train fusion] done" in stdout
    rows = _table(stdout)
    assert set(rows) == set(MODELS)
    for values in rows.values():
        assert len(values) == 6 and all(0.0 <= v <= 1.0 for v in values)
    # The filter exercises in the corpus are dropped for the reasons they were made for.
    report = json.loads((workdir / "data" / "filter-report.json").read_text())
    assert report["dropped"]["not_fetched"] == 2
    assert report["dropped"]["too_few_words"] == 1
    assert report["dropped"]["too_many_words"] == 1
    assert report["dropped"]["conflicting_anps"] == 1
    assert report["dropped"]["duplicate_owner_text"] == 3


def test_a_rerun_skips_every_finished_stage(demo):
    workdir, stdout = demo
    again = run_vsotools("demo", "--workdir", workdir, *ARGS, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("fetch", "filter", "shard", "train text", "train image", "train fusion"):
        assert f"[{stage}] skipped" in again.stdout
    assert _table(again.stdout) == _table(stdout)


def test_evaluate_reproduces_what_train_saved(demo):
    workdir, _ = demo
    run = workdir / "train-fusion"
    done = run_vsotools(
        "evaluate", "--checkpoint", run / "checkpoint.pt", "--shards", workdir / "shards", "--json"
    )
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout)
    saved = json.loads((run / "metrics.json").read_text())
    for key in ("accuracy", "precision", "recall", "f1", "n"):
        assert measured[key] == pytest.approx(saved[key])


def test_reports_are_written_with_plots(demo):
    workdir, _ = demo
    page = (workdir / "report.html").read_text()
    for model in MODELS:
        assert model in page
    images = re.findall(r'<img src="([^"]+)"', page)
    # curves and confusion per model, label balance, word histogram, photos per ANP
    assert len(images) == 3 * 2 + 3
    for src in images:
        assert (workdir / src).stat().st_size > 1000
    for model in ("text", "image", "fusion"):
        assert (workdir / f"train-{model}" / "report.html").is_file()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHECK_PAGE = """<!doctype html><html><body><iframe id=r src="report.html" width=1200 height=900>
</iframe><script>
document.getElementById('r').addEventListener('load', () => {
  const doc = document.getElementById('r').contentDocument;
  const images = [...doc.images];
  const loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  const rows = doc.querySelectorAll('table tr').length;
  document.body.insertAdjacentHTML('beforeend',
    `<pre id=result>images=${images.length} loaded=${loaded} rows=${rows}</pre>`);
});
</script></body></html>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_a_real_browser(demo, tmp_path):
    workdir, _ = demo
    (workdir / "check.html").write_text(CHECK_PAGE)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(workdir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    flags = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
    ]  # fmt: skip
    try:
        dom = subprocess.run(
            [*flags, "--virtual-time-budget=10000", "--dump-dom", f"{base}/check.html"],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip
        shot = tmp_path / "report.png"
        subprocess.run(
            [*flags, "--window-size=1200,2400", f"--screenshot={shot}", f"{base}/report.html"],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
    finally:
        server.shutdown()
    found = re.search(r"images=(\d+) loaded=(\d+) rows=(\d+)", dom)
    assert found, dom[-2000:]
    images, loaded, rows = map(int, found.groups())
    assert images == loaded == 9
    assert rows >= 4, "the results table has a header and three methods"
    assert shot.stat().st_size > 50_000, "a page with plots, not a blank one"
