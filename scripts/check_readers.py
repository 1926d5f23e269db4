#!/usr/bin/env python3
"""Opens magpie output folders the way users do, in pandas, pyarrow, polars, duckdb and HF datasets.

    scripts/check_readers.py DIR [DIR...]

A magpie folder is `part-NNNNN.parquet` files plus hidden bookkeeping (`.magpie-manifest.json`,
`.magpie-run.json`, `.*.magpie-tmp-*` temporaries). Each reader below is called exactly as the
docs tell users to write it, and must give the rows and column names that pyarrow reads from the
part files themselves. Exits 1 naming the library and the folder on any failure.
"""
import glob
import os
import sys
import tempfile

# HF datasets: no hub, and a scratch cache (removed at exit) so that every run reads the folder afresh.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
hf_cache = tempfile.TemporaryDirectory(prefix="check-readers-hf-")
os.environ.setdefault("HF_DATASETS_CACHE", hf_cache.name)

import datasets
import duckdb
import pandas as pd
import polars as pl
import pyarrow.parquet as pq

datasets.disable_progress_bars()
datasets.logging.set_verbosity_error()


def pandas_(d):
    df = pd.read_parquet(d)
    return len(df), list(df.columns)


def pyarrow_(d):
    table = pq.read_table(d)
    return table.num_rows, table.column_names


def polars_(d):
    # polars opens a folder only if every file in it, hidden ones too, is parquet: use a glob.
    df = pl.read_parquet(f"{d}/*.parquet")
    return df.height, df.columns


def duckdb_(d):
    rel = duckdb.sql(f"select * from '{d}/*.parquet'")
    return len(rel.fetchall()), rel.columns


def datasets_parquet(d):
    ds = datasets.load_dataset("parquet", data_dir=d, split="train")
    return ds.num_rows, ds.column_names


def datasets_folder(d):
    ds = datasets.load_dataset(d, split="train")
    return ds.num_rows, ds.column_names


READERS = {
    "pandas: pd.read_parquet(dir)": pandas_,
    "pyarrow: pq.read_table(dir)": pyarrow_,
    "polars: pl.read_parquet(f'{dir}/*.parquet')": polars_,
    "duckdb: duckdb.sql(\"select * from '{dir}/*.parquet'\")": duckdb_,
    "datasets: load_dataset('parquet', data_dir=dir)": datasets_parquet,
    "datasets: load_dataset(dir)": datasets_folder,
}


def check(d):
    """The failures for folder `d`, one message each."""
    parts = sorted(glob.glob(os.path.join(d, "part-*.parquet")))
    if not parts:
        return [f"{d}: no part-*.parquet files"]
    want = (sum(pq.ParquetFile(p).metadata.num_rows for p in parts), pq.read_schema(parts[0]).names)
    failures = []
    for name, read in READERS.items():
        try:
            rows, columns = read(d)
        except Exception as e:
            failures.append(f"{name} cannot open {d}: {type(e).__name__}: {e}")
            continue
        if rows != want[0]:
            failures.append(f"{name} read {rows} rows from {d}; its parts hold {want[0]}")
        if list(columns) != want[1]:
            failures.append(f"{name} read columns {list(columns)} from {d}; its parts hold {want[1]}")
    if not failures:
        print(f"ok {d}: {want[0]} rows, {len(want[1])} columns, {len(parts)} part(s), {len(READERS)} readers")
    return failures


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    failures = [f for d in sys.argv[1:] for f in check(d.rstrip("/"))]
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    sys.exit(1 if failures else 0)
