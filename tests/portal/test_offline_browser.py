"""The portal and every page it links open in headless Chromium with the network blocked.

Built from a tiny real run (GX Data Docs and an Evidently report made in tmp), then moved to another
folder (as a zipped copy would be) and crawled from reports/index.html: every link and every loaded
file resolves, no request leaves the machine (each one is recorded and aborted), no script fails, and
the main figures render (bootstrap-table draws the GX rows, vega draws the GX charts, font-awesome's
webfont loads, the SVG curves exist, Evidently draws its report). Screenshots go to tmp.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import pytest

from flows.portal.build import build_portal

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
LOCAL = ("file:", "data:", "about:", "blob:")

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} missing: apt-get install -y chromium "
                                "(Debian's package; .ci/run installs it)")

# A page is ready when it and its fonts have loaded and every vega chart it embeds is drawn. Not
# Playwright's "networkidle" (500 ms without a request, which Playwright itself discourages): on a
# loaded CI machine it timed out on pages that had nothing left to fetch. A generous limit: the
# condition is exact, so waiting longer costs only a broken page's time.
STATE = """() => ({
  readyState: document.readyState,
  fonts: document.fonts.status,
  vegaCalls: (document.documentElement.innerHTML.match(/vegaEmbed\\(/g) || []).length,
  vegaDrawn: document.querySelectorAll('.vega-embed canvas, .vega-embed svg').length,
})"""
READY = f"""() => {{ const s = ({STATE})();
  return s.readyState === 'complete' && s.fonts === 'loaded' && (s.vegaCalls === 0 || s.vegaDrawn > 0); }}"""
READY_MS = 120_000

# What each page shows once its scripts ran (evaluated in the page).
PROBE = """() => ({
  refs: [...document.querySelectorAll('a[href], [data-href], script[src], link[href], img[src]')]
        .map(e => e.getAttribute('href') ?? e.getAttribute('data-href') ?? e.getAttribute('src')),
  rows: document.querySelectorAll('.bootstrap-table table tbody tr[data-index]').length,
  tables: document.querySelectorAll('.bootstrap-table').length,
  vegaCalls: (document.documentElement.innerHTML.match(/vegaEmbed\\(/g) || []).length,
  vegaDrawn: document.querySelectorAll('.vega-embed canvas, .vega-embed svg').length,
  curves: document.querySelectorAll('svg.curves polyline.curve').length,
  fontsLoaded: [...document.fonts].filter(f => f.family.includes('Font Awesome') && f.status === 'loaded').length,
  fontsFailed: [...document.fonts].filter(f => f.status === 'error').map(f => f.family),
  text: document.body.innerText,
  svgs: document.querySelectorAll('svg').length,
})"""


@dataclass
class Visit:
    probe: dict
    errors: list[str] = field(default_factory=list)


def _crawl(context, start: Path, root: Path, shots: Path | None) -> dict[Path, Visit]:
    """Open start and every local .html page reachable from it under root; check each reference."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    visits: dict[Path, Visit] = {}
    queue = [start]
    while queue:
        path = queue.pop(0)
        if path in visits:
            continue
        page = context.new_page()
        visit = Visit({})
        page.on("pageerror", lambda e, v=visit: v.errors.append(f"script error: {e}"))
        page.on("requestfailed", lambda r, v=visit: v.errors.append(f"failed: {r.url} ({r.failure})"))
        page.goto(path.as_uri(), wait_until="load", timeout=READY_MS)
        try:  # vega draws after load; every file is local, so "ready" is a state of the page
            page.wait_for_function(READY, timeout=READY_MS)
        except PlaywrightTimeout:
            visit.errors.append(f"not ready after {READY_MS} ms: {page.evaluate(STATE)}")
        visit.probe = page.evaluate(PROBE)
        for ref in visit.probe["refs"]:
            url = urljoin(page.url, ref)
            if not url.startswith("file:"):
                continue  # a plain <a href> to GX's web docs: loads nothing unless clicked
            target = Path(unquote(urlparse(url).path))
            if not target.exists():
                visit.errors.append(f"broken reference {ref!r} -> {target}")
            elif target.suffix == ".html" and root in target.parents:
                queue.append(target)
        if shots is not None:
            page.screenshot(path=str(shots / (str(path.relative_to(root)).replace("/", "__") + ".png")),
                            full_page=True)
        page.close()
        visits[path] = visit
    return visits


def _browse(reports: Path, scheme: str, shots: Path | None) -> tuple[dict[Path, Visit], list[str]]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # not a reason to skip: it is in the dev extra
        pytest.fail("playwright is not installed: it is in pyproject's dev extra (make lock && make setup)")
    external: list[str] = []

    def gate(route) -> None:  # noqa: ANN001
        if route.request.url.startswith(LOCAL):
            route.continue_()
        else:
            external.append(route.request.url)
            route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            context = browser.new_context(color_scheme=scheme, viewport={"width": 1280, "height": 900})
            context.route("**/*", gate)
            visits = _crawl(context, reports / "index.html", reports, shots)
        finally:
            browser.close()
    return visits, external


@pytest.fixture(scope="module")
def moved_reports(real_run, tmp_path_factory) -> Path:
    """The built reports folder, copied elsewhere: as a reviewer gets it in a zip."""
    reports, inputs = real_run
    build_portal(reports, inputs)
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "reports"
    shutil.copytree(reports, elsewhere)
    return elsewhere


def test_every_page_renders_offline(moved_reports, tmp_path_factory):
    shots = tmp_path_factory.mktemp("screenshots")
    visits, external = _browse(moved_reports, "light", shots)
    print(f"screenshots: {shots}")

    assert external == [], f"requests that left the machine: {external}"
    assert {p: v.errors for p, v in visits.items() if v.errors} == {}
    rel = {str(p.relative_to(moved_reports)): v.probe for p, v in visits.items()}
    # the portal links both Data Docs sites and the drift report, and the crawl reached every GX page
    assert {"index.html", "validation/index.html", "training_validation/index.html", "drift/drift.html"} <= set(rel)
    gx_pages = [k for k in rel if k.startswith(("validation/", "training_validation/"))]
    assert len(gx_pages) == (1 + 2 + 2) + (1 + 1 + 1), gx_pages  # index, suites, results per site

    portal = rel["index.html"]
    assert portal["curves"] == 2  # one line per curves CSV
    assert "prev 0.2246" in portal["text"] and "Gate passed" in portal["text"]
    for site, suites in (("validation", 2), ("training_validation", 1)):
        index = rel[f"{site}/index.html"]
        # two tables drawn by bootstrap-table from inline data: validation results and suites
        assert (index["tables"], index["rows"]) == (2, 2 * suites), f"{site}: {index['rows']} rows drawn"
        assert index["fontsLoaded"] >= 1, f"{site}: font-awesome icons did not load"
    charted = [k for k, v in rel.items() if v["vegaCalls"]]
    assert charted, "no GX page with a vega chart: the fixture should make one (KL divergence)"
    for k in charted:
        assert rel[k]["vegaDrawn"] >= 1, f"{k}: vega chart not drawn"
    assert all(not v["fontsFailed"] for v in rel.values())
    drift = rel["drift/drift.html"]
    assert "Drift" in drift["text"] and drift["svgs"] > 0  # Evidently's own (inline) scripts drew it


def test_dark_theme_loads_nothing_either(moved_reports):
    # GX's dark stylesheet swaps the navbar logo for one on GX's S3 bucket: rewritten too
    visits, external = _browse(moved_reports, "dark", None)
    assert external == [] and len(visits) > 5
    assert {p: v.errors for p, v in visits.items() if v.errors} == {}
