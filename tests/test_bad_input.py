"""The bad-input catalogue (docs/architecture.md, "Conventions" and "Validation"): each case
raises MicaInputError naming the column, the first offending row and the rule."""

import numpy as np
import pyarrow as pa
import pytest

import mica_core as mc
from mica_core import MicaInputError


def long_rows():
    return [
        {"group_id": "a", "traj_id": 0, "turn": 0, "distance": 5.0, "initial_distance": 6.0},
        {"group_id": "a", "traj_id": 0, "turn": 1, "distance": 4.0, "initial_distance": 6.0},
        {"group_id": "a", "traj_id": 1, "turn": 0, "distance": 7.0, "initial_distance": 6.0},
        {"group_id": "b", "traj_id": 2, "turn": 0, "distance": 2.0, "initial_distance": 3.0},
        {"group_id": "b", "traj_id": 2, "turn": 1, "distance": 1.0, "initial_distance": 3.0},
    ]


def table_with(changes):
    rows = long_rows()
    for (row, col), value in changes.items():
        rows[row][col] = value
    return pa.Table.from_pylist(rows)


def expect(call, column, row, rule_fragment):
    with pytest.raises(MicaInputError) as info:
        call()
    err = info.value
    assert isinstance(err, ValueError)
    assert err.column == column and err.row == row, str(err)
    assert rule_fragment in (err.rule or ""), err.rule
    assert f"column {column!r}" in str(err)
    if row is not None:
        assert f"row {row}" in str(err)


def test_missing_column():
    t = pa.Table.from_pylist(long_rows()).drop_columns(["turn"])
    expect(lambda: mc.compute_advantages(t), "turn", None, "missing column")
    t = pa.Table.from_pylist(long_rows()).drop_columns(["initial_distance"])
    expect(lambda: mc.compute_advantages(t), "initial_distance", None, "missing column")


def test_no_value_column():
    t = pa.Table.from_pylist(long_rows()).drop_columns(["distance"])
    expect(lambda: mc.compute_advantages(t), "distance", None, "missing column")


def test_wrong_dtype():
    t = pa.Table.from_pylist(long_rows())
    t = t.set_column(3, "distance", pa.array(["5", "4", "7", "2", "1"]))
    expect(lambda: mc.compute_advantages(t), "distance", None, "dtype")
    t = pa.Table.from_pylist(long_rows())
    t = t.set_column(2, "turn", pa.array([0.0, 1.0, 0.0, 0.0, 1.0]))
    expect(lambda: mc.compute_advantages(t), "turn", None, "dtype")


def test_nulls():
    expect(lambda: mc.compute_advantages(table_with({(3, "distance"): None})), "distance", 3,
           "no nulls")
    expect(lambda: mc.compute_advantages(table_with({(1, "group_id"): None})), "group_id", 1,
           "no nulls")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite(value):
    expect(lambda: mc.compute_advantages(table_with({(4, "distance"): value})), "distance",
           4, "finite")
    expect(lambda: mc.estimate([0, 2], [0], distance=[1.0, value], initial_distance=[2.0]),
           "distance", 1, "finite")


def test_on_missing_carry_fills_and_never_mutates():
    d = np.array([5.0, np.nan, 3.0, np.nan])
    res = mc.estimate([0, 2, 4], [0, 0], distance=d, initial_distance=[6.0, np.float64(4.0)],
                      on_missing="carry")
    np.testing.assert_array_equal(res.reward, [1.0, 0.0, 1.0, 0.0])
    assert np.isnan(d[1])  # input untouched
    t = table_with({(1, "distance"): None, (3, "distance"): float("nan")})
    out = mc.compute_advantages(t, on_missing="carry")
    np.testing.assert_array_equal(out["reward"].to_numpy(), [1.0, 0.0, -1.0, 0.0, 2.0])


def test_trajectory_split_across_groups():
    expect(lambda: mc.compute_advantages(table_with({(1, "group_id"): "b"})), "group_id", 1,
           "one group per trajectory")


def test_duplicate_and_missing_turns():
    expect(lambda: mc.compute_advantages(table_with({(1, "turn"): 0})), "turn", 1,
           "no duplicate turns")
    expect(lambda: mc.compute_advantages(table_with({(4, "turn"): 2})), "turn", 4,
           "no missing turns")
    expect(lambda: mc.compute_advantages(table_with({(2, "turn"): -1})), "turn", 2,
           "turns are 0..T-1")


def test_negative_distances():
    expect(lambda: mc.compute_advantages(table_with({(2, "distance"): -0.5})), "distance", 2,
           "non-negative")
    expect(lambda: mc.estimate([0, 1], [0], distance=[1.0], initial_distance=[-2.0]),
           "initial_distance", 0, "non-negative")


