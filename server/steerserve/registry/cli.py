"""`steerserve registry import|list|rm`: the registry from the command line, through the same
loaders (`formats`) and the same `Registry` methods as the HTTP routes.

`stats ID --texts FILE --model M` (added by steerserve/cli.py, which may build an engine) computes, for an
SAE, each feature's max activation, density, mean and sample of nonzero activations (interp/stats.py),
or for a steering vector a sample of its projection at each of its sites (interp/vector_stats.py),
through the engine, and stores them (`--kind` when an SAE and a vector share the id).

`import` takes a local path, or `--hub REPO_ID --path PATH` fetched with huggingface_hub (its cache,
HF_HUB_CACHE and HF_HUB_OFFLINE are honoured). What is imported is decided by `--kind` or guessed:
a folder, a `.npz`, or a `.safetensors` beside a `cfg.json` is an SAE; a `.gguf`, other
`.safetensors` or a `.json` is a steering vector; with `--sae ID`, a `.json`/`.jsonl` file is a set
of feature annotations. Without a loaded model, fit to a model is not checked here (`--model` only
names the model the item is for).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path

from steerserve.config import RegistryConfig
from steerserve.registry import formats
from steerserve.registry.blobs import BlobStoreError
from steerserve.registry.errors import InvalidInput, NotFound, RegistryError
from steerserve.registry.formats.common import site_of
from steerserve.registry.formats.neuronpedia import parse_features
from steerserve.registry.registry import Registry
from steerserve.registry.storable import is_uint, parse_json_or_lines, parse_uint

_KINDS = ("auto", "sae", "vector", "features")


def add_registry_arguments(p: argparse.ArgumentParser) -> None:
    """Where the registry lives: the flags `serve` and every `registry` command share."""
    p.add_argument("--data-dir", default=None, help="registry data directory (env STEERSERVE_DATA_DIR)")
    p.add_argument(
        "--registry-url",
        default=None,
        help="postgresql://... for a shared registry (env STEERSERVE_REGISTRY_URL)",
    )
    p.add_argument(
        "--blob-url",
        default=None,
        help="s3://BUCKET/PREFIX to keep blobs in an S3-compatible bucket (env STEERSERVE_BLOB_URL); "
        "credentials and region from the standard AWS variables",
    )
    p.add_argument(
        "--blob-endpoint-url", default=None, help="S3 endpoint, e.g. http://minio:9000 (default: boto3's own)"
    )
    p.add_argument("--blob-cache-mb", type=int, default=None, help="local disk cache of S3 blobs")


def registry_config_from_args(args: argparse.Namespace) -> RegistryConfig:
    """Flags over environment over defaults."""
    base = RegistryConfig()
    flags = {
        "data_dir": args.data_dir,
        "registry_url": args.registry_url,
        "blob_url": args.blob_url,
        "blob_endpoint_url": args.blob_endpoint_url,
        "blob_cache_mb": args.blob_cache_mb,
    }
    return dataclasses.replace(base, **{k: v for k, v in flags.items() if v is not None})


def add_registry_commands(subparsers, stats_command=None) -> argparse.ArgumentParser:
    """Add `registry` with `import`, `list` and `rm` to an argparse subparsers object, and `stats` when
    given the command that runs it (it drives an engine: steerserve/cli.py passes it; the registry
    itself builds nothing).

    Each leaf sets `func`: the caller runs `sys.exit(args.func(args))`; registry errors are printed
    to stderr and give exit status 2.
    """
    reg = subparsers.add_parser("registry", help="manage stored SAEs, features, vectors and variants")
    sub = reg.add_subparsers(dest="registry_command", required=True)

    imp = sub.add_parser("import", help="import an SAE, a steering vector or feature annotations")
    imp.add_argument("source", nargs="?", help="local file or folder (or use --hub/--path)")
    imp.add_argument("--hub", metavar="REPO_ID", help="Hugging Face repository to fetch from")
    imp.add_argument("--path", metavar="PATH", help="file or folder inside the --hub repository")
    imp.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    imp.add_argument("--kind", choices=_KINDS, default="auto")
    imp.add_argument("--id", default=None, help="id to store it under (default: derived from the content)")
    imp.add_argument("--site", default=None, help="hook name (blocks.L.hook_resid_post) or layer number")
    imp.add_argument("--model", default=None, help="model the item is for (default: the file's own claim)")
    imp.add_argument("--sae", default=None, help="SAE id the feature annotations belong to")
    add_registry_arguments(imp)
    imp.set_defaults(func=_reporting(cmd_import))

    ls = sub.add_parser("list", help="list stored items")
    ls.add_argument("--kind", choices=("all", "saes", "vectors", "variants"), default="all")
    ls.add_argument("--json", action="store_true", help="print JSON lines")
    add_registry_arguments(ls)
    ls.set_defaults(func=_reporting(cmd_list))

    if stats_command is not None:
        _add_stats(sub, stats_command)

    rm = sub.add_parser("rm", help="delete a stored item")
    rm.add_argument("kind", choices=("sae", "vector", "variant"))
    rm.add_argument("id")
    add_registry_arguments(rm)
    rm.set_defaults(func=_reporting(cmd_rm))
    return reg


def _add_stats(sub, command) -> None:
    st = sub.add_parser(
        "stats",
        help="compute an SAE's feature statistics (max, density, mean, activation sample) or a vector's "
        "projection sample over a text file",
    )
    st.add_argument("id", help="SAE or vector id")
    st.add_argument("--kind", choices=("auto", "sae", "vector"), default="auto")
    st.add_argument(
        "--seed", type=int, default=0, help="seed of the samples (the same seed, the same sample)"
    )
    st.add_argument("--texts", required=True, help="text file, one document per line")
    st.add_argument("--model", required=True, help="the served model (path, HF id or random:<arch>)")
    st.add_argument("--dtype", default="auto")
    st.add_argument("--device", default="auto")
    st.add_argument("--batch", type=int, default=32, help="documents per engine batch")
    add_registry_arguments(st)
    st.set_defaults(func=_reporting(command))


def stats_kind(registry: Registry, args: argparse.Namespace) -> str:
    """`sae` or `vector`: what `stats ID` is about (--kind, else whichever exists; both: ask for --kind)."""
    if args.kind != "auto":
        return args.kind
    found = []
    for kind, get in (("sae", registry.get_sae), ("vector", registry.get_vector)):
        with contextlib.suppress(NotFound):
            get(args.id)
            found.append(kind)
    if len(found) != 1:
        what = "both an SAE and a vector" if found else "no SAE or vector"
        raise (InvalidInput if found else NotFound)(f"{args.id!r} names {what}; give --kind", param="id")
    return found[0]


def _reporting(command):
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except RegistryError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 2
        except BlobStoreError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run


def _open(args: argparse.Namespace) -> Registry:
    return Registry.from_config(registry_config_from_args(args))


def fetch_from_hub(repo_id: str, path: str, revision: str | None = None) -> Path:
    """A file or folder of a hub repository, from the local hub cache or downloaded into it."""
    from huggingface_hub import hf_hub_download, snapshot_download

    path = path.strip("/")
    try:
        if Path(path).suffix in (".npz", ".safetensors", ".gguf", ".json", ".jsonl"):
            local = Path(hf_hub_download(repo_id, path, revision=revision))
            if local.suffix == ".safetensors" and "/" in path:  # a SAELens folder's weights: its cfg too
                parent = path.rsplit("/", 1)[0]
                with contextlib.suppress(Exception):  # no cfg.json beside it: a plain vector file
                    hf_hub_download(repo_id, f"{parent}/cfg.json", revision=revision)
            return local
        root = snapshot_download(repo_id, revision=revision, allow_patterns=[f"{path}/*"])
    except Exception as exc:  # huggingface_hub raises many types (offline, missing file, auth)
        raise InvalidInput(
            f"cannot fetch {path!r} from hub repository {repo_id!r}: {exc}", param="path"
        ) from None
    local = Path(root) / path
    if not local.exists():
        raise InvalidInput(
            f"{path!r} is not in hub repository {repo_id!r} (or not in the local cache)", "path"
        )
    return local


def _guess_kind(source: Path, sae: str | None) -> str:
    if sae is not None:
        return "features"
    if source.is_dir() or source.suffix == ".npz":
        return "sae"
    if source.suffix == ".safetensors" and (source.parent / "cfg.json").is_file():
        return "sae"
    return "vector"


def cmd_import(args: argparse.Namespace) -> int:
    if bool(args.source) == bool(args.hub):
        raise InvalidInput("give a local SOURCE or --hub REPO_ID --path PATH", param="source")
    if args.hub and not args.path:
        raise InvalidInput("--hub needs --path (the file or folder inside the repository)", param="path")
    source = fetch_from_hub(args.hub, args.path, args.revision) if args.hub else Path(args.source)
    if not source.exists():
        raise InvalidInput(f"{source} does not exist", param="source")
    kind = args.kind if args.kind != "auto" else _guess_kind(source, args.sae)
    site = None
    if args.site:  # ASCII digits: a layer number ("²" passes str.isdigit() but not int())
        site = site_of(parse_uint(args.site, "site") if is_uint(args.site) else args.site)
    registry = _open(args)
    try:
        if kind == "features":
            if not args.sae:
                raise InvalidInput("feature annotations need --sae ID", param="sae")
            count = registry.put_features(
                args.sae, parse_features(parse_json_or_lines(source.read_bytes(), "features"))
            )
            out = {"sae": args.sae, "object": "features", "updated": count}
        elif kind == "sae":
            loaded = formats.load_sae_path(source, site)
            out = registry.add_sae(loaded, sae_id=args.id, model=args.model).to_json()
        else:
            vec, meta = formats.load_vector(source, source.name, None, site)
            out = registry.add_vector(vec, vector_id=args.id, model=args.model, meta=meta).to_json()
    finally:
        registry.close()
    print(json.dumps(out))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    registry = _open(args)
    try:
        groups = {
            "saes": registry.list_saes() if args.kind in ("all", "saes") else [],
            "vectors": registry.list_vectors() if args.kind in ("all", "vectors") else [],
            "variants": registry.list_variants() if args.kind in ("all", "variants") else [],
        }
    finally:
        registry.close()
    for items in groups.values():
        for item in items:
            row = item.to_json()
            if args.json:
                print(json.dumps(row))
            else:
                detail = {
                    "sae": lambda r: (
                        f"{r['model']}  {r['site']}  d_in={r['d_in']} d_sae={r['d_sae']}  {r['architecture']}"
                    ),
                    "vector": lambda r: (
                        f"{r['model']}  {','.join(s['site'] for s in r['sites'])}  d={r['d']}"
                    ),
                    "variant": lambda r: (
                        f"{len(r['steering'])} steering, {len(r['feature_logit_bias'])} logit bias"
                    ),
                }[row["object"]](row)
                print(f"{row['object']:8} {row['id']}  {detail}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    registry = _open(args)
    try:
        {"sae": registry.delete_sae, "vector": registry.delete_vector, "variant": registry.delete_variant}[
            args.kind
        ](args.id)
    finally:
        registry.close()
    print(f"deleted {args.kind} {args.id}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m steerserve.registry.cli registry import ...` (the same commands, standalone)."""
    parser = argparse.ArgumentParser(prog="steerserve")
    add_registry_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
