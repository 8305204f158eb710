"""Transcoders end to end, through a real server on tiny GPT-2 and Llama models (random norm weights): the
four transcoder classes written by the real sae-lens upload as they are, real eai-sparsify transcoders
(TopK, saved by sparsify) and a Gemma Scope 2 raw layout of a sae-lens JumpReLUSkipTranscoder read at
blocks.L.mlp.hook_in (a pre-hook on the MLP module here); /v1/inspect equals
the library's own encode() of the MLP input it reads; clamp / scale / ablate / add through /generate equal
HF generate() with a hand-written hook pair (read the MLP's input; replace the MLP's output y by
`decode(a') + skip + (y - (decode(a) + skip))`, the library's own encode / decode / W_skip, keeping the
transcoder's error), token for token."""

from __future__ import annotations

import functools
import json
import warnings

import httpx
import pytest
import safetensors.torch
import torch

from steerserve.types.sites import parse_site
from tests.server_process import ServerProcess
from tests.steering.reference import _SUBLAYER, _layers, _load, greedy_generate
from tests.steering.site_models import save_norm_perturbed_model

warnings.filterwarnings("ignore", module="sae_lens")
sae_lens = pytest.importorskip("sae_lens")

D_MODEL, D_SAE, MAX_TOKENS = 64, 48, 8
PROMPT_TEXT = "The weather in Oslo"
PROMPT = list(PROMPT_TEXT.encode())  # the byte-level tokenizer adds no BOS
# sae-lens class -> the MLP input it reads (each writes blocks.L.hook_mlp_out of the same layer)
TRANSCODERS = {
    "transcoder": "blocks.0.ln2.hook_normalized",
    "skip_transcoder": "blocks.1.hook_mlp_in",
    "jumprelu_transcoder": "blocks.1.ln2.hook_normalized",
    "jumprelu_skip_transcoder": "blocks.0.hook_resid_mid",
}
_CONFIGS = {
    "transcoder": "TranscoderConfig",
    "skip_transcoder": "SkipTranscoderConfig",
    "jumprelu_transcoder": "JumpReLUTranscoderConfig",
    "jumprelu_skip_transcoder": "JumpReLUSkipTranscoderConfig",
}


# eai-sparsify transcoders (transcode: true, hookpoint layers.L.mlp): TopK, read the MLP module's input
SPARSIFY = {"sparsify": "blocks.0.mlp.hook_in", "sparsify_skip": "blocks.0.mlp.hook_in"}
SPARSIFY_K = 6  # < the top_k inspect asks (D_SAE): features outside the top k must not show


