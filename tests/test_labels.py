"""One label-identity rule on every path (README, "Choices the contract left open").

Two labels name the same group (or trajectory) when they are equal values of the same kind:
numbers compare as numbers (``1 == 1.0 == True``, ``0.0 == -0.0``, integers exactly), a
number never equals a string, ``bytes`` never equal ``str``. NaN, infinite and null labels
are errors naming the column and the row. The same table of cases runs through
``estimate`` (every backend; host labels), torch tensor labels, Arrow tables and the
streamed reader.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mica_core as mc
from mica_core.stream import iter_advantages

# Four trajectories of two turns; distances differ so that every partition into groups gives
# different mica_group advantages.
OFFSETS = [0, 2, 4, 6, 8]
DISTANCE = [4.0, 3.0, 5.0, 1.5, 2.0, 2.5, 6.0, 0.5]
INITIAL = [5.0, 5.5, 3.0, 7.0]

SAME = [  # (what, labels, groups by first appearance)
    ("1 and 1.0 are one number", [1, 1.0, 2, 2], [0, 0, 1, 1]),
    ("0.0 and -0.0 are one number", [0.0, -0.0, 1.5, 1.5], [0, 0, 1, 1]),
    ("True is the number 1", [True, 1, 0, False], [0, 0, 1, 1]),
    ("numpy and Python numbers", [np.int64(3), 3, np.float32(0.5), 0.5], [0, 0, 1, 1]),
    ("a number is never a string", [1, "1", 2, 2], [0, 1, 2, 2]),
    ("bytes are never str", [b"a", "a", "b", "b"], [0, 1, 2, 2]),
    ("integers compare exactly", [2**53 + 1, float(2**53), 7, 7], [0, 1, 2, 2]),
    ("strings", ["x", "y", "x", "y"], [0, 1, 0, 1]),
    ("small integer codes", [3, 0, 3, 0], [0, 1, 0, 1]),
]
BAD = [  # (what, labels, first bad row, a word of the message)
    ("NaN", [1.0, math.nan, 2.0, 2.0], 1, "NaN"),
    ("NaN among strings", ["a", "b", math.nan, "b"], 2, "NaN"),
    ("infinity", [1.0, 1.0, 2.0, math.inf], 3, "infinite"),
    ("None", ["a", None, "b", "b"], 1, "null"),
]


def by_codes(codes, backend=None):
    run = backend.estimate if backend is not None else mc.estimate
    return run(np.array(OFFSETS), np.array(codes), distance=np.array(DISTANCE),
               initial_distance=np.array(INITIAL), estimator="mica_group").advantage


@pytest.mark.parametrize("what, labels, groups", SAME, ids=[c[0] for c in SAME])
def test_estimate_groups_equal_labels(backend, what, labels, groups):
    got = backend.estimate(np.array(OFFSETS), labels, distance=np.array(DISTANCE),
                           initial_distance=np.array(INITIAL), estimator="mica_group")
    np.testing.assert_array_equal(got.advantage, by_codes(groups, backend))


@pytest.mark.parametrize("what, labels, row, word", BAD, ids=[c[0] for c in BAD])
def test_estimate_rejects_bad_labels(backend, what, labels, row, word):
    with pytest.raises(mc.MicaInputError) as info:
        backend.estimate(np.array(OFFSETS), labels, distance=np.array(DISTANCE),
                         initial_distance=np.array(INITIAL))
    assert info.value.column == "group" and info.value.row == row, str(info.value)
    assert word in str(info.value)


def _numeric(labels):
    """The labels as float64 when that loses nothing (a tensor or an Arrow float column)."""
    if not all(isinstance(v, (int, float, np.number)) for v in labels):
        return None
    values = [float(v) for v in labels]
    return values if all(a == b for a, b in zip(values, labels)) else None


# tensors hold numbers only: the cases whose labels are exact as float64
NUMERIC = [c for c in SAME if _numeric(c[1]) is not None]


@pytest.mark.parametrize("what, labels, groups", NUMERIC, ids=[c[0] for c in NUMERIC])
def test_torch_tensor_labels(what, labels, groups):
    torch = pytest.importorskip("torch")
    values = _numeric(labels)
    f64 = torch.float64
    got = mc.estimate(torch.tensor(OFFSETS), torch.tensor(values, dtype=f64),
                      distance=torch.tensor(DISTANCE, dtype=f64),
                      initial_distance=torch.tensor(INITIAL, dtype=f64), estimator="mica_group")
    np.testing.assert_array_equal(got.advantage.numpy(), by_codes(groups))


def test_torch_tensor_labels_reject_nan():
    torch = pytest.importorskip("torch")
    with pytest.raises(mc.MicaInputError) as info:
        mc.estimate(torch.tensor(OFFSETS), torch.tensor([1.0, 2.0, math.nan, 1.0]),
                    distance=torch.tensor(DISTANCE), initial_distance=torch.tensor(INITIAL))
    assert info.value.column == "group" and info.value.row == 2


# --------------------------------------------------------------------------- tables


def long_table(group_column):
    """One row per turn, the group label of trajectory i on its rows."""
    lengths = np.diff(OFFSETS)
    traj = np.repeat(np.arange(len(lengths)), lengths)
    return pa.table({"group_id": group_column.take(pa.array(traj)), "traj_id": traj,
                     "turn": np.arange(len(traj)) - np.repeat(OFFSETS[:-1], lengths),
                     "distance": DISTANCE, "initial_distance": np.repeat(INITIAL, lengths)})


def arrow_columns(labels):
    """The Arrow columns that hold these labels exactly (one type per column)."""
    cols = []
    values = _numeric(labels)
    if values is not None:
        cols += [pa.array(values, pa.float64()), pa.array(values, pa.float32()),
                 pa.array(values, pa.float64()).dictionary_encode()]
        if all(float(v).is_integer() for v in values):
            cols.append(pa.array([int(v) for v in labels], pa.int64()))
    elif all(isinstance(v, str) for v in labels):
        cols += [pa.array(labels), pa.array(labels, pa.large_string())]
    return cols


TABLE_CASES = [(what, col, groups) for what, labels, groups in SAME
               for col in arrow_columns(labels)]


@pytest.mark.parametrize("what, column, groups", TABLE_CASES,
                         ids=[f"{c[0]} ({c[1].type})" for c in TABLE_CASES])
def test_tables_group_equal_labels(tmp_path, what, column, groups):
    table = long_table(column)
    want = by_codes(groups)
    got = mc.compute_advantages(table, "mica_group")["advantage"].to_numpy()
    np.testing.assert_array_equal(got, want)
    if groups != sorted(groups):
        return  # not stored group by group: the streamed reader refuses it (test_stream)
    path = tmp_path / "in.parquet"
    pq.write_table(table, path)
    for batch_rows in (1, 1000):  # streamed: one chunk per group, or one chunk in all
        chunks = list(iter_advantages(path, "mica_group", batch_rows=batch_rows))
        streamed = pa.concat_tables(chunks)["advantage"].to_numpy()
        np.testing.assert_array_equal(streamed, want)


TABLE_BAD = [c for c in BAD if c[0] != "NaN among strings"]  # a column holds one type


@pytest.mark.parametrize("what, labels, row, word", TABLE_BAD, ids=[c[0] for c in TABLE_BAD])
def test_tables_reject_bad_labels(tmp_path, what, labels, row, word):
    values = _numeric(labels)
    column = pa.array(values if values is not None else labels)
    table = long_table(column)
    bad_row = OFFSETS[row]  # the first row of the trajectory with the bad label
    with pytest.raises(mc.MicaInputError) as info:
        mc.compute_advantages(table)
    assert info.value.column == "group_id" and info.value.row == bad_row, str(info.value)
    assert word in str(info.value)
    path = tmp_path / "in.parquet"
    pq.write_table(table, path)
    for batch_rows in (1, 1000):
        with pytest.raises(mc.MicaInputError) as info:
            list(iter_advantages(path, batch_rows=batch_rows))
        assert info.value.column == "group_id" and info.value.row == bad_row, str(info.value)


def test_streamed_zero_signs_are_one_group_stored_together(tmp_path):
    """0.0, 1.0, -0.0: the group 0.0 comes back after another group (not two groups)."""
    table = long_table(pa.array([0.0, 1.0, -0.0, 2.0]))
    path = tmp_path / "in.parquet"
    pq.write_table(table, path)
    with pytest.raises(mc.MicaInputError, match="stored together") as info:
        list(iter_advantages(path, batch_rows=1))
    assert info.value.row == OFFSETS[2]


def test_trajectory_ids_follow_the_same_rule():
    """Rows with traj_id 0.0 and -0.0 are one trajectory (turns 0 and 1 of it); a NaN
    trajectory id is an error naming its row."""
    table = pa.table({"group_id": ["g", "g", "g"], "traj_id": [0.0, -0.0, 1.0],
                      "turn": [0, 1, 0], "distance": [1.0, 2.0, 3.0],
                      "initial_distance": [4.0, 4.0, 4.0]})
    got = mc.compute_advantages(table, "mica_turn")
    want = mc.estimate([0, 2, 3], ["g", "g"], distance=[1.0, 2.0, 3.0],
                       initial_distance=[4.0, 4.0], estimator="mica_turn")
    np.testing.assert_array_equal(got["advantage"].to_numpy(), want.advantage)
    bad = table.set_column(1, "traj_id", pa.array([0.0, math.nan, 1.0]))
    with pytest.raises(mc.MicaInputError) as info:
        mc.compute_advantages(bad)
    assert info.value.column == "traj_id" and info.value.row == 1


# --------------------------------------------------------------------------- missing values


def _missing_values():
    pd = pytest.importorskip("pandas")
    return [("pandas.NA", pd.NA), ("pandas.NaT", pd.NaT),
            ("numpy.datetime64('NaT')", np.datetime64("NaT")),
            ("numpy.timedelta64('NaT')", np.timedelta64("NaT"))]


@pytest.mark.parametrize("which", range(4))
def test_missing_values_of_any_library_are_null_labels(backend, which):
    """A table holds pandas.NA or NaT as a null: estimate refuses them as tables do."""
    what, missing = _missing_values()[which]
    for labels, row in ((["a", missing, "b", "b"], 1), ([missing, 1, 2, 2], 0)):
        with pytest.raises(mc.MicaInputError) as info:
            backend.estimate(np.array(OFFSETS), labels, distance=np.array(DISTANCE),
                             initial_distance=np.array(INITIAL))
        assert (info.value.column, info.value.row, info.value.rule) == ("group", row, "no nulls")
    key = ["k"] * len(DISTANCE)
    key[5] = missing
    with pytest.raises(mc.MicaInputError) as info:
        mc.estimate(np.array(OFFSETS), [0, 0, 1, 1], distance=np.array(DISTANCE),
                    initial_distance=np.array(INITIAL), estimator="gigpo", key=key)
    assert (info.value.column, info.value.row, info.value.rule) == ("key", 5, "no nulls")


def test_nat_in_datetime_labels_and_pandas_tables():
    dates = np.array(["2024-01-01", "NaT", "2024-01-02", "2024-01-02"], dtype="datetime64[D]")
    with pytest.raises(mc.MicaInputError) as info:
        mc.estimate(np.array(OFFSETS), dates, distance=np.array(DISTANCE),
                    initial_distance=np.array(INITIAL))
    assert (info.value.column, info.value.row) == ("group", 1)
    ok = mc.estimate(np.array(OFFSETS), dates[[0, 0, 2, 3]], distance=np.array(DISTANCE),
                     initial_distance=np.array(INITIAL), estimator="mica_group")
    np.testing.assert_array_equal(ok.advantage, by_codes([0, 0, 1, 1]))
    pd = pytest.importorskip("pandas")
    frame = long_table(pa.array(["a", "b", "c", "d"])).to_pandas()
    frame["group_id"] = pd.array(["a", "a", pd.NA, pd.NA, "b", "b", "b", "b"], dtype="string")
    with pytest.raises(mc.MicaInputError) as info:
        mc.compute_advantages(frame)
    assert (info.value.column, info.value.row) == ("group_id", 2)


def test_a_masked_entry_is_a_null_label():
    labels = np.ma.masked_array([7, 7, 8, 8], mask=[False, False, True, False])
    with pytest.raises(mc.MicaInputError) as info:
        mc.estimate(np.array(OFFSETS), labels, distance=np.array(DISTANCE),
                    initial_distance=np.array(INITIAL))
    assert (info.value.column, info.value.row, info.value.rule) == ("group", 2, "no nulls")
    unmasked = np.ma.masked_array([7, 7, 8, 8], mask=False)
    got = mc.estimate(np.array(OFFSETS), unmasked, distance=np.array(DISTANCE),
                      initial_distance=np.array(INITIAL), estimator="mica_group")
    np.testing.assert_array_equal(got.advantage, by_codes([0, 0, 1, 1]))
    key = np.ma.masked_array(np.zeros(len(DISTANCE), dtype=np.int64), mask=False)
    key.mask = np.arange(len(DISTANCE)) == 3
    with pytest.raises(mc.MicaInputError) as info:
        mc.estimate(np.array(OFFSETS), [0, 0, 1, 1], distance=np.array(DISTANCE),
                    initial_distance=np.array(INITIAL), estimator="gigpo", key=key)
    assert (info.value.column, info.value.row) == ("key", 3)


def test_a_bad_key_in_a_nested_table_names_the_table_row():
    """keys is a list column: the error names the row (trajectory) that holds the element,
    not the element's position among all lists."""
    table = pa.table({"group_id": [0, 0, 1], "distances": [[2.0, 1.0], [3.0], [1.0, 0.5, 0.2]],
                      "initial_distance": [3.0, 3.0, 2.0],
                      "keys": [[1.0, 2.0], [1.0], [2.0, math.nan, 1.0]]})
    with pytest.raises(mc.MicaInputError) as info:
        mc.compute_advantages(table, "gigpo")
    assert (info.value.column, info.value.row) == ("keys", 2), str(info.value)
    assert "row 2" in str(info.value) and "row 4" not in str(info.value)


