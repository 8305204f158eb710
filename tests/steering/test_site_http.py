"""SAEs and vectors at the sites inside a layer, through a real server on a Gemma-2 (norms after attention
and MLP, random norm weights): SAEs written by the real sae-lens upload at their cfg's hook; /v1/inspect
equals the library's own encode() of what a plain hook at the matching module sees; a clamp and a
vector add through /generate equal HF generate() with a plain hook doing the same; sites the server
does not have are 400s naming the site."""

from __future__ import annotations

import io
import json
import warnings

import httpx
import pytest
import torch
from safetensors.torch import save

from steerserve.types.sites import parse_site
from tests.server_process import ServerProcess
from tests.steering.reference import read_site, steered_generate
from tests.steering.site_models import save_norm_perturbed_model

warnings.filterwarnings("ignore", module="sae_lens")
sae_lens = pytest.importorskip("sae_lens")

D_MODEL, D_SAE = 64, 32
PROMPT_TEXT = "The weather in Oslo"
PROMPT = list(PROMPT_TEXT.encode())  # the byte-level tokenizer adds no BOS
# (hook name, sae-lens architecture): one per site inside a layer
SAES = {
    "blocks.1.hook_attn_out": "standard",
    "blocks.1.hook_resid_mid": "jumprelu",
    "blocks.0.hook_mlp_in": "standard",
    "blocks.1.ln2.hook_normalized": "jumprelu",
    "blocks.0.hook_mlp_out": "standard",
}


def library_sae(hook: str, arch: str, seed: int):
    cfg_cls = {"standard": sae_lens.StandardSAEConfig, "jumprelu": sae_lens.JumpReLUSAEConfig}[arch]
    cfg = cfg_cls(d_in=D_MODEL, d_sae=D_SAE)
    cfg.metadata = sae_lens.saes.sae.SAEMetadata(hook_name=hook, model_name="tiny-gemma2")
    sae = sae_lens.SAE.from_dict(cfg.to_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            scale = {"W_enc": D_MODEL**-0.5, "W_dec": 0.5, "threshold": 0.2}.get(name, 0.3)
            p.copy_(torch.randn(p.shape, generator=g) * scale)
            if name == "threshold":
                p.abs_()
    return sae


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("site-http")
    model_dir = save_norm_perturbed_model("gemma2", str(tmp / "model"))
    proc = ServerProcess(
        ["--model", model_dir, "--kv-cache-memory-gb", "0.05", "--max-num-seqs", "8", "--threads", "1"],
        str(tmp / "server.log"),
    ).wait_healthy()
    saes = {}
    for i, (hook, arch) in enumerate(SAES.items()):
        sae = saes[hook] = library_sae(hook, arch, seed=i)
        folder = tmp / f"sae{i}"
        sae.save_model(str(folder))
        files = {
            "cfg": ("cfg.json", (folder / "cfg.json").read_bytes(), "application/json"),
            "weights": ("sae_weights.safetensors", (folder / "sae_weights.safetensors").read_bytes()),
        }
        r = httpx.post(proc.url + "/v1/saes", files=files, data={"id": f"sae{i}"}, timeout=60)
        assert r.status_code == 201, r.text
        assert r.json()["site"] == hook
    proc.model_dir, proc.saes = model_dir, saes
    yield proc
    proc.stop()


def _site_states(model_dir: str, hook: str) -> torch.Tensor:
    """[T, d] what a plain hook at the module matching `hook` sees for PROMPT."""
    site = parse_site(hook)
    return read_site(model_dir, PROMPT, (site.layer, site.hook.value), lambda h: h.clone())


@pytest.mark.parametrize("hook", list(SAES))
def test_inspect_at_each_site_equals_the_library_encode(served, hook):
    i = list(SAES).index(hook)
    r = httpx.post(
        served.url + "/v1/inspect", json={"text": PROMPT_TEXT, "sae": f"sae{i}", "top_k": 5}, timeout=60
    )
    assert r.status_code == 200, r.text
    tokens = r.json()["tokens"]
    assert [t["token_id"] for t in tokens] == PROMPT
    with torch.no_grad():
        acts = served.saes[hook].encode(_site_states(served.model_dir, hook))
    vals, idx = acts.topk(5, dim=-1)
    fired = 0
    for t, v, ix in zip(tokens, vals, idx, strict=True):
        keep = [(int(a), float(b)) for a, b in zip(ix, v, strict=True) if b > 0]
        assert [f["index"] for f in t["features"]] == [a for a, _ in keep], (hook, t["token_id"])
        assert [f["activation"] for f in t["features"]] == pytest.approx(
            [b for _, b in keep], rel=1e-4, abs=1e-4
        )
        fired += len(keep)
    assert fired > 0, "the SAE must fire somewhere on the prompt"


def _generate(served, steering) -> list[int]:
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0.0, "ignore_eos": True, "steering": steering}
    r = httpx.post(served.url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["token_ids"]


def _sae_dict(sae) -> dict:
    sd = {n: p.detach().clone() for n, p in sae.named_parameters()}
    return {**sd, "threshold": sd.get("threshold"), "apply_b_dec_to_input": sae.cfg.apply_b_dec_to_input}


@pytest.mark.parametrize("hook", list(SAES))
def test_a_clamp_at_each_site_through_the_server_equals_a_plain_hook(served, hook):
    i = list(SAES).index(hook)
    got = _generate(served, [{"feature": {"sae": f"sae{i}", "index": 3}, "mode": "clamp", "value": 8.0}])
    site = parse_site(hook)
    where = (site.layer, site.hook.value)
    item = {
        "kind": "clamp",
        "sae": _sae_dict(served.saes[hook]),
        "index": 3,
        "value": 8.0,
        "positions": "all",
    }
    want = steered_generate(served.model_dir, PROMPT, 8, {where: [item]})
    assert got == want
    assert got != steered_generate(served.model_dir, PROMPT, 8, {})


def test_a_vector_at_mlp_in_by_layer_and_hook(served):
    v = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(5)) * 2
    body = {"id": "v-mlp-in", "site": {"layer": 1, "hook": "mlp_in"}, "vector": v.tolist()}
    r = httpx.post(served.url + "/v1/vectors", json=body, timeout=60)
    assert r.status_code == 201, r.text
    got = _generate(served, [{"vector": "v-mlp-in", "mode": "add", "strength": 1.5}])
    want = steered_generate(
        served.model_dir,
        PROMPT,
        8,
        {(1, "mlp_in"): [{"kind": "add", "direction": 1.5 * v, "positions": "all"}]},
    )
    assert got == want and got != steered_generate(served.model_dir, PROMPT, 8, {})


