"""``moesim-traces``: import, validate, describe and profile routing traces.

Examples::

    moesim-traces import --format moe-beyond-csv SRC_DIR out.parquet
    moesim-traces import --format vllm-routes-jsonl SRC -o segment=stream out.parquet
    moesim-traces validate out.parquet
    moesim-traces info out.parquet
    moesim-traces info --format speculative-moe-jsonl SRC_DIR      # import on the fly
    moesim-traces stats out.parquet --out stats_dir
    moesim-traces cache info                     # what the user cache holds, with sizes
    moesim-traces cache clear --stale            # abandoned temporaries and part folders
    moesim-traces cache clear --only predictors  # or everything, without --only

Bad input prints one ``error: ...`` line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa

from moesim.traces.errors import TraceError
from moesim.traces.importers import IMPORTERS, import_trace
from moesim.traces.model_card import ModelCardError
from moesim.traces.store import iter_requests, read_header, read_meta, scan_counts, validate_trace

EXIT_BAD_INPUT = 2


def _parse_opt(text: str) -> tuple[str, Any]:
    """``key=value`` with value read as int, float, bool, null or string."""
    if "=" not in text:
        raise TraceError(f"option {text!r} is not key=value", field="-o")
    key, raw = text.split("=", 1)
    low = raw.lower()
    value: Any
    if low in ("true", "false"):
        value = low == "true"
    elif low in ("none", "null"):
        value = None
    else:
        try:
            value = int(raw)
        except ValueError:
            try:
                value = float(raw)
            except ValueError:
                value = raw
    return key.strip().replace("-", "_"), value


def _opts(args: argparse.Namespace) -> dict[str, Any]:
    return dict(_parse_opt(o) for o in (args.opt or []))


@contextmanager
def _trace_path(args: argparse.Namespace) -> Iterator[Path]:
    """The trace to read: PATH itself, or PATH imported with --format into a temporary file."""
    path = Path(args.path)
    if args.format is None:
        if path.is_dir():
            raise TraceError("is a folder; pass --format FMT to import a raw source", file=path)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="moesim-traces-") as tmp:
        out = Path(tmp) / "trace.parquet"
        import_trace(args.format, path, out, **_opts(args))
        yield out


def _cmd_import(args: argparse.Namespace) -> int:
    opts = _opts(args)
    if not args.quiet and "progress" not in opts:
        opts["progress"] = sys.stderr.isatty()
    res = import_trace(args.format, Path(args.src), Path(args.out), **opts)
    print(f"wrote {res.out}: {res.requests:,} requests, {res.tokens:,} tokens, {res.rows:,} rows")
    for name, p in res.side_files.items():
        print(f"wrote {p} ({name})")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    with _trace_path(args) as path:
        s = validate_trace(path)
    print(f"ok: {args.path}: {s.requests:,} requests, {s.tokens:,} tokens, {s.rows:,} rows")
    return 0


def _fmt_layers(layers: tuple[int, ...]) -> str:
    if len(layers) > 2 and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{len(layers)} ({layers[0]}..{layers[-1]})"
    return f"{len(layers)} ({', '.join(map(str, layers))})"


def _cmd_info(args: argparse.Namespace) -> int:
    with _trace_path(args) as path:
        meta = read_meta(path)
        header = read_header(path)
        counts, phases = scan_counts(path)
    shared = f" (+{meta.num_shared_experts} shared)" if meta.num_shared_experts else ""
    lines = [
        ("file", str(args.path)),
        ("model", meta.model),
        ("requests", f"{counts.requests:,}"),
        (
            "tokens",
            f"{counts.tokens:,} (prefill {phases['prefill']:,}, decode {phases['decode']:,})",
        ),
        ("rows", f"{counts.rows:,}"),
        ("layers", _fmt_layers(meta.moe_layers)),
        ("experts", f"{meta.num_experts}{shared}"),
        ("top-k", str(meta.top_k)),
        ("expert bytes", f"{meta.expert_bytes:,}"),
        ("partial", "yes" if meta.partial else "no"),
        ("scores", "yes" if header.get("has_scores") else "no"),
        ("token texts", "yes" if header.get("has_tokens") else "no"),
        ("source", meta.source),
        ("license", meta.license),
    ]
    width = max(len(k) for k, _ in lines) + 1
    for key, value in lines:
        print(f"{key + ':':<{width}} {value}")
    if args.notes:
        for key, value in meta.notes.items():
            print(f"note {key}: {value}")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from itertools import islice

    from moesim.traces.stats import write_stats

    with _trace_path(args) as path:
        meta = read_meta(path)
        reqs = iter_requests(path)
        if args.max_requests is not None:
            reqs = islice(reqs, args.max_requests)
        written = write_stats(meta, reqs, Path(args.out), plot=not args.no_plots)
    print(f"wrote {len(written)} files to {args.out}")
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _cmd_cache(args: argparse.Namespace) -> int:
    from datetime import datetime

    from moesim.traces import cache

    root = Path(args.root) if args.root else cache.cache_root()
    if args.action == "clear":
        try:
            n, nbytes, busy = cache.clear(root, only=args.only, stale_only=args.stale)
        except ValueError as exc:
            raise TraceError(str(exc), field="--only") from None
        print(f"removed {n} item(s), {_human(nbytes)} from {root}"
              + (f"; {busy} in use by another process, kept" if busy else ""))
        return 0
    items = cache.entries(root)
    print(f"cache: {root}" + ("" if root.is_dir() else " (empty: does not exist)"))
    described = {**cache.KINDS, "embedded": "moesim files at the root (the embedded trace)",
                 "foreign": "not moesim's: never cleared"}
    for kind in described:
        mine = [e for e in items if e.kind == kind]
        if not mine:
            continue
        total = sum(e.bytes for e in mine)
        print(f"{kind}: {len(mine)} item(s), {_human(total)}  ({described[kind]})")
        for e in mine:
            when = datetime.fromtimestamp(e.mtime).strftime("%Y-%m-%d %H:%M")
            flag = "  [stale]" if e.stale else ""
            print(f"  {_human(e.bytes):>9}  {when}  {e.path.name}{flag}")
    print(f"total: {_human(sum(e.bytes for e in items if e.kind != 'foreign'))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moesim-traces", description="Import, check and profile MoE routing traces."
    )
    sub = p.add_subparsers(dest="command", required=True)
    fmts = sorted(IMPORTERS)
    opt_help = "importer option key=value (repeatable), e.g. -o limit=3 -o segment=stream"

    imp = sub.add_parser("import", help="convert a raw source into a project trace")
    imp.add_argument("--format", "-f", required=True, choices=fmts)
    imp.add_argument("src", help="source file or folder")
    imp.add_argument("out", help="output .parquet")
    imp.add_argument("-o", "--opt", action="append", metavar="KEY=VALUE", help=opt_help)
    imp.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    imp.set_defaults(func=_cmd_import)

    for name, func, text in (
        ("validate", _cmd_validate, "re-check every rule of a trace file"),
        ("info", _cmd_info, "print counts and model metadata"),
        ("stats", _cmd_stats, "write routing statistics tables and plots"),
    ):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("path", help="project trace .parquet, or a raw source with --format")
        sp.add_argument("--format", "-f", choices=fmts, help="import PATH on the fly first")
        sp.add_argument("-o", "--opt", action="append", metavar="KEY=VALUE", help=opt_help)
        sp.set_defaults(func=func)
        if name == "info":
            sp.add_argument("--notes", action="store_true", help="also print provenance notes")
        if name == "stats":
            sp.add_argument("--out", required=True, help="output folder")
            sp.add_argument("--max-requests", type=int, default=None)
            sp.add_argument("--no-plots", action="store_true")

    cp = sub.add_parser("cache", help="list or clear the user cache ($MOESIM_CACHE)")
    cp.add_argument("action", choices=("info", "clear"))
    cp.add_argument("--only", metavar="KIND", help="clear one kind: traces, predictions, "
                    "predictors")
    cp.add_argument("--stale", action="store_true",
                    help="clear only abandoned temporaries and collector part folders")
    cp.add_argument("--root", help="another cache folder (default: $MOESIM_CACHE or "
                    "~/.cache/moesim)")
    cp.set_defaults(func=_cmd_cache)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # output piped into `head`: not an input error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (TraceError, ModelCardError, OSError, pa.ArrowException) as exc:
        msg = " ".join(str(exc).split())
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
