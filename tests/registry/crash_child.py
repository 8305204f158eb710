"""Child process of the crash tests: stores an SAE and stops dead at a chosen point until SIGKILLed.

usage: python -m tests.registry.crash_child DATA_DIR (URL|-) MODE MARKER
MODE sealed:    the blob's temp file is written, hashed and fsynced, not yet renamed into place;
MODE published: the blob is in place and the row inserted, the transaction not yet committed.
MARKER is created when the child reaches that point.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from steerserve.registry import Registry, SAEWeights
from steerserve.registry.blobs import LocalBlobStore
from steerserve.sites import Site
from tests.registry.helpers import rand_state


def main(data_dir: str, url: str, mode: str, marker: str) -> None:
    def pause() -> None:
        Path(marker).write_text(mode)
        time.sleep(600)

    original = getattr(LocalBlobStore, {"sealed": "seal", "published": "publish"}[mode])

    def hooked(self, *args):
        result = original(self, *args)
        pause()
        return result

    setattr(LocalBlobStore, original.__name__, hooked)
    registry = Registry(data_dir, None if url == "-" else url)
    weights = SAEWeights(**rand_state("jumprelu", seed=7), architecture="jumprelu", site=Site(1))
    registry.add_sae(weights, sae_id="doomed")
    raise SystemExit("the child should have been killed before finishing")


if __name__ == "__main__":
    main(*sys.argv[1:5])