def test_initial_distance_must_be_constant_per_trajectory():
    expect(lambda: mc.compute_advantages(table_with({(1, "initial_distance"): 9.0})),
           "initial_distance", 1, "constant within trajectory")


def test_array_shapes_and_required_inputs():
    expect(lambda: mc.estimate([0, 2], [0], distance=[1.0], initial_distance=[2.0]),
           "distance", None, "length")
    expect(lambda: mc.estimate([0, 2], [0, 1], distance=[1.0, 2.0], initial_distance=[2.0]),
           "group", None, "length")
    expect(lambda: mc.estimate([0, 2], [0], distance=[1.0, 2.0]), "initial_distance", None,
           "required")
    expect(lambda: mc.estimate([0, 2], [0]), "distance", None, "required")
    expect(lambda: mc.estimate([0, 2, 2], [0, 0], distance=[1.0, 2.0],
                               initial_distance=[2.0, 2.0]), "offsets", 2,
           "strictly increasing")
    expect(lambda: mc.estimate([1, 2], [0], distance=[1.0], initial_distance=[2.0]),
           "offsets", 0, "start at 0")
    expect(lambda: mc.estimate([0, 1], [0], reward=[1.0], distance=[1.0]), "reward", None,
           "exclusive")


def test_nested_form_errors():
    t = pa.table({"group_id": ["a", "a"], "distances": [[1.0, 2.0], []],
                  "initial_distance": [3.0, 3.0]})
    expect(lambda: mc.compute_advantages(t), "distances", 1, "at least one turn")
    t = pa.table({"group_id": ["a", "a"], "distances": [[1.0, None], [2.0]],
                  "initial_distance": [3.0, 3.0]})
    expect(lambda: mc.compute_advantages(t), "distances", 0, "no nulls")
    t = pa.table({"group_id": ["a", "a"], "traj_id": [7, 7], "distances": [[1.0], [2.0]],
                  "initial_distance": [3.0, 3.0]})
    expect(lambda: mc.compute_advantages(t), "traj_id", 1, "unique trajectory ids")


def test_empty_table_gives_empty_output():
    t = pa.Table.from_pylist(long_rows()).slice(0, 0)
    out = mc.compute_advantages(t)
    assert out.num_rows == 0 and "advantage" in out.column_names


def test_bad_options():
    with pytest.raises(ValueError, match="ddof"):
        mc.estimate([0, 1], [0], distance=[1.0], initial_distance=[2.0], ddof=2)
    with pytest.raises(ValueError, match="baseline"):
        mc.estimate([0, 1], [0], distance=[1.0], initial_distance=[2.0], baseline="median")
    with pytest.raises(ValueError, match="weight"):
        mc.estimate([0, 1], [0], distance=[1.0], initial_distance=[2.0], weight=1.5)
    with pytest.raises(ValueError, match="backend"):
        mc.estimate([0, 1], [0], distance=[1.0], initial_distance=[2.0], backend="jax")


def test_zero_rows_of_untyped_columns_give_empty_output():
    """A header-only CSV reads as zero rows of type null: an empty batch, like a zero-row
    Parquet file (README: an empty batch gives empty outputs)."""
    names = list(long_rows()[0])
    t = pa.table({name: pa.array([], pa.null()) for name in names})
    out = mc.compute_advantages(t)
    assert out.num_rows == 0 and out.column_names == names + ["reward", "return", "advantage"]
    assert all(out.schema.field(c).type == pa.float64() for c in ("reward", "return",
                                                                     "advantage"))
    # Rows of type null are all nulls: still the null rule, not a type error.
    t = pa.table({name: pa.array([None], pa.null()) for name in names})
    expect(lambda: mc.compute_advantages(t), "group_id", 0, "no nulls")


def test_duplicate_column_name():
    t = pa.Table.from_pylist(long_rows())
    t = pa.Table.from_arrays(t.columns + [t.column("turn")], t.column_names + ["turn"])
    expect(lambda: mc.compute_advantages(t), "turn", None, "unique column names")


@pytest.mark.parametrize("role, values", [
    ("group_id", [{"k": 1}] * 5),
    ("group_id", [[1]] * 5),
    ("traj_id", [[0], [0], [1], [2], [2]]),
    ("traj_id", [{"k": 0}, {"k": 0}, {"k": 1}, {"k": 2}, {"k": 2}]),
])
def test_nested_id_columns(role, values):
    t = pa.Table.from_pylist(long_rows())
    t = t.set_column(t.column_names.index(role), role, pa.array(values))
    expect(lambda: mc.compute_advantages(t), role, None, "dtype")
    nested = pa.table({"group_id": pa.array(values[:2]) if role == "group_id" else ["a", "b"],
                       "distances": [[1.0], [2.0]], "initial_distance": [3.0, 3.0]})
    if role == "group_id":
        expect(lambda: mc.compute_advantages(nested), role, None, "dtype")


