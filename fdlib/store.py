"""An embedded results store: SQLite, keyed by (sample, configuration), written per sample.

Each `put` is one transaction, so a crash or Ctrl-C loses at most the sample in flight and a
rerun skips every key already present.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    sample_id TEXT NOT NULL,
    config    TEXT NOT NULL,
    record    TEXT NOT NULL,   -- JSON: answer, em and other scalars
    arrays    BLOB,            -- npz of named arrays (scores)
    PRIMARY KEY (sample_id, config)
)
"""


@dataclass(frozen=True)
class Row:
    sample_id: str
    config: str
    record: dict[str, Any]
    arrays: dict[str, np.ndarray]


def _pack(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _unpack(blob: bytes | None) -> dict[str, np.ndarray]:
    if not blob:
        return {}
    with np.load(io.BytesIO(blob)) as data:
        return {k: data[k] for k in data.files}


class Store:
    """A results table in one SQLite file (`":memory:"` for a throwaway one)."""

    def __init__(self, path: str | Path) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self._db = sqlite3.connect(self.path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        self._db.commit()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has(self, sample_id: str, config: str) -> bool:
        cur = self._db.execute("SELECT 1 FROM results WHERE sample_id=? AND config=?", (sample_id, config))
        return cur.fetchone() is not None

    def put(self, rows: Iterable[Row]) -> None:
        """Write rows in one transaction (all or none)."""
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?)",
                [(r.sample_id, r.config, json.dumps(r.record), _pack(r.arrays)) for r in rows],
            )

    def keys(self) -> set[tuple[str, str]]:
        """Every (sample_id, config) present, without reading the stored arrays."""
        return set(self._db.execute("SELECT sample_id, config FROM results"))

    def rows(self, config: str | None = None) -> Iterator[Row]:
        query = "SELECT sample_id, config, record, arrays FROM results"
        args: tuple = ()
        if config is not None:
            query += " WHERE config=?"
            args = (config,)
        for sid, cfg, rec, blob in self._db.execute(query + " ORDER BY rowid", args):
            yield Row(sid, cfg, json.loads(rec), _unpack(blob))

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0])


@contextlib.contextmanager
def open_store(store: "str | Path | Store | None") -> Iterator["Store | None"]:
    """Yield a Store for a path (closed afterwards), or pass an open Store / None through
    untouched (its owner closes it)."""
    if isinstance(store, (str, Path)):
        with Store(store) as db:
            yield db
    else:
        yield store


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call `write(tmp)` on a temporary file next to `path`, then rename it over `path`: readers
    see the old file or the new one, never half of one (a crash leaves no partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
