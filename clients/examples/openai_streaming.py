"""Stream a steered chat completion with the openai SDK, token by token, with usage at the end.

python clients/examples/openai_streaming.py --base-url http://localhost:8000 [--sae res-l0 --feature 3]
"""

from __future__ import annotations

import argparse
import sys

from openai import OpenAI


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://localhost:8000")
    p.add_argument("--api-key", default="none")
    p.add_argument("--sae", default=None, help="steer with this SAE's feature (default: no steering)")
    p.add_argument("--feature", type=int, default=0)
    p.add_argument("--strength", type=float, default=8.0)
    p.add_argument("--max-tokens", type=int, default=24)
    args = p.parse_args()

    client = OpenAI(base_url=args.base_url.rstrip("/") + "/v1", api_key=args.api_key)
    model = client.models.list().data[0].id
    extra = {}
    if args.sae:
        feature = {"sae": args.sae, "index": args.feature}
        extra["steering"] = [{"feature": feature, "mode": "add", "strength": args.strength, "scale": "unit"}]

    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Write a line about the sea."}],
        max_tokens=args.max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    pieces = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            sys.stdout.write(chunk.choices[0].delta.content)
            sys.stdout.flush()
            pieces += 1
        if chunk.usage is not None:
            print(f"\n[{pieces} chunks; usage: {chunk.usage.completion_tokens} completion tokens]")


if __name__ == "__main__":
    main()
