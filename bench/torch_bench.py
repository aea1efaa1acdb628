"""Torch backend benchmark: time per call and achieved bandwidth against the device's copy.

    python -m bench.torch_bench                       # CUDA if present: 100M turns; else CPU 1M
    python -m bench.torch_bench --device cpu --turns 2000000 --estimators mica,grpo

Builds a random batch on the device (trajectory lengths uniform in 1..19, mean 10; rollout
groups of 8; float32 distances), warms up, then times each estimator's sync-free call
(``ngroups=``, ``max_turns=``, ``validate=False``) and the validated call, median of
``--repeats``. In the same run it times a device-to-device copy of a buffer as large as the
call's inputs and outputs together, so the ratio does not depend on a datasheet.

Achieved bandwidth counts the bytes the call must touch at least: its inputs read once
(offsets, group codes, distances, initial distances) and its three outputs written once.
The computation moves several times that (float64 intermediates, the padded turn-major
layout, bucket statistics), so this is a lower bound on traffic and an honest figure of
merit, not the memory system's load.

Writes JSON to ``bench/results/torch_<device>.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when present)")
    p.add_argument("--turns", type=int, default=None,
                   help="turns in the batch (default 100M on CUDA, 1M on CPU)")
    p.add_argument("--estimators", default="mica,mica_turn,grpo,mapo",
                   help="comma-separated preset names")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per case (median)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--deterministic", action="store_true",
                   help="also time deterministic mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/torch_<dev>.json)")
    return p.parse_args(argv)


def make_batch(torch, n_turns, device, dtype, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    n_traj = max(1, n_turns // 10)
    lengths = torch.randint(1, 20, (n_traj,), generator=g, device=device)
    offsets = torch.zeros(n_traj + 1, dtype=torch.int64, device=device)
    torch.cumsum(lengths, 0, out=offsets[1:])
    n_rows = int(offsets[-1])  # setup only, not timed
    ngroups = max(1, n_traj // 8)
    group = torch.randint(0, ngroups, (n_traj,), generator=g, device=device)
    distance = torch.rand(n_rows, generator=g, device=device, dtype=dtype) * 4
    initial = torch.rand(n_traj, generator=g, device=device, dtype=dtype) * 4
    return dict(offsets=offsets, group=group, distance=distance, initial_distance=initial,
                ngroups=ngroups, max_turns=int(lengths.max()), n_rows=n_rows, n_traj=n_traj)


class Timer:
    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == "cuda"

    def __call__(self, fn, repeats):
        torch = self.torch
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times), times


def main(argv=None):
    args = parse_args(argv)
    import torch

    import mica_core as mc

    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                       else ("cpu" if args.device == "auto" else args.device))
    n_turns = args.turns or (100_000_000 if dev.type == "cuda" else 1_000_000)
    dtype = getattr(torch, args.dtype)
    b = make_batch(torch, n_turns, dev, dtype, args.seed)
    esize = torch.finfo(dtype).bits // 8
    min_bytes = (8 * (b["n_traj"] + 1) + 8 * b["n_traj"] + esize * b["n_rows"]
                 + esize * b["n_traj"] + 3 * esize * b["n_rows"])
    timer = Timer(torch, dev)

    # The device's own copy bandwidth, measured here: a buffer of min_bytes, read + written.
    src = torch.empty(min_bytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy_s, _ = timer(lambda: dst.copy_(src), max(args.repeats, 10))
    copy_bw = 2 * src.numel() * 4 / copy_s
    src = dst = None  # free the buffers before the timed calls

    base = dict(offsets=b["offsets"], group=b["group"], distance=b["distance"],
                initial_distance=b["initial_distance"])
    cases = []
    for name in [s for s in args.estimators.split(",") if s]:
        variants = [("sync_free", dict(ngroups=b["ngroups"], max_turns=b["max_turns"],
                                       validate=False, deterministic=False)),
                    ("validated", dict(ngroups=b["ngroups"], deterministic=False))]
        if args.deterministic:
            variants.append(("deterministic", dict(ngroups=b["ngroups"],
                                                   max_turns=b["max_turns"], validate=False,
                                                   deterministic=True)))
        for label, extra in variants:
            def call(name=name, extra=extra):
                return mc.estimate(estimator=name, **base, **extra)

            call()  # warm-up (allocator, kernels)
            med, times = timer(call, args.repeats)
            cases.append(dict(estimator=name, variant=label, median_s=med, times_s=times,
                              turns_per_s=b["n_rows"] / med,
                              achieved_bytes_per_s=min_bytes / med,
                              fraction_of_copy_bandwidth=(min_bytes / med) / copy_bw))
            print(f"{name:>16} {label:>13}: {med * 1e3:9.2f} ms  "
                  f"{b['n_rows'] / med / 1e6:9.1f} Mturns/s  "
                  f"{min_bytes / med / 1e9:7.1f} GB/s ({100 * min_bytes / med / copy_bw:5.1f}% "
                  f"of copy)")
    peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None)
    result = dict(
        benchmark="torch_bench", device=dev.type,
        device_name=(torch.cuda.get_device_name(dev) if dev.type == "cuda"
                     else platform.processor() or platform.machine()),
        torch=torch.__version__, dtype=args.dtype, n_turns=b["n_rows"], n_traj=b["n_traj"],
        ngroups=b["ngroups"], max_turns=b["max_turns"], min_bytes_per_call=min_bytes,
        copy_bytes_per_s=copy_bw, copy_median_s=copy_s, peak_memory_bytes=peak,
        cpu_threads=torch.get_num_threads(), cases=cases)
    print(f"copy bandwidth: {copy_bw / 1e9:.1f} GB/s on {result['device_name']}")
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   f"torch_{dev.type}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