def test_a_pandas_column_mixing_numbers_and_text_is_one_line():
    pd = pytest.importorskip("pandas")
    frame = long_table(pa.array(["a", "b", "c", "d"])).to_pandas()
    frame["key"] = pd.Series([1, 1, 2, "1", 1, 2, 2, 1], dtype=object)
    with pytest.raises(mc.MicaInputError) as info:
        mc.compute_advantages(frame, "gigpo")
    err = info.value
    assert (err.column, err.row, err.rule) == ("key", 3, "one type per column"), str(err)
    assert "int and str" in str(err) and len(str(err).splitlines()) == 1


def test_meta_device_tensors_are_refused_by_name():
    torch = pytest.importorskip("torch")
    offsets = torch.tensor(OFFSETS)
    distance = torch.tensor(DISTANCE)
    for name, kwargs in (
            ("distance", dict(distance=distance.to("meta"), initial_distance=torch.tensor(INITIAL))),
            ("initial_distance", dict(distance=distance,
                                      initial_distance=torch.tensor(INITIAL, device="meta"))),
            ("offsets", dict(distance=distance, initial_distance=torch.tensor(INITIAL),
                             offsets=offsets.to("meta"))),
            ("group", dict(distance=distance, initial_distance=torch.tensor(INITIAL),
                           group=torch.zeros(4, dtype=torch.int64, device="meta")))):
        args = dict(offsets=offsets, group=torch.tensor([0, 0, 1, 1]))
        args.update(kwargs)
        with pytest.raises(mc.MicaInputError) as info:
            mc.estimate(args.pop("offsets"), args.pop("group"), **args)
        assert (info.value.column, info.value.rule) == (name, "device"), str(info.value)


