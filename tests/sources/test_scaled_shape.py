"""The scale bench's generated data (flows/sources/shapes.py `scaled`): skewed like real logs, string
ids, multi-valued item features, ranking logs, and accepted by ingest's contract reader."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.params import DataParams
from flows.sources.contract import check_directory, read_source
from flows.sources.shapes import generate_topics, scaled, write_source

N = 20_000


@pytest.fixture(scope="module")
def frames() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    return generate_topics(scaled(N), seed=1)


def _top_share(counts: pd.Series, share: float) -> float:
    """Share of the events that the busiest `share` of the ids hold."""
    c = counts.sort_values(ascending=False).to_numpy()
    return c[: max(int(len(c) * share), 1)].sum() / c.sum()


def test_sizes_scale_from_n(frames) -> None:
    users, items, inter, logs = frames
    assert (len(inter), len(users), len(items)) == (N, N // 10, N // 50)
    assert set(inter["user_id"]) == set(users["user_id"]) and set(inter["item_id"]) == set(items["item_id"])
    assert inter["timestamp"].is_monotonic_increasing
    with pytest.raises(ValueError, match="cannot cover"):
        scaled(1000, users=5000)


def test_skew_string_ids_and_multi_valued_features(frames) -> None:
    users, items, inter, _ = frames
    item_counts, user_counts = inter["item_id"].value_counts(), inter["user_id"].value_counts()
    # Zipf items: the top 1% of items take many times their share, the median item few events
    assert _top_share(item_counts, 0.01) > 0.08
    assert item_counts.median() < item_counts.mean() * 0.6
    # heavy-tailed users, but no single account dominates
    assert _top_share(user_counts, 0.1) > 0.3
    assert user_counts.max() / len(inter) < 0.02
    assert inter["user_id"].map(type).eq(str).all() and inter["item_id"].str.startswith("i").all()
    lengths = items["genres"].map(len)
    assert lengths.min() >= 1 and lengths.max() > 1
    assert items["genres"].map(lambda g: len(set(g)) == len(g)).all()    # no genre twice in one item


def test_ranking_logs_follow_the_funnel(frames) -> None:
    *_, logs = frames
    assert not logs.duplicated(["request_id", "item_id"]).any()
    shown = logs["stage"] == "shown"
    assert logs.loc[shown, "position"].notna().all() and logs.loc[~shown, "position"].isna().all()
    assert not logs.loc[~shown, "clicked"].any() and logs.loc[shown, "clicked"].any()
    # clicks fall with the position (the generator's examination curve)
    by_position = logs[shown].groupby("position")["clicked"].mean()
    assert by_position.iloc[0] > by_position.iloc[-1]


def test_is_valid_contract_data(frames, tmp_path: Path) -> None:
    source = write_source(*frames, tmp_path / "src")
    data = DataParams(source=str(source))
    files = check_directory(source, data)
    tables, kinds = read_source(files, data)
    assert kinds["item_features"]["multi"] == ["genres"]
    assert "brand" in kinds["item_features"]["categorical"]
    assert set(kinds["item_features"]["numeric"]) == {"price", "year"}
    assert tables.interactions.num_rows == N and tables.ranking_logs.num_rows == len(frames[3])
    assert str(tables.interactions.schema.field("user_id").type) == "string"
    assert np.isin(["retrieved", "ranked", "shown"], tables.ranking_logs["stage"].to_numpy(zero_copy_only=False)).all()


def test_log_requests_sets_the_ranking_log_volume() -> None:
    """--log-requests: logged requests per interaction, each up to 50 rows (an item retrieved twice for
    a request is one row), none at 0, and a share outside [0, 1] refused with its value."""
    n = 4_000
    *_, few = generate_topics(scaled(n), seed=2)
    *_, many = generate_topics(scaled(n, log_requests=0.4), seed=2)
    assert 0.015 * n < few["request_id"].nunique() < 0.025 * n
    assert 0.37 * n < many["request_id"].nunique() < 0.43 * n
    assert many.groupby("request_id").size().max() <= 50 and len(many) > 10 * len(few)
    assert generate_topics(scaled(n, log_requests=0.0), seed=2)[3] is None
    with pytest.raises(ValueError, match="within \\[0, 1\\], got 1.5"):
        scaled(n, log_requests=1.5)
