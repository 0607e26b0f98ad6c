"""Vendor the browser assets the reports load, from the npm registry, at install time.

Great Expectations Data Docs load bootstrap, jQuery, bootstrap-table, vega and font-awesome from CDNs
(docs/issue 15: opened offline, the index is an empty unstyled list). The exact npm releases are
committed in assets.lock.json with the registry's sha512 integrity; this module fetches them once with
`npm pack` (the ordinary client: it uses the registry and proxy npm is configured with, and its cache
makes a later re-vendor work offline), checks each tarball against the committed integrity (the lock,
not the registry, is what we trust), and extracts only the listed files into
`<cache>/<lock digest>/<package>/<path in package>`. The folder appears atomically (built in a
temporary folder, then renamed), so a crash or a concurrent run never leaves half an asset set, and
a new lock gets a new folder. `python -m flows.portal.vendor` is the `make vendor` step.
"""
from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from flows.errors import TowerflowError

LOCK = Path(__file__).with_name("assets.lock.json")
DEFAULT_CACHE = Path(".cache/towerflow/vendor")  # paths.cache/vendor: inside the project, gitignored
STAMP = ".vendored.json"  # written last, inside the folder before the rename: its presence = complete
# One retry for a transient failure; npm's default (2 retries, 10-60 s back-off) waits over a minute
# before it reports an unreachable registry. --prefer-offline: releases are pinned exactly and checked
# against the lock, so npm's cache is as good as the registry (and works with no network).
NPM_FLAGS = ["--json", "--ignore-scripts", "--prefer-offline", "--fetch-retries=1",
             "--fetch-retry-mintimeout=2000", "--fetch-retry-maxtimeout=5000", "--no-fund", "--no-audit",
             "--no-update-notifier"]


class VendorError(TowerflowError):
    """The report assets could not be fetched, verified or extracted."""


@dataclass(frozen=True)
class Package:
    """One npm release and the files the pages need from it (globs allowed)."""

    name: str
    version: str
    integrity: str
    files: tuple[str, ...]

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class AssetLock:
    packages: tuple[Package, ...]
    urls: dict[str, str]  # CDN address -> vendored path (<package>/<file>)
    digest: str           # of the packages: names the folder, so a changed lock re-vendors

    def target(self, url: str) -> str | None:
        return self.urls.get(url)


def load_lock(path: Path = LOCK) -> AssetLock:
    raw = json.loads(path.read_text())
    packages = tuple(Package(p["name"], p["version"], p["integrity"], tuple(p["files"]))
                     for p in raw["packages"])
    canon = json.dumps(raw["packages"], sort_keys=True, separators=(",", ":"))
    return AssetLock(packages, dict(raw["urls"]), hashlib.sha256(canon.encode()).hexdigest()[:12])


def assets_dir(cache: Path = DEFAULT_CACHE, lock: AssetLock | None = None) -> Path:
    """Where this lock's assets are (or will be) vendored."""
    return cache / (lock or load_lock()).digest


def is_vendored(cache: Path = DEFAULT_CACHE, lock: AssetLock | None = None) -> bool:
    return (assets_dir(cache, lock) / STAMP).is_file()


def ensure_assets(cache: Path = DEFAULT_CACHE, lock: AssetLock | None = None, npm: str = "npm") -> Path:
    """The vendored assets of the lock: returned at once when present, fetched and verified otherwise.

    Raises VendorError (one line: what failed and what to try) when npm or the registry cannot be
    reached and the assets are missing, or when a tarball does not match the committed integrity.
    """
    lock = lock or load_lock()
    dest = assets_dir(cache, lock)
    if (dest / STAMP).is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".tmp-") as tmp:
        tarballs = _npm_pack(lock.packages, Path(tmp) / "tgz", npm)
        staging = Path(tmp) / "assets"
        files: dict[str, int] = {}
        for pkg in lock.packages:
            _verify(pkg, tarballs[pkg.spec])
            files.update(_extract(pkg, tarballs[pkg.spec], staging))
        stamp = {"packages": [p.spec for p in lock.packages], "files": files}
        (staging / STAMP).write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n")
        if dest.exists():  # an incomplete folder (no stamp) from an older, non-atomic layout
            shutil.rmtree(dest)
        try:
            os.rename(staging, dest)
        except OSError:
            if not (dest / STAMP).is_file():  # not a concurrent `make vendor` that won the race
                raise
    _prune(cache, keep=dest)
    return dest


