"""Benchmarks for enrich: latency overhead, throughput, checkpoint cost, memory, resume,
rate limits, hung requests, self-hosted servers with slots, the batch route.

    python benchmarks/bench.py [--quick] [--only SECTION ...] [--repeats N]

Every measured job runs in its own subprocess (``python -m pipeline run ...`` or a
naive ``asyncio.gather`` script), against the local simulator running in another
subprocess, so the numbers are the client's alone: wall time and CPU time (user +
sys, from ``os.wait4``) and peak RSS (the high-water mark the child reports at
exit, see ``MEASURED``) are those of that one child. The machine is shared
and noisy, so each figure is the median over repeats, and each section compares
against a baseline measured in the same run. Nothing is asserted; results are
printed as tables and written to ``bench-results/bench-<timestamp>.json``.

Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from harness import FULL, QUICK, REPO, RESULTS_DIR, Context, Sizes, environment
from sections.batch import section_batch
from sections.checkpoint import section_checkpoint
from sections.latency import section_latency
from sections.memory import section_memory
from sections.rate import section_rate
from sections.ray import section_ray
from sections.resume import section_resume
from sections.slots import EXTERNAL_ROWS, section_slots
from sections.tail import section_tail
from sections.throughput import section_throughput

SECTIONS: Final = (
    "latency",
    "throughput",
    "checkpoint",
    "memory",
    "resume",
    "rate",
    "tail",
    "slots",
    "ray",
    "batch",
)


SECTION_FUNCTIONS: Final[dict[str, Callable[[Context], dict[str, Any]]]] = {
    "latency": section_latency,
    "throughput": section_throughput,
    "checkpoint": section_checkpoint,
    "memory": section_memory,
    "resume": section_resume,
    "rate": section_rate,
    "tail": section_tail,
    "slots": section_slots,
    "ray": section_ray,
    "batch": section_batch,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark enrich against the local simulator; prints medians.",
        epilog=f"sections: {', '.join(SECTIONS)}. See benchmarks/README.md.",
    )
    parser.add_argument("--quick", action="store_true", help="small inputs (about 4 minutes)")
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS, metavar="SECTION", help="run only these sections"
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds per section [3]")
    parser.add_argument(
        "--budget",
        type=float,
        metavar="S",
        help="seconds after which a section starts no new round",
    )
    for name in SECTIONS:
        parser.add_argument(f"--{name}-rows", type=int, metavar="N", help=f"rows for {name}")
    parser.add_argument(
        "--enrich-args",
        default="",
        metavar="FLAGS",
        help='extra flags for every enrich run, e.g. "--chunk-size 5000"',
    )
    parser.add_argument(
        "--rate-variants",
        nargs="+",
        default=(),
        metavar="TEXT",
        help='only the rate variants whose name contains one of these, e.g. "window" "storm"',
    )
    parser.add_argument(
        "--server-url",
        metavar="URL",
        help="slots section: an OpenAI-compatible server of yours (e.g. llama.cpp on "
        "http://127.0.0.1:8080/v1) instead of the simulator",
    )
    parser.add_argument(
        "--server-model", default="sim-1", metavar="NAME", help="model to ask --server-url for"
    )
    parser.add_argument(
        "--max-tokens", type=int, metavar="N", help="slots section: cap each answer at N tokens"
    )
    parser.add_argument(
        "--slots",
        type=int,
        nargs="+",
        metavar="N",
        help="slots section: only these slot counts of the simulator [1 4 16]",
    )
    parser.add_argument(
        "--slot-order",
        choices=("fifo", "any"),
        help="slots section: the simulator serves its queue in the order it came "
        "(its default) or in any, as llama-cpp-python's server does",
    )
    parser.add_argument(
        "--timings",
        choices=("llama.cpp", "vllm", "none"),
        help="slots section: the server's own times the simulator's answers carry "
        "(llama.cpp's by default; none, as llama-cpp-python's server)",
    )
    parser.add_argument(
        "--baseline-tree",
        metavar="DIR",
        help="slots section: also run enrich's defaults from this checkout (another "
        "commit's tree, by PYTHONPATH), interleaved: before and after in the same run",
    )
    parser.add_argument("--keep-temp", action="store_true", help="keep inputs and child logs")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else FULL
    for name in SECTIONS:
        rows = getattr(args, f"{name}_rows")
        if rows is not None:
            sizes = replace(sizes, **{f"{name}_rows": rows})
    if args.server_url and args.slots_rows is None:
        sizes = replace(sizes, slots_rows=EXTERNAL_ROWS)
    if args.budget is not None:
        sizes = replace(sizes, section_budget_s=args.budget)
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: the running job and the simulator are
    # stopped, the numbers so far are saved and the work dir is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sizes = sizes_from(args)
    chosen = [name for name in SECTIONS if not args.only or name in args.only]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = Path(tempfile.mkdtemp(prefix="enrich-bench-"))
    ctx = Context(
        workdir,
        sizes,
        args.repeats,
        tuple(shlex.split(args.enrich_args)),
        rate_variants=tuple(args.rate_variants),
        server_url=args.server_url,
        server_model=args.server_model,
        max_tokens=args.max_tokens,
        slot_counts=tuple(args.slots) if args.slots else None,
        slot_server_flags=tuple(
            flag
            for name in ("slot_order", "timings")
            if getattr(args, name)
            for flag in (f"--{name.replace('_', '-')}", getattr(args, name))
        ),
        baseline_tree=args.baseline_tree,
    )
    report: dict[str, Any] = {
        "started": stamp,
        "args": vars(args),
        "sizes": asdict(sizes),
        "environment": environment(),
        "sections": {},
    }
    print(f"enrich benchmarks: {', '.join(chosen)}; {args.repeats} repeats; work dir {workdir}")
    started = time.perf_counter()
    try:
        for name in chosen:
            section_started = time.perf_counter()
            report["sections"][name] = SECTION_FUNCTIONS[name](ctx)
            report["sections"][name]["section_s"] = time.perf_counter() - section_started
    finally:
        report["total_s"] = time.perf_counter() - started
        report["environment"]["loadavg_end"] = os.getloadavg()
        RESULTS_DIR.mkdir(exist_ok=True)
        path = RESULTS_DIR / f"bench-{stamp}.json"
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        if args.keep_temp:
            print(f"\nkept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n" + "=" * 34 + " results " + "=" * 34)
    for text in ctx.tables:
        print("\n" + text)
    env = report["environment"]
    load = (
        f"load average {env['loadavg_start'][0]:.1f} at start, {env['loadavg_end'][0]:.1f} at end"
    )
    print(f"\n{env['cpus']} CPUs, {load} (a busy machine slows every variant alike)")
    print(f"total {report['total_s']:.0f} s; every number is in {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
