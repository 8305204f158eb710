"""Store a steering variant, then use it from an unmodified openai client through `model=`.

    python clients/examples/openai_variant.py --base-url http://localhost:8000 --sae res-l0 --feature 3

A variant is a named set of interventions (`POST /v1/variants`); `model="<model>:<variant>"` applies
it, so any OpenAI-compatible tool can use steering without knowing about it.
"""

from __future__ import annotations

import argparse
import contextlib

from openai import NotFoundError, OpenAI


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://localhost:8000")
    p.add_argument("--api-key", default="none", help="a key allowed to write to the registry")
    p.add_argument("--sae", default="res-l0")
    p.add_argument("--feature", type=int, default=0)
    p.add_argument("--strength", type=float, default=8.0)
    p.add_argument("--variant", default="example-variant")
    args = p.parse_args()

    # NOTE: the registry calls go through the SDK's own raw-request methods: no other HTTP library needed
    client = OpenAI(base_url=args.base_url.rstrip("/") + "/v1", api_key=args.api_key)
    variant = {
        "id": args.variant,
        "steering": [
            {"feature": {"sae": args.sae, "index": args.feature}, "mode": "add",
             "strength": args.strength, "scale": "unit"},
        ],
    }  # fmt: skip
    with contextlib.suppress(NotFoundError):  # start clean: a 404 when it does not exist yet
        client.delete(f"/variants/{args.variant}", cast_to=object)
    client.post("/variants", body=variant, cast_to=object)

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