def _npm_pack(packages: tuple[Package, ...], out: Path, npm: str) -> dict[str, Path]:
    """Download the release tarballs with one `npm pack` call; spec -> tarball path."""
    out = out.resolve()  # npm runs in `out`: a relative destination would nest
    out.mkdir(parents=True)
    cmd = [npm, "pack", *(p.spec for p in packages), "--pack-destination", str(out), *NPM_FLAGS]
    hint = ("the report pages need them to render offline; connect to the npm registry once and run "
            "`make vendor` (or `python -m flows.portal.vendor`)")
    try:
        # cwd=out: no package.json or .npmrc of the caller's folder changes what is packed
        proc = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise VendorError(f"'{npm}' not found: the report assets are vendored from the npm registry with "
                          f"npm (Debian: apt-get install npm); {hint}") from None
    except subprocess.TimeoutExpired:
        raise VendorError(f"npm pack took over 10 minutes; {hint}") from None
    if proc.returncode != 0:
        raise VendorError(f"could not fetch the report assets from the npm registry "
                          f"({_npm_error(proc.stdout, proc.stderr)}); {hint}")
    packed = {f"{e['name']}@{e['version']}": out / e["filename"] for e in json.loads(proc.stdout)}
    missing = [p.spec for p in packages if p.spec not in packed or not packed[p.spec].is_file()]
    if missing:
        raise VendorError(f"npm pack did not produce {', '.join(missing)}; {hint}")
    return packed


def _npm_error(stdout: str, stderr: str) -> str:
    """npm --json prints {"error": {"code", "summary"}}; fall back to its last stderr line."""
    try:
        err = json.loads(stdout)["error"]
        return f"{err.get('code')}: {err.get('summary')}"
    except (ValueError, KeyError, TypeError):
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        return lines[-1] if lines else "npm failed with no message"


def _verify(pkg: Package, tarball: Path) -> None:
    algo, _, expected = pkg.integrity.partition("-")
    if algo != "sha512":
        raise VendorError(f"{LOCK.name}: {pkg.spec} integrity must be sha512-<base64> (got {algo})")
    actual = base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
    if actual != expected:
        raise VendorError(f"{pkg.spec}: the downloaded tarball does not match {LOCK.name} "
                          f"(sha512-{actual[:16]}..., expected sha512-{expected[:16]}...); nothing was vendored")


def _extract(pkg: Package, tarball: Path, staging: Path) -> dict[str, int]:
    """Copy the package's listed files out of the tarball; vendored path -> size in bytes."""
    out: dict[str, int] = {}
    matched: set[str] = set()
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            # npm tarballs hold one top folder ('package/' for most, the name for some): strip it
            rel = PurePosixPath(*PurePosixPath(member.name).parts[1:])
            hits = {pat for pat in pkg.files if fnmatch.fnmatchcase(str(rel), pat)}
            if not member.isfile() or not hits:
                continue
            if rel.is_absolute() or ".." in rel.parts:
                raise VendorError(f"{pkg.spec}: unsafe path in tarball: {member.name}")
            target = staging / pkg.name / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as dst:  # type: ignore[union-attr]
                shutil.copyfileobj(src, dst)
            out[f"{pkg.name}/{rel}"] = member.size
            matched |= hits
    unmatched = sorted(set(pkg.files) - matched)
    if unmatched:
        raise VendorError(f"{pkg.spec}: {LOCK.name} lists {', '.join(unmatched)}, not in the tarball")
    return out


def _prune(cache: Path, keep: Path) -> None:
    """Drop asset folders of older locks (complete ones only: a folder without a stamp may be
    another process's work in progress, and temporary folders clean themselves up)."""
    for child in cache.iterdir():
        if child != keep and child.is_dir() and (child / STAMP).is_file():
            shutil.rmtree(child, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Vendor the report assets (flows/portal/assets.lock.json).")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="default: %(default)s")
    args = parser.parse_args(argv)
    lock = load_lock()
    if is_vendored(args.cache, lock):
        print(f"vendor: up to date ({assets_dir(args.cache, lock)})")
        return 0
    t0 = time.perf_counter()
    try:
        dest = ensure_assets(args.cache, lock)
    except VendorError as exc:
        print(f"vendor: error: {exc}", file=sys.stderr)
        return 1
    files = json.loads((dest / STAMP).read_text())["files"]
    print(f"vendor: {len(lock.packages)} packages, {len(files)} files, {sum(files.values()) / 1e6:.1f} MB "
          f"in {time.perf_counter() - t0:.1f}s -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
