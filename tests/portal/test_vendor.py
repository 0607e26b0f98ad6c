"""Vendoring: the committed lock covers what GX loads; tarballs are verified, extracted atomically, once.

npm is replaced by a small script that "packs" tarballs made here, so no test needs the registry.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import sys
import tarfile
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

from flows.portal.docs import GX_ASSET_HOST, external_loads
from flows.portal.vendor import STAMP, AssetLock, Package, VendorError, ensure_assets, load_lock, main


def test_lock_maps_every_cdn_address_in_the_gx_templates():
    # a GX upgrade that loads something new fails here, not silently in a reviewer's browser
    import great_expectations

    templates = Path(great_expectations.__file__).parent / "render" / "view" / "templates"
    lock = load_lock()
    loads = {url for t in templates.glob("*.j2") for url in external_loads(t.read_text())}
    assert loads, "no CDN address found: did GX move its templates?"
    unmapped = {u for u in loads if lock.target(u) is None and GX_ASSET_HOST not in u}
    assert unmapped == set()


def test_each_mapped_file_is_one_the_lock_extracts():
    lock = load_lock()
    for url, target in lock.urls.items():
        owners = [p for p in lock.packages if target.startswith(p.name + "/")]
        assert len(owners) == 1, url
        inside = target[len(owners[0].name) + 1:]
        assert any(fnmatchcase(inside, pat) for pat in owners[0].files), f"{url} -> {target} is not extracted"
    for p in lock.packages:
        assert p.integrity.startswith("sha512-") and "latest" not in p.version and "^" not in p.version


def _tarball(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _sri(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def _fake_npm(tmp: Path, tgz: bytes, fail: str | None = None) -> Path:
    """An `npm pack name@version --pack-destination DIR --json` stand-in; counts its calls."""
    (tmp / "pkg.tgz").write_bytes(tgz)
    script = tmp / "npm"
    script.write_text(f"""#!{sys.executable}
import json, shutil, sys
from pathlib import Path
calls = Path({str(tmp / 'calls')!r}); calls.write_text(calls.read_text() + "x" if calls.exists() else "x")
if {fail!r}:
    print(json.dumps({{"error": {{"code": {fail!r}, "summary": "request to the registry failed"}}}})); sys.exit(1)
dest = Path(sys.argv[sys.argv.index("--pack-destination") + 1])
shutil.copy({str(tmp / 'pkg.tgz')!r}, dest / "demo-1.0.0.tgz")
print(json.dumps([{{"name": "demo", "version": "1.0.0", "filename": "demo-1.0.0.tgz"}}]))
""")
    script.chmod(0o755)
    return script


def _lock(integrity: str) -> AssetLock:
    return AssetLock((Package("demo", "1.0.0", integrity, ("dist/demo.min.js", "fonts/*.woff2")),), {}, "d1g35t")


TGZ = _tarball({"dist/demo.min.js": b"js", "dist/demo.js": b"big", "fonts/a.woff2": b"f", "README.md": b"r"})


def test_vendors_only_the_listed_files_once(tmp_path):
    npm = _fake_npm(tmp_path, TGZ)
    cache = tmp_path / "cache"
    dest = ensure_assets(cache, _lock(_sri(TGZ)), npm=str(npm))
    assert dest == cache / "d1g35t"
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == [STAMP, "demo/dist/demo.min.js", "demo/fonts/a.woff2"]
    assert (dest / "demo/dist/demo.min.js").read_bytes() == b"js"
    assert ensure_assets(cache, _lock(_sri(TGZ)), npm=str(npm)) == dest
    assert (tmp_path / "calls").read_text() == "x"  # the second call found them and ran no npm
    assert [p.name for p in cache.iterdir()] == ["d1g35t"]  # no temporary folder left behind


def test_a_tarball_that_differs_from_the_lock_vendors_nothing(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(VendorError, match=r"demo@1.0.0: the downloaded tarball does not match"):
        ensure_assets(cache, _lock(_sri(b"something else")), npm=str(_fake_npm(tmp_path, TGZ)))
    assert list(cache.iterdir()) == []


def test_unreachable_registry_is_one_clear_error(tmp_path):
    npm = _fake_npm(tmp_path, TGZ, fail="ECONNREFUSED")
    with pytest.raises(VendorError) as err:
        ensure_assets(tmp_path / "cache", _lock(_sri(TGZ)), npm=str(npm))
    msg = str(err.value)
    assert "could not fetch the report assets from the npm registry (ECONNREFUSED" in msg
    assert "make vendor" in msg


def test_missing_npm_is_named(tmp_path):
    with pytest.raises(VendorError, match="'no-such-npm' not found"):
        ensure_assets(tmp_path / "cache", _lock(_sri(TGZ)), npm="no-such-npm")


def test_a_listed_file_missing_from_the_tarball_is_an_error(tmp_path):
    lock = AssetLock((Package("demo", "1.0.0", _sri(TGZ), ("dist/nope.js",)),), {}, "x")
    with pytest.raises(VendorError, match="lists dist/nope.js, not in the tarball"):
        ensure_assets(tmp_path / "cache", lock, npm=str(_fake_npm(tmp_path, TGZ)))


def test_make_vendor_entry_point_reports_up_to_date(tmp_path, capsys):
    lock = load_lock()
    done = tmp_path / lock.digest
    done.mkdir()
    (done / STAMP).write_text(json.dumps({"files": {}}))
    assert main(["--cache", str(tmp_path)]) == 0
    assert "vendor: up to date" in capsys.readouterr().out
