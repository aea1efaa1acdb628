"""Streaming advantages over Parquet datasets (mica_core.stream)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import mica_core as mc
from mica_core.stream import iter_advantages, write_advantages
from mica_core.validate import GROUPED_RULE

OUTPUTS = ("reward", "return", "advantage")


def long_table(n_groups=40, per=4, seed=0, shuffle_within_group=False):
    rng = np.random.default_rng(seed)
    rows = []
    traj = 0
    for g in range(n_groups):
        group_rows = []
        for _ in range(per):
            length = int(rng.integers(1, 9))
            d0 = float(rng.uniform(3, 5))
            for t in range(length):
                group_rows.append((g, traj, t, float(rng.uniform(0, 5)), d0))
            traj += 1
        if shuffle_within_group:
            group_rows = [group_rows[i] for i in rng.permutation(len(group_rows))]
        rows.extend(group_rows)
    cols = list(zip(*rows))
    return pa.table({"group_id": pa.array(cols[0], pa.int64()),
                     "traj_id": pa.array(cols[1], pa.int64()),
                     "turn": pa.array(cols[2], pa.int64()),
                     "distance": pa.array(cols[3], pa.float64()),
                     "initial_distance": pa.array(cols[4], pa.float64())})


def assert_same(got: pa.Table, want: pa.Table):
    assert got.num_rows == want.num_rows
    assert got.column_names == want.column_names
    for name in want.column_names:
        a, b = got.column(name).to_numpy(), want.column(name).to_numpy()
        if name in OUTPUTS:
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
        else:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("batch_rows", [1, 37, 10_000])
def test_chunks_equal_the_whole_table(tmp_path, batch_rows, shuffle):
    table = long_table(shuffle_within_group=shuffle)
    path = tmp_path / "data.parquet"
    pq.write_table(table, path, row_group_size=50)
    chunks = list(iter_advantages(path, batch_rows=batch_rows))
    assert_same(pa.concat_tables(chunks), mc.compute_advantages(table))
    if batch_rows == 1:
        assert len(chunks) == 40  # one chunk per group


def test_string_ids_and_several_files(tmp_path):
    table = long_table(n_groups=30)
    labels = pa.array([f"uid-{g:03d}" for g in table.column("group_id").to_pylist()])
    table = table.set_column(0, "group_id", labels)
    files = []
    for k, (lo, hi) in enumerate([(0, 100), (100, 250), (250, table.num_rows)]):
        files.append(str(tmp_path / f"part-{k}.parquet"))
        pq.write_table(table.slice(lo, hi - lo), files[-1], row_group_size=40)
    want = mc.compute_advantages(table)
    assert_same(pa.concat_tables(list(iter_advantages(files, batch_rows=60))), want)
    assert_same(pa.concat_tables(list(iter_advantages(str(tmp_path), batch_rows=60))), want)
    dataset = ds.dataset(files, format="parquet")
    assert_same(pa.concat_tables(list(iter_advantages(dataset, batch_rows=60))), want)


def test_options_are_passed_through(tmp_path):
    table = long_table()
    path = tmp_path / "data.parquet"
    pq.write_table(table, path)
    opts = {"gamma": 0.5, "baseline": "loo", "singleton": "raw", "backend": "cython"}
    got = pa.concat_tables(list(iter_advantages(path, "mica_turn", batch_rows=30, **opts)))
    assert_same(got, mc.compute_advantages(table, "mica_turn", **opts))


def _split_group(table, group, cut):
    """The rows with the first ``cut`` rows of ``group`` moved to the front."""
    g = table.column("group_id").to_numpy()
    rows = np.flatnonzero(g == group)
    order = np.concatenate([rows[:cut], np.flatnonzero(g != group), rows[cut:]])
    return table.take(order), len(np.flatnonzero(g != group)) + cut


@pytest.mark.parametrize("row_group_size", [10_000, 17])
def test_group_stored_in_two_places_is_an_error(tmp_path, row_group_size):
    table, second_run = _split_group(long_table(), group=5, cut=3)
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path, row_group_size=row_group_size)
    with pytest.raises(mc.MicaInputError) as info:
        list(iter_advantages(path, batch_rows=25))
    err = info.value
    assert err.column == "group_id" and err.rule == GROUPED_RULE
    assert err.row == second_run
    assert "stored together" in str(err) and "group 5" in str(err)


def test_group_coming_back_right_after_another_is_an_error(tmp_path):
    table = long_table(n_groups=3)
    g = table.column("group_id").to_numpy()
    order = np.concatenate([np.flatnonzero(g == 0)[:2], np.flatnonzero(g == 1),
                            np.flatnonzero(g == 0)[2:], np.flatnonzero(g == 2)])
    path = tmp_path / "bad.parquet"
    pq.write_table(table.take(order), path, row_group_size=3)
    with pytest.raises(mc.MicaInputError, match="stored together") as info:
        list(iter_advantages(path, batch_rows=1000))
    assert info.value.row == 2 + int((g == 1).sum())


def test_errors_name_rows_of_the_whole_dataset(tmp_path):
    table = long_table()
    bad_row = table.num_rows - 7
    dist = table.column("distance").to_numpy().copy()
    dist[bad_row] = -1.0
    table = table.set_column(3, "distance", pa.array(dist))
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path, row_group_size=30)
    with pytest.raises(mc.MicaInputError) as whole:
        mc.compute_advantages(table)
    with pytest.raises(mc.MicaInputError) as streamed:
        list(iter_advantages(path, batch_rows=40))
    assert streamed.value.row == whole.value.row == bad_row
    assert str(streamed.value) == str(whole.value)


def test_batch_scope_warns_when_chunked(tmp_path):
    table = long_table()
    path = tmp_path / "data.parquet"
    pq.write_table(table, path)
    with pytest.warns(UserWarning, match="batch-scope"):
        list(iter_advantages(path, "mapo", batch_rows=50))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = pa.concat_tables(list(iter_advantages(path, "mapo", batch_rows=10**6)))
    assert_same(one, mc.compute_advantages(table, "mapo"))


def test_chunk_sizes_stay_bounded(tmp_path):
    table = long_table(n_groups=200)
    path = tmp_path / "data.parquet"
    pq.write_table(table, path, row_group_size=64)
    sizes = [t.num_rows for t in iter_advantages(path, batch_rows=100)]
    largest_group = max(np.bincount(table.column("group_id").to_numpy()))
    assert sum(sizes) == table.num_rows
    assert max(sizes) <= 100 + 64 + largest_group


# --------------------------------------------------------------------------- writing


def test_write_advantages_round_trip(tmp_path):
    table = long_table()
    src, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(table, src, row_group_size=40)
    assert write_advantages(src, out, batch_rows=45) == table.num_rows
    assert_same(pq.read_table(out), mc.compute_advantages(table))
    assert [p for p in os.listdir(tmp_path) if p.startswith(".mica-")] == []


def test_write_advantages_never_overwrites_unless_asked(tmp_path):
    table = long_table()
    src, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(table, src)
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_advantages(src, out)
    assert out.read_bytes() == b"keep me"
    write_advantages(src, out, overwrite=True)
    assert pq.read_table(out).num_rows == table.num_rows


def test_failed_write_leaves_nothing(tmp_path):
    table, _ = _split_group(long_table(), group=9, cut=1)
    src, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(table, src, row_group_size=20)
    with pytest.raises(mc.MicaInputError):
        write_advantages(src, out, batch_rows=30)
    assert sorted(os.listdir(tmp_path)) == ["in.parquet"]


def test_empty_dataset_writes_an_empty_file(tmp_path):
    table = long_table().slice(0, 0)
    src, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(table, src)
    assert write_advantages(src, out) == 0
    got = pq.read_table(out)
    assert got.num_rows == 0
    assert got.column_names == table.column_names + list(OUTPUTS)


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(iter_advantages(tmp_path / "missing.parquet"))
    path = tmp_path / "data.parquet"
    pq.write_table(long_table().drop_columns(["group_id"]), path)
    with pytest.raises(mc.MicaInputError, match="missing"):
        list(iter_advantages(path))
    with pytest.raises(ValueError, match="batch_rows"):
        list(iter_advantages(path, batch_rows=0))


def test_value_source_option_reaches_compute_advantages(tmp_path):
    """``source=`` among the options picks the value column (the dataset is positional)."""
    table = long_table()
    table = table.append_column("reward", pa.array(np.linspace(-1, 1, table.num_rows)))
    path = tmp_path / "data.parquet"
    pq.write_table(table, path)
    got = pa.concat_tables(list(iter_advantages(path, "mica_group", source="reward",
                                                batch_rows=40)))
    assert_same(got, mc.compute_advantages(table, "mica_group", source="reward"))


def _per_group_trajectory_ids(table):
    """The same table with trajectories numbered 0, 1, ... within each group (ids reused)."""
    groups = table.column("group_id").to_numpy()
    traj = table.column("traj_id").to_numpy()
    local = np.empty_like(traj)
    for g in np.unique(groups):
        rows = groups == g
        _, local[rows] = np.unique(traj[rows], return_inverse=True)
    return table.set_column(1, "traj_id", pa.array(local))


@pytest.mark.parametrize("batch_rows", [1, 7, 37, 10_000])
def test_trajectory_ids_reused_across_groups_are_an_error_at_any_chunk_size(tmp_path,
                                                                             batch_rows):
    """Validity does not depend on the chunk size: a trajectory id used in two groups is
    refused whether the groups fall in one chunk or in two."""
    table = _per_group_trajectory_ids(long_table(n_groups=6))
    path = tmp_path / "reused.parquet"
    pq.write_table(table, path, row_group_size=16)
    with pytest.raises(mc.MicaInputError) as whole:
        mc.compute_advantages(table)
    with pytest.raises(mc.MicaInputError) as streamed:
        list(iter_advantages(path, batch_rows=batch_rows))
    for err in (whole.value, streamed.value):
        assert err.rule == "one group per trajectory" and err.column == "group_id", str(err)
    # The first row of group 1 reuses trajectory id 0 of group 0.
    first_of_group_1 = int(np.flatnonzero(table.column("group_id").to_numpy() == 1)[0])
    assert streamed.value.row == first_of_group_1
    assert whole.value.row == first_of_group_1