@pytest.mark.parametrize("threads", [2**31, 2**63 + 1])
def test_huge_thread_counts_are_capped_not_overflowed(threads):
    from mica_core.api import run_plan
    from mica_core.estimators import resolve
    from mica_core.validate import make_ragged

    plan = resolve("mica", reward_given=False)
    ragged = make_ragged(np.array(OFFSETS), np.array([0, 0, 1, 1]))
    want = mc.estimate(np.array(OFFSETS), [0, 0, 1, 1], distance=np.array(DISTANCE),
                       initial_distance=np.array(INITIAL), backend="numpy")
    got = run_plan(plan, ragged, np.array(DISTANCE), np.array(INITIAL), None, "cython",
                   num_threads=threads)
    np.testing.assert_allclose(got[2], want.advantage, rtol=1e-12)


@pytest.mark.parametrize("threads", [0, -1, 2.5, True, "4"])
def test_thread_counts_must_be_integers_of_at_least_one(threads):
    from mica_core.api import run_plan
    from mica_core.estimators import resolve
    from mica_core.validate import make_ragged

    plan = resolve("mica", reward_given=False)
    ragged = make_ragged(np.array(OFFSETS), np.array([0, 0, 1, 1]))
    with pytest.raises(mc.MicaInputError) as info:
        run_plan(plan, ragged, np.array(DISTANCE), np.array(INITIAL), None, "cython",
                 num_threads=threads)
    assert info.value.column == "num_threads"
