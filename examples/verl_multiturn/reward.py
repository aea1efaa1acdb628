"""verl reward function for the example (``reward.custom_reward_function``).

verl's reward loop calls it once per trajectory with the agent loop's ``extra_fields`` merged
into ``extra_info`` (verl/experimental/reward_loop/reward_manager/naive.py). The score it
returns is what verl logs and what verl's own estimators (grpo, ...) would train on: the
trajectory's total distance reduction ``D_{-1} - D_{T-1}`` (the sum of its IDR). mica's
estimators do not use it: they read the per-turn distances the agent loop left in
``non_tensor_batch`` (``mica_distance``, ``mica_initial_distance``) and compute IDR, ADR and
returns themselves.
"""


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    extra_info = extra_info or {}
    distances = list(extra_info.get("mica_distance") or [])
    if not distances:
        return {"score": 0.0, "final_distance": float("nan"), "turns": 0}
    d0 = float(extra_info["mica_initial_distance"])
    return {"score": d0 - float(distances[-1]), "final_distance": float(distances[-1]),
            "turns": len(distances)}