@pytest.mark.parametrize(
    "hook",
    ["blocks.0.mlp.hook_post", "blocks.0.attn.hook_z", "blocks.7.hook_attn_out"],
    ids=["mlp_hidden", "hook_z", "layer"],
)
def test_sites_the_server_lacks_are_400s(served, hook):
    cfg = json.loads(json.dumps(library_sae("blocks.0.hook_attn_out", "standard", 9).cfg.to_dict()))
    cfg.setdefault("metadata", {})["hook_name"] = hook
    weights = save(
        {n: p.detach() for n, p in library_sae("blocks.0.hook_attn_out", "standard", 9).named_parameters()}
    )
    files = {
        "cfg": ("cfg.json", json.dumps(cfg), "application/json"),
        "weights": ("w.safetensors", io.BytesIO(weights)),
    }
    r = httpx.post(served.url + "/v1/saes", files=files, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] in ("site", "cfg.hook_name", "cfg.reshape_activations"), err
    assert "hook" in err["message"] or "layer" in err["message"], err
    r = httpx.post(
        served.url + "/v1/vectors", json={"id": "bad", "site": hook, "vector": [1.0] * D_MODEL}, timeout=60
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "site", r.text


def test_a_sparsify_transcoder_is_refused_where_mlp_out_is_a_post_norm_output(served, tmp_path):
    """Gemma-2: sparsify's transcoder writes the MLP module's raw output, our hook_mlp_out is after
    post_feedforward_layernorm, so its edits cannot be exact there: a 400, not an approximation."""
    from tests.steering.test_transcoders import SparsifyTranscoder

    tc = SparsifyTranscoder("blocks.0.mlp.hook_in", skip=False, seed=5)
    tc.coder.save_to_disk(tmp_path / "sp")
    files = {
        "cfg": ("cfg.json", (tmp_path / "sp" / "cfg.json").read_bytes()),
        "weights": ("sae.safetensors", (tmp_path / "sp" / "sae.safetensors").read_bytes()),
    }
    r = httpx.post(
        served.url + "/v1/saes", files=files, data={"id": "sp-gemma", "site": "blocks.0.mlp.hook_in"}
    )
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "site" and "post-MLP norm" in err["message"], r.text
    assert httpx.get(served.url + "/v1/saes/sp-gemma").status_code == 404
