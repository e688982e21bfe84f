"""``python -m moesim <command> [args]``: the console scripts under one name.

``python -m moesim sim ...`` is ``moesim-sim ...`` (and so on for every command below), for when
the scripts are not on PATH (a venv not activated, a notebook's ``!`` line, a cluster job).
"""

from __future__ import annotations

import sys
from importlib import import_module

# command -> (entry point, one line of help); pyproject's [project.scripts] lists the same
# entry points as moesim-<command> (tests/experiments/test_main.py keeps the two in step).
COMMANDS: dict[str, tuple[str, str]] = {
    "sim": ("moesim.experiments.sim_app:main",
            "simulate one run, or a sweep with -m (Hydra app; --help lists every option)"),
    "plot": ("moesim.experiments.plot:main", "aggregate a sweep folder into tables and figures"),
    "traces": ("moesim.traces.cli:main", "inspect, import and convert traces; the trace cache"),
    "collect": ("moesim.extras:moesim_collect",
                "record routing traces from a Hugging Face MoE model (needs torch)"),
    "train": ("moesim.extras:moesim_train", "train an expert predictor (needs torch)"),
    "profile": ("moesim.extras:moesim_profile",
                "measure this machine into a hardware profile; plot and tabulate profiles"),
}


def usage() -> str:
    from moesim import __version__

    width = max(map(len, COMMANDS)) + 2
    lines = [f"moesim {__version__}: simulate MoE expert caches over routing traces", "",
             "usage: python -m moesim <command> [args ...]   (= moesim-<command> [args ...])",
             "       python -m moesim --version", "", "commands:"]
    lines += [f"  {name:<{width}}{doc}" for name, (_, doc) in COMMANDS.items()]
    lines += ["", "python -m moesim <command> --help shows a command's own options.",
              "Python API: import moesim; moesim.simulate(...) (see help(moesim))."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:
        print(usage(), file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args[0] in ("-V", "--version"):
        from moesim import __version__

        print(f"moesim {__version__}")
        return 0
    if args[0] not in COMMANDS:
        print(f"error: unknown command {args[0]!r}; commands: {', '.join(COMMANDS)} "
              "(python -m moesim --help)", file=sys.stderr)
        return 2
    target, _ = COMMANDS[args[0]]
    module, func = target.split(":")
    # The command sees the argv its console script would: its own name, then its arguments.
    sys.argv = [f"moesim-{args[0]}", *args[1:]]
    result = getattr(import_module(module), func)()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
