"""Command-line launch shared by the tools: run ``main(cfg)`` here, or submit it through submitit.

On SLURM, one task per GPU. At the time-limit / preemption signal (USR2) or TERM each task's main
process finishes its step and saves (:mod:`rcmae.core.preemption`); after USR2 the first task requeues
the job through submitit (:meth:`Job.checkpoint`: the same config with ``train.resume=auto``), after
TERM SLURM requeues it by itself (or it was cancelled). The restarted job resumes from the
``last_checkpoint`` pointer in the output directory (which training writes: see checkpoint.py).
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Union

from rcmae.core.config import config_path, load_config, save_config
from rcmae.core.errors import CheckpointError, ConfigError, DataError, OutputDirInUseError
from rcmae.core.preemption import Interrupted, noting_signals

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
    g.add_argument("--dry-run", action="store_true",
                   help="run the checks and print the plan (with --slurm: the job); run, write or submit nothing")
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
    g.add_argument("--signal-delay-s", type=int, default=120,
                   help="how long before the time limit SLURM sends USR2, on which the run saves and requeues: "
                        "more than a step and a checkpoint take")
    g.add_argument("--max-requeues", type=int, default=20,
                   help="requeues after a time limit (preemptions and requeues by SLURM are not counted)")
    g.add_argument("--after", default=None, metavar="JOBID[:JOBID...]",
                   help="with --slurm: start once these SLURM jobs have ended successfully (afterok). A check that "
                        "fails now, on an input one of them is to write, is reported and runs again when the job "
                        "starts")
    g.add_argument("--job-name", default=None)
    g.add_argument("--job-dir", default=None, help="submitit logs (default <output_dir>/submitit)")


def slurm_world_size(args: argparse.Namespace) -> int:
    """Processes the submitted job will run: one task per GPU (one per node with --local)."""
    return 1 if args.local else args.nodes * max(args.gpus_per_node, 1)


def job_world_size(args: argparse.Namespace) -> int:
    """Processes the run will have: the SLURM job's, or here those torchrun / srun describe (else 1)."""
    if args.slurm:
        return slurm_world_size(args)
    from rcmae.core.distributed import env_from_variables

    return env_from_variables()[0].world_size


def run_main(main: Entry, cfg: dict) -> dict:
    """``main(cfg)`` with USR2 / TERM noted rather than fatal (the trainers stop at them, saved), then
    let go of its output directory and leave the process group (a main may call another: the demos do)."""
    from rcmae.core.distributed import cleanup
    from rcmae.core.run import release_output_dirs

    try:
        with noting_signals():
            return resolve(main)(cfg)
    finally:
        release_output_dirs()
        cleanup()


def requeue_quietly(requeue) -> None:
    """submitit's SIGUSR2 handler: ``Job.checkpoint``, then ``scontrol requeue``. SLURM answers the requeue by
    terminating every process of the job step, ``scontrol`` among them when it has not exited yet: its death
    by SIGTERM is the requeue under way, not a failure to report with a traceback."""
    try:
        requeue(signal.SIGUSR2, None)
    except subprocess.CalledProcessError as e:
        if e.returncode != -signal.SIGTERM:
            raise


class Job:
    """The picklable job submitit runs on each task; ``argv`` is the user's command line, which the
    task's run records and output-directory lock name (not submitit's ``_submit.py``)."""

    def __init__(self, main: Entry, cfg: dict, argv: list[str]):
        self.main, self.cfg, self.argv = main, cfg, argv

    def __call__(self) -> dict:
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's: Job.checkpoint, then scontrol requeue
        with noting_signals():  # first of all: from here on a signal stops the run where it can save
            import submitit

            sys.argv[:] = self.argv
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                    overwrite=True)
            try:
                return run_main(self.main, self.cfg)
            except Interrupted as stop:
                print(f"{stop}; {last_checkpoint_note(self.cfg['train']['output_dir'])}", file=sys.stderr)
                if stop.signum == signal.SIGUSR2 and callable(requeue):
                    requeue_quietly(requeue)  # the first task requeues and exits; the others return
                # no result: the job is not done. After TERM, SLURM requeues it (or it was cancelled).
                raise SystemExit(0)

    def checkpoint(self):
        import submitit

        from rcmae.core.checkpoint import find_last_checkpoint

        cfg = copy.deepcopy(self.cfg)
        # Training checkpoints periodically; once one exists, the requeued job resumes from it.
        if find_last_checkpoint(cfg["train"]["output_dir"]) is not None:
            cfg["train"]["resume"] = "auto"
        return submitit.helpers.DelayedSubmission(Job(self.main, cfg, self.argv))


