"""verl reward function for the example (``reward.custom_reward_function``).

verl's reward loop calls it for a trajectory whose agent loop left ``reward_score`` unset,
with the agent loop's ``extra_fields`` merged into ``extra_info``
(verl/experimental/reward_loop/reward_manager/naive.py). The example's agent loop returns
mica's ``agent_loop_output``, which sets ``reward_score`` to the same outcome (and writes the
per-turn rewards into ``rm_scores`` itself), so verl skips this function there; it stays for
agent loops that return a plain ``AgentLoopOutput``. The score is the trajectory's total
distance reduction ``D_{-1} - D_{T-1}`` (the sum of its IDR), what verl's own estimators
(grpo, ...) would train on.
"""


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    extra_info = extra_info or {}
    distances = list(extra_info.get("mica_distance") or [])
    if not distances:
        return {"score": 0.0, "final_distance": float("nan"), "turns": 0}
    d0 = float(extra_info["mica_initial_distance"])
    return {"score": d0 - float(distances[-1]), "final_distance": float(distances[-1]),
            "turns": len(distances)}