def test_state_and_initial_state_need_the_same_axes():
    rows = long_rows()
    t = pa.Table.from_pylist(rows).drop_columns(["distance", "initial_distance"])
    state = pa.array([[-2.0, -1.0, 0.5]] * len(rows), pa.list_(pa.float64(), 3))
    initial = [[-3.0, -3.0, -3.0]] * len(rows)
    t3 = t.append_column("state", state).append_column("initial_state", pa.array(initial))
    assert mc.compute_advantages(t3).num_rows == len(rows)
    initial[2] = [-3.0, -3.0]  # variable-size lists: one row differs
    t2 = t.append_column("state", state).append_column("initial_state", pa.array(initial))
    expect(lambda: mc.compute_advantages(t2), "initial_state", 2, "same number of axes")
    fixed = pa.array([[-3.0, -3.0]] * len(rows), pa.list_(pa.float64(), 2))
    t2 = t.append_column("state", state).append_column("initial_state", fixed)
    expect(lambda: mc.compute_advantages(t2), "state", 0, "same number of axes")


@pytest.mark.parametrize("offsets, row", [
    (np.array([0, 2**64 - 1], dtype=np.uint64), 1),
    (np.array([0, 1, 2**63 + 5], dtype=np.uint64), 2),
    (np.array([0, 1e30]), 1),
])
def test_huge_offsets_are_named_not_wrapped(offsets, row):
    with pytest.raises(MicaInputError) as info:
        mc.estimate(offsets, np.zeros(len(offsets) - 1, dtype=np.int64),
                    distance=np.ones(2), initial_distance=np.ones(len(offsets) - 1))
    err = info.value
    assert err.column == "offsets" and err.row == row, str(err)
    assert str(int(offsets[row])) in str(err) and "int64" in str(err)
    assert "-" not in str(err)  # no count wrapped to a negative number


@pytest.mark.parametrize("scale", [1e101, 1e160, 1e200, 1e300])
def test_values_too_large_for_float64_statistics_are_refused(backend, scale):
    # Above 1e100, squared deviations or sums could overflow float64 and the advantages
    # silently become 0 or NaN (issue: all 0 at 1e160, NaN at 1e200): a clear error instead.
    d = np.array([2.0, 1.0, 3.0, 2.0, 1.0, 0.0])
    with pytest.raises(MicaInputError, match="too large") as info:
        backend.estimate(np.array([0, 3, 5, 6]), ["A", "A", "B"], distance=d * scale,
                         initial_distance=np.array([3.0, 3.0, 2.0]) * scale)
    assert info.value.rule == "magnitude" and info.value.row == 0
    with pytest.raises(MicaInputError, match="too large") as info:
        backend.estimate(np.array([0, 3, 5, 6]), ["A", "A", "B"], reward=d - 1e300 * (d > 2))
    assert info.value.column == "reward" and info.value.row == 2


def test_values_just_below_the_limit_stay_exact_and_scale_free(backend):
    d = np.array([2.0, 1.0, 3.0, 2.0, 1.0, 0.0])
    d0 = np.array([3.0, 3.0, 2.0])
    small = backend.estimate(np.array([0, 3, 5, 6]), ["A", "A", "B"], distance=d,
                             initial_distance=d0, eps=1e-300)
    big = backend.estimate(np.array([0, 3, 5, 6]), ["A", "A", "B"], distance=d * 1e99,
                           initial_distance=d0 * 1e99, eps=1e-300)
    np.testing.assert_allclose(big.advantage, small.advantage, rtol=1e-12)
    np.testing.assert_allclose(big.reward, small.reward * 1e99, rtol=1e-15)


def test_large_values_in_tables_name_the_input_row():
    rows = [dict(group_id="g", traj_id=0, turn=t, distance=[1.0, 2e150, 3.0][t],
                 initial_distance=4.0) for t in (2, 0, 1)]
    with pytest.raises(MicaInputError, match="too large") as info:
        mc.compute_advantages(pa.Table.from_pylist(rows))
    assert (info.value.column, info.value.row) == ("distance", 2)


def state_rows(state_value=None, initial_value=None, row=3, axis=1):
    """``long_rows`` with three-axis states; one state (or the initial state of the row's
    trajectory) changed."""
    rows = long_rows()
    for r in rows:
        del r["distance"], r["initial_distance"]
        r["state"] = [-2.0, -1.0, 0.5]
        r["initial_state"] = [-3.0, -3.0, -3.0]
    if state_value is not None:
        rows[row]["state"] = [state_value if k == axis else v
                              for k, v in enumerate(rows[row]["state"])]
    if initial_value is not None:
        for r in rows:
            if r["traj_id"] == rows[row]["traj_id"]:
                r["initial_state"] = [initial_value] * 3
    return pa.Table.from_pylist(rows)