def executor_parameters(args: argparse.Namespace, name: str) -> dict:
    """submitit's public parameters for this job (``AutoExecutor.update_parameters``)."""
    gpus = args.gpus_per_node
    params = dict(name=args.job_name or name, nodes=args.nodes, tasks_per_node=max(gpus, 1),
                  cpus_per_task=args.cpus_per_task, timeout_min=args.timeout,
                  slurm_signal_delay_s=args.signal_delay_s)
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
    if args.after:
        extra["dependency"] = f"afterok:{args.after}"
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


def partition_nodes(partition: str | None) -> tuple[str, list[dict]] | None:
    """The partition a job goes to (``partition``, else SLURM's default) and its nodes' CPUs, memory (MB)
    and GPUs, as ``sinfo`` reports them; None when ``sinfo`` is not reachable from here."""
    if shutil.which("sinfo") is None:
        return None
    try:
        out = subprocess.run(["sinfo", "--noheader", "--Node", "--format", "%P|%N|%c|%m|%G"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    rows = [line.split("|") for line in out.stdout.split("\n") if line.count("|") == 4]
    names = sorted({r[0].rstrip("*") for r in rows})
    if partition is None:
        defaults = {r[0].rstrip("*") for r in rows if r[0].endswith("*")}
        if not defaults:
            raise ConfigError(f"SLURM has no default partition: pass --partition (one of {', '.join(names)})")
        partition = defaults.pop()
    elif partition not in names:
        raise ConfigError(f"--partition {partition}: SLURM has no such partition (sinfo lists {', '.join(names)})")
    nodes = {}
    for part, node, cpus, mem, gres in rows:
        if part.rstrip("*") == partition:
            gpus = sum(int(n) for n in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))
            nodes[node] = {"cpus": int(cpus.rstrip("+")), "mem_mb": int(mem.rstrip("+")), "gpus": gpus}
    return partition, list(nodes.values())


def check_request(args: argparse.Namespace, params: dict) -> None:
    """Refuse a job no node of its partition can run: SLURM accepts it and leaves it PENDING for ever
    (``Reason=PartitionConfig``), without a word. Nothing is checked when ``sinfo`` is not reachable."""
    found = partition_nodes(args.partition)
    if found is None:
        return
    partition, nodes = found
    tasks, gpus = params["tasks_per_node"], params.get("gpus_per_node", 0)
    cpus = tasks * params["cpus_per_task"]
    mem_mb = params.get("mem_gb", 0) * 1024
    fit = [n for n in nodes if n["cpus"] >= cpus and n["gpus"] >= gpus and n["mem_mb"] >= mem_mb]
    if len(fit) >= params["nodes"]:
        return
    most = {key: max(n[key] for n in nodes) for key in ("cpus", "gpus", "mem_mb")}
    fixes = []
    if most["gpus"] < gpus:  # one task per GPU: fewer GPUs also means fewer tasks
        fixes.append(f"--gpus-per-node {most['gpus']} or less" if most["gpus"] else
                     "--gpus-per-node 0 (a CPU-only job) or a partition with GPUs")
    if most["cpus"] < cpus:
        fixes.append(f"--cpus-per-task {most['cpus'] // tasks} or less" if most["cpus"] >= tasks else
                     f"at most {most['cpus']} task(s) per node, one CPU each")
    if most["mem_mb"] < mem_mb:
        fixes.append(f"--mem-gb {most['mem_mb'] // 1024} or less")
    if not fixes:
        fixes.append(f"--nodes {len(fit)} or less, or another partition")
    raise ConfigError(
        f"partition {partition} cannot run this job, which SLURM would leave pending: each of {params['nodes']} "
        f"node(s) must give {tasks} task(s) x {params['cpus_per_task']} CPUs = {cpus} CPUs, {gpus} GPU(s)"
        f"{f', {mem_mb // 1024} GB' if mem_mb else ''}; {len(fit)} of its {len(nodes)} node(s) can (the largest has "
        f"{most['cpus']} CPUs, {most['gpus']} GPUs, {most['mem_mb'] // 1024} GB). Use {'; '.join(fixes)}")


def launch(main: Entry, cfg: dict, args: argparse.Namespace, name: str):
    """Run ``main(cfg)`` in this process, or submit it (``--slurm``); returns the result or the job.
    ``--dry-run`` prints what would run or be submitted and returns None."""
    if not args.slurm:
        if args.dry_run:
            print(f"dry run: the checks passed; {name} would run here on {job_world_size(args)} process(es), "
                  f"outputs in {Path(cfg['train']['output_dir']).resolve()}. Nothing was run or written. "
                  "The resolved config:")
            save_config(cfg, sys.stdout)
            return None
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
    else:
        check_request(args, params)
    if args.dry_run:
        print("submitit parameters:", json.dumps(params, indent=2))
        print("\n".join(["sbatch options:", *sbatch_options(params)]))
        print(f"job logs: {folder}/<job id>; outputs: {out_dir}")
        return None
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="local" if args.local else None,
                                     slurm_max_num_timeout=args.max_requeues)
    executor.update_parameters(**params)
    job = executor.submit(Job(main, cfg, list(sys.argv)))
    print(f"submitted job {job.job_id}: logs in {folder / job.job_id}, outputs in {out_dir}")
    return job


