"""The range of an int64 id. Its own module so that parsing ids (the `towerflow recommend` path that
a running service answers) needs neither numpy nor pandas."""
from __future__ import annotations

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
