"""Structured-output benchmark: bench_serving.py's workload with every request constrained by a JSON
schema against the same workload unconstrained, on one server in one run; and the same pair with half
the requests steered (steered_workload.py's steering). Target: constrained >= 0.9x unconstrained.

EOS is ignored as in bench_serving.py, so every request produces exactly its output length (once a
value is complete the grammar allows only EOS, which is then sampled until the length is reached: the
mask is computed every step all the same).

    python benchmarks/bench_structured.py                      # 64 requests (minutes on 2 cores)
    python benchmarks/bench_structured.py --num-requests 16    # quick look
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_serving import MODEL_NAME, make_workload, print_table, run_http, start_server
from steered_workload import add_saes, steering_for

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"zip": {"type": "integer"}, "geo": {"type": "array", "items": {"type": "number"}}},
            "required": ["zip", "geo"],
        },
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
FORMAT = {"response_format": {"type": "json_schema", "json_schema": {"name": "bench", "schema": SCHEMA}}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--d-sae", type=int, default=4096, help="features per SAE of the steered half")
    ap.add_argument("--no-steered", action="store_true", help="skip the half-steered pair")
    ap.add_argument("--model-dir", default=None)
    args = ap.parse_args(argv)
    data_dir = tempfile.mkdtemp(prefix="bench-registry-")
    from steerserve.runner.model_loader import save_random_model

    model_dir = args.model_dir or save_random_model("gpt2-small", tempfile.mkdtemp(prefix="gpt2small-"))
    wl = make_workload(args.num_requests, args.seed, 4.0, vocab=50257)
    print(f"workload: {len(wl.prompts)} requests, {sum(wl.output_lens)} output tokens", flush=True)

    def half_steered(i: int) -> dict:
        return steering_for(i, args.d_sae, args.seed) if i % 2 else {}

    kinds = [("unconstrained", lambda i: {}), ("json_schema", lambda i: FORMAT)]
    if not args.no_steered:
        add_saes(data_dir, 768, args.d_sae, MODEL_NAME)
        kinds += [
            ("unconstrained, half steered", half_steered),
            ("json_schema, half steered", lambda i: FORMAT | half_steered(i)),
        ]
    server = start_server(model_dir, args.threads, ["--dtype", args.dtype], data_dir)
    rows = []
    try:
        warm = make_workload(4, args.seed + 1, 4.0, vocab=50257)
        for _, how in kinds:
            asyncio.run(run_http(server.url, MODEL_NAME, warm, False, how))
        # NOTE: twice, the second time in reverse order, so a drift of the machine hits every kind
        for rep, order in enumerate((kinds, kinds[::-1])):
            for name, how in order:
                print(f"{name} #{rep + 1} ...", flush=True)
                rows.append((name, asyncio.run(run_http(server.url, MODEL_NAME, wl, False, how))))
    finally:
        server.stop()
    print_table(rows, None)
    r = {name: {"tok_s": sum(x["tok_s"] for n, x in rows if n == name) / 2} for name, _ in kinds}
    print(f"json_schema / unconstrained: {r['json_schema']['tok_s'] / r['unconstrained']['tok_s']:.3f}x")
    if not args.no_steered:
        ratio = r["json_schema, half steered"]["tok_s"] / r["unconstrained, half steered"]["tok_s"]
        print(f"json_schema / unconstrained, half steered: {ratio:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
