"""The ``crossent`` command: worked examples and a loss calculator that explains itself.

Commands::

    crossent demo [--json]
        The seed examples side by side: crossent, the NumPy float64 reference and torch.
    crossent loss {bce,bce-logits,ce,nll} --input X --target Y [options] [--explain] [--json]
        One loss on your numbers (inline, .npy or .csv), optionally step by step.

Exit status: 0 on success, 2 for usage errors (malformed numbers, unreadable files, bad
options), 1 when the library rejects the arguments (its message says what was expected and
what was given). Errors are one line on stderr starting with ``crossent: error:``. When the
reader of the output goes away (``crossent demo | head``) the command stops quietly with the
status a Unix tool killed by SIGPIPE has (141). On a stream that cannot encode the output's
symbols (``PYTHONIOENCODING=ascii``) they are spelled in ASCII.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import NoReturn, TextIO

import numpy as np
import torch

from crossent.cli._format import ascii_output, can_encode, encodable, exact, jsonable, table
from crossent.cli._losses import (
    LIBRARY_ERRORS,
    LOSSES,
    LossError,
    LossSpec,
    Outcome,
    build_problem,
    max_abs_diff,
    one_line,
    run_crossent,
    run_reference,
    run_torch,
)
from crossent.cli._values import UsageError

__all__ = ["build_parser", "main"]

EXIT_OK = 0
EXIT_LOSS_ERROR = 1
EXIT_USAGE = 2
EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a Unix tool stopped so

# A value that starts with '-' but is a number or a list of numbers ("-1,2", "-1e400", "-inf"),
# not an option. argparse asks this pattern (its default knows only "-1" and "-1.5").
_NEGATIVE_VALUE = re.compile(r"^-\s*(\d|\.\d|inf|nan)", re.IGNORECASE)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors become one ``crossent: error:`` line (exit 2), and which
    reads ``--input -1,2`` and ``--label-smoothing -1e400`` as values, not options."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_VALUE

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")

    def print_help(self, file: TextIO | None = None) -> None:
        file = sys.stdout if file is None else file
        file.write(encodable(self.format_help(), getattr(file, "encoding", None)))


def _int64(text: str) -> int:
    """An ``int`` option that must fit in int64 (torch's index type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not -(2**63) <= value < 2**63:
        raise argparse.ArgumentTypeError(
            f"{text} does not fit in int64: expected an integer in [-2**63, 2**63 - 1]"
        )
    return value


_LOSS_EPILOG = """\
values: inline numbers ('0.3,0.7' is 1-D; '1,2,3;4,5,6' is 2x3, rows separated by ';'),
or a path to a .npy file (numpy.save; pickled object arrays are refused) or a .csv file
(comma-separated, one row per line). Values may start with '-' (--input -1,2).

examples:
  crossent loss {cmd} {example}
  crossent loss {cmd} {example} --reduction none --json
  crossent loss {cmd} {example} --explain
"""


def _add_loss_parser(subparsers: argparse._SubParsersAction, spec: LossSpec) -> None:
    p = subparsers.add_parser(
        spec.command,
        help=spec.title,
        description=f"{spec.title.capitalize()}, computed by crossent.functional.{spec.function}.",
        epilog=_LOSS_EPILOG.format(cmd=spec.command, example=spec.example),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", required=True, metavar="VALUES", help=spec.input_help)
    p.add_argument("--target", required=True, metavar="VALUES", help=spec.target_help)
    p.add_argument("--weight", metavar="VALUES", help=spec.weight_help)
    if "pos_weight" in spec.options:
        p.add_argument(
            "--pos-weight",
            metavar="VALUES",
            help="weight of the positive term, broadcast right-aligned against the input "
            "(shape (C,) applies along the last dimension)",
        )
    if "ignore_index" in spec.options:
        p.add_argument(
            "--ignore-index",
            type=_int64,
            default=-100,
            metavar="N",
            help="class index whose rows contribute 0 and are left out of the mean (default: -100)",
        )
    if "label_smoothing" in spec.options:
        p.add_argument(
            "--label-smoothing",
            type=float,
            default=0.0,
            metavar="EPS",
            help="ε: mix the target with the uniform distribution, ε/C on every class "
            "(PyTorch's convention; default: 0). 0 < ε <= 1 smooths; ε <= 0 and nan mean no "
            "smoothing (as in torch); ε > 1 is an error",
        )
    p.add_argument(
        "--reduction",
        choices=("none", "mean", "sum"),
        default="mean",
        help="'none': per-element losses; 'sum'; 'mean' (default)",
    )
    p.add_argument(
        "--dtype",
        choices=("float64", "float32"),
        default="float64",
        help="dtype of the input, floating targets and weights (default: float64)",
    )
    p.add_argument(
        "--explain",
        action="store_true",
        help="print the computation step by step, and crossent vs reference vs torch",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument(
        "--max-rows",
        type=int,
        default=20,
        metavar="N",
        help="with --explain: elements or rows to print (all count in the total; default: 20)",
    )
    p.set_defaults(handler=_run_loss, spec=spec, command_parser=p)


def build_parser() -> argparse.ArgumentParser:
    """The ``crossent`` argument parser (every command and subcommand has ``--help``)."""
    from crossent import __version__

    parser = _Parser(
        prog="crossent",
        description="Cross-entropy losses with exact PyTorch semantics: worked examples and a "
        "loss calculator that shows its steps.",
        epilog="examples:\n  crossent demo\n  crossent loss bce --input 0.3,0.9 --target 0,1 "
        "--explain\n  crossent loss ce --input logits.npy --target labels.csv --json\n\n"
        "exit status: 0 ok, 1 the loss rejected its arguments, 2 usage error",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"crossent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="the seed examples: crossent vs NumPy reference vs torch",
        description="Worked examples on built-in data: BCE on probabilities, sigmoid + BCE vs "
        "BCE with logits (and where the naive form breaks), cross entropy on class indices and "
        "probabilities (with label smoothing), NLL on log-softmax = CE, and a classic mistake.",
    )
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    demo.set_defaults(handler=_run_demo, command_parser=demo)

    loss = commands.add_parser(
        "loss",
        help="compute one loss on your values (inline, .npy or .csv)",
        description="Compute a loss with crossent on your values; --explain shows each step and "
        "compares with the NumPy float64 reference and torch.",
        epilog="run 'crossent loss LOSS --help' for the options of each loss",
    )
    losses = loss.add_subparsers(dest="loss", required=True, metavar="LOSS")
    for spec in LOSSES.values():
        _add_loss_parser(losses, spec)
    return parser


# ---------------------------------------------------------------------------------------------
# crossent loss


def _indexed_lines(values: np.ndarray, dtype: np.dtype) -> list[str]:
    if values.ndim == 0:
        return [f"  {exact(values, dtype)}"]
    return [
        f"  [{', '.join(str(i) for i in index)}]  {exact(values[index], dtype)}"
        for index in np.ndindex(values.shape)
    ]


def _comparison_lines(
    ours: np.ndarray, dtype: np.dtype, others: list[tuple[str, Outcome]]
) -> list[str]:
    scalar = ours.ndim == 0
    rows = [["crossent", exact(ours, dtype) if scalar else f"shape {ours.shape}", ""]]
    for name, outcome in others:
        if outcome.value is None:
            rows.append([name, f"raised {outcome.error}", ""])
            continue
        diff = max_abs_diff(ours, outcome.value)
        value = exact(outcome.value) if scalar else f"shape {outcome.value.shape}"
        rows.append([name, value, "shape differs" if diff is None else f"{diff:.2g}"])
    header = "|diff| vs crossent" if scalar else "max |diff| vs crossent"
    return ["comparison:", *table(["implementation", "value", header], rows)]


def _run_loss(args: argparse.Namespace) -> int:
    spec: LossSpec = args.spec
    if args.max_rows < 0:
        raise UsageError(f"--max-rows must be >= 0, got {args.max_rows}")
    problem = build_problem(spec, args)
    out = run_crossent(problem)  # raises LossError: exit 1
    dtype = problem.dtype
    ours = out.numpy()
    reference = run_reference(problem)
    torch_out = run_torch(problem)
    torch_name = f"torch {torch.__version__}"

    explanation = None
    if args.explain:
        from crossent.cli._explain import explain

        explanation = explain(problem, args.max_rows)

    if args.json:
        result: dict[str, object] = {
            "command": spec.command,
            "function": spec.function,
            "reduction": problem.reduction,
            "dtype": str(ours.dtype),
            "shape": list(ours.shape),
            "loss": ours,
            "reference": reference.value,
            "torch": torch_out.value,
            "torch_version": torch.__version__,
            "max_abs_diff": {
                "reference": max_abs_diff(ours, reference.value),
                "torch": max_abs_diff(ours, torch_out.value),
            },
        }
        if reference.error:
            result["reference_error"] = reference.error
        if torch_out.error:
            result["torch_error"] = torch_out.error
        if explanation is not None:
            result["explain"] = {
                "steps": explanation.steps,
                "reduction": explanation.reduction,
                "total": explanation.total,
            }
        _out_json(result)
        return EXIT_OK

    if explanation is not None:
        _out("\n".join(explanation.lines))
        _out("")
        others = [
            ("explained above (NumPy f64)", Outcome(explanation.total)),
            ("reference (NumPy f64)", reference),
            (torch_name, torch_out),
        ]
        _out("\n".join(_comparison_lines(ours, dtype, others)))
        _out("")
    label = f"{spec.function}(reduction={problem.reduction!r}, dtype={ours.dtype})"
    if ours.ndim == 0:
        _out(f"{label} = {exact(ours, dtype)}")
    else:
        _out(f"{label}, shape {tuple(ours.shape)}:")
        _out("\n".join(_indexed_lines(ours, dtype)))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# crossent demo


def _run_demo(args: argparse.Namespace) -> int:
    from crossent.cli._demo import run_demo

    report = run_demo()
    if args.json:
        _out_json(report.data)
    else:
        _out("\n".join(report.lines))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------


def _out(text: str) -> None:
    """Print ``text`` on stdout in what its encoding can hold (see ``_format.encodable``)."""
    print(encodable(text, sys.stdout.encoding))


def _out_json(data: object) -> None:
    """One JSON object on stdout; ``\\u`` escapes where the stream cannot encode a character."""
    text = json.dumps(jsonable(data), ensure_ascii=False)
    if not can_encode(text, sys.stdout.encoding):
        text = json.dumps(jsonable(data), ensure_ascii=True)
    _out(text)


def _error(message: str) -> None:
    text = "crossent: error: " + " ".join(message.split())
    print(encodable(text, sys.stderr.encoding), file=sys.stderr)


def _symbols_fit(stream: object) -> bool:
    """Whether ``stream`` can encode the symbols of the text output (σ, Σ, ε, −)."""
    return can_encode("σΣε−·…Δ", getattr(stream, "encoding", None))


def _quiet_closed_pipe() -> int:
    """The reader went away (``crossent demo | head``): stop without a word, like a Unix tool.

    Points stdout at /dev/null so that the interpreter's final flush does not raise again.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    return EXIT_CLOSED_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``crossent`` command.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 when a loss rejects its arguments, 2 for usage
        errors (bad options, malformed numbers, unreadable files), 141 when stdout is closed
        before the output is written. Errors print one line on stderr starting with
        ``crossent: error:``; no traceback.
    """
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        with ascii_output(not _symbols_fit(sys.stdout)):
            args, unknown = parser.parse_known_args(argv)
            if unknown:  # named by the subcommand that was given them, with its --help
                args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
            code = int(args.handler(args))
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
            return code
    except SystemExit as exc:  # --help and --version exit through argparse
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BrokenPipeError:
        return _quiet_closed_pipe()
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except LossError as exc:
        _error(str(exc))
        return EXIT_LOSS_ERROR
    except OSError as exc:
        _error(f"{type(exc).__name__}: {exc}")
        return EXIT_USAGE
    except LIBRARY_ERRORS as exc:  # anything the library raised outside run_crossent
        _error(one_line(exc))
        return EXIT_LOSS_ERROR
    except Exception as exc:  # a bug here: still one line, and a way to report it
        _error(f"unexpected {one_line(exc)} (a bug in crossent's command line; please report it)")
        return EXIT_LOSS_ERROR
