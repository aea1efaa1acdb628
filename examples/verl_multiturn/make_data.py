"""Writes the example's train/val Parquet files in verl's RL dataset format.

    python examples/verl_multiturn/make_data.py --out ~/data/mica_support

Each row is one support scenario: a chat prompt (the user's opening message), the user's
initial support state (``extra_info.support_state``) and the agent loop that runs it.
"""

import argparse
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mica_core.atomic import atomic_path

OPENINGS = [
    "I failed my driving test again and I feel like an idiot.",
    "My best friend stopped answering my messages.",
    "I can't sleep before my exams and I keep panicking.",
    "My manager criticised my work in front of everyone.",
    "I moved to a new city and I don't know anyone.",
    "My dog is sick and the vet bills are scaring me.",
]
SYSTEM = "You are a supportive listener. Reply in one or two sentences."


def rows(n, seed, split):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        opening = OPENINGS[i % len(OPENINGS)]
        state = np.round(rng.uniform(-4.0, -1.5, size=3), 2).tolist()
        out.append({
            "data_source": "mica_support",
            "agent_name": "mica_support_agent",
            "prompt": [{"role": "system", "content": SYSTEM},
                       {"role": "user", "content": opening}],
            "ability": "support",
            "reward_model": {"style": "rule", "ground_truth": ""},
            "extra_info": {"index": i, "split": split, "support_state": state},
        })
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.expanduser("~/data/mica_support"))
    p.add_argument("--train", type=int, default=64)
    p.add_argument("--val", type=int, default=8)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for split, n, seed in (("train", args.train, 0), ("val", args.val, 1)):
        path = os.path.join(args.out, f"{split}.parquet")
        with atomic_path(path) as tmp:  # never a half-written file under the final name
            pq.write_table(pa.Table.from_pylist(rows(n, seed, split)), tmp)
        print(path)


if __name__ == "__main__":
    main()