class SparsifyTranscoder:
    """A real `sparsify.SparseCoder` (transcode) seen through the dense encode / decode the hooks use:
    `encode` scatters sparsify's own top-k output, `decode` is sparsify's decode over all features."""

    def __init__(self, hook: str, skip: bool, seed: int):
        sparsify = pytest.importorskip("sparsify")
        # NOTE: sparsify decodes with a Triton kernel that has no CPU driver; its own eager one is the same sum
        sparsify.sparse_coder.decoder_impl = sparsify.utils.eager_decode
        cfg = sparsify.SparseCoderConfig(
            num_latents=D_SAE, k=SPARSIFY_K, transcode=True, skip_connection=skip
        )
        self.coder = sparsify.SparseCoder(D_MODEL, cfg)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.coder.named_parameters():
                scale = {"encoder.weight": 2 * D_MODEL**-0.5, "W_dec": 2.0, "W_skip": 0.1}.get(name, 0.3)
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            self.coder.encoder.bias[: D_SAE // 4] -= 8.0  # features that stay off on the prompt
            self.coder.encoder.bias[-1] += 4.0  # one in every token's top k: edits of it show in the output
        self.W_dec = self.coder.W_dec
        if skip:
            self.W_skip = self.coder.W_skip

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        out = self.coder.encode(x)
        return torch.zeros(x.shape[0], D_SAE).scatter(1, out.top_indices, out.top_acts)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return self.coder.decode(acts, torch.arange(D_SAE).expand(acts.shape[0], D_SAE))


def library_transcoder(arch: str, hook: str, seed: int, hook_out: str | None = None):
    layer = parse_site(hook).layer
    cfg = getattr(sae_lens, _CONFIGS[arch])(
        d_in=D_MODEL, d_sae=D_SAE, d_out=D_MODEL, apply_b_dec_to_input=False
    )
    cfg.metadata = sae_lens.saes.sae.SAEMetadata(
        hook_name=hook, hook_name_out=hook_out or f"blocks.{layer}.hook_mlp_out", model_name="tiny"
    )
    tc = sae_lens.SAE.from_dict(cfg.to_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tc.named_parameters():
            scale = {"W_enc": 2 * D_MODEL**-0.5, "W_dec": 0.6, "W_skip": 0.1, "threshold": 0.3}.get(name, 0.3)
            p.copy_(torch.randn(p.shape, generator=g) * scale)  # thresholds of both signs
        tc.b_enc[: D_SAE // 4] -= 8.0  # features that stay off on the prompt: clamping one writes W_dec[f]
    return tc


# Gemma Scope 2 transcoders (raw params.safetensors + config.json, SAELens loader gemma_3): read the
# pre-MLP norm's output; the library's JumpReLUSkipTranscoder is the reference
GEMMA_SCOPE_2 = {"gemma_scope_2": "blocks.0.mlp.hook_in"}
HOOKS = {**TRANSCODERS, **SPARSIFY, **GEMMA_SCOPE_2}


def save_gemma_scope_2(tc, layer: int, folder) -> None:
    """`tc` in Gemma Scope 2's raw layout: lowercase names, `affine_skip_connection` = W_skip^T."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {"W_enc": "w_enc", "W_dec": "w_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold"}
    state = {new: getattr(tc, old).detach().contiguous() for old, new in names.items()}
    state["affine_skip_connection"] = tc.W_skip.detach().T.contiguous()
    safetensors.torch.save_file(state, str(folder / "params.safetensors"))
    raw = {
        "architecture": "jump_relu",
        "model_name": "tiny",
        "hf_hook_point_in": f"model.layers.{layer}.pre_feedforward_layernorm.output",
        "hf_hook_point_out": f"model.layers.{layer}.post_feedforward_layernorm.output",
        "affine_connection": True,
    }
    (folder / "config.json").write_text(json.dumps(raw))


def _read_hook(model, hook: str, store: dict):
    """A hand-written read-only hook storing what the transcoder reads (`hook`) in store["x"] [T, d]."""
    site = parse_site(hook)
    _, ln2_name, _ = _SUBLAYER[model.config.model_type]
    ln2 = getattr(_layers(model)[site.layer], ln2_name)
    if site.hook.value in ("resid_mid", "mlp_in"):  # the pre-MLP norm's input

        def pre(module, args, kwargs):
            store["x"] = (args[0] if args else kwargs["hidden_states"])[0].detach().clone()

        return ln2.register_forward_pre_hook(pre, with_kwargs=True)
    if site.hook.value == "mlp_hook_in":  # what the MLP module is called with (sparsify's transcoder input)

        def mlp_input(module, args, kwargs):
            store["x"] = args[0][0].detach().clone()

        mlp = _layers(model)[site.layer].mlp
        return mlp.register_forward_pre_hook(mlp_input, with_kwargs=True)
    assert site.hook.value == "ln2_normalized"

    def normalized(module, args, output):  # TransformerLens: centred (LayerNorm), / scale, no weight
        x = args[0][0].float()
        if isinstance(module, torch.nn.LayerNorm):
            x = x - x.mean(-1, keepdim=True)
        eps = module.eps if hasattr(module, "eps") else module.variance_epsilon
        store["x"] = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()

    return ln2.register_forward_hook(normalized)


def _reconstruction(tc, x, acts):
    out = tc.decode(acts)
    return out + x @ tc.W_skip.T if hasattr(tc, "W_skip") else out


@functools.lru_cache(maxsize=2)
def unsteered(model_dir) -> list[int]:
    return transcoder_generate(model_dir, None, "", None)


def transcoder_generate(model_dir, tc, hook: str, edit: dict | None) -> list[int]:
    """Greedy HF generate() with the hook pair doing `edit` ({"mode", "index", "value", "positions"})."""
    model = _load(model_dir)
    store, state = {}, {"start": 0}

    def write(module, args, output):
        y = output[0] if isinstance(output, tuple) else output  # [1, T, d]
        x = store.pop("x").to(y.dtype)
        t = x.shape[0]
        pos = torch.arange(state["start"], state["start"] + t)
        state["start"] += t
        mask = {"all": torch.ones(t), "prompt": (pos < len(PROMPT)).float()}.get(
            edit["positions"], (pos >= len(PROMPT)).float()
        )
        f = edit["index"]
        acts = tc.encode(x)  # [T, d_sae]
        new = acts.clone()
        a = acts[:, f]
        target = {"clamp": torch.full_like(a, edit["value"]), "scale": a * edit["value"]}.get(
            edit["mode"], torch.zeros_like(a)
        )
        if "when" in edit:  # a gate on the transcoder's own feature g, read from x: a_g > above
            g, above = edit["when"]
            mask = mask * (acts[:, g] > above).float()
        if edit["mode"] == "add":
            y[0] += mask[:, None] * edit["value"] * tc.W_dec[f]
            return
        new[:, f] = mask * target + (1 - mask) * a
        y[0] = _reconstruction(tc, x, new) + (y[0] - _reconstruction(tc, x, acts))  # keep the error

    handles = []
    if edit is not None:
        mlp = getattr(_layers(model)[parse_site(hook).layer], _SUBLAYER[model.config.model_type][2])
        handles = [_read_hook(model, hook, store), mlp.register_forward_hook(write)]
    try:
        return greedy_generate(model, PROMPT, MAX_TOKENS)
    finally:
        for h in handles:
            h.remove()


def read_inputs(model_dir, hook: str) -> torch.Tensor:
    """[T, d] what the transcoder reads over the unsteered PROMPT."""
    model, store = _load(model_dir), {}
    handle = _read_hook(model, hook, store)
    try:
        with torch.inference_mode():
            model(torch.tensor([PROMPT]))
    finally:
        handle.remove()
    return store["x"]


def _upload(url: str, folder, sae_id: str) -> httpx.Response:
    files = {
        "cfg": ("cfg.json", (folder / "cfg.json").read_bytes(), "application/json"),
        "weights": ("sae_weights.safetensors", (folder / "sae_weights.safetensors").read_bytes()),
    }
    return httpx.post(url + "/v1/saes", files=files, data={"id": sae_id}, timeout=60)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def served(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"transcoders-{request.param}")
    model_dir = save_norm_perturbed_model(request.param, str(tmp / "model"))
    proc = ServerProcess(
        ["--model", model_dir, "--kv-cache-memory-gb", "0.05", "--max-num-seqs", "8", "--threads", "1"],
        str(tmp / "server.log"),
    ).wait_healthy()
    proc.model_dir, proc.tcs = model_dir, {}
    for i, (arch, hook) in enumerate(TRANSCODERS.items()):
        tc = proc.tcs[arch] = library_transcoder(arch, hook, seed=i)
        tc.save_model(str(tmp / arch))
        r = _upload(proc.url, tmp / arch, arch)
        assert r.status_code == 201, r.text
        assert r.json()["site"] == hook
        out = f"blocks.{parse_site(hook).layer}.hook_mlp_out"
        assert r.json()["meta"]["hook_name_out"] == out and r.json()["meta"]["source_architecture"] == arch
    for i, (name, hook) in enumerate(SPARSIFY.items()):
        tc = proc.tcs[name] = SparsifyTranscoder(hook, skip=name.endswith("skip"), seed=21 + i)
        tc.coder.save_to_disk(tmp / name)  # sparsify's own save: cfg.json + sae.safetensors
        files = {n: (n, (tmp / name / n).read_bytes()) for n in ("cfg.json", "sae.safetensors")}
        files = {"cfg": files["cfg.json"], "weights": files["sae.safetensors"]}
        r = httpx.post(proc.url + "/v1/saes", files=files, data={"id": name, "site": hook}, timeout=60)
        assert r.status_code == 201, r.text
        assert r.json()["site"] == hook and r.json()["architecture"] == "topk", r.json()
        assert r.json()["meta"]["hook_name_out"] == f"blocks.{parse_site(hook).layer}.hook_mlp_out"
    for i, (name, hook) in enumerate(GEMMA_SCOPE_2.items()):
        tc = proc.tcs[name] = library_transcoder("jumprelu_skip_transcoder", hook, seed=30 + i)
        save_gemma_scope_2(tc, parse_site(hook).layer, tmp / name)
        files = {
            "cfg": ("config.json", (tmp / name / "config.json").read_bytes()),
            "weights": ("params.safetensors", (tmp / name / "params.safetensors").read_bytes()),
        }
        r = httpx.post(proc.url + "/v1/saes", files=files, data={"id": name}, timeout=60)
        assert r.status_code == 201, r.text
        assert r.json()["site"] == hook and r.json()["architecture"] == "jumprelu", r.json()
        assert r.json()["meta"]["hook_name_out"] == f"blocks.{parse_site(hook).layer}.hook_mlp_out"
    yield proc
    proc.stop()


@pytest.mark.parametrize("arch", [*TRANSCODERS, *SPARSIFY, *GEMMA_SCOPE_2])
def test_inspect_reads_where_the_transcoder_reads(served, arch):
    r = httpx.post(
        served.url + "/v1/inspect", json={"text": PROMPT_TEXT, "sae": arch, "top_k": D_SAE}, timeout=60
    )
    assert r.status_code == 200, r.text
    with torch.no_grad():
        acts = served.tcs[arch].encode(read_inputs(served.model_dir, HOOKS[arch]))  # [T, d_sae]
    fired = 0
    for t, row in zip(r.json()["tokens"], acts, strict=True):
        got = {f["index"]: f["activation"] for f in t["features"]}
        want = {i: float(v) for i, v in enumerate(row) if v > 0}  # every feature, not only the top few
        assert got.keys() == want.keys(), (arch, t["token_id"])
        assert [got[i] for i in want] == pytest.approx(list(want.values()), rel=1e-4, abs=1e-4)
        fired += len(want)
    assert fired > 0


def _features(served, arch):
    """(a feature active on the prompt, one inactive on every prompt token) of transcoder `arch`."""
    with torch.no_grad():
        acts = served.tcs[arch].encode(read_inputs(served.model_dir, HOOKS[arch]))
    active = int(acts.mean(0).argmax())
    silent = [i for i in range(D_SAE) if not bool((acts[:, i] > 0).any())]
    assert silent, "every feature fires: choose other weights"
    return active, silent[0]


EDITS = {  # name -> (mode, active feature?, value, positions)
    "clamp_active": ("clamp", True, 6.0, "all"),
    "clamp_inactive": ("clamp", False, 5.0, "all"),
    "scale_generated": ("scale", True, 4.0, "generated"),
    "ablate_prompt": ("ablate", True, 0.0, "prompt"),
    "add": ("add", True, 5.0, "all"),
}


@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize("arch", [*TRANSCODERS, *SPARSIFY, *GEMMA_SCOPE_2])
def test_edits_equal_a_hand_written_hook_pair(served, arch, edit):
    mode, active, value, positions = EDITS[edit]
    active_f, silent_f = _features(served, arch)
    f = active_f if active else silent_f
    item = {"feature": {"sae": arch, "index": f}, "mode": mode, "positions": positions}
    item.update(
        {"clamp": {"value": value}, "scale": {"factor": value}, "add": {"strength": value}}.get(mode, {})
    )
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}
    r = httpx.post(served.url + "/generate", json={**body, "steering": [item]}, timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()["token_ids"]
    tc, hook = served.tcs[arch], HOOKS[arch]
    with torch.no_grad():
        want = transcoder_generate(
            served.model_dir, tc, hook, {"mode": mode, "index": f, "value": value, "positions": positions}
        )
        assert got == want
    assert got != unsteered(served.model_dir), "the edit must change the output"


def test_a_transcoder_that_does_not_write_its_own_mlp_output_is_a_400(served, tmp_path):
    tc = library_transcoder("transcoder", "blocks.0.hook_mlp_in", 9, hook_out="blocks.1.hook_mlp_out")
    tc.save_model(str(tmp_path))
    r = _upload(served.url, tmp_path, "bad-tc")
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "cfg.hook_name_out" and "blocks.1.hook_mlp_out" in err["message"], err
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["metadata"]["hook_name_out"]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    r = _upload(served.url, tmp_path, "bad-tc")
    assert r.status_code == 400 and r.json()["error"]["param"] == "cfg.hook_name_out", r.text


@pytest.mark.parametrize("mode", ["clamp", "add"])
@pytest.mark.parametrize("arch", ["skip_transcoder", "jumprelu_skip_transcoder"])
def test_a_gate_on_a_transcoder_feature_gates_its_edits(served, arch, mode):
    g, silent_f = _features(served, arch)
    tc, hook = served.tcs[arch], TRANSCODERS[arch]
    with torch.no_grad():
        above = float(tc.encode(read_inputs(served.model_dir, hook))[:, g].median())
    f = silent_f if mode == "clamp" else g
    item = {"feature": {"sae": arch, "index": f}, "mode": mode}
    item.update({"value": 5.0} if mode == "clamp" else {"strength": 5.0})

    def gated(above: float) -> list[int]:
        when = {"feature": {"sae": arch, "index": g}, "above": above}
        body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}
        r = httpx.post(
            served.url + "/generate", json={**body, "steering": [{**item, "when": when}]}, timeout=60
        )
        assert r.status_code == 200, r.text
        return r.json()["token_ids"]

    edit = {"mode": mode, "index": f, "value": 5.0, "positions": "all"}
    with torch.no_grad():
        assert gated(above) == transcoder_generate(served.model_dir, tc, hook, {**edit, "when": (g, above)})
        assert transcoder_generate(served.model_dir, tc, hook, edit) != unsteered(served.model_dir)
    assert gated(1e4) == unsteered(served.model_dir), "a gate that never opens must stop the edit"
