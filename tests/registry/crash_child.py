"""Child process of the crash tests: stores an SAE and stops dead at a chosen point until SIGKILLed.

usage: python -m tests.registry.crash_child CONFIG_JSON MODE MARKER
CONFIG_JSON: the RegistryConfig's fields (data dir, registry URL, blob URL...);
MODE sealed:    the blob's temp file is written, hashed and fsynced (in S3: uploaded), not yet published;
MODE published: the blob is in place and the row inserted, the transaction not yet committed.
MARKER is created when the child reaches that point.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from steerserve.config import RegistryConfig
from steerserve.registry import Registry, SAEWeights
from steerserve.types.sites import Site
from tests.registry.helpers import rand_state


def main(config: str, mode: str, marker: str) -> None:
    def pause() -> None:
        Path(marker).write_text(mode)
        time.sleep(600)

    registry = Registry.from_config(RegistryConfig(**json.loads(config)))
    store_class = type(registry.blobs)
    original = getattr(store_class, {"sealed": "seal", "published": "publish"}[mode])

    def hooked(self, *args):
        result = original(self, *args)
        pause()
        return result

    setattr(store_class, original.__name__, hooked)
    weights = SAEWeights(**rand_state("jumprelu", seed=7), architecture="jumprelu", site=Site(1))
    registry.add_sae(weights, sae_id="doomed")
    raise SystemExit("the child should have been killed before finishing")


if __name__ == "__main__":
    main(*sys.argv[1:4])
