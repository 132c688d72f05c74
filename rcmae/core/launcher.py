"""Command-line launch shared by the tools: run ``main(cfg)`` here, or submit it through submitit.

On SLURM, one task per GPU; submitit sends the timeout / preemption signal, :meth:`Job.checkpoint`
requeues the same config with ``train.resume=auto``, and the requeued job resumes from the
``last_checkpoint`` pointer in the output directory (which training writes: see checkpoint.py).
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
from pathlib import Path
from typing import Callable, Union

from rcmae.core.config import config_path, load_config, save_config
from rcmae.core.errors import CheckpointError, ConfigError

# A function, or its "module:name" (imported only when needed, so that --help starts fast)
Entry = Union[Callable, str]


def resolve(entry: Entry) -> Callable:
    if callable(entry):
        return entry
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The tool's docstring as written, and every option's default."""


def add_launch_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("cluster launch (submitit)")
    g.add_argument("--slurm", action="store_true", help="submit to SLURM instead of running here")
    g.add_argument("--local", action="store_true",
                   help="with --slurm: submitit's local executor (debugging, tests)")
    g.add_argument("--dry-run", action="store_true", help="check the job, print it, submit nothing")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=8)
    g.add_argument("--cpus-per-task", type=int, default=10)
    g.add_argument("--mem-gb", type=int, default=0, help="per node; 0 = all of it (--mem=0)")
    g.add_argument("--partition", default=None)
    g.add_argument("--timeout", type=int, default=72 * 60, help="minutes per allocation")
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", default=None)
    g.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, passed through (repeatable), e.g. exclusive=true, "
                        "reservation=R, comment=C")
    g.add_argument("--max-requeues", type=int, default=20)
    g.add_argument("--job-name", default=None)
    g.add_argument("--job-dir", default=None, help="submitit logs (default <output_dir>/submitit)")


def slurm_world_size(args: argparse.Namespace) -> int:
    """Processes the submitted job will run: one task per GPU (one per node with --local)."""
    return 1 if args.local else args.nodes * max(args.gpus_per_node, 1)


def run_main(main: Entry, cfg: dict) -> dict:
    """``main(cfg)``, then leave the process group (a main may call another: the demos do)."""
    from rcmae.core.distributed import cleanup

    try:
        return resolve(main)(cfg)
    finally:
        cleanup()


class Job:
    """The picklable job submitit runs on each task."""

    def __init__(self, main: Callable[[dict], dict], cfg: dict):
        self.main, self.cfg = main, cfg

    def __call__(self) -> dict:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                overwrite=True)
        return run_main(self.main, self.cfg)

    def checkpoint(self):
        import submitit

        from rcmae.core.checkpoint import find_last_checkpoint

        cfg = copy.deepcopy(self.cfg)
        # Training checkpoints periodically; once one exists, the requeued job resumes from it.
        if find_last_checkpoint(cfg["train"]["output_dir"]) is not None:
            cfg["train"]["resume"] = "auto"
        return submitit.helpers.DelayedSubmission(Job(self.main, cfg))


def executor_parameters(args: argparse.Namespace, name: str) -> dict:
    """submitit's public parameters for this job (``AutoExecutor.update_parameters``)."""
    gpus = args.gpus_per_node
    params = dict(name=args.job_name or name, nodes=args.nodes, tasks_per_node=max(gpus, 1),
                  cpus_per_task=args.cpus_per_task, timeout_min=args.timeout,
                  slurm_signal_delay_s=120)
    if gpus:
        params["gpus_per_node"] = gpus
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    else:
        params["slurm_mem"] = "0"  # SLURM: all the memory of each node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(args, key):
            params[f"slurm_{key}"] = getattr(args, key)
    extra = {}
    for item in args.slurm_param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--slurm-param {item!r} is not KEY=VALUE")
        extra[key.strip().replace("-", "_")] = True if value.lower() == "true" else value
    if extra:
        params["slurm_additional_parameters"] = extra
    return params


def sbatch_options(params: dict) -> list[str]:
    """The ``#SBATCH`` options these parameters ask for, in sbatch's own spelling (a preview: submitit
    writes the script itself, adding its output files and the command)."""
    names = {"name": "job-name", "nodes": "nodes", "tasks_per_node": "ntasks-per-node",
             "cpus_per_task": "cpus-per-task", "gpus_per_node": "gpus-per-node", "timeout_min": "time"}
    options = {flag: params[key] for key, flag in names.items() if key in params}
    if "mem_gb" in params:
        options["mem"] = f"{params['mem_gb']}GB"
    options["signal"] = f"USR2@{params['slurm_signal_delay_s']}"
    for key, value in params.items():
        if key.startswith("slurm_") and key not in ("slurm_signal_delay_s", "slurm_additional_parameters"):
            options[key[len("slurm_"):]] = value
    options.update(params.get("slurm_additional_parameters", {}))
    return [f"#SBATCH --{k.replace('_', '-')}" if v is True else f"#SBATCH --{k.replace('_', '-')}={v}"
            for k, v in options.items()]


