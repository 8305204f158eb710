"""A tour of the steerserve-client package: upload an SAE, label and search its features, steer.

    pip install -e clients/python
    python clients/examples/steerserve_client_tour.py --base-url http://localhost:8000 --sae-dir PATH

PATH is a SAELens folder (cfg.json + sae_weights.safetensors) trained on the served model.
"""

from __future__ import annotations

import argparse
import contextlib

from steerserve_client import Client, NotFoundError, Steering


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://localhost:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--sae-dir", required=True)
    p.add_argument("--sae-id", default="tour-sae")
    args = p.parse_args()

    with Client(args.base_url, api_key=args.api_key) as c:
        with contextlib.suppress(NotFoundError):
            c.delete_sae(args.sae_id)  # start clean
        sae = c.upload_sae(args.sae_dir, id=args.sae_id)
        print(f"uploaded {sae['id']}: {sae['d_sae']} features at {sae['site']}")

        c.put_features(sae["id"], [{"index": 0, "label": "cold weather", "max_activation": 4.0},
                                   {"index": 1, "label": "sunny beaches"}])  # fmt: skip
        hit = c.search_features("cold", sae=sae["id"])[0]
        print(f"search 'cold' -> feature {hit['index']} ({hit['label']})")

        cold = Steering.feature(sae["id"], hit["index"])
        out = c.generate("The weather is", max_tokens=8, temperature=0,
                         steering=[cold.add(1.0, scale="max_activation")], return_unsteered=True)  # fmt: skip
        print(f"steered:   {out['text']!r}\nunsteered: {out['unsteered']['text']!r}")

        print("streamed:  ", end="")
        for event in c.generate_stream("The weather is", max_tokens=8, temperature=0,
                                       steering=[cold.clamp(4.0, positions="generated")]):  # fmt: skip
            print(event.get("text", ""), end="", flush=True)
        print()


if __name__ == "__main__":
    main()
