"""Make a Great Expectations Data Docs site load nothing from the network.

GX 1.24 pages load their scripts, stylesheets and fonts from CDNs and the navbar logo from GX's S3
bucket with the data context id in the query string (a request to a third party each time a reviewer
opens a page). `localize_site` copies the vendored assets into the site (`<site>/static/vendor/`, so
the site folder, a DVC output of its stage, stays self-contained and can be zipped on its own), then
rewrites every page and stylesheet of the site to load them by relative path. The logo comes from
the copy GX itself ships under `<site>/static/images/`. Plain `<a href>` links to GX's docs are left
alone: they load nothing until clicked. Rewriting is idempotent: a rewritten page has no CDN address
left to replace, and files whose text does not change are not written (their mtime stays).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from flows.portal.vendor import STAMP, AssetLock, load_lock

log = logging.getLogger("towerflow.portal")
VENDOR_SUBDIR = Path("static") / "vendor"
GX_ASSET_HOST = "great-expectations-web-assets.s3."
# GX's S3 images -> the file GX ships in <site>/static/images/. No dark-theme logo is shipped: the
# dark stylesheet's navbar background falls back to the regular logo.
GX_IMAGES = {"logo-long.png": "logo-long.png", "full_logo_dark.png": "logo-long.png"}

# Elements that load what their src/href names when the page opens (an <a href> does not).
_LOADING_TAG = re.compile(r"<(?:script|link|img|iframe|source|embed|audio|video|input)\b[^>]*>", re.I)
_URL_ATTR = re.compile(r"""(\s(?:src|href|data)\s*=\s*)(["'])((?:https?:)?//[^"']+)\2""", re.I)
_CSS_URL = re.compile(r"""(url\(\s*)(["']?)((?:https?:)?//[^"')\s]+)\2(\s*\))""", re.I)
_CSS_IMPORT = re.compile(r"""(@import\s+)(["'])((?:https?:)?//[^"']+)\2""", re.I)
# GX 1.24 writes validation result pages four folders deep but links their favicon three levels up:
# relative links into the site's static/ folder are re-pointed when they do not resolve.
_STATIC_ATTR = re.compile(r"""(\s(?:src|href)\s*=\s*)(["'])((?:\./|\.\./)*static/[^"']+)\2""", re.I)
# Subresource integrity asks for a CORS fetch, which file: URLs cannot satisfy: Chromium refuses such
# a script from disk. The bytes were checked against the committed sha512 when they were vendored.
_SRI_ATTRS = re.compile(r"""\s(?:integrity\s*=\s*(["'])[^"']*\1|crossorigin(?:\s*=\s*(["'])[^"']*\2)?(?=[\s/>]))""",
                        re.I)


@dataclass
class SiteResult:
    """What localize_site did to one site."""

    site: Path
    pages: int = 0
    rewritten: list[Path] = field(default_factory=list)
    external: dict[str, list[str]] = field(default_factory=dict)  # page -> loads left pointing outside

    @property
    def offline(self) -> bool:
        return not self.external


def localize_site(site: Path, assets: Path, lock: AssetLock | None = None) -> SiteResult:
    """Copy the vendored assets into site/static/vendor and rewrite every .html and .css of the site
    to load them (and GX's own logo) by relative path. Returns what was rewritten and any load that
    still leaves the machine (an address the lock does not map: a newer GX template, say)."""
    lock = lock or load_lock()
    vendor = site / VENDOR_SUBDIR
    sync_tree(assets, vendor)
    result = SiteResult(site)
    for path in sorted(site.rglob("*")):
        if path.suffix not in (".html", ".css") or vendor in path.parents or not path.is_file():
            continue
        result.pages += path.suffix == ".html"
        text = path.read_text(encoding="utf-8")
        new = rewrite(text, path, site, vendor, lock)
        if new != text:
            _write_atomic(path, new)
            result.rewritten.append(path)
        left = external_loads(new)
        if left:
            result.external[str(path.relative_to(site))] = left
    return result


def rewrite(text: str, page: Path, site: Path, vendor: Path, lock: AssetLock) -> str:
    """The page's text with each mapped CDN/GX address replaced by a path relative to the page."""
    def local(url: str) -> str | None:
        target = _local_target(url, site, vendor, lock)
        return None if target is None else PurePosixPath(os.path.relpath(target, page.parent)).as_posix()

    def tag(m: re.Match[str]) -> str:
        changed = False

        def attr(a: re.Match[str]) -> str:
            nonlocal changed
            path = local(a.group(3))
            changed |= path is not None
            return a.group(0) if path is None else f"{a.group(1)}{a.group(2)}{path}{a.group(2)}"

        def static(a: re.Match[str]) -> str:
            if (page.parent / a.group(3)).exists():
                return a.group(0)
            target = site / "static" / a.group(3).split("static/", 1)[1]
            if not target.exists():
                return a.group(0)
            path = PurePosixPath(os.path.relpath(target, page.parent)).as_posix()
            return f"{a.group(1)}{a.group(2)}{path}{a.group(2)}"

        out = _STATIC_ATTR.sub(static, _URL_ATTR.sub(attr, m.group(0)))
        return _SRI_ATTRS.sub("", out) if changed else out

    def css(m: re.Match[str]) -> str:
        path = local(m.group(3))
        return m.group(0) if path is None else f"{m.group(1)}{m.group(2)}{path}{m.group(2)}{m.group(4)}"

    def imp(m: re.Match[str]) -> str:
        path = local(m.group(3))
        return m.group(0) if path is None else f"{m.group(1)}{m.group(2)}{path}{m.group(2)}"

    if page.suffix == ".html":
        text = _LOADING_TAG.sub(tag, text)
    text = _CSS_URL.sub(css, text)   # <style> blocks, style attributes and .css files
    return _CSS_IMPORT.sub(imp, text)


def external_loads(text: str) -> list[str]:
    """Addresses that a page or stylesheet would still fetch from the network when opened."""
    found = [a.group(3) for m in _LOADING_TAG.finditer(text) for a in _URL_ATTR.finditer(m.group(0))]
    found += [m.group(3) for m in _CSS_URL.finditer(text)] + [m.group(3) for m in _CSS_IMPORT.finditer(text)]
    return sorted(set(found))


def _local_target(url: str, site: Path, vendor: Path, lock: AssetLock) -> Path | None:
    mapped = lock.target(url)
    if mapped is not None:
        return vendor / mapped
    host_path = url.split("//", 1)[-1]
    if host_path.startswith(GX_ASSET_HOST):
        # the query string (?d=<time>&dataContextId=<id>) is what identified the reader: dropped
        name = host_path.split("?", 1)[0].rsplit("/", 1)[-1]
        shipped = site / "static" / "images" / GX_IMAGES.get(name, name)
        return shipped if shipped.is_file() else None
    return None


def sync_tree(src: Path, dst: Path) -> bool:
    """Make dst a copy of the vendored assets in src; False when it already was one.

    The asset set of a lock never changes (vendor.py names its folder by the lock digest), so its
    stamp (the list of files and sizes) tells whether dst holds the same set."""
    stamp = src / STAMP
    if (dst / STAMP).is_file() and (dst / STAMP).read_bytes() == stamp.read_bytes():
        files = json.loads(stamp.read_text())["files"]
        if all((dst / rel).is_file() and (dst / rel).stat().st_size == size for rel, size in files.items()):
            return False
    if dst.exists():
        shutil.rmtree(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)  # the stamp travels with the files
    os.replace(tmp, dst)
    return True


def _write_atomic(path: Path, text: str) -> None:
    """A reader (or a crash) never sees half a page."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def localize_offline(site: Path, cache: Path) -> SiteResult | None:
    """What a stage that builds a Data Docs site calls afterwards: vendor the assets if needed (a no-op
    once done, `make setup` normally did it) and localize the site. When the assets cannot be had (no
    npm, registry unreachable) the site stays as GX wrote it and a warning says why: reviewing the
    data must not depend on styling."""
    from flows.portal.vendor import VendorError, ensure_assets

    if not (site / "index.html").is_file():
        return None
    try:
        assets = ensure_assets(cache)
    except VendorError as exc:
        log.warning("%s: Data Docs keep their CDN links (%s)", site, exc)
        return None
    result = localize_site(site, assets)
    if not result.offline:
        log.warning("%s: loads not mapped to vendored assets: %s", site, sorted(result.external))
    return result
