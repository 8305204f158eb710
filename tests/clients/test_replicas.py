"""Two replicas, one registry: two server processes on two ports sharing one PostgreSQL database and
one blob directory (the deploy/ layout). What one replica stores, the other sees and steers with;
what one deletes, the other stops serving at once. Registry writes need the admin key on both."""

from __future__ import annotations

import uuid

import pytest
from steerserve_client import (
    AuthenticationError,
    Client,
    NotFoundError,
    PermissionDeniedError,
    Steering,
)

from tests.clients.conftest import MODEL, SERVER_ARGS, SITE, sae_cfg, sae_state
from tests.server_process import ServerProcess

pytestmark = pytest.mark.postgres
USER_KEY, ADMIN_KEY = "user-key", "admin-key"
GREEDY = {"temperature": 0, "seed": 3}
PROMPT = "The weather is"


@pytest.fixture(scope="module")
def replicas(pg_server, tmp_path_factory):
    """(replica 1, replica 2): `steerserve serve` x 2, one PostgreSQL database, one --data-dir."""
    import psycopg

    name = f"replicas_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{pg_server}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    root = tmp_path_factory.mktemp("replicas")
    shared = ["--registry-url", f"{pg_server}/{name}", "--data-dir", str(root / "blobs"),
              "--api-key", USER_KEY, "--admin-key", ADMIN_KEY]  # fmt: skip
    procs = [ServerProcess([*SERVER_ARGS, *shared], str(root / f"replica{i}.log")) for i in (1, 2)]
    try:
        for proc in procs:  # both were started before either is waited for
            proc.wait_healthy()
        yield procs
    finally:
        for proc in procs:
            proc.stop()
        with psycopg.connect(f"{pg_server}/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="module")
def admins(replicas):
    clients = [Client(p.url, api_key=USER_KEY, admin_key=ADMIN_KEY, max_retries=0) for p in replicas]
    yield clients
    for c in clients:
        c.close()


def test_registry_is_shared_and_deletes_propagate(admins):
    one, two = admins
    sae = one.upload_sae(cfg=sae_cfg(), weights=sae_state(seed=0), id="shared-sae")
    assert two.get_sae("shared-sae")["sha256"] == sae["sha256"]
    assert "shared-sae" in {s["id"] for s in two.list_saes()}
    one.put_features("shared-sae", [{"index": 5, "label": "replicated label"}])
    assert [(h["sae"], h["index"]) for h in two.search_features("replicated")] == [("shared-sae", 5)]
    assert two.get_feature("shared-sae", 5)["label"] == "replicated label"

    one.upload_vector([0.5] * 64, id="shared-vec", layer=1)
    assert two.get_vector("shared-vec")["site"] == "blocks.1.hook_resid_post"
    one.create_variant("shared-var", steering=[Steering.feature("shared-sae", 5).ablate()])
    assert f"{MODEL}:shared-var" in {m["id"] for m in two.models()}
    assert two.get_variant("shared-var")["steering"][0]["mode"] == "ablate"

    two.delete_sae("shared-sae")
    two.delete_vector("shared-vec")
    two.delete_variant("shared-var")
    for lookup in (lambda: one.get_sae("shared-sae"), lambda: one.get_vector("shared-vec"),
                   lambda: one.get_variant("shared-var"), lambda: one.get_feature("shared-sae", 5)):  # fmt: skip
        with pytest.raises(NotFoundError):
            lookup()
    assert f"{MODEL}:shared-var" not in {m["id"] for m in one.models()}


def test_steered_request_on_the_other_replica(admins):
    """An SAE uploaded through replica 1 steers a request served by replica 2 (and a variant stored
    through 1 is usable by name on 2); after replica 2 deletes it and stores other weights under
    the same id, replica 1 steers with the new weights, never its stale device copy."""
    one, two = admins
    one.upload_sae(cfg=sae_cfg(), weights=sae_state(seed=0), id="steer-sae")
    push = [Steering.feature("steer-sae", 3).add(50.0, scale="unit")]
    on_two = two.generate(PROMPT, max_tokens=4, steering=push, return_unsteered=True, **GREEDY)
    assert on_two["token_ids"] != on_two["unsteered"]["token_ids"]  # the steering acted on replica 2
    on_one = one.generate(PROMPT, max_tokens=4, steering=push, **GREEDY)
    assert on_one["token_ids"] == on_two["token_ids"]  # same model, same SAE: same tokens

    one.create_variant("steer-var", steering=push)
    by_name = two.completions(PROMPT, model=f"{MODEL}:steer-var", max_tokens=4, **GREEDY)
    assert by_name["choices"][0]["text"] == on_two["text"]

    two.delete_variant("steer-var")
    two.delete_sae("steer-sae")
    with pytest.raises(NotFoundError) as info:  # replica 1 used it a moment ago; it is gone now
        one.generate(PROMPT, max_tokens=4, steering=push, **GREEDY)
    assert info.value.param.startswith("steering[0]")
    with pytest.raises(NotFoundError):
        one.completions(PROMPT, model=f"{MODEL}:steer-var", max_tokens=4)

    two.upload_sae(cfg=sae_cfg(), weights=sae_state(seed=7), id="steer-sae")  # same id, new weights
    fresh_two = two.generate(PROMPT, max_tokens=4, steering=push, **GREEDY)
    fresh_one = one.generate(PROMPT, max_tokens=4, steering=push, **GREEDY)
    assert fresh_two["token_ids"] != on_two["token_ids"]  # the new weights steer elsewhere...
    assert fresh_one["token_ids"] == fresh_two["token_ids"]  # ...on both replicas
    assert one.get_sae("steer-sae")["site"] == SITE


def test_keys_on_every_replica(replicas):
    for proc in replicas:
        anonymous = Client(proc.url, max_retries=0)
        with pytest.raises(AuthenticationError) as info:
            anonymous.models()
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        assert anonymous.health() == {"status": "ok"}  # /health stays open
        user = Client(proc.url, api_key=USER_KEY, max_retries=0)
        assert MODEL in {m["id"] for m in user.models()}
        with pytest.raises(PermissionDeniedError) as info:
            user.create_variant("nope", steering=[Steering.vector("v").project_out()])
        assert info.value.status_code == 403
