"""The ``ironcore`` command: one sub-command per module in this package.

Each module exposes ``register(subparsers)``, which adds its parser and sets
``func(args) -> int``. Expected failures (bad config, bad input files) raise
:class:`ironcore.errors.UserError` subclasses and are printed as one line.
"""

from __future__ import annotations

import argparse
import sys

from ironcore import __version__
from ironcore.errors import UserError
from ironcore.files import describe_os_error


class _IntermixedParser(argparse.ArgumentParser):
    """A sub-command's parser whose KEY=VALUE positionals may come before, between and after its options
    (``train --config C a=1 --tensor-model-parallel-size 1 b=2``, as torchrun users write it): plain argparse
    takes the positionals up to the first option and calls the rest unrecognized."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 (argparse's signature)
        if self._intermixing or not any(a.nargs in ("*", "+") for a in self._get_positional_actions()):
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls back here (Python < 3.12)
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser() -> argparse.ArgumentParser:
    from ironcore.cli import (
        chat,
        convert,
        corpus,
        evaluate,
        generate,
        mlflow_runs,
        model_info,
        preprocess,
        reference,
        synthetic,
        tokenizer,
        train,
    )

    parser = argparse.ArgumentParser(prog="ironcore", description="IronCore LLM training framework")
    parser.add_argument("--version", action="version", version=f"ironcore {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_IntermixedParser)
    for module in (corpus, synthetic, tokenizer, preprocess, train, evaluate, generate, chat, convert, model_info,
                   reference, mlflow_runs):
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"ironcore {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file the system refused (permissions, a folder where a file goes): name it
        if err.filename is None:
            raise
        print(f"ironcore {args.command}: error: {describe_os_error(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ironcore {args.command}: interrupted", file=sys.stderr)
        return 130
