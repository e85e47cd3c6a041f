"""Record every decision a policy makes in simulator runs, or check that it still makes them.

    python scripts/policy_decisions.py --out out/decisions.jsonl [--policy cache_aware] [--limit 3000]
    python scripts/policy_decisions.py --check out/decisions.jsonl

A speed-up of a policy must not change what it decides: the simulator's results (and every
table measured with them) hold only for the decisions that were measured. This runs the
policy through the lockstep simulator on the Mooncake conversation trace and the synthetic
tool-agent trace (``scripts/make_agent_trace.py``, seed 7), at dp 4 and 8, each with the
plain ``sglang`` report profile, with KV events (``sglang-kv``), with 10% of event batches
lost, with rank faults (a rank down and back with an empty cache), and with a small KV cache
and small policy memory bounds (so that every eviction path runs), and writes one line
per request: its rank, the policy's reason and its scores (``--explain``'s fields, e.g.
matched blocks, which cache index was read, the expected TTFT).

``--check FILE`` runs the same scenarios as FILE (its header lines say which) and exits 1 at
the first decision that differs, printing both. Record before a change, check after.
``--digests`` records (or checks) a SHA-256 per 100 decisions instead of the decisions: small
enough to keep in the repo (the test suite checks ``tests/data/cache_aware_decisions.json``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import attrs

from dpcore.sim.config import EngineConfig
from dpcore.sim.faults import parse_faults
from dpcore.sim.lockstep import LockstepSimulation
from dpcore.sim.runner import RunSpec, make_router

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_agent_trace import generate  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONVERSATION = REPO / "traces" / "conversation_trace.jsonl"
#: The agent trace's generator settings (make_agent_trace.py's defaults).
AGENT_RATE, AGENT_PROMPTS, AGENT_SEED = 6.0, 40, 7
#: Per trace, a load where queues form (so backlog, uncertainty and KV room all matter).
TIME_SCALES = {"conversation": 0.75, "agent": 2.0}
#: A small KV cache and small memory bounds for the policy: the rank's cache evicts, the
#: policy's own prefix index forgets blocks (by count with the first options, by age with the
#: second), and blocks become uncertain.
SMALL = {"kv_capacity_tokens": 60_000}
BY_COUNT = {"max_blocks": 400, "eviction_interval": 30.0, "memory_factor": 1.5}
BY_AGE = {"max_blocks": 3_000, "eviction_interval": 30.0, "memory_factor": 1.5}
#: name -> (engine settings, policy options, faults).
VARIANTS = {
    "sglang": ({"report_profile": "sglang"}, {}, None),
    "kv": ({"report_profile": "sglang-kv"}, {}, None),
    "kv-loss": ({"report_profile": "sglang-kv", "kv_event_loss": 0.1}, {}, None),
    "kv-faults": ({"report_profile": "sglang-kv"}, {}, "random:3"),
    "faults": ({"report_profile": "sglang"}, {}, "random:3"),
    "small": ({"report_profile": "sglang", **SMALL}, BY_COUNT, None),
    "small-kv-loss": ({"report_profile": "sglang-kv", "kv_event_loss": 0.1, **SMALL}, BY_AGE, None),
}


def scenarios(limit: int, dp_sizes: list[int], traces: list[str], variants: list[str]) -> Iterator[dict]:
    for trace in traces:
        for dp in dp_sizes:
            for variant in variants:
                yield {"trace": trace, "dp": dp, "variant": variant, "limit": limit}


def trace_path(name: str, limit: int, tmp: Path) -> Path:
    if name == "conversation":
        return CONVERSATION
    path = tmp / f"agent_{limit}.jsonl"
    if not path.exists():
        rows = generate(limit, AGENT_RATE, AGENT_PROMPTS, AGENT_SEED)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def decisions(policy: str, scenario: dict, tmp: Path) -> list[list]:
    """``[request index, rank, policy, reason, scores]`` per routed request, in arrival order."""
    settings, options, fault_spec = VARIANTS[scenario["variant"]]
    config = attrs.evolve(EngineConfig(), **settings)
    spec = RunSpec(
        trace_path=str(trace_path(scenario["trace"], scenario["limit"], tmp)),
        dp_size=scenario["dp"],
        config=config,
        time_scale=TIME_SCALES[scenario["trace"]],
        limit=scenario["limit"],
        options={name.strip(): options for name in policy.split(",")} if options else {},
    )
    trace = spec.load_trace()
    spec = attrs.evolve(spec, faults=parse_faults(fault_spec, dp_size=spec.dp_size, duration_s=trace.duration_s, seed=0))
    sim = LockstepSimulation(trace, spec.dp_size, spec.config, seed=spec.seed, faults=spec.faults)
    router = make_router(policy, sim, spec)
    index = {r.rid: i for i, r in enumerate(sim.requests)}
    out: list[list] = []
    select = router.select

    def recording_select(request):  # noqa: ANN001, ANN202 - the router's own signature
        rank = select(request)
        d = router.last_decision
        scores = sorted(d.scores.items()) if d.scores else None
        out.append([index[request.rid], rank, d.policy, d.reason, scores])
        return rank

    router.select = recording_select
    sim.run(router, policy)
    return out


#: Decisions per digest in ``--digests`` files: a difference is located to within this many.
CHUNK = 100


def digests(policy: str, scenario: dict, tmp: Path) -> list[str]:
    """A SHA-256 (hex, 16 digits) per :data:`CHUNK` decisions of one run, then the count."""
    out = []
    chunk = []
    for d in decisions(policy, scenario, tmp):
        chunk.append(json.dumps(d))
        if len(chunk) == CHUNK:
            out.append(hashlib.sha256("\n".join(chunk).encode()).hexdigest()[:16])
            chunk = []
    if chunk:
        out.append(hashlib.sha256("\n".join(chunk).encode()).hexdigest()[:16])
    return out


def record(path: Path, policy: str, runs: list[dict], tmp: Path, *, as_digests: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for scenario in runs:
            header = json.dumps({"policy": policy, **scenario})
            if as_digests:
                f.write(header + "\n" + json.dumps(digests(policy, scenario, tmp)) + "\n")
            else:
                f.write(header + "\n" + "".join(json.dumps(d) + "\n" for d in decisions(policy, scenario, tmp)))
            print(f"{scenario}: recorded", file=sys.stderr)


def read(path: Path) -> list[tuple[dict, list[str]]]:
    """``(header, lines)`` per run recorded in *path*."""
    runs: list[tuple[dict, list[str]]] = []
    for line in path.read_text().splitlines():
        doc = json.loads(line)
        if isinstance(doc, dict):
            runs.append((doc, []))
        elif runs:
            runs[-1][1].append(line)
        else:
            raise SystemExit(f"{path}: decisions before the first run's header")
    return runs


def check(path: Path, tmp: Path, *, as_digests: bool) -> int:
    """Re-run each run recorded in *path*; 0 if every decision is the same, else 1."""
    total = 0
    runs = read(path)
    for header, want in runs:
        scenario = dict(header)
        policy = scenario.pop("policy")
        if as_digests:
            want = json.loads(want[0]) if want else []
            got = digests(policy, scenario, tmp)
        else:
            got = [json.dumps(d) for d in decisions(policy, scenario, tmp)]
        i = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
        if i is not None:
            where = f"decisions {i * CHUNK}..{(i + 1) * CHUNK - 1}" if as_digests else f"decision {i}"
            print(f"{header}: {where} differ")
            if not as_digests:
                print(f"  recorded: {want[i]}\n  now:      {got[i]}")
            return 1
        if len(want) != len(got):
            print(f"{header}: {len(want)} {'digests' if as_digests else 'decisions'} recorded, {len(got)} now")
            return 1
        total += scenario["limit"] if as_digests else len(got)
        print(f"{header}: the same", file=sys.stderr)
    print(f"{len(runs)} runs ({total} requests): every decision the same")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", type=Path, metavar="FILE", help="record the decisions to FILE (JSON lines)")
    what.add_argument("--check", type=Path, metavar="FILE", help="re-run FILE's runs; exit 1 at the first difference")
    ap.add_argument("--digests", action="store_true", help="a digest per 100 decisions instead of the decisions")
    ap.add_argument("--policy", default="cache_aware", help="the dpcore policy (or chain) (default cache_aware)")
    ap.add_argument("--limit", type=int, default=3000, help="requests per run (default 3000)")
    ap.add_argument("--dp-size", type=int, nargs="+", default=[4, 8], help="dp sizes (default 4 8)")
    ap.add_argument("--traces", nargs="+", choices=tuple(TIME_SCALES), default=list(TIME_SCALES))
    ap.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.check:
            return check(args.check, Path(tmp), as_digests=args.digests)
        runs = list(scenarios(args.limit, args.dp_size, args.traces, args.variants))
        record(args.out, args.policy, runs, Path(tmp), as_digests=args.digests)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
