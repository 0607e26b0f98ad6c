"""The demo source: MovieLens-100K, taken from the recbole 1.2.1 wheel and converted to the contract.

The wheel ships the three atomic files of ml-100k (tab-separated, header of `name:type` fields). The
package registry is the only network this project may use, so the data comes through
`pip download` (recbole is never installed). Extracted files are checked against pinned sha256
digests; the converted contract tables are cached so a second run downloads and converts nothing.
"""
from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pandas as pd

from flows.errors import DataContractError

RECBOLE = "recbole==1.2.1"
WHEEL_GLOB = "recbole-1.2.1-*.whl"
MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
SHA256 = {
    "inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
    "item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}
DEMO_DIR = "ml-100k"
DONE = ".complete"
# The MovieLens-1M age groups: coarse enough to be a categorical feature.
AGE_EDGES = [0, 18, 25, 35, 45, 50, 56, 200]
AGE_LABELS = ["<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"]


def demo_source(cache_dir: Path) -> Path:
    """A source directory (users/items/interactions.parquet) for MovieLens-100K, built once in cache_dir."""
    out = cache_dir / DEMO_DIR
    if (out / DONE).exists():
        return out
    raw = read_verified(wheel(cache_dir))
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_DIR}-", dir=cache_dir))
    tmp.chmod(0o755)  # mkdtemp makes it private (0700)
    try:
        users, items, inter = convert(raw)
        users.to_parquet(tmp / "users.parquet", index=False)
        items.to_parquet(tmp / "items.parquet", index=False)
        inter.to_parquet(tmp / "interactions.parquet", index=False)
        (tmp / DONE).write_text(f"{RECBOLE} ml-100k, sha256 verified\n")
        shutil.rmtree(out, ignore_errors=True)  # a half-built directory from an interrupted run
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def wheel(cache_dir: Path) -> Path:
    """The recbole wheel in cache_dir, fetched with `pip download` when it is not there yet."""
    found = sorted(cache_dir.glob(WHEEL_GLOB))
    if found:
        return found[0]
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", RECBOLE, "-d", str(cache_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache_dir.glob(WHEEL_GLOB))
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataContractError(f"demo: `pip download {RECBOLE}` into {cache_dir} failed ({last}); "
                                f"check access to the package registry or use a data directory")
    return found[0]


def read_verified(path: Path) -> dict[str, bytes]:
    """The ml-100k inter/user/item files from the wheel, each checked against its pinned sha256."""
    try:
        with zipfile.ZipFile(path) as zf:
            raw = {name: zf.read(MEMBER.format(name)) for name in SHA256}
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise DataContractError(f"demo: {path} is not a readable recbole wheel with ml-100k ({exc}); "
                                f"delete it to download again") from exc
    for name, data in raw.items():
        got = hashlib.sha256(data).hexdigest()
        if got != SHA256[name]:
            raise DataContractError(f"demo: ml-100k.{name} in {path} has sha256 {got}, expected "
                                    f"{SHA256[name]}; delete {path} to download again")
    return raw


def _atomic(data: bytes) -> pd.DataFrame:
    """Parse a recbole atomic file: tab-separated, header fields 'name:type'."""
    df = pd.read_csv(io.BytesIO(data), sep="\t", dtype=str, keep_default_na=False)
    return df.rename(columns=lambda c: c.split(":")[0])


def convert(raw: dict[str, bytes]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """ml-100k atomic files -> (users, items, interactions) in the data contract."""
    u, i, r = _atomic(raw["user"]), _atomic(raw["item"]), _atomic(raw["inter"])
    age = pd.to_numeric(u["age"])
    users = pd.DataFrame({
        "user_id": u["user_id"].astype("int64"),
        "age_bucket": pd.cut(age, AGE_EDGES, right=False, labels=AGE_LABELS).astype(str),
        "gender": u["gender"],
        "occupation": u["occupation"],
        # First zip digit = US postal region (10 values); Canadian postcodes keep their letter.
        "zip_prefix": u["zip_code"].str[:1],
    })
    items = pd.DataFrame({
        "item_id": i["item_id"].astype("int64"),
        "title": i["movie_title"],
        # Two years are not numbers ("unkonwn" (sic) and "V"): they become nulls, not errors.
        "release_year": pd.to_numeric(i["release_year"], errors="coerce").astype("Int64"),
        "genres": [g.split(" ") if g else [] for g in i["class"]],
    })
    inter = pd.DataFrame({
        "user_id": r["user_id"].astype("int64"),
        "item_id": r["item_id"].astype("int64"),
        "timestamp": pd.to_datetime(pd.to_numeric(r["timestamp"]).astype("int64"), unit="s", utc=True),
        "rating": pd.to_numeric(r["rating"]).astype("float64"),
    })
    return users, items, inter
