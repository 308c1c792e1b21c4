"""The `kubetune` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from kubetune import api, crd, manifests

EXIT_OK, EXIT_INVALID = 0, api.EXIT_USER_ERROR  # a bad manifest is a user error, like in run
GPU_NAMES = ("H200", "H100-80GB", "A100-80GB", "A100-40GB", "L40S", "A10G", "L4", "T4")


class Parser(argparse.ArgumentParser):
    """A usage error is one 'error:' line and exit 10, like every other user error (argparse
    prints the whole usage and exits 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(api.EXIT_USER_ERROR, f"error: {self.prog}: {message} (see --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_validate(args: argparse.Namespace) -> int:
    problems: list[str] = []
    notes: list[str] = []
    count = sweeps = 0
    for path in args.files:
        loaded = manifests.load_file(path)
        count += len(loaded.jobs)
        sweeps += len(loaded.sweeps)
        problems += loaded.problems
        notes += [f"note: {path}: {line}" for job in loaded.jobs for line in api.notes(job.spec)]
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        return EXIT_INVALID
    also = f", {sweeps} FineTuneSweep(s) valid" if sweeps else ""
    print(f"{count} FineTuneJob(s) valid{also}")
    for line in notes:
        print(line)
    return EXIT_OK


def cmd_crd(args: argparse.Namespace) -> int:
    from kubetune import sweep_crd

    sys.stdout.write(sweep_crd.crd_yaml() if args.kind == "FineTuneSweep" else crd.crd_yaml())
    return EXIT_OK


def cmd_docs(args: argparse.Namespace) -> int:
    from kubetune import sweep_crd

    if args.conditions_in:
        try:
            sys.stdout.write(crd.with_conditions_table(Path(args.conditions_in).read_text()))
        except (OSError, ValueError) as error:
            print(f"error: {args.conditions_in}: {error}", file=sys.stderr)
            return EXIT_INVALID
        return EXIT_OK
    sys.stdout.write(crd.api_reference() + sweep_crd.api_reference())
    return EXIT_OK


def cmd_render(args: argparse.Namespace) -> int:
    from kubetune import api, render, settings

    loaded = manifests.load_file(args.file)
    for line in loaded.problems:
        print(line, file=sys.stderr)
    if loaded.problems:
        return EXIT_INVALID
    try:
        config = settings.from_env()
    except settings.SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INVALID
    policy = api.Policy(allowedLicenses=config.allowed_licenses)
    objects = []
    for job in loaded.jobs:
        if args.namespace:
            job.metadata.namespace = args.namespace
        image = args.image or config.trainer_image
        objects += render.render(job, uid=args.uid, default_image=image, policy=policy).all()
    sys.stdout.write(render.to_yaml(objects))
    return EXIT_OK


def cmd_operator(args: argparse.Namespace) -> int:
    from kubetune import handlers, settings

    try:
        config = settings.from_env()
    except settings.SettingsError as error:
        print(f"kubetune operator: {error}", file=sys.stderr)
        return EXIT_INVALID
    return handlers.run(config, namespace=args.namespace)


def cmd_run(args: argparse.Namespace) -> int:
    from kubetune_trainer.local import run_manifest  # torch & co.: only for this command

    return run_manifest(
        args.file,
        output=args.output,
        max_steps=args.max_steps,
        progress=not args.no_progress,
        metrics_port=args.metrics_port,
    )


def cmd_sweep(args: argparse.Namespace) -> int:
    from kubetune_trainer.sweep_local import run_sweep  # torch & co.: only for this command

    return run_sweep(args.file, parallel=args.parallel, output=args.output)


def cmd_plan(args: argparse.Namespace) -> int:
    from kubetune import plan_cli

    return plan_cli.main(args.file, gpu_memory=args.gpu_memory, gpu=args.gpu, as_json=args.json)


Command = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="kubetune", description="Fine-tune LLMs on Kubernetes or locally from one manifest."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check FineTuneJob manifests")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("crd", help="print a CustomResourceDefinition")
    p.add_argument(
        "kind", nargs="?", default="FineTuneJob", choices=["FineTuneJob", "FineTuneSweep"]
    )
    p.set_defaults(func=cmd_crd)

    p = sub.add_parser("docs", help="print the manifest reference (docs/api.md)")
    p.add_argument(
        "--conditions-in",
        metavar="FILE",
        help="print FILE (docs/operator.md) with its generated conditions table up to date",
    )
    p.set_defaults(func=cmd_docs)

    p = sub.add_parser("render", help="print the Kubernetes objects the operator creates")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--namespace", help="namespace of the children (default: the manifest's)")
    p.add_argument("--uid", help="FineTuneJob uid for owner references (default: none)")
    p.add_argument("--image", help="trainer image when the spec has none")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("operator", help="run the Kubernetes operator (kopf)")
    p.add_argument(
        "--namespace",
        default=None,
        help="watch only this namespace (default: KUBETUNE_NAMESPACE; empty: all namespaces)",
    )
    p.set_defaults(func=cmd_operator)

    p = sub.add_parser("run", help="run a FineTuneJob manifest locally (CPU or one GPU)")
    p.add_argument("file", metavar="FILE")
    p.add_argument(
        "--output",
        help="output folder or URI: a path, file:///path or s3://bucket/prefix (overrides "
        "spec.output.destination)",
    )
    p.add_argument("--max-steps", type=positive_int, help="stop after N optimizer steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--metrics-port", type=int, default=0, help="serve /metrics (0: off)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("plan", help="estimate memory and time of full, LoRA and QLoRA")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--gpu-memory", help="memory per GPU, e.g. 80Gi (default: from --gpu)")
    p.add_argument("--gpu", help="GPU model for memory and FLOP rate: " + ", ".join(GPU_NAMES))
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("sweep", help="run a FineTuneSweep manifest locally (trials in turn)")
    p.add_argument("file", metavar="FILE")
    p.add_argument(
        "--parallel", type=positive_int, default=1, help="trials at the same time (processes)"
    )
    p.add_argument(
        "--output",
        help="the sweep's folder (default: spec.template.output.destination); trials go to "
        "<folder>/<sweep>-tNNN; rerunning continues the sweep",
    )
    p.set_defaults(func=cmd_sweep)

    # Commands that need heavy imports (torch, kopf) import them inside their function.
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Command = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
