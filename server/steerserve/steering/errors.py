"""SteeringError: why a request's steering cannot run, named by the field at fault.

Raised by compilation (steering/compile.py, steering/bounds.py) on the API's threads; the API renders
it in the OpenAI error shape (api/errors.py). It knows no HTTP framework: `status` is the answer's.
"""

from __future__ import annotations


class SteeringError(Exception):
    def __init__(self, status: int, message: str, param: str | None, code: str):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def invalid(param: str, message: str) -> SteeringError:
    """400 `invalid_steering` on `param`: "<param>: <message>"."""
    return SteeringError(400, f"{param}: {message}", param, "invalid_steering")
