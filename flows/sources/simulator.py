"""Simulated ranking logs with a known ground truth, for sources that have none.

The world: a fixed relevance model P(relevant | user, item) (a low-rank factorization of the
interaction matrix, squashed by a calibrated sigmoid, plus a bonus for pairs the user really
interacted with); a retrieval step (the interacted item, two-hop co-occurrence walks from the user's
earlier items, popularity samples); a noisy logging ranker (true logit + an error that, like a real
trained ranker's, is mostly persistent: per item or low-rank per user-item, only the share
`logger_error_redraw` of its variance drawn afresh per request); and a
position-based click model (Richardson et al. 2007; Joachims et al. 2017): P(click) =
P(examined | position, user type) x P(relevant | user, item), with impatient and patient users.

Everything is vectorized over chunks of requests (cost linear in requests) and deterministic from
the seed. The truth is written beside the logs so a ranking stage can check what it recovers.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp

from flows.sources.contract import LOG_STAGES
from flows.sources.normalize import TIMESTAMP, logs_schema
from flows.params import SimulatorParams
from flows.sources.click_model import examination, neighbour_factor, propensity_formula, ranker_scores

# Calibration targets of the relevance model: a median popularity-sampled (user, item) pair is
# relevant with p=0.03, a median observed pair scores p=0.2 from the latent model alone, and the
# observed-pair bonus lifts that median to p=0.8 ("the item the user chose is highly relevant").
# A steeper latent model (observed median 0.5) made every shown item p>0.95: clicks then carry no
# relevance signal, only position.
P_RANDOM, P_OBSERVED_LATENT, P_OBSERVED = 0.03, 0.2, 0.8
CALIBRATION_PAIRS = 20000
OVERSAMPLE = 2.0  # draw 2x candidates; duplicates and already-consumed items are dropped
SCORE_BLOCK = 1024  # requests per block when gathering item factors (bounds memory)


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


@dataclass
class World:
    """The fixed, seeded state that every request chunk samples from."""

    user_ids: pa.Array          # original ids, by user code
    item_ids: pa.Array          # original ids, by item code
    seq_items: np.ndarray       # item codes of interactions sorted by (user, time)
    seq_times: np.ndarray       # their timestamps (int64 microseconds)
    user_ptr: np.ndarray        # CSR pointer of users into seq_*
    pairs: sp.csr_matrix        # binary user x item matrix (deduped pairs)
    item_users: sp.csr_matrix   # its transpose, item -> users
    pair_keys: np.ndarray       # sorted user_code * n_items + item_code of interacted pairs
    pair_first: np.ndarray      # first interaction time of each pair (int64 microseconds)
    user_f: np.ndarray          # (n_users, k) latent factors
    item_f: np.ndarray          # (n_items, k)
    pop: np.ndarray             # popularity sampling distribution over item codes
    scale: float
    bias: float
    bonus: float
    impatient: np.ndarray       # bool per user code
    err_user: np.ndarray        # (n_users, k) the logging ranker's persistent error: err_user . err_item
    err_item: np.ndarray        # (n_items, k)   (item mode: k = 1 and err_user = 1)


def _factorize(pairs: sp.csr_matrix, rank: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Randomized truncated SVD (Halko et al. 2011), seeded: pairs ~ user_f @ item_f.T."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=1, user_api="blas"):
        # These are tall-skinny QRs: one BLAS thread is as fast, and OpenBLAS threads that spin on a
        # busy 2-core machine made each QR 50x slower (0.9 s instead of 0.02 s).
        return _randomized_svd(pairs, rank, rng)


def _randomized_svd(pairs: sp.csr_matrix, rank: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    k = max(1, min(rank, min(pairs.shape) - 1))
    omega = rng.standard_normal((pairs.shape[1], min(k + 10, pairs.shape[1])))
    q, _ = np.linalg.qr(pairs @ omega)
    for _ in range(2):  # power iterations sharpen the spectrum of a sparse, flat matrix
        q, _ = np.linalg.qr(pairs.T @ q)
        q, _ = np.linalg.qr(pairs @ q)
    ub, s, vt = np.linalg.svd((pairs.T @ q).T, full_matrices=False)
    root = np.sqrt(s[:k])
    return (q @ ub[:, :k]) * root, vt[:k].T * root


def _dot(user_f: np.ndarray, item_f: np.ndarray, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """user_f[users[r]] . item_f[items[r, m]], in blocks of requests (bounds memory)."""
    out = np.empty(items.shape, dtype=np.float64)
    for lo in range(0, len(users), SCORE_BLOCK):
        hi = lo + SCORE_BLOCK
        out[lo:hi] = np.einsum("rk,rmk->rm", user_f[users[lo:hi]], item_f[items[lo:hi]])
    return out


def _raw_scores(world: World, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Latent score of (users[r], items[r, m]) pairs."""
    return _dot(world.user_f, world.item_f, users, items)