def last_checkpoint_note(out_dir: str) -> str:
    """Where a stopped run can be continued from, in a sentence."""
    from rcmae.core.checkpoint import find_last_checkpoint

    try:
        last = find_last_checkpoint(out_dir)
    except CheckpointError as e:  # a pointer to a file that is gone: say so rather than fail again
        return f"The last checkpoint cannot be found: {e}"
    if last is None:
        return f"No checkpoint was written in {Path(out_dir).resolve()}."
    return f"The last checkpoint is {last.resolve()} (--resume continues from it)."


def exit_stopped(stop: Interrupted, out_dir: str) -> None:
    """A run stopped at USR2 / TERM, its state saved: name where it continues from, and exit with 128 + the
    signal (the shell's status for a command that signal ended)."""
    print(f"\n{stop}. {last_checkpoint_note(out_dir)}", file=sys.stderr)
    sys.exit(128 + stop.signum)


def parse_tool_args(argv, defaults: dict, demo_config: str, name: str, description: str, add_args=None,
                    args_to_overrides=None) -> tuple[argparse.Namespace, bool, list[str]]:
    """:func:`run_cli`'s arguments: the parsed namespace, whether the demo runs, and the config overrides the
    flags and ``key.sub=value`` arguments make."""
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
    args = p.parse_intermixed_args(argv)  # overrides may come after flags too
    demo = args.demo or not argv
    overrides = (args_to_overrides(args) if args_to_overrides else []) + list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    if getattr(args, "resume", None):
        overrides.append(f"train.resume={args.resume}")
    if getattr(args, "no_resume", False):
        overrides.append("train.resume=none")
    return args, demo, overrides


def run_cli(argv, *, defaults: dict, main: Entry, demo_config: str, name: str,
            description: str, errors: tuple = (), add_args=None, args_to_overrides=None,
            preflight: Entry | None = None):
    """The command line every tool shares: ``--config-file``, ``key.sub=value`` overrides,
    ``--output-dir``, ``--resume [PATH]`` / ``--no-resume`` (tools that resume), ``--print-config``,
    and the cluster options; runs here or submits, and prints where the outputs are. ``main`` and
    ``preflight`` may be "module:function" strings, imported after the arguments are parsed.

    The tool's demo (``demo_config``) runs only with no arguments at all or ``--demo``; any other
    call starts from ``defaults`` (the documented recipe). ``preflight(cfg, world_size)`` checks a
    config before anything runs, is written or is submitted, with the world size the run or job will
    have; ``--dry-run`` stops after the checks and prints the plan. Ctrl-C stops a run with exit
    status 130 and names its last checkpoint; TERM or USR2 stop it after the step in progress, saved,
    with 128 + the signal (:mod:`rcmae.core.preemption`). A tool may add flags
    (``add_args(parser)``) that become overrides (``args_to_overrides(args) -> ["key=value", ...]``).
    """
    args, demo, overrides = parse_tool_args(argv, defaults, demo_config, name, description, add_args,
                                            args_to_overrides)
    cfg = None
    try:
        if demo and args.config_file:
            raise ConfigError("--demo runs the demo config; drop --demo to use --config-file")
        cfg = load_config(defaults, config_path(demo_config) if demo else args.config_file, overrides)
        if args.print_config:
            save_config(cfg, sys.stdout)
            return cfg
        from rcmae.core.run import check_run_config

        # everything that can be checked fails now, before anything is written (and not after a queue wait)
        check_run_config(cfg)
        if preflight is not None:
            try:
                resolve(preflight)(cfg, job_world_size(args))
            except (ConfigError, CheckpointError, DataError, FileNotFoundError) as e:
                if not (args.slurm and args.after):
                    raise
                print(f"warning: {e}\n  The job starts after job(s) {args.after}, which may write what is missing; "
                      "it runs these checks again when it starts.", file=sys.stderr)
        result = launch(main, cfg, args, name=name)
    except (ConfigError, CheckpointError, DataError, OutputDirInUseError, FileNotFoundError, *errors) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        note = last_checkpoint_note(cfg["train"]["output_dir"]) if cfg else "Nothing had started."
        print(f"\ninterrupted: stopped. {note}", file=sys.stderr)
        sys.exit(130)  # the shell's status for a command ended by Ctrl-C
    except Interrupted as stop:  # TERM or USR2 outside submitit: saved, stopped
        exit_stopped(stop, cfg["train"]["output_dir"])
    if isinstance(result, dict):
        print("\ndone. outputs:")
        for key, value in result.items():
            if isinstance(value, str) and value:
                print(f"  {key:15s} {value}")
    return result
