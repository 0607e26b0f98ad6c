"""Serving: the users file parser, and recommendations end to end from a published index."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.errors import DataContractError
from flows.serving.ids import read_ids_file
from tests.fresh import modules_imported


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "users.txt"
    path.write_text(text)
    return path


def test_ids_file_header_blank_lines_and_int_ids(tmp_path: Path) -> None:
    ids = read_ids_file(write(tmp_path, "user_id\n 12\n\n7\n  \n-3\n"), "int64")
    assert ids == [12, 7, -3] and all(type(i) is int for i in ids)


def test_ids_file_string_ids_stay_strings(tmp_path: Path) -> None:
    # '007' must not become 7 and a header-less file keeps its first line.
    ids = read_ids_file(write(tmp_path, "\ufeff007\nu-1\n\nuser 2\n"), "string")
    assert ids == ["007", "u-1", "user 2"]
    assert read_ids_file(write(tmp_path, "user_id\nuser_id2\n"), "string") == ["user_id2"]


def test_ids_file_bad_int_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "user_id\n1\n\nabc\n")
    with pytest.raises(DataContractError, match=r"users\.txt:4: user_id 'abc' is not an int64"):
        read_ids_file(path, "int64")
    with pytest.raises(DataContractError, match=r":1: user_id '1.5' is not an int64"):
        read_ids_file(write(tmp_path, "1.5\n"), "int64")
    with pytest.raises(DataContractError, match="out of the int64 range"):
        read_ids_file(write(tmp_path, str(2**63) + "\n"), "int64")


def test_ids_file_without_ids_or_missing(tmp_path: Path) -> None:
    with pytest.raises(DataContractError, match="no user ids"):
        read_ids_file(write(tmp_path, "user_id\n\n"), "int64")
    with pytest.raises(DataContractError, match="not found"):
        read_ids_file(tmp_path / "nope.txt", "int64")


# --- end to end: a published bundle answers through Recommender and the CLI ------------------------

def _published(root: Path, out: Path, **cfg) -> Path:
    from flows.params import PublishParams
    from flows.stages.publish import publish

    publish(root / "artifacts/model/full", root / "data/training", root / "data/ingested/schema.json",
            PublishParams(verify_users=20, upsert_batch=20, **cfg), out)
    return out


@pytest.mark.parametrize("string_ids", [False, True], ids=["int_ids", "string_ids"])
def test_recommend_end_to_end(trained_root, tmp_path: Path, string_ids: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.serving.recommend import Recommender

    monkeypatch.delenv("QDRANT_URL", raising=False)
    root = trained_root(string_ids)
    published = _published(root, tmp_path / "published")
    inter = pd.read_parquet(root / "data/ingested/interactions.parquet")
    catalog = set(pd.read_parquet(root / "data/training/items.parquet")["item_id"])
    users = list(inter["user_id"].drop_duplicates()[:5])
    unknown = "nobody" if string_ids else 987654321
    asked = [users[0], unknown, *users[1:], users[0]]

    with Recommender.load_live(published, root / "data/feast", root / "data/features") as rec:
        recs = rec.recommend(asked, 7, batch_users=2)          # several batches, a repeated user
        n = len(catalog)
        everything = rec.recommend(users, n, exclude_seen=False)
        unseen = rec.recommend(users, n)
    assert list(recs.columns) == ["user_id", "item_id", "rank", "score", "cold_start"]
    assert list(recs["user_id"].drop_duplicates()) == asked[:-1]
    assert all(g["rank"].tolist() == list(range(1, 8)) for _, g in recs.groupby("user_id", sort=False))
    assert all((np.diff(g["score"].to_numpy()) <= 1e-6).all() for _, g in recs.groupby("user_id"))
    assert set(recs["item_id"]) <= catalog
    assert recs.groupby("user_id", sort=False)["cold_start"].first().tolist() == [False, True, False, False, False, False]
    if string_ids:
        assert all(isinstance(u, str) for u in recs["user_id"]) and all(isinstance(i, str) for i in recs["item_id"])
    else:
        assert recs["user_id"].dtype == "int64" and recs["item_id"].dtype == "int64"
    # The whole catalog: with seen items every item once; without, exactly the catalog minus history.
    for u in users:
        seen = set(inter.loc[inter["user_id"] == u, "item_id"])
        ranked = everything.loc[everything["user_id"] == u, "item_id"].tolist()
        assert len(ranked) == n and set(ranked) == catalog
        kept = unseen.loc[unseen["user_id"] == u]
        assert set(kept["item_id"]) == catalog - seen and kept["rank"].tolist() == list(range(1, len(kept) + 1))
    assert not set(zip(recs["user_id"], recs["item_id"])) & set(zip(inter["user_id"], inter["item_id"]))


def test_filters_similar_items_and_bad_queries(trained_root, tmp_path: Path) -> None:
    from flows.serving.index import BadQuery
    from flows.serving.recommend import Recommender

    root = trained_root(False)
    items = pd.read_parquet(root / "data/training/items.parquet").set_index("item_id")
    users = pd.read_parquet(root / "data/ingested/interactions.parquet")["user_id"].unique()[:4].tolist()
    for backend in ("qdrant-local", "qdrant-edge"):
        published = _published(root, tmp_path / backend, backend=backend)
        with Recommender.load_live(published, root / "data/feast", root / "data/features") as rec:
            recs = rec.recommend(users, 5, filter={"genres": "comedy", "year": {"gte": 1960}})
            assert len(recs) and all("comedy" in items.loc[i, "genres"] and items.loc[i, "year"] >= 1960
                                     for i in recs["item_id"])
            first = int(items.index[0])
            similar = rec.similar(first, 4)
            assert list(similar.columns) == ["item_id", "rank", "score"] and len(similar) == 4
            assert first not in similar["item_id"].tolist()
            with pytest.raises(BadQuery, match="unknown filter field 'colour'"):
                rec.recommend(users, 5, filter={"colour": "red"})
            with pytest.raises(BadQuery, match="k must be at least 1"):
                rec.recommend(users, 0)
            with pytest.raises(BadQuery, match="is not in the index"):
                rec.similar(-1, 3)


def test_cli_recommend_reads_the_live_bundle(project: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    params = str(project / "params.yaml")
    result = CliRunner().invoke(app, ["recommend", "--user-id", "1", "--params", params])
    assert result.exit_code == 1 and "LIVE not found: nothing is published yet" in result.output
    _published(project, project / "artifacts/published")
    user = int(pd.read_parquet(project / "data/ingested/interactions.parquet")["user_id"].iloc[0])
    result = CliRunner().invoke(app, ["recommend", "--user-id", str(user), "--k", "3", "--params", params])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0] == "user_id,item_id,rank,score,cold_start" and len(lines) == 4
    assert all(line.endswith(",False") for line in lines[1:])
    result = CliRunner().invoke(app, ["recommend", "--user-id", str(user), "--filter", '{"genres": ["kids"', "--params", params])
    assert result.exit_code == 1 and "--filter is not valid JSON" in result.output
    result = CliRunner().invoke(app, ["recommend", "--user-id", str(user), "--filter", '{"brand": "x"}', "--params", params])
    assert result.exit_code == 1 and "unknown filter field 'brand'; filterable fields: genres, year" in result.output


def test_a_broken_training_run_cannot_take_the_live_bundle_down(project: Path) -> None:
    """Issue 14, as a user met it: items with inf features trained a nan model that overwrote
    artifacts/model/full; publish must refuse it and recommend must keep answering."""
    import torch
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.serving.bundles import BundleStore

    params = str(project / "params.yaml")
    runner = CliRunner()
    assert runner.invoke(app, ["stage", "publish", "--params", params]).exit_code == 0
    live = BundleStore(project / "artifacts/published").live()
    user = str(int(pd.read_parquet(project / "data/ingested/interactions.parquet")["user_id"].iloc[0]))
    before = runner.invoke(app, ["recommend", "--user-id", user, "--k", "5", "--params", params])
    assert before.exit_code == 0

    model_pt = project / "artifacts/model/full/model.pt"
    saved = torch.load(model_pt, map_location="cpu", weights_only=True)
    saved["state_dict"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                           for k, v in saved["state_dict"].items()}
    torch.save(saved, model_pt)

    refused = runner.invoke(app, ["stage", "publish", "--params", params])
    assert refused.exit_code == 1
    assert "item vectors are zero or not finite" in refused.output
    assert f"the live version ({live}) is unchanged" in refused.output
    assert BundleStore(project / "artifacts/published").live() == live
    after = runner.invoke(app, ["recommend", "--user-id", user, "--k", "5", "--params", params])
    assert after.exit_code == 0 and after.output == before.output


@pytest.mark.parametrize("string_ids,backend", [(False, "qdrant-local"), (True, "qdrant-local"), (False, "qdrant-edge")],
                         ids=["int_ids", "string_ids", "edge"])
def test_a_one_shot_load_answers_as_the_full_load_does(trained_root, tmp_path: Path, string_ids: bool, backend: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`towerflow recommend` loads a bundle one_shot: the user tower in numpy, a qdrant-local
    catalog read from the bundle's files with its sidecar. Same answers as the service's load,
    after items were added and removed, with and without a filter and seen items."""
    from flows.serving.index.arrays import BundleArrays
    from flows.serving.items import add_items, catalog_ids, normalize_items, remove_items
    from flows.serving.recommend import Recommender
    from models.numpy_user_tower import NumpyUserEncoder

    monkeypatch.delenv("QDRANT_URL", raising=False)
    root = trained_root(string_ids)
    published = _published(root, tmp_path / "published", backend=backend)
    feast, features = root / "data/feast", root / "data/features"
    catalog = pd.read_parquet(root / "data/training/items.parquet")["item_id"].tolist()
    new = ["new-1", "new-2"] if string_ids else [9001, 9002]
    with Recommender.load_live(published, feast, features) as rec:
        known = catalog_ids(rec.bundle_dir)
        add_items(rec, published, normalize_items(pd.DataFrame(
            [{"item_id": new[0], "genres": ["comedy"], "year": 1999}, {"item_id": new[1], "year": 1950}]),
            rec.schema, "test"), known)
        remove_items(rec, published, [catalog[0], catalog[3]], known)
    users = pd.read_parquet(root / "data/ingested/interactions.parquet")["user_id"].drop_duplicates()[:6].tolist()
    users.append("nobody" if string_ids else 987654321)
    asked = [dict(k=len(catalog) + 2), dict(k=5, exclude_seen=False), dict(k=4, filter={"genres": "comedy"}),
             dict(k=3, filter={"year": {"gte": 1960}})]
    with Recommender.load_live(published, feast, features) as full:
        full.sync_own_additions()        # as the service does on load: the removals are hidden in memory
        expected = [full.recommend(users, **a) for a in asked]
    one_shot = Recommender.load(published / "versions" / expected_version(published), feast, features, one_shot=True)
    with one_shot:
        assert isinstance(one_shot.index, BundleArrays) == (backend == "qdrant-local")
        assert isinstance(one_shot.model, NumpyUserEncoder)
        got = [one_shot.recommend(users, **a) for a in asked]
    for a, want, have in zip(asked, expected, got):
        assert have[["user_id", "item_id", "rank", "cold_start"]].equals(want[["user_id", "item_id", "rank", "cold_start"]]), a
        np.testing.assert_allclose(have["score"], want["score"], atol=1e-5)
    everything = got[0]
    assert new[0] in set(everything["item_id"]) and not {catalog[0], catalog[3]} & set(everything["item_id"])