def logger_error(n_users: int, n_items: int, params: SimulatorParams, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The logging ranker's persistent error as factors (err_user, err_item), unit variance per pair:
    per item (a catalog-wide mistake, as a ranker that mis-weighs a feature makes) or low-rank per
    user-item (a model trained on other data). Its own generator: the world's other draws stay as
    they were whatever this is."""
    rng = np.random.default_rng([seed, 0x10_6E_E4])
    if params.logger_error == "item":
        return np.ones((n_users, 1)), rng.standard_normal((n_items, 1))
    k = params.latent_rank
    return rng.standard_normal((n_users, k)), rng.standard_normal((n_items, k)) / np.sqrt(k)


def _observed(world: World, users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Whether each (user, item) pair was ever interacted, and its first time (int64 max if never)."""
    keys = users.reshape(len(users), -1).astype(np.int64) * world.pairs.shape[1] + items
    at = np.minimum(np.searchsorted(world.pair_keys, keys), len(world.pair_keys) - 1)
    hit = world.pair_keys[at] == keys
    return hit, np.where(hit, world.pair_first[at], np.iinfo(np.int64).max)


def build_world(inter: pa.Table, catalog: pa.Array, params: SimulatorParams,
                rng: np.random.Generator, seed: int) -> World:
    """Index users/items, factorize the interaction matrix, calibrate relevance, draw user types."""
    users_np = inter["user_id"].to_numpy(zero_copy_only=False)
    items_np = inter["item_id"].to_numpy(zero_copy_only=False)
    cat_np = pc.drop_null(catalog).to_numpy(zero_copy_only=False)
    user_vals, u = np.unique(users_np, return_inverse=True)
    item_vals = np.unique(np.concatenate([cat_np, items_np]))
    i = np.searchsorted(item_vals, items_np)
    t = pc.cast(inter["timestamp"], pa.int64()).to_numpy()
    order = np.lexsort((i, t, u))  # by user, then time (ties by item) => a per-user history
    n_users, n_items = len(user_vals), len(item_vals)
    pairs = sp.csr_matrix((np.ones(len(u)), (u, i)), shape=(n_users, n_items))
    pairs.sum_duplicates()
    pairs.data[:] = 1.0
    user_f, item_f = _factorize(pairs, params.latent_rank, rng)
    keys = u.astype(np.int64) * n_items + i
    by_key = np.lexsort((t, keys))
    pair_keys, first_at = np.unique(keys[by_key], return_index=True)
    counts = np.bincount(i, minlength=n_items) + 1.0  # +1: never-interacted catalog items can be retrieved
    err_user, err_item = logger_error(n_users, n_items, params, seed)
    world = World(
        user_ids=pa.array(user_vals, type=inter.schema.field("user_id").type),
        item_ids=pa.array(item_vals, type=inter.schema.field("item_id").type),
        seq_items=i[order], seq_times=t[order],
        user_ptr=np.concatenate([[0], np.cumsum(np.bincount(u, minlength=n_users))]),
        pairs=pairs, item_users=pairs.T.tocsr(),
        pair_keys=pair_keys, pair_first=t[by_key][first_at],
        user_f=user_f, item_f=item_f,
        pop=counts / counts.sum(), scale=1.0, bias=0.0, bonus=_logit(P_OBSERVED) - _logit(P_OBSERVED_LATENT),
        impatient=rng.random(n_users) < params.impatient_share, err_user=err_user, err_item=err_item)
    _calibrate(world, rng)
    return world


def _calibrate(world: World, rng: np.random.Generator) -> None:
    """Pick scale and bias so the sigmoid meets the P_RANDOM / P_OBSERVED_LATENT medians."""
    coo = world.pairs.tocoo()
    take = rng.choice(coo.nnz, size=min(CALIBRATION_PAIRS, coo.nnz), replace=False)
    obs = _raw_scores(world, coo.row[take], coo.col[take][:, None])[:, 0]
    users = rng.integers(0, world.pairs.shape[0], CALIBRATION_PAIRS)
    items = rng.choice(len(world.pop), size=(CALIBRATION_PAIRS, 1), p=world.pop)
    rand = _raw_scores(world, users, items)[:, 0]
    gap = float(np.median(obs) - np.median(rand))
    world.scale = (_logit(P_OBSERVED_LATENT) - _logit(P_RANDOM)) / gap if gap > 1e-9 else 1.0
    world.bias = _logit(P_RANDOM) - world.scale * float(np.median(rand))


def _retrieve(world: World, users: np.ndarray, anchors: np.ndarray, actual: np.ndarray, width: int,
              rng: np.random.Generator) -> np.ndarray:
    """(R, width) candidate item codes: the actual item, co-occurrence walks, popularity samples."""
    r = len(users)
    n_walk = (width - 1) // 2
    n_pop = width - 1 - n_walk
    # Walk start: a random item from the user's history strictly before this request.
    before = anchors - world.user_ptr[users]
    start = world.user_ptr[users][:, None] + np.floor(rng.random((r, n_walk)) * before[:, None]).astype(np.int64)
    hist = world.seq_items[np.minimum(start, len(world.seq_items) - 1)]
    # Two hops: item -> a random user who interacted with it -> a random item of that user.
    iu = world.item_users
    deg_i = np.diff(iu.indptr)[hist]
    via = iu.indices[iu.indptr[hist] + np.floor(rng.random(hist.shape) * deg_i).astype(np.int64)]
    deg_u = np.diff(world.pairs.indptr)[via]
    walk = world.pairs.indices[world.pairs.indptr[via] + np.floor(rng.random(via.shape) * deg_u).astype(np.int64)]
    pop = rng.choice(len(world.pop), size=(r, n_pop + n_walk), p=world.pop)
    walk = np.where(before[:, None] > 0, walk, pop[:, n_pop:])  # a first interaction has no history
    return np.concatenate([actual[:, None], walk, pop[:, :n_pop]], axis=1)


def _first_unique(cand: np.ndarray, eligible: np.ndarray, limit: int) -> np.ndarray:
    """Mask of the first occurrence of each eligible item per row, at most `limit` per row."""
    order = np.argsort(cand, axis=1, kind="stable")
    srt = np.take_along_axis(cand, order, axis=1)
    first = np.concatenate([np.ones((len(cand), 1), bool), srt[:, 1:] != srt[:, :-1]], axis=1)
    keep = np.empty_like(first)
    np.put_along_axis(keep, order, first, axis=1)
    keep &= eligible
    return keep & (np.cumsum(keep, axis=1) <= limit)


def _chunk(world: World, anchors: np.ndarray, first_request: int, params: SimulatorParams,
           curves: np.ndarray, rng: np.random.Generator, width: int) -> tuple[pa.Table, pa.Table]:
    users = np.searchsorted(world.user_ptr, anchors, side="right") - 1
    actual = world.seq_items[anchors]
    cand = _retrieve(world, users, anchors, actual, width, rng)
    seen, first = _observed(world, users, cand)
    # Retrieval skips what the user consumed before this request (the request's own item stays).
    fresh = first >= world.seq_times[anchors][:, None]
    fresh[:, 0] = True
    keep = _first_unique(cand, fresh, params.candidates)
    logit = world.scale * _raw_scores(world, users, cand) + world.bias + world.bonus * seen
    # The per-request draw is made whatever the redraw share, so every other draw stays in step.
    fresh, persistent = rng.standard_normal(cand.shape), _dot(world.err_user, world.err_item, users, cand)
    r = params.logger_error_redraw
    score = ranker_scores(logit, keep, np.sqrt(r) * fresh + np.sqrt(1.0 - r) * persistent, params)
    order = np.argsort(np.where(keep, -score, np.inf), axis=1, kind="stable")  # best first, dropped last
    cand, logit, score, keep = (np.take_along_axis(a, order, axis=1) for a in (cand, logit, score, keep))
    rows, rank = np.nonzero(keep)  # row-major: by request, then by ranker score
    shown = rank < params.shown
    stage = np.where(shown, 2, np.where(rank < params.ranked, 1, 0))
    impatient = world.impatient[users[rows]]
    p_position = np.where(shown, curves[impatient.astype(int), np.minimum(rank, params.shown - 1)], 0.0)
    p_rel = 1.0 / (1.0 + np.exp(-logit[rows, rank]))
    p_exam = p_position
    if params.neighbour_effect > 0:
        width = min(params.shown, cand.shape[1])
        head = keep[:, :width]
        factor = neighbour_factor(1.0 / (1.0 + np.exp(-logit[:, :width])), head, params.neighbour_effect,
                                  params.grid_columns)
        p_exam = np.where(shown, p_position * factor[rows, np.minimum(rank, width - 1)], 0.0)
    clicked = shown & (rng.random(len(rows)) < p_exam * p_rel)
    req = pc.binary_join_element_wise(
        "sim-", pc.utf8_lpad(pc.cast(pa.array(first_request + np.arange(len(users))), pa.string()), 8, "0"), "")
    request_id = req.take(pa.array(rows))
    user_id = world.user_ids.take(pa.array(users[rows]))
    item_id = world.item_ids.take(pa.array(cand[rows, rank]))
    logs = pa.table({
        "request_id": request_id, "user_id": user_id, "item_id": item_id,
        "timestamp": pa.array(world.seq_times[anchors][rows], type=pa.int64()).cast(TIMESTAMP),
        "stage": pa.array(LOG_STAGES).take(pa.array(stage)),
        "position": pa.array(rank + 1, mask=~shown, type=pa.int64()),
        "ranker_score": score[rows, rank], "clicked": clicked,
    })
    if params.grid_columns is not None:    # the page layout, as optional context columns of the logs
        logs = logs.append_column("grid_row", pa.array(rank // params.grid_columns + 1, mask=~shown, type=pa.int64()))
        logs = logs.append_column("grid_col", pa.array(rank % params.grid_columns + 1, mask=~shown, type=pa.int64()))
    s = np.nonzero(shown)[0]
    truth = pa.table({
        "request_id": request_id.take(pa.array(s)), "item_id": item_id.take(pa.array(s)),
        "user_type": pa.array(["patient", "impatient"]).take(pa.array(impatient[s].astype(int))),
        "p_examine": p_exam[s], "p_relevant": p_rel[s], "p_examine_position": p_position[s],
    })
    return logs, truth


def _one_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def simulate(interactions: pa.Table, catalog: pa.Array, params: SimulatorParams, seed: int,
             logs_path: Path, truth_dir: Path, users: pa.Array | None = None) -> dict[str, float | int]:
    """Write logs_path (ranking_logs.parquet) and truth_dir/{truth.json,truth.parquet,user_types.parquet}.
    Only interactions of known users (`users`, when given) with catalog items anchor requests."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    truth_dir.mkdir(parents=True, exist_ok=True)
    schema = logs_schema(interactions.schema.field("user_id").type, interactions.schema.field("item_id").type)
    if params.grid_columns is not None:
        schema = schema.append(pa.field("grid_row", pa.int64())).append(pa.field("grid_col", pa.int64()))
    truth_schema = pa.schema([("request_id", pa.string()), ("item_id", schema.field("item_id").type),
                              ("user_type", pa.string()), ("p_examine", pa.float64()), ("p_relevant", pa.float64()),
                              ("p_examine_position", pa.float64())])
    # Rows with a null id or time, an unknown user or an item outside the catalog are the validate
    # stage's finding about the interactions; they cannot anchor a request (simulated logs that carried
    # them would be reported as a second fault, in a ranking_logs file the user never gave).
    keep = pc.and_(pc.and_(pc.is_valid(interactions["user_id"]), pc.is_valid(interactions["item_id"])),
                   pc.is_valid(interactions["timestamp"]))
    keep = pc.and_(keep, pc.is_in(interactions["item_id"], value_set=_one_array(catalog)))
    if users is not None:
        keep = pc.and_(keep, pc.is_in(interactions["user_id"], value_set=_one_array(users)))
    valid = interactions.filter(keep)
    world = build_world(valid, catalog, params, rng, seed) if valid.num_rows else None
    curve = examination(params.shown, params.position_bias, params.impatient_bias_factor)
    counts = {"requests": 0, "log_rows": 0, "shown": 0, "clicks": 0}
    with pq.ParquetWriter(logs_path, schema) as logs_w, \
            pq.ParquetWriter(truth_dir / "truth.parquet", truth_schema) as truth_w:
        if world is not None:
            n_seq = len(world.seq_items)
            n_req = max(1, round(params.request_fraction * n_seq))
            anchors = rng.choice(n_seq, size=n_req, replace=False)
            anchors = anchors[np.lexsort((anchors, world.seq_times[anchors]))]  # sim-00000001 is the earliest
            curves = np.stack([curve["patient"], curve["impatient"]])
            width = int(np.ceil(params.candidates * OVERSAMPLE))
            for lo in range(0, n_req, params.chunk_requests):
                chunk = anchors[lo:lo + params.chunk_requests]
                logs, truth = _chunk(world, chunk, lo + 1, params, curves, rng, width)
                logs_w.write_table(logs.cast(schema))
                truth_w.write_table(truth.cast(truth_schema))
                counts["requests"] += len(chunk)
                counts["log_rows"] += logs.num_rows
                counts["shown"] += truth.num_rows
                counts["clicks"] += int(pc.sum(logs["clicked"]).as_py() or 0)
    _write_truth(world, params, seed, curve, truth_dir, counts["requests"])
    return {**counts, "seconds": round(time.perf_counter() - started, 2)}


def _write_truth(world: World | None, params: SimulatorParams, seed: int, curve: dict[str, np.ndarray],
                 truth_dir: Path, n_req: int) -> None:
    if world is None:
        user_types = pa.table({"user_id": pa.array([], pa.int64()), "user_type": pa.array([], pa.string())})
        share = 0.0
    else:
        user_types = pa.table({"user_id": world.user_ids,
                               "user_type": pa.array(["patient", "impatient"]).take(pa.array(world.impatient.astype(int)))})
        share = float(world.impatient.mean()) if len(world.impatient) else 0.0
    pq.write_table(user_types, truth_dir / "user_types.parquet")
    truth = {
        "click_model": "P(click) = P(examined | position, user_type) * P(relevant | user, item)",
        "positions": list(range(1, params.shown + 1)),
        "propensity": {k: [float(x) for x in v] for k, v in curve.items()},
        "propensity_formula": propensity_formula(params),
        "neighbour_effect": {"gamma": params.neighbour_effect, "grid_columns": params.grid_columns,
                             "formula": "p_examine = p_examine_position * (1 - gamma * mean p_relevant of "
                                        "the neighbours (list: beside; grid: left/right/above/below))"},
        "logging_ranker": {**({"noise_std": params.ranker_noise, "formula": "true logit + noise_std * error"}
                              if params.logging_strength is None else
                              {"strength": params.logging_strength,
                               "formula": "s * true logit + (1 - s) * std(true logit) * error"}),
                           "error": f"sqrt(r) * N(0, 1) per request + sqrt(1 - r) * persistent "
                                    f"({params.logger_error}), r = {params.logger_error_redraw:g}"},
        "mixture": {"impatient": share, "patient": 1.0 - share, "configured_impatient_share": params.impatient_share},
        "relevance": {
            "formula": "sigmoid(scale * user_f.item_f + bias + bonus * interacted(user, item))",
            "latent_rank": 0 if world is None else int(world.user_f.shape[1]),
            "scale": None if world is None else world.scale, "bias": None if world is None else world.bias,
            "bonus": None if world is None else world.bonus,
            "targets": {"random_pair_median": P_RANDOM, "observed_pair_median": P_OBSERVED},
        },
        "retrieval": "interacted item + two-hop co-occurrence walks from earlier items + popularity samples",
        "parameters": {**params.model_dump(), "seed": seed},
        "requests": n_req,
    }
    (truth_dir / "truth.json").write_text(json.dumps(truth, indent=2) + "\n")
