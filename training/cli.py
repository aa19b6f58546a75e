"""The `hessforge` command. Each subcommand lives in its own module exposing add_arguments(parser) and
run(args) -> int; modules are imported only when their subcommand runs, so `hessforge --help` is fast."""
from __future__ import annotations

import argparse
import importlib
import sys

from engine.allocator import keep_freed_memory
from engine.errors import HessforgeError

SUBCOMMANDS = {
    "ingest": ("training.data.ingest", "read an ASE-readable file with energies/forces into an LMDB dataset"),
    "label": ("training.labels", "label a dataset with a teacher's energies, forces and Hessian rows"),
    "train": ("training.trainer", "train a student from a YAML config"),
    "evaluate": ("training.evaluate", "energy/force/Hessian errors of a student (and the teacher)"),
    "quickstart": ("training.quickstart.run", "label, train and evaluate on the bundled dataset"),
    "export": ("engine.export", "export a checkpoint to one TorchScript file for the C++ core and LAMMPS"),
    "bench": ("training.bench", "batched energy+force speed (ns/day) of students and teachers, side by side"),
    "sweep": ("training.baselines", "write (and --run) the baseline configs beside Hessian KD from one base config"),
    "md": ("training.md_cli", "batched MD: B systems at once, batched model calls (Verlet or Langevin, barostats)"),
    "md-eval": ("training.md_eval", "MD stability (NVT), NVE drift and FIRE optimization of a student through ASE"),
    "report": ("training.report", "paper-style markdown table and PNG plots from run directories"),
    "build-benchmark": ("training.benchmark_data", "build the QM9 benchmark slice: ANI-1x MD conformers, pyscf "
                        "ωB97x/6-31G(d) labels, resumable"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hessforge",
        description="Distill a foundation force field into a small student with teacher Hessian rows, and run "
                    "the student fast. `hessforge COMMAND --help` describes each command.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # Arguments are added lazily in main() for the chosen subcommand only.
    return parser


class _ParseFailed(Exception):
    pass


def parse_arguments(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """argparse as usual, and where that fails, with options between positionals (hessforge bench MODEL
    --compare T DATA) as users type them (parse_intermixed_args); if both fail, the usual message (intermixed
    parsing's can leave out missing positionals)."""
    def fail(message):
        raise _ParseFailed(message)

    usual_error, parser.error = parser.error, fail
    try:
        try:
            return parser.parse_args(argv)
        except _ParseFailed as first:
            try:
                return parser.parse_intermixed_args(argv)
            except _ParseFailed:
                message = str(first)
    finally:
        parser.error = usual_error
    parser.error(message)  # exits


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        keep_freed_memory()  # large tensors reused, not faulted in again every call (engine/allocator.py)
    except HessforgeError as err:  # a bad HESSFORGE_MALLOC
        print(f"hessforge: error: {err}", file=sys.stderr)
        return 2
    parser = build_parser()
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
        sub = argparse.ArgumentParser(prog=f"hessforge {argv[0]}", description=SUBCOMMANDS[argv[0]][1])
        module.add_arguments(sub)
        args = parse_arguments(sub, argv[1:])
        try:
            return int(module.run(args) or 0)
        except HessforgeError as err:
            print(f"hessforge {argv[0]}: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as err:
            print(f"hessforge {argv[0]}: interrupted" + (f": {err}" if str(err) else ""), file=sys.stderr)
            return 130
        except OSError as err:  # an output that cannot be written (read-only, disk full): one line, the path
            print(f"hessforge {argv[0]}: error: {err.strerror or err}"
                  + (f": {err.filename}" if getattr(err, "filename", None) else ""), file=sys.stderr)
            return 2
    parser.parse_args(argv)  # prints help / usage errors
    return 0


if __name__ == "__main__":
    sys.exit(main())
