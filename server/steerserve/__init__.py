"""steerserve: an LLM inference server whose generations can be steered from the inside."""

__version__ = "0.1.0"