def expected_version(published: Path) -> str:
    from flows.serving.bundles import BundleStore

    return BundleStore(published).live()


def test_a_one_shot_answer_imports_neither_torch_nor_qdrant_client_nor_redis_nor_feast(project: Path) -> None:
    """What makes `towerflow recommend` answer in ~1 s instead of ~4 s on the demo: measured in a
    fresh interpreter, as the CLI runs. Feast: its import alone was 0.9-1.3 s; the SQLite rows are
    read without it (features/online_sqlite.py). Redis: Feast's first online read would import six
    other online stores' modules to answer a probe (features/store.py, 70 ms)."""
    _published(project, project / "artifacts/published")
    user = int(pd.read_parquet(project / "data/ingested/interactions.parquet")["user_id"].iloc[0])
    code = f"""
from pathlib import Path
from flows.serving.bundles import BundleStore
from flows.serving.recommend import Recommender
root = Path({str(project)!r})
live = BundleStore(root / "artifacts/published").live_dir()
with Recommender.load(live, root / "data/feast", root / "data/features", one_shot=True) as rec:
    recs = rec.recommend([{user}], 3)
assert len(recs) == 3, recs
"""
    loaded, _ = modules_imported(code, ("torch", "qdrant_client", "feast", "redis"), torch_importable_after=True)
    assert loaded == []