def launch(main: Entry, cfg: dict, args: argparse.Namespace, name: str):
    """Run ``main(cfg)`` in this process, or submit it (``--slurm``); returns the result or the job."""
    if not args.slurm:
        return run_main(main, cfg)
    import submitit

    out_dir = Path(cfg["train"]["output_dir"]).resolve()
    cfg = copy.deepcopy(cfg)
    cfg["train"]["output_dir"] = str(out_dir)  # the job may start in another directory
    folder = Path(args.job_dir or out_dir / "submitit").resolve()
    params = executor_parameters(args, name)
    if args.local:
        params.pop("gpus_per_node", None)
        params["tasks_per_node"] = 1
    if args.dry_run:
        print("submitit parameters:", json.dumps(params, indent=2))
        print("\n".join(["sbatch options:", *sbatch_options(params)]))
        print(f"job logs: {folder}/<job id>; outputs: {out_dir}")
        return None
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="local" if args.local else None,
                                     slurm_max_num_timeout=args.max_requeues)
    executor.update_parameters(**params)
    job = executor.submit(Job(main, cfg))
    print(f"submitted job {job.job_id}: logs in {folder / job.job_id}, outputs in {out_dir}")
    return job


def run_cli(argv, *, defaults: dict, main: Entry, demo_config: str, name: str,
            description: str, errors: tuple = (), add_args=None, args_to_overrides=None,
            preflight: Entry | None = None):
    """The command line every tool shares: ``--config-file``, ``key.sub=value`` overrides,
    ``--output-dir``, ``--resume [PATH]`` / ``--no-resume`` (tools that resume), ``--print-config``,
    and the cluster options; runs here or submits, and prints where the outputs are. ``main`` and
    ``preflight`` may be "module:function" strings, imported after the arguments are parsed.

    The tool's demo (``demo_config``) runs only with no arguments at all or ``--demo``; any other
    call starts from ``defaults`` (the documented recipe). ``preflight(cfg, world_size)`` checks a
    config before a job is submitted, with the world size the job will have. A tool may add flags
    (``add_args(parser)``) that become overrides (``args_to_overrides(args) -> ["key=value", ...]``).
    """
    p = argparse.ArgumentParser(prog=name, description=description, formatter_class=HelpFormatter)
    p.add_argument("--demo", action="store_true",
                   help=f"the CPU demo (configs/{demo_config}); also what a call without arguments runs")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--config-file", default=None,
                   help="YAML config; without one the tool's defaults (the published recipe) apply")
    if "resume" in defaults.get("train", {}):
        p.add_argument("--resume", nargs="?", const="auto", default=None,
                       help="resume from the output dir's last checkpoint (the default behaviour), or "
                            "from PATH")
        p.add_argument("--no-resume", action="store_true", help="start afresh even if checkpoints exist")
    p.add_argument("--output-dir", default=None, help="same as train.output_dir=...")
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    if add_args is not None:
        add_args(p)
    add_launch_args(p)
    args = p.parse_args(argv)
    demo = args.demo or not argv
    overrides = (args_to_overrides(args) if args_to_overrides else []) + list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    if getattr(args, "resume", None):
        overrides.append(f"train.resume={args.resume}")
    if getattr(args, "no_resume", False):
        overrides.append("train.resume=none")
    try:
        if demo and args.config_file:
            raise ConfigError("--demo runs the demo config; drop --demo to use --config-file")
        cfg = load_config(defaults, config_path(demo_config) if demo else args.config_file, overrides)
        if args.print_config:
            save_config(cfg, sys.stdout)
            return cfg
        if args.slurm and preflight is not None:  # fail now, not after the queue wait
            resolve(preflight)(cfg, slurm_world_size(args))
        result = launch(main, cfg, args, name=name)
    except (ConfigError, CheckpointError, FileNotFoundError, *errors) as e:
        sys.exit(f"error: {e}")
    if isinstance(result, dict):
        print("\ndone. outputs:")
        for key, value in result.items():
            if isinstance(value, str) and value:
                print(f"  {key:15s} {value}")
    return result
