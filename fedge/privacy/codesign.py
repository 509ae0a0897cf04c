"""PIR/model co-design (Lam et al., ASPLOS 2024, section 4): pay for fewer, cheaper queries.

Plain PIR costs (queries x table rows) per inference. Three layout changes cut that, at the
price of sometimes not fetching a row (the model then sees a zero row):

- hot/cold split: the most frequently accessed rows form a small hot table that takes most
  queries cheaply; the long cold tail gets few queries;
- bins: the cold table is cut into bins (rows dealt round-robin by frequency rank, so bins carry
  similar traffic) and each inference sends exactly one query per bin over a 1/B-size table;
  two needed rows in one bin collide and one is dropped;
- co-location: each row also stores its most frequent successor row, so one query can return
  two needed rows.

Every inference sends the same number of queries to every table (dummies fill unused slots at
random rows), so a server learns nothing from which table or bin is queried or how often.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedge.privacy.pir import PIRServer, answer_many, query, reconstruct


@dataclass(frozen=True)
class CoDesign:
    """Query budget per inference. hot_rows = 0 means no hot table; cold_bins = 1 and
    cold_queries = k means plain PIR over the whole (cold) table with k queries."""

    hot_rows: int = 0
    hot_queries: int = 0
    cold_bins: int = 1
    cold_queries: int = 1  # per bin
    colocate: bool = False

    def __post_init__(self) -> None:
        if self.hot_rows < 0 or self.hot_queries < 0 or self.cold_queries < 0:
            raise ValueError(f"hot_rows, hot_queries and cold_queries must be >= 0: {self}")
        if self.cold_bins < 1:
            raise ValueError(f"cold_bins must be >= 1, got {self.cold_bins}")
        if (self.hot_rows == 0) != (self.hot_queries == 0):
            raise ValueError(f"a hot table needs both hot_rows and hot_queries > 0: {self}")


@dataclass
class Plan:
    """One inference's queries: for each table, a fixed number of local row indices."""

    queries: list[np.ndarray]
    wanted: list[np.ndarray]  # per table, the global ids the real queries are for (-1: dummy)
    fetched: np.ndarray  # global ids this plan returns (including co-located neighbours)


class Layout:
    """Where every row of a table lives under a CoDesign: table 0 is the hot table (if any),
    then one table per cold bin. Built from access counts measured on training traffic."""

    def __init__(self, counts: np.ndarray, design: CoDesign, successor: np.ndarray | None = None):
        counts = np.asarray(counts)
        n = counts.size
        if design.hot_rows >= n:
            raise ValueError(f"hot_rows {design.hot_rows} must be below the table's {n} rows")
        if design.colocate and (successor is None or successor.shape != (n,)):
            raise ValueError("colocate needs successor: for each row, the row to store beside it")
        self.design, self.num_rows = design, n
        self.successor = np.zeros(0, np.int64) if successor is None else successor  # colocate only
        rank = np.argsort(-counts, kind="stable")
        hot, cold = rank[: design.hot_rows], rank[design.hot_rows :]
        parts = [hot] if design.hot_rows else []
        parts += [cold[b :: design.cold_bins] for b in range(design.cold_bins)]
        self.members = [p for p in parts if p.size]
        if len(self.members) != len(parts):
            raise ValueError(f"{design.cold_bins} bins leave some bin empty for {n} rows")
        self.budget = ([design.hot_queries] if design.hot_rows else []) + [
            design.cold_queries
        ] * design.cold_bins
        self.table_of = np.empty(n, np.int64)
        self.local = np.empty(n, np.int64)
        for t, rows in enumerate(self.members):
            self.table_of[rows] = t
            self.local[rows] = np.arange(rows.size)

    def tables(self, table: np.ndarray) -> list[np.ndarray]:
        """The per-table arrays a server holds; with co-location each row is followed by its
        successor's row (rows twice as wide)."""
        if table.shape[0] != self.num_rows:
            raise ValueError(f"table has {table.shape[0]} rows, layout {self.num_rows}")
        if self.design.colocate:
            table = np.concatenate([table, table[self.successor]], axis=1)
        return [np.ascontiguousarray(table[rows]) for rows in self.members]

    def plan(self, ids: np.ndarray, rng: np.random.Generator) -> Plan:
        """Greedy, in order of first need: query a row unless already covered, if its table
        still has budget; pad every table's queries with random dummies."""
        slots: list[list[int]] = [[] for _ in self.members]
        wanted: list[list[int]] = [[] for _ in self.members]
        covered: set[int] = set()
        for i in dict.fromkeys(int(x) for x in np.asarray(ids).reshape(-1)):
            if i in covered:
                continue
            t = self.table_of[i]
            if len(slots[t]) < self.budget[t]:
                slots[t].append(int(self.local[i]))
                wanted[t].append(i)
                covered.add(i)
                if self.design.colocate:
                    covered.add(int(self.successor[i]))
        queries, want = [], []
        for t, rows in enumerate(self.members):
            pad = self.budget[t] - len(slots[t])
            dummies = rng.integers(0, rows.size, pad)
            queries.append(np.concatenate([np.array(slots[t], np.int64), dummies]))
            want.append(np.concatenate([np.array(wanted[t], np.int64), np.full(pad, -1)]))
        return Plan(queries, want, np.fromiter(covered, np.int64, len(covered)))

    def cost_rows(self) -> int:
        """Table rows each server scans per inference (queries x rows, summed over tables)."""
        return sum(b * rows.size for b, rows in zip(self.budget, self.members, strict=True))


def serve_pair(tables: list[np.ndarray]) -> tuple[list[PIRServer], list[PIRServer]]:
    """Both parties' servers for every table of a layout (sharing one buffer per party where
    they can, so that a party answers all bins of a batch in one call)."""
    return PIRServer.many(tables, 0), PIRServer.many(tables, 1)


def fetch(
    layout: Layout, plans: list[Plan], servers: tuple[list[PIRServer], list[PIRServer]]
) -> dict[int, np.ndarray]:
    """Run a batch of plans through real PIR (each party answers all tables in one
    `answer_many` call, each table one pass for the whole batch) and return global id -> row
    for every row the plans cover."""
    out: dict[int, np.ndarray] = {}
    half = layout.design.colocate
    idx = [np.concatenate([p.queries[t] for p in plans]) for t in range(len(servers[0]))]
    used = [t for t, i in enumerate(idx) if i.size]
    keys = [query(idx[t], servers[0][t].spec.num_rows) for t in used]
    answers = [
        answer_many([servers[party][t] for t in used], [k[party] for k in keys]) for party in (0, 1)
    ]
    for t, a, b in zip(used, *answers, strict=True):
        rows = reconstruct(a, b, servers[0][t].spec)
        ids = np.concatenate([p.wanted[t] for p in plans])
        for i, row in zip(ids, rows, strict=True):
            if i < 0:
                continue
            if half:
                first, second = np.split(row, 2)
                out[int(i)], out[int(layout.successor[i])] = first, second
            else:
                out[int(i)] = row
    return out
