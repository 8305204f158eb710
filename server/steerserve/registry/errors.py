"""Registry errors: what went wrong, which parameter, and the bound or value involved.

The registry knows nothing of HTTP; `api/routes_registry.py` maps each class onto a status
(InvalidInput 400, NotFound 404, Conflict 409, TooLarge 413). Messages name the parameter and
the offending value so they can be shown to a client as they are.
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base class; `param` names the request field the error is about, when there is one."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidInput(RegistryError):
    """Malformed or unsafe input: bad file format, wrong shape or dtype, non-finite values, bad id."""


class NotFound(RegistryError):
    """No SAE, vector, variant or feature with that id."""


class Conflict(RegistryError):
    """The id is already taken."""


class TooLarge(RegistryError):
    """An upload or a tensor file over the configured limit."""