@pytest.mark.parametrize("value", [1e101, -1e155, 1e300, -1.7e308])
def test_state_values_past_the_limit_are_refused_before_squaring(value):
    # 1e155 squared is past float64: these used to give NaN advantages and no error.
    expect(lambda: mc.compute_advantages(state_rows(value)), "state", 3, "magnitude")
    with pytest.raises(MicaInputError, match=r"axis 1\) " + repr(value).replace("+", r"\+")):
        mc.compute_advantages(state_rows(value))
    expect(lambda: mc.compute_advantages(state_rows(initial_value=value, row=2)),
           "initial_state", 2, "magnitude")
    with pytest.raises(MicaInputError) as info:
        mc.distance_from_state(np.array([[-1.0, 0.0], [value, 1.0]]))
    assert (info.value.column, info.value.row, info.value.rule) == ("state", 1, "magnitude")


def test_states_at_the_limit_are_computed():
    out = mc.compute_advantages(state_rows(-1e100))
    assert np.isfinite(out["advantage"].to_numpy()).all()


def test_distances_computed_from_states_follow_the_magnitude_rule():
    # Finite states whose weighted distance passes the limit: the state row is named.
    expect(lambda: mc.compute_advantages(state_rows(-1e99), state_weights=[1.0, 1e10, 1.0]),
           "state", 3, "magnitude")


@pytest.mark.parametrize("options, column", [
    ({"state_weights": [1.0, float("nan"), 1.0]}, "state_weights"),
    ({"state_weights": [1.0, -1.0, 1.0]}, "state_weights"),
    ({"state_weights": [1.0, float("inf"), 1.0]}, "state_weights"),
    ({"state_weights": [1.0, 1.0]}, "state_weights"),
    ({"epsilon": float("nan")}, "epsilon"),
    ({"epsilon": -5}, "epsilon"),
    ({"epsilon": float("inf")}, "epsilon"),
    ({"distance_kind": "cube"}, "distance_kind"),
])
def test_state_options_are_checked_where_they_are_given(options, column):
    with pytest.raises(MicaInputError) as info:
        mc.compute_advantages(state_rows(), **options)
    assert info.value.column == column, str(info.value)
    assert len(str(info.value).splitlines()) == 1
    if "state_weights" in options and len(options["state_weights"]) == 3:
        with pytest.raises(MicaInputError) as info:
            mc.distance_from_state(np.zeros((2, 3)), weights=options["state_weights"])
        assert info.value.column == "state_weights"
    if "epsilon" in options:
        with pytest.raises(MicaInputError, match="epsilon"):
            mc.distance_from_state(np.zeros((2, 3)), epsilon=options["epsilon"])


def test_state_options_are_checked_on_an_empty_stream(tmp_path):
    # No row ever reaches compute_advantages: the options are still checked, once, up front.
    import pyarrow.parquet as pq

    from mica_core.stream import write_advantages

    pq.write_table(state_rows().slice(0, 0), tmp_path / "in.parquet")
    with pytest.raises(MicaInputError, match="epsilon"):
        write_advantages(tmp_path / "in.parquet", tmp_path / "out.parquet", epsilon=float("nan"))
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.parametrize("eps", [float("nan"), -5.0, float("inf")])
def test_normalization_eps_must_be_finite_and_non_negative(eps):
    with pytest.raises(ValueError, match="eps"):
        mc.estimate(np.array([0, 2]), [0], distance=np.ones(2), initial_distance=[2.0], eps=eps)
    with pytest.raises(ValueError, match="eps"):
        mc.compute_advantages(pa.Table.from_pylist(long_rows()), eps=eps)


def test_a_value_just_past_the_limit_is_shown_with_its_digits():
    with pytest.raises(MicaInputError) as info:
        mc.estimate(np.array([0, 2]), [0], distance=np.array([1.0, 1.0000001e100]),
                    initial_distance=[2.0])
    assert "1.0000001e+100 is too large" in str(info.value)
    assert "at most 1e+100" in str(info.value)


def test_masked_values_are_missing_values():
    d = np.ma.masked_array([5.0, 4.0, 3.0], mask=[False, True, False])
    with pytest.raises(MicaInputError) as info:
        mc.estimate(np.array([0, 3]), [0], distance=d, initial_distance=[6.0])
    assert (info.value.column, info.value.row, info.value.rule) == ("distance", 1, "no nulls")
    carried = mc.estimate(np.array([0, 3]), [0], distance=d, initial_distance=[6.0],
                          on_missing="carry")
    want = mc.estimate(np.array([0, 3]), [0], distance=np.array([5.0, 5.0, 3.0]),
                       initial_distance=[6.0])
    np.testing.assert_array_equal(carried.advantage, want.advantage)
