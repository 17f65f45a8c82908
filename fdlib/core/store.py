"""The results store: SQLite, one row per (sample, condition), written one transaction per sample.

Every row carries the hash of everything that made it (`setup_sha`: model, prompt tokens, the
heads actually used, the directions' content, the condition's parameter, decoding settings) and
that setup itself in its record, so a run can tell a row it may reuse from one it must not.
A crash or a kill loses at most the transaction in flight. A `progress` table keeps, per study
run into the store, how many rows it asked for, how many are stored and the wall time spent.

A committed results file (`*.jsonl.gz`, `export_results`) is a store's rows in a compact, text,
byte-reproducible form; `open_store` reads one into a read-only in-memory store, so every reader
(and `run_study`, which then decodes nothing) takes it like a store.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import json
import os
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

_SCHEMA = """
CREATE TABLE IF NOT EXISTS study_rows (
    sample_id TEXT NOT NULL,
    condition TEXT NOT NULL,   -- Condition.key
    setup_sha TEXT NOT NULL,   -- hash of everything that determined the row
    record    TEXT NOT NULL,   -- JSON: answer, score, the condition's fields, meta, the setup
    arrays    BLOB,            -- npz of named arrays (per-head scores)
    PRIMARY KEY (sample_id, condition)
);
CREATE TABLE IF NOT EXISTS progress (
    study    TEXT PRIMARY KEY, -- a run_study call's description and conditions
    expected INTEGER NOT NULL, -- rows that call asked for, stored ones included
    done     INTEGER NOT NULL, -- of them, the rows stored
    seconds  REAL NOT NULL,    -- wall time spent decoding them, summed over calls
    computed INTEGER NOT NULL DEFAULT 0, -- rows decoded in that time (the rest were stored before)
    elsewhere_bytes INTEGER NOT NULL DEFAULT 0 -- bytes these rows took in the store that decoded them,
                                               -- beyond their copy here (a store seeded from results)
)
"""
RESULTS_SUFFIX = ".jsonl.gz"
# The dtype of a row, kept result, results file, ledger entry or findings file that names none. A
# float32 setup names no dtype, so every row made before the dtype was a setting (all float32)
# keeps its setup_sha; every other dtype is named (`fdlib.study.runner.dtype_setup`).
BASE_DTYPE = "float32"


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
    """A results table in one SQLite file (`":memory:"` for a throwaway one). A read-only store
    (a committed results file, see `load_results`) refuses every write."""

    def __init__(self, path: str | Path, *, source: str | None = None) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = source or str(path)
        self.read_only = False  # set by `load_results` once its rows are in
        self._db = sqlite3.connect(str(path))
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(progress)")}
        for column in ("computed", "elsewhere_bytes"):  # older stores lack them
            if column not in columns:
                self._db.execute(f"ALTER TABLE progress ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")
        self._db.commit()

    def _writable(self) -> None:
        if self.read_only:
            raise PermissionError(
                f"{self.path} is a committed results file (read-only): recompute it with "
                "`./dev figures paper` (FDLIB_RECOMPUTE=1), which writes runs/ and exports the file again"
            )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def put(self, rows: Iterable[Row]) -> None:
        """Write rows in one transaction (all or none)."""
        self._writable()
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

    def note_progress(self, study: str, *, expected: int, done: int, seconds: float = 0.0, computed: int = 0,
                      elsewhere_bytes: int = 0) -> None:
        """Record where a study stands: rows asked for, rows stored, and `seconds` more spent
        decoding `computed` more rows. `elsewhere_bytes`: what rows copied in from another store
        took there beyond their copy here (the largest given is kept)."""
        if self.read_only:
            return
        with self._db:
            self._db.execute(
                "INSERT INTO progress (study, expected, done, seconds, computed, elsewhere_bytes) "
                "VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(study) DO UPDATE SET expected=excluded.expected, done=excluded.done, "
                "seconds=progress.seconds + excluded.seconds, computed=progress.computed + excluded.computed, "
                "elsewhere_bytes=max(progress.elsewhere_bytes, excluded.elsewhere_bytes)",
                (study, int(expected), int(done), float(seconds), int(computed), int(elsewhere_bytes)),
            )

    def progress(self) -> list[dict[str, Any]]:
        """Per study run into this store: expected rows, stored rows, seconds spent, rows decoded,
        and the bytes its rows took elsewhere (see `note_progress`)."""
        cur = self._db.execute(
            "SELECT study, expected, done, seconds, computed, elsewhere_bytes FROM progress ORDER BY rowid")
        return [dict(study=s, expected=e, done=d, seconds=t, computed=c, elsewhere_bytes=b)
                for s, e, d, t, c, b in cur]


def check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    """`(i, n)`: this job's share i of n of a study's samples (and of its store); checked."""
    i, n = shard
    if not (isinstance(i, int) and isinstance(n, int) and n >= 1 and 0 <= i < n):
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")
    return i, n


@contextlib.contextmanager
def open_store(store: "str | Path | Store | None") -> Iterator[Store]:
    """Yield a Store for a path (closed afterwards), an open Store passed through untouched (its
    owner closes it), a read-only one for a committed results file (`*.jsonl.gz`), or a throwaway
    in-memory one for None."""
    if isinstance(store, Store):
        yield store
    elif store is not None and str(store).endswith(RESULTS_SUFFIX):
        with load_results(store) as db:
            yield db
    else:
        with Store(":memory:" if store is None else store) as db:
            yield db


def _array_text(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a, dtype="<f2")  # figures need 3 digits; float16 halves the file
    return {"shape": list(a.shape), "f16": base64.b64encode(a.tobytes()).decode("ascii")}


def _array_from(d: Mapping[str, Any]) -> np.ndarray:
    raw = np.frombuffer(base64.b64decode(d["f16"]), dtype="<f2").reshape(d["shape"])
    return raw.astype(np.float32)


def export_results(store: "str | Path | Store", path: str | Path, *, arrays: bool | Sequence[str] = True) -> Path:
    """Write a store's rows as a committed results file: gzip'd JSON lines sorted by (sample,
    condition), the per-head arrays in float16 (`arrays`: all, none, or the kinds named), no
    timestamp in the gzip header, so the same rows always give the same bytes. Atomic."""
    if not str(path).endswith(RESULTS_SUFFIX):
        raise ValueError(f"a results file must end in {RESULTS_SUFFIX}, got {path}")
    with open_store(store) as db:
        rows = sorted(db.rows(arrays=arrays is not False), key=lambda r: (r.sample_id, r.condition))
    keep = None if arrays is True else set(arrays or ())
    lines = []
    for r in rows:
        kept = {k: _array_text(v) for k, v in sorted(r.arrays.items()) if keep is None or k in keep}
        lines.append(json.dumps({"sample_id": r.sample_id, "condition": r.condition, "setup_sha": r.setup_sha,
                                 "record": r.record, "arrays": kept}, sort_keys=True, separators=(",", ":")))
    data = gzip.compress(("\n".join(lines) + "\n").encode("utf-8"), compresslevel=9, mtime=0)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def load_results(path: str | Path) -> Store:
    """A committed results file as a read-only in-memory store."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no committed results at {path}: compute them with `./dev figures paper`")
    db = Store(":memory:", source=str(path))
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                rows.append(Row(d["sample_id"], d["condition"], d["setup_sha"], d["record"],
                                {k: _array_from(v) for k, v in d["arrays"].items()}))
    db.put(rows)
    db.read_only = True
    return db


def results_rows(path: str | Path) -> int:
    """The rows a committed results file holds (its JSON lines, as `load_results` reads them),
    counted without decoding records or arrays."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def merge_stores(sources: Sequence[str | Path], target: str | Path) -> int:
    """Merge shard stores (or committed results files) into one. A (sample, condition) present
    twice is kept once when both copies have the same setup, and refused when they differ.
    Returns the target's row count."""
    with Store(target) as out:
        for src in sources:
            with open_store(src) as s:
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
