"""Arrow long and nested forms, every container the README names, real Parquet files."""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import mica_core as mc

from naive import naive_estimate


def batch(seed=0, n_groups=5, per_group=4, max_len=6):
    rng = np.random.default_rng(seed)
    trajs, rows = [], []
    tid = 0
    for g in range(n_groups):
        d0 = float(rng.uniform(5, 15))
        for _ in range(per_group):
            T = int(rng.integers(1, max_len + 1))
            ds = [float(x) for x in np.round(rng.uniform(0, 15, size=T), 3)]
            trajs.append({"group": f"scenario-{g}", "distances": ds, "initial_distance": d0,
                          "traj": f"t{tid:03d}"})
            for t, d in enumerate(ds):
                rows.append({"group_id": f"scenario-{g}", "traj_id": f"t{tid:03d}", "turn": t,
                             "distance": d, "initial_distance": d0})
            tid += 1
    return trajs, rows


def expected_rows(trajs, rows, name="mica", **opts):
    want = naive_estimate(trajs, name, **opts)
    by_key = {}
    for tr, res in zip(trajs, want):
        for t, (r, G, a) in enumerate(res):
            by_key[(tr["traj"], t)] = (r, G, a)
    return np.array([by_key[(row["traj_id"], row["turn"])] for row in rows])


def check(out, trajs, rows, name="mica", **opts):
    exp = expected_rows(trajs, rows, name, **opts)
    for k, col in enumerate(("reward", "return", "advantage")):
        got = np.asarray(out[col].to_numpy() if hasattr(out[col], "to_numpy") else out[col])
        np.testing.assert_allclose(got, exp[:, k], atol=1e-12)


@pytest.mark.parametrize("name", mc.list_estimators()[:8])
def test_long_form_shuffled_keeps_input_order(name):
    trajs, rows = batch()
    perm = np.random.default_rng(3).permutation(len(rows))
    rows = [rows[k] for k in perm]
    out = mc.compute_advantages(pa.Table.from_pylist(rows), name)
    assert out["traj_id"].to_pylist() == [r["traj_id"] for r in rows]
    assert out.schema.field("advantage").type == pa.float64()
    check(out, trajs, rows, name)


def test_chunked_dictionary_and_integer_ids():
    trajs, rows = batch(1)
    table = pa.Table.from_pylist(rows)
    table = table.set_column(0, "group_id", pc.dictionary_encode(table["group_id"]))
    ids = pa.array([int(r["traj_id"][1:]) for r in rows], type=pa.int32())
    table = table.set_column(1, "traj_id", ids)
    chunked = pa.Table.from_batches(table.to_batches(max_chunksize=7))
    assert chunked["distance"].num_chunks > 1
    out = mc.compute_advantages(chunked)
    check(out, trajs, rows)


def test_record_batch_and_mapping_inputs():
    trajs, rows = batch(2)
    table = pa.Table.from_pylist(rows)
    check(mc.compute_advantages(table.to_batches()[0]), trajs, rows)
    check(mc.compute_advantages(table.to_pydict()), trajs, rows)


def test_state_columns_give_hinge_distances():
    rng = np.random.default_rng(4)
    rows, trajs = [], []
    for i in range(6):
        s0 = [int(x) for x in rng.integers(-12, 0, size=3)]
        states = [[int(x) for x in rng.integers(-12, 3, size=3)] for _ in range(3)]
        trajs.append({"group": i % 2, "traj": f"t{i}",
                      "distances": [mc.distance_from_state(s) for s in states],
                      "initial_distance": mc.distance_from_state(s0)})
        for t, s in enumerate(states):
            rows.append({"group_id": i % 2, "traj_id": f"t{i}", "turn": t,
                         "state": [float(x) for x in s], "initial_state": [float(x) for x in s0]})
    schema = pa.schema([("group_id", pa.int64()), ("traj_id", pa.string()), ("turn", pa.int64()),
                        ("state", pa.list_(pa.float64(), 3)),
                        ("initial_state", pa.list_(pa.float64(), 3))])
    out = mc.compute_advantages(pa.Table.from_pylist(rows, schema=schema))
    check(out, trajs, rows)


def test_reward_column_and_column_overrides():
    trajs, rows = batch(5)
    table = pa.Table.from_pylist(rows)
    ref = mc.compute_advantages(table)
    renamed = pa.table({"uid": table["group_id"], "episode": table["traj_id"],
                        "step": table["turn"], "r": ref["reward"]})
    out = mc.compute_advantages(renamed, columns={"group": "uid", "traj": "episode",
                                                  "turn": "step", "reward": "r"})
    np.testing.assert_allclose(out["advantage"].to_numpy(), ref["advantage"].to_numpy(),
                               atol=1e-12)
    assert out.column_names == ["uid", "episode", "step", "r", "reward", "return", "advantage"]


def _nested(trajs, list_type=pa.list_):
    return pa.table({
        "group_id": [t["group"] for t in trajs],
        "distances": pa.array([t["distances"] for t in trajs], type=list_type(pa.float64())),
        "initial_distance": [t["initial_distance"] for t in trajs],
    })


@pytest.mark.parametrize("list_type", [pa.list_, pa.large_list])
def test_nested_form(list_type):
    trajs, _ = batch(6)
    out = mc.compute_advantages(_nested(trajs, list_type), "mapo")
    want = naive_estimate(trajs, "mapo")
    got = out["advantage"].to_pylist()
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, [x[2] for x in w], atol=1e-12)
    assert out.num_rows == len(trajs)


def test_nested_form_sliced_list_array():
    trajs, _ = batch(7)
    table = _nested(trajs)
    sliced = table.slice(3, 9)  # offsets point into the unsliced values
    assert sliced["distances"].chunk(0).offset == 3
    out = mc.compute_advantages(sliced)
    want = naive_estimate(trajs[3:12])
    for g, w in zip(out["advantage"].to_pylist(), want):
        np.testing.assert_allclose(g, [x[2] for x in w], atol=1e-12)


def test_pandas_polars_and_datasets_round_trip():
    pd = pytest.importorskip("pandas")
    pl = pytest.importorskip("polars")
    datasets = pytest.importorskip("datasets")
    trajs, rows = batch(8)
    df = pd.DataFrame(rows).sample(frac=1.0, random_state=0)
    out = mc.compute_advantages(df)
    assert isinstance(out, pd.DataFrame) and list(out.index) == list(df.index)
    check(out, trajs, df.to_dict("records"))
    pdf = pl.DataFrame(rows)
    out = mc.compute_advantages(pdf)
    assert isinstance(out, pl.DataFrame)
    check(out, trajs, rows)
    ds = datasets.Dataset.from_list(rows).shuffle(seed=0)
    out = mc.compute_advantages(ds)
    assert isinstance(out, datasets.Dataset)
    check(out.with_format("numpy"), trajs, ds.to_list())


def test_parquet_file_round_trip(tmp_path):
    trajs, rows = batch(9)
    path = tmp_path / "rollouts.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=10)
    out = mc.compute_advantages(pq.read_table(path))
    check(out, trajs, rows)


def test_value_columns_read_without_copy():
    from mica_core.arrow import ragged_from_table

    trajs, rows = batch(10)
    table = pa.Table.from_pylist(rows)
    ti = ragged_from_table(table)
    assert ti.order is None  # already in trajectory/turn order
    buf = table["distance"].chunk(0).buffers()[1]
    assert ti.distance.ctypes.data == buf.address
