"""``dino-bridge``: train | eval knn|linear | export | quickstart | data.

Exit codes (every command): 0 finished; 2 a user error (config, paths, inputs); 3 non-finite losses;
4 unreadable data; 5 a checkpoint write failed; 130 / 143 stopped by SIGINT / SIGTERM."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from .train.args import main as train_main

        return train_main(argv[1:], prog="dino-bridge train")

    parser = argparse.ArgumentParser(prog="dino-bridge", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("train", help="pretrain from a config (see dino-bridge train --help)")
    evaluate = commands.add_parser("eval", help="evaluate a checkpoint")
    protocols = evaluate.add_subparsers(dest="protocol", required=True)
    from .eval import run_knn, run_linear

    run_knn.add_arguments(protocols.add_parser("knn", help="weighted kNN on the frozen CLS"))
    run_linear.add_arguments(protocols.add_parser("linear", help="linear probe on frozen features"))
    from . import quickstart

    quickstart.add_arguments(
        commands.add_parser("quickstart", help="train a small ViT on Fashion-MNIST on CPU")
    )
    from . import data_cli

    data_cli.add_arguments(commands.add_parser("data", help="data tools: index-wsi, stats"))
    from .export import cli as export_cli

    export_cli.add_arguments(commands.add_parser("export", help="export a backbone: hf | torch"))
    from .eval import run_features

    run_features.add_arguments(commands.add_parser("features", help="image features as .npy, PCA picture"))
    from .report import cli as report_cli

    report_cli.add_arguments(commands.add_parser("report", help="figures and an HTML page of a run"))
    args = parser.parse_args(argv)
    try:
        if args.command == "data":
            return data_cli.main(args)
        if args.command == "export":
            return export_cli.main(args)
        if args.command == "features":
            return run_features.main(args)
        if args.command == "report":
            return report_cli.main(args)
        if args.command == "eval":
            return (run_linear if args.protocol == "linear" else run_knn).main(args)
        return quickstart.main(args)
    except (Exception, KeyboardInterrupt) as e:
        # the same exit codes and one-line messages as ``dino-bridge train``; the eval and data
        # tools report a bad input (a class missing from the train folder, k too large) as ValueError
        from .train.args import EXIT_USER_ERROR, exit_code, one_line

        code = exit_code(e)
        if code is None and isinstance(e, ValueError):
            code = EXIT_USER_ERROR
        if code is None:
            raise  # our own bug: the traceback is what a bug report needs
        print(f"error: {one_line(e)}", file=sys.stderr)  # always on stderr, one line
        return code


if __name__ == "__main__":
    sys.exit(main())
