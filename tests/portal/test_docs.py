"""Localizing a Data Docs site: CDN and GX-logo loads become relative paths to copies in the site."""
from __future__ import annotations

import json
from pathlib import Path

from flows.portal.docs import external_loads, localize_site
from flows.portal.vendor import STAMP, load_lock

LOCK = load_lock()
JQ = "https://code.jquery.com/jquery-3.7.1.min.js"
POPPER = "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js"
BOOTSTRAP_CSS = "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css"
LOGO = ("https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/logo-long.png"
        "?d=20261128T001242.171126Z&dataContextId=a7654693-5b0d-4083-8a88-eb6c199cf266")
DARK = "https://great-expectations-web-assets.s3.us-east-2.amazonaws.com/full_logo_dark.png"
DOCS = "https://docs.greatexpectations.io/docs/guides/validation/checkpoints/how_to_create_a_new_checkpoint"
PAGE = f"""<html><head>
<link rel="stylesheet" href="{BOOTSTRAP_CSS}"/>
<style>.navbar-brand a {{ background: url('{DARK}') 0 0 no-repeat; }}</style>
<link rel="shortcut icon" href="../../../static/images/favicon.ico" type="image/x-icon"/>
</head><body><img class="NO-CACHE" src="{LOGO}" alt="Great Expectations"/>
<a href="{DOCS}" target="_blank">How to Validate Data</a>
<script src="{JQ}"></script>
<script src="{POPPER}" integrity="sha384-ApNbgh9B+Y1QKtv3Rn7W3mgPxhU9K/ScQsAP7hUibX39j7fakFPskvXusvfa0b4Q" crossorigin="anonymous"></script>
<script src="https://example.invalid/new-in-gx-2.js"></script>
</body></html>"""


def _assets(root: Path) -> Path:
    """Stand-in vendored assets: every mapped file, with the stamp vendor.py writes."""
    files = {}
    for target in set(LOCK.urls.values()):
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        (root / target).write_text(f"/* {target} */")
        files[target] = (root / target).stat().st_size
    (root / STAMP).write_text(json.dumps({"files": files}))
    return root


def _site(root: Path) -> tuple[Path, Path]:
    (root / "static" / "images").mkdir(parents=True)
    (root / "static" / "images" / "logo-long.png").write_bytes(b"png")
    (root / "static" / "images" / "favicon.ico").write_bytes(b"ico")
    deep = root / "validations" / "suite" / "__none__" / "20261128T001232Z" / "src-users.html"
    deep.parent.mkdir(parents=True)
    deep.write_text(PAGE)
    (root / "index.html").write_text(PAGE.replace("../../../static/", "./static/"))
    return root, deep


def test_rewrites_loads_to_relative_local_files_and_reports_the_rest(tmp_path):
    site, deep = _site(tmp_path / "validation")
    result = localize_site(site, _assets(tmp_path / "assets"))
    text = deep.read_text()
    up = "../../../../"
    assert f'src="{up}static/vendor/jquery/dist/jquery.min.js"' in text
    assert f'href="{up}static/vendor/bootstrap/dist/css/bootstrap.min.css"' in text
    assert f'src="{up}static/images/logo-long.png"' in text and "dataContextId" not in text
    assert f"url('{up}static/images/logo-long.png')" in text  # the dark theme's logo too
    assert f'href="{up}static/images/favicon.ico"' in text  # GX links it one folder short
    assert "integrity" not in text and "crossorigin" not in text  # SRI cannot pass on file:
    assert f'<a href="{DOCS}" target="_blank">' in text  # links load nothing: left alone
    assert 'src="static/vendor/jquery/dist/jquery.min.js"' in (site / "index.html").read_text()
    for ref in ("static/vendor/jquery/dist/jquery.min.js", "static/images/logo-long.png"):
        assert (site / ref).is_file()
    # an address the lock does not know stays, and is reported for both pages
    assert result.external == {p: ["https://example.invalid/new-in-gx-2.js"]
                               for p in ("index.html", str(deep.relative_to(site)))}
    assert external_loads(text) == ["https://example.invalid/new-in-gx-2.js"]


def test_rewriting_twice_changes_nothing(tmp_path):
    site, deep = _site(tmp_path / "validation")
    assets = _assets(tmp_path / "assets")
    first = localize_site(site, assets)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in site.rglob("*") if p.is_file()}
    second = localize_site(site, assets)
    assert len(first.rewritten) == 2 and second.rewritten == []
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in site.rglob("*") if p.is_file()} == before


def test_stylesheets_of_the_site_are_rewritten_relative_to_themselves(tmp_path):
    site, _ = _site(tmp_path / "validation")
    css = site / "static" / "styles" / "data_docs_default_styles.css"
    css.parent.mkdir(parents=True)
    css.write_text(f".navbar-brand a {{ background: url('{DARK}') 0 0 no-repeat; }}")
    localize_site(site, _assets(tmp_path / "assets"))
    assert css.read_text() == ".navbar-brand a { background: url('../images/logo-long.png') 0 0 no-repeat; }"
