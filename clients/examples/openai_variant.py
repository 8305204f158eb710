"""Store a steering variant, then use it from an unmodified openai client through `model=`.

    python clients/examples/openai_variant.py --base-url http://localhost:8000 --sae res-l0 --feature 3

A variant is a named set of interventions (`POST /v1/variants`); `model="<model>:<variant>"` applies
it, so any OpenAI-compatible tool can use steering without knowing about it.
"""

from __future__ import annotations

import argparse

import httpx
from openai import OpenAI


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://localhost:8000")
    p.add_argument("--api-key", default="none", help="a key allowed to write to the registry")
    p.add_argument("--sae", default="res-l0")
    p.add_argument("--feature", type=int, default=0)
    p.add_argument("--strength", type=float, default=8.0)
    p.add_argument("--variant", default="example-variant")
    args = p.parse_args()

    base = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"}
    variant = {
        "id": args.variant,
        "steering": [
            {"feature": {"sae": args.sae, "index": args.feature}, "mode": "add",
             "strength": args.strength, "scale": "unit"},
        ],
    }  # fmt: skip
    with httpx.Client(base_url=base, headers=headers, timeout=60) as http:
        http.delete(f"/v1/variants/{args.variant}")  # start clean: 404 when it does not exist yet
        http.post("/v1/variants", json=variant).raise_for_status()

    client = OpenAI(base_url=base + "/v1", api_key=args.api_key)
    names = [m.id for m in client.models.list().data]
    base_model = names[0]
    steered_model = f"{base_model}:{args.variant}"
    print("models:", ", ".join(names))
    assert steered_model in names, f"{steered_model} is not listed"

    for model in (base_model, steered_model):
        out = client.completions.create(
            model=model, prompt="The weather today is", max_tokens=12, temperature=0
        )
        print(f"{model}: {out.choices[0].text!r}")


if __name__ == "__main__":
    main()
