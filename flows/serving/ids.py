"""User and item ids as the command line and the service take them: one id as the schema's dtype, a
file of ids, a filter given as JSON. Light on purpose (no numpy, pandas or index imports at module
level): `towerflow recommend` parses its input with these before it knows whether a running service
will answer or the bundle must be loaded."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flows.errors import ConfigError, DataContractError
from flows.int64 import INT64_MAX, INT64_MIN

RESULT_COLUMNS = ["user_id", "item_id", "rank", "score", "cold_start"]


def parse_id(text: str, id_dtype: str, where: str, what: str = "user_id") -> int | str:
    """One id (`what`: user_id, item_id) as the schema's dtype; `where` names the source in the error
    (file:line)."""
    if not text:
        raise DataContractError(f"{where}: empty {what}")
    if id_dtype == "string":
        return text
    if id_dtype != "int64":
        raise ConfigError(f"schema.json: {what}_dtype must be 'int64' or 'string', got {id_dtype!r}")
    try:
        value = int(text)
    except ValueError:
        raise DataContractError(f"{where}: {what} '{text}' is not an int64") from None
    if not INT64_MIN <= value <= INT64_MAX:
        raise DataContractError(f"{where}: {what} '{text}' is out of the int64 range")
    return value


def read_ids_file(path: Path, id_dtype: str) -> list:
    """User ids from a text file, one per line; an optional first line `user_id` is a header and
    blank lines are skipped. Ids are returned as the schema's dtype ('int64' -> int, 'string' -> str)."""
    if not path.is_file():
        raise DataContractError(f"{path}: users file not found")
    ids: list[int | str] = []
    first = True
    # utf-8-sig: files saved by spreadsheet tools start with a BOM.
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        if first and text == "user_id":
            first = False
            continue
        first = False
        ids.append(parse_id(text, id_dtype, f"{path}:{lineno}"))
    if not ids:
        raise DataContractError(f"{path}: no user ids found (one id per line, optional header 'user_id')")
    return ids


def parse_filter_json(value: str | dict | None, name: str = "--filter") -> dict[str, Any] | None:
    """'{"genres": "comedy", "year": {"gte": 1990}}' (text, or an object already parsed) as a dict;
    its fields are checked by the index. `name` is what the error calls it (--filter, filter)."""
    if value is None or value == "":
        return None
    from flows.serving.index import BadQuery  # (numpy, the index base) only for a filter
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadQuery(f"{name} is not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(value, dict):
        raise BadQuery(f"{name} must be a JSON object of field -> value, got {value!r}")
    return value
