"""Command-line launch shared by the tools: run ``main(cfg)`` here, or submit it through submitit.

On SLURM, one task per GPU; submitit sends the timeout / preemption signal, :meth:`Job.checkpoint`
requeues the same config with ``train.resume=auto``, and the requeued job resumes from the
``last_checkpoint`` pointer in the output directory (which training writes: see checkpoint.py).
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Callable

from .checkpoint import find_last_checkpoint


def add_launch_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("cluster launch (submitit)")
    g.add_argument("--slurm", action="store_true", help="submit to SLURM instead of running here")
    g.add_argument("--local", action="store_true",
                   help="with --slurm: submitit's local executor (debugging, tests)")
    g.add_argument("--dry-run", action="store_true", help="print the job and sbatch script, submit nothing")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=8)
    g.add_argument("--cpus-per-task", type=int, default=10)
    g.add_argument("--mem-gb", type=int, default=0, help="per node; 0 = all of it")
    g.add_argument("--partition", default=None)
    g.add_argument("--timeout", type=int, default=72 * 60, help="minutes per allocation")
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", default=None)
    g.add_argument("--max-requeues", type=int, default=20)
    g.add_argument("--job-name", default=None)
    g.add_argument("--job-dir", default=None, help="submitit logs (default <output_dir>/submitit)")


def run_main(main: Callable[[dict], dict], cfg: dict) -> dict:
    """``main(cfg)``, then leave the process group (a main may call another: the demos do)."""
    from .distributed import cleanup

    try:
        return main(cfg)
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

        cfg = copy.deepcopy(self.cfg)
        # Training checkpoints periodically; once one exists, the requeued job resumes from it.
        if find_last_checkpoint(cfg["train"]["output_dir"]) is not None:
            cfg["train"]["resume"] = "auto"
        return submitit.helpers.DelayedSubmission(Job(self.main, cfg))


def executor_parameters(args: argparse.Namespace, name: str) -> dict:
    gpus = args.gpus_per_node
    params = dict(name=args.job_name or name, nodes=args.nodes, tasks_per_node=max(gpus, 1),
                  cpus_per_task=args.cpus_per_task, timeout_min=args.timeout,
                  slurm_signal_delay_s=120)
    if gpus:
        params["gpus_per_node"] = gpus
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(args, key):
            params[f"slurm_{key}"] = getattr(args, key)
    return params


def sbatch_preview(params: dict, folder: Path) -> str:
    """The sbatch script submitit would write for these parameters (submits nothing)."""
    from submitit.slurm.slurm import _make_sbatch_string

    sbatch = {"job_name": params["name"], "nodes": params["nodes"],
              "ntasks_per_node": params["tasks_per_node"], "cpus_per_task": params["cpus_per_task"],
              "time": params["timeout_min"], "signal_delay_s": params["slurm_signal_delay_s"]}
    if "gpus_per_node" in params:
        sbatch["gpus_per_node"] = params["gpus_per_node"]
    if "mem_gb" in params:
        sbatch["mem"] = f"{params['mem_gb']}GB"
    sbatch.update({k[len("slurm_"):]: v for k, v in params.items()
                   if k.startswith("slurm_") and k != "slurm_signal_delay_s"})
    return _make_sbatch_string(command="python -u -m submitit.core._submit " + str(folder),
                               folder=folder, **sbatch)


def launch(main: Callable[[dict], dict], cfg: dict, args: argparse.Namespace, name: str):
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
        print(sbatch_preview(params, folder / "%j"))
        return None
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="local" if args.local else None,
                                     slurm_max_num_timeout=args.max_requeues)
    executor.update_parameters(**params)
    job = executor.submit(Job(main, cfg))
    print(f"submitted job {job.job_id}: logs in {folder / job.job_id}, outputs in {out_dir}")
    return job


def run_cli(argv, *, defaults: dict, main: Callable[[dict], dict], demo_config: Path, name: str,
            description: str, errors: tuple = (), add_args=None, args_to_overrides=None):
    """The command line every tool shares: ``--config-file`` (default: the tool's demo),
    ``key.sub=value`` overrides, ``--output-dir``, ``--resume [PATH]`` / ``--no-resume``, and the
    cluster options; runs here or submits, and prints where the outputs are. A tool may add flags
    (``add_args(parser)``) that become overrides (``args_to_overrides(args) -> ["key=value", ...]``)."""
    import sys

    from .checkpoint import CheckpointError
    from .config import ConfigError, load_config

    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=None, help=f"YAML config (default: the demo, {demo_config.name})")
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
    overrides = (args_to_overrides(args) if args_to_overrides else []) + list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    if args.resume:
        overrides.append(f"train.resume={args.resume}")
    if args.no_resume:
        overrides.append("train.resume=none")
    try:
        cfg = load_config(defaults, args.config_file or demo_config, overrides)
        result = launch(main, cfg, args, name=name)
    except (ConfigError, CheckpointError, FileNotFoundError, *errors) as e:
        sys.exit(f"error: {e}")
    if isinstance(result, dict):
        print("\ndone. outputs:")
        for key, value in result.items():
            if isinstance(value, str) and value:
                print(f"  {key:15s} {value}")
    return result
