"""A `POST /v1/variants` body -> (id, the spec to store), checked by the models that check a request's
steering (steering/items.py), so a variant that is stored parses when a request uses it.

Only the shape is checked here: whether the SAEs, features and vectors it names exist and fit is
compile's, when a request uses the variant (they may be deleted or replaced meanwhile anyway). The
spec is stored as given (unknown keys included), without `id`.
"""

from __future__ import annotations

from steerserve.registry.errors import InvalidInput
from steerserve.registry.validate import check_id
from steerserve.steering.errors import invalid
from steerserve.steering.items import FIELDS, parse

MAX_ITEMS = 256  # per list: a stored variant is compiled again on every request that uses it


def parse_variant(body: object) -> tuple[str, dict]:
    """(id, spec to store) from a `POST /v1/variants` body: InvalidInput on the body or its id,
    SteeringError (400) on its steering."""
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object", param=None)
    variant_id = check_id(body.get("id"))
    spec = {k: v for k, v in body.items() if k != "id"}
    spec.setdefault("steering", [])
    spec.setdefault("feature_logit_bias", [])
    for name in FIELDS:
        items = spec.get(name, [])
        if not isinstance(items, list) or len(items) > MAX_ITEMS:
            raise invalid(name, f"must be a list of at most {MAX_ITEMS} entries")
    if not any(spec.get(name) for name in FIELDS):
        raise invalid(
            "steering", "a variant needs at least one steering, feature_logit_bias or stop_when entry"
        )
    parse(spec)
    return variant_id, spec
