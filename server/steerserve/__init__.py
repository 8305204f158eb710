"""steerserve: an LLM inference server whose generations can be steered from the inside."""

import os

# NOTE: torch's CPU allocator backs allocations of 2 MB and more with transparent huge pages when this is
# set before its first allocation, hence here, ahead of any torch import: weights, activations and the
# KV cache then take a TLB entry per 2 MB (packed GEMMs 4-8% faster on CPU; issue #26 and
# runner/cpu_memory.py). An operator's own setting wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
