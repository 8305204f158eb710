"""Steer a chat completion with the official openai SDK: steerserve's fields go in `extra_body`.

    python clients/examples/openai_steering.py --base-url http://localhost:8000 --sae res-l0 --feature 3

Adds SAE feature `--feature` of `--sae` (and, with `--vector`, a steering vector) at every position,
asks for the unsteered twin in the same batch (`return_unsteered`), and prints both answers.
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://localhost:8000")
    p.add_argument("--api-key", default="none")
    p.add_argument("--model", default=None, help="default: the first model the server lists")
    p.add_argument("--sae", default="res-l0")
    p.add_argument("--feature", type=int, default=0)
    p.add_argument("--strength", type=float, default=8.0)
    p.add_argument("--vector", default=None, help="also add this stored steering vector")
    p.add_argument("--prompt", default="Tell me about the weather.")
    args = p.parse_args()

    client = OpenAI(base_url=args.base_url.rstrip("/") + "/v1", api_key=args.api_key)
    model = args.model or client.models.list().data[0].id

    steering = [
        {
            "feature": {"sae": args.sae, "index": args.feature},
            "mode": "add",
            "strength": args.strength,
            "scale": "unit",  # strength x the unit decoder direction
            "positions": "all",
        }
    ]
    if args.vector:
        steering.append({"vector": args.vector, "mode": "add", "strength": 1.0, "positions": "generated"})

    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": args.prompt}],
        max_tokens=16,
        temperature=0,
        seed=0,
        extra_body={"steering": steering, "return_unsteered": True},
    )
    for choice in response.choices:
        # the extension field `steered` is kept by the SDK as an extra attribute of the choice
        label = "steered" if getattr(choice, "steered", True) else "unsteered"
        print(f"{label:>9}: {choice.message.content!r}")


if __name__ == "__main__":
    main()
