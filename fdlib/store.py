"""The results store: SQLite, one row per (sample, condition), written one transaction per sample.

Every row carries the hash of everything that made it (`setup_sha`: model, prompt tokens, the
heads actually used, the directions' content, the condition's parameter, decoding settings) and
that setup itself in its record, so a run can tell a row it may reuse from one it must not.
A crash or a kill loses at most the transaction in flight.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

_SCHEMA = """
CREATE TABLE IF NOT EXISTS study_rows (
    sample_id TEXT NOT NULL,
    condition TEXT NOT NULL,   -- Condition.key
    setup_sha TEXT NOT NULL,   -- hash of everything that determined the row
    record    TEXT NOT NULL,   -- JSON: answer, score, the condition's fields, meta, the setup
    arrays    BLOB,            -- npz of named arrays (per-head scores)
    PRIMARY KEY (sample_id, condition)
)
"""


@dataclass(frozen=True)
class Row:
    sample_id: str
    condition: str
    setup_sha: str
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

    def put(self, rows: Iterable[Row]) -> None:
        """Write rows in one transaction (all or none)."""
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO study_rows VALUES (?, ?, ?, ?, ?)",
                [(r.sample_id, r.condition, r.setup_sha, json.dumps(r.record), _pack(r.arrays)) for r in rows],
            )

    def setups(self) -> dict[tuple[str, str], str]:
        """(sample_id, condition) -> setup_sha of every stored row, without reading records or arrays."""
        return {(s, c): h for s, c, h in self._db.execute("SELECT sample_id, condition, setup_sha FROM study_rows")}

    def record(self, sample_id: str, condition: str) -> dict[str, Any] | None:
        cur = self._db.execute("SELECT record FROM study_rows WHERE sample_id=? AND condition=?", (sample_id, condition))
        got = cur.fetchone()
        return json.loads(got[0]) if got else None

    def rows(self, conditions: Sequence[str] | None = None, *, arrays: bool = True) -> Iterator[Row]:
        query = f"SELECT sample_id, condition, setup_sha, record, {'arrays' if arrays else 'NULL'} FROM study_rows"
        args: tuple = ()
        if conditions is not None:
            query += f" WHERE condition IN ({','.join('?' * len(conditions))})"
            args = tuple(conditions)
        for sid, cond, sha, rec, blob in self._db.execute(query + " ORDER BY rowid", args):
            yield Row(sid, cond, sha, json.loads(rec), _unpack(blob))

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM study_rows").fetchone()[0])


@contextlib.contextmanager
def open_store(store: "str | Path | Store | None") -> Iterator[Store]:
    """Yield a Store for a path (closed afterwards), an open Store passed through untouched (its
    owner closes it), or a throwaway in-memory one for None."""
    if isinstance(store, Store):
        yield store
    else:
        with Store(":memory:" if store is None else store) as db:
            yield db


def merge_stores(sources: Sequence[str | Path], target: str | Path) -> int:
    """Merge shard stores into one. A (sample, condition) present twice is kept once when both
    copies have the same setup, and refused when they differ. Returns the target's row count."""
    with Store(target) as out:
        for src in sources:
            with Store(src) as s:
                have = out.setups()
                new = []
                for r in s.rows():
                    sha = have.get((r.sample_id, r.condition))
                    if sha is None:
                        new.append(r)
                    elif sha != r.setup_sha:
                        raise ValueError(f"{src}: row ({r.sample_id}, {r.condition}) was made by another setup than "
                                         f"the one in {target} ({r.setup_sha} vs {sha}); merge stores of one run only")
                out.put(new)
        return len(out)


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
