"""Shared by the format-fidelity tests: SAEs written by the REAL sae-lens, a registry server on a real
port, and SAELens' own release loaders run offline (their Hugging Face download answered from a
local folder; nothing of ours is replaced).

Importing this module imports sae_lens (~14 s): import it once per test module.
"""

from __future__ import annotations

import json
import uuid
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

warnings.filterwarnings("ignore", module="sae_lens")
from sae_lens import SAE  # noqa: E402
from sae_lens.loading import pretrained_sae_loaders  # noqa: E402
from sae_lens.loading.pretrained_saes_directory import get_norm_scaling_factor  # noqa: E402
from sae_lens.registry import get_sae_training_class  # noqa: E402
from sae_lens.saes.sae import SAEMetadata  # noqa: E402

from tests.registry.app_process import ThreadServer, make_app  # noqa: E402
from tests.registry.helpers import D_IN, D_SAE  # noqa: E402

HOOK = "blocks.2.hook_resid_post"
X = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(7)) * 1.5  # hidden states [64, d]


def metadata(**extra) -> SAEMetadata:
    return SAEMetadata(hook_name=HOOK, model_name="toy", **extra)


def randomize(sae: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter / buffer drawn at random: decoder rows of uneven norms, thresholds of both signs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(sae.named_parameters()) + list(sae.named_buffers()):
            if name == "W_dec":
                p.copy_(torch.randn(p.shape, generator=g) * torch.linspace(0.3, 2.0, p.shape[0])[:, None] / 4)
            elif name in ("threshold", "log_threshold"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)  # negative thresholds included
            elif name == "topk_threshold":
                p.fill_(0.15)
            elif p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=g) * (0.4 if p.dim() == 1 else 1 / p.shape[0] ** 0.5))
    return sae


def sae_of(cfg_cls, seed: int = 0, **cfg_kw) -> SAE:
    """An inference SAE of SAELens' config class, built by SAE.from_dict, random weights."""
    cfg = cfg_cls(d_in=D_IN, d_sae=D_SAE, **cfg_kw)
    cfg.metadata = metadata()
    return randomize(SAE.from_dict(cfg.to_dict()), seed)


def library_encode(sae: torch.nn.Module, x: torch.Tensor = X) -> tuple[torch.Tensor, torch.Tensor]:
    """(encode(x), decode(encode(x))) as the library computes them, float64."""
    with torch.no_grad():
        acts = sae.encode(x)
        return acts.double(), sae.decode(acts).double()


def assert_matches(ours, sae: torch.nn.Module, x: torch.Tensor = X) -> None:
    """Every feature's activation and the reconstruction equal the library's (fp32 tolerance)."""
    ref_acts, ref_out = library_encode(sae, x)
    active = (ref_acts != 0).float().mean().item()
    assert 0.0 < active < 0.9, f"test data must exercise both sides of the gate (active fraction {active})"
    acts = ours.encode(x).double()
    torch.testing.assert_close(acts, ref_acts, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ours.decode(acts).double(), ref_out, atol=2e-5, rtol=1e-4)


def edit_cfg(folder: Path, name: str = "cfg.json", **changes) -> None:
    cfg = json.loads((folder / name).read_text())
    cfg.update(changes)
    (folder / name).write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ThreadServer(make_app(tmp_path_factory.mktemp("data"), max_upload_mb=4)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def upload(client, weights: Path, cfg: Path | dict | None = None, **fields) -> httpx.Response:
    fields.setdefault("id", f"t-{uuid.uuid4().hex[:12]}")  # one module-wide server: ids never collide
    files = {"weights": (weights.name, weights.read_bytes())}
    if cfg is not None:
        text = cfg.read_text() if isinstance(cfg, Path) else json.dumps(cfg)
        files["cfg"] = ("cfg.json", text)
    return client.post("/v1/saes", files=files, data={k: str(v) for k, v in fields.items()})


def stored(server, resp: httpx.Response):
    """The SAE the server stored (read back from its registry blob) for a 201 response."""
    assert resp.status_code == 201, resp.text
    return server.app.state.registry.load_sae(resp.json()["id"])[1]


def refused(resp: httpx.Response, param: str, *words: str) -> str:
    """A 400 in the OpenAI shape naming `param`, whose message says each of `words`."""
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param, err
    for w in words:
        assert w.lower() in err["message"].lower(), err
    return err["message"]


@pytest.fixture
def hf_folder(tmp_path, monkeypatch) -> Path:
    """SAELens' release loaders read `repo_id/subfolder/filename` under this folder instead of the Hub."""

    def download(repo_id, filename, subfolder=None, **_):
        return str(tmp_path / repo_id / (subfolder or "") / filename)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(pretrained_sae_loaders, "hf_hub_download", download)
    return tmp_path


def with_overrides(loader, **over):
    """A SAELens release loader whose cfg gets `over` (small d_in / d_sae for a toy-sized test file)."""
    return lambda **kw: loader(**{**kw, "cfg_overrides": {**(kw.get("cfg_overrides") or {}), **over}})


def gemma_scope_state(seed: int = 3) -> dict[str, np.ndarray]:
    """Gemma Scope tensors with a large b_dec, so subtracting it (or not) changes every activation."""
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": (torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5).numpy(),
        "W_dec": (torch.randn(D_SAE, D_IN, generator=g) / 4).numpy(),
        "b_enc": (torch.randn(D_SAE, generator=g) * 0.3).numpy(),
        "b_dec": (torch.randn(D_IN, generator=g) * 1.0).numpy(),
        "threshold": (torch.rand(D_SAE, generator=g) * 0.5).numpy(),
    }


def training_checkpoint(cfg_cls, folder, seed, **kw):
    """A SAELens training SAE's save_model folder (what a training run checkpoints)."""
    cfg = cfg_cls(d_in=D_IN, d_sae=D_SAE, **kw)
    cfg.metadata = metadata()
    sae = randomize(get_sae_training_class(cfg.architecture())[0](cfg), seed)
    sae.save_model(folder)
    return sae


def llama_scope_folder(hf_folder, hook_out: str = HOOK):
    release, sae_id = "llama_scope_lxr_8x", "l2r_8x"
    f = get_norm_scaling_factor(release, sae_id)  # the release table's factor = sqrt(d) / norm_in
    folder = hf_folder / "fnlp/Llama3_1-8B-Base-LXR-8x/Llama3_1-8B-Base-L2R-8x"
    (folder / "checkpoints").mkdir(parents=True)
    hyper = {
        "d_model": D_IN, "d_sae": D_SAE, "expansion_factor": D_SAE // D_IN, "hook_point_in": HOOK,
        "hook_point_out": hook_out, "jump_relu_threshold": 0.02, "act_fn": "jumprelu",
        "norm_activation": "dataset-wise", "dataset_average_activation_norm": {"in": D_IN**0.5 / f, "out": 1.0},
        "apply_decoder_bias_to_pre_encoder": False, "sparsity_include_decoder_norm": True, "top_k": 50,
    }  # fmt: skip
    (folder / "hyperparams.json").write_text(json.dumps(hyper))
    g = torch.Generator().manual_seed(9)
    state = {
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=g) / 40,  # nn.Linear(d_model, d_sae)
        "encoder.bias": torch.randn(D_SAE, generator=g) * 0.02,
        "decoder.weight": torch.randn(D_IN, D_SAE, generator=g) / 4,
        "decoder.bias": torch.randn(D_IN, generator=g),
    }
    save_file(state, str(folder / "checkpoints" / "final.safetensors"))
    return folder, release, sae_id
