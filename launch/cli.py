"""`loopstack launch slurm|slurm-data|local|status` (argparse only here: handlers import the rest)."""

from __future__ import annotations

import argparse

from loopstack.commands import add_set_flag


def register(sub: argparse._SubParsersAction) -> None:
    launch = sub.add_parser("launch", help="SLURM jobs with requeue, data-prep arrays, multi-node torchrun",
                            description="Launchers; see launch/README.md for the requeue protocol.")
    lsub = launch.add_subparsers(dest="launch_command", metavar="ACTION", required=True)

    sl = lsub.add_parser(
        "slurm", help="render <run>/launch/train.sbatch and submit it (requeues itself on preemption)",
        description="Render the training job script into the run directory and submit it with sbatch. The job "
                    "checkpoints on USR1 (sent --signal grace before the time limit) or TERM, requeues itself "
                    "and resumes with --resume auto; it stops on trainer exit 0 or after launch.max_restarts. "
                    "Flags default to the config's launch section.")
    sl.add_argument("config", help="YAML run config")
    sl.add_argument("--nodes", type=int, help="nodes (launch.nodes)")
    sl.add_argument("--gpus-per-node", type=int, help="GPUs per node; 0 = CPU-only, launch.procs_per_node "
                                                      "processes on gloo (launch.gpus_per_node)")
    sl.add_argument("--time", help="time limit HH:MM:SS (launch.time)")
    sl.add_argument("--partition", help="SLURM partition (launch.partition)")
    sl.add_argument("--account", help="SLURM account (launch.account)")
    sl.add_argument("--chain", type=int, default=0, metavar="K",
                    help="for clusters that forbid requeue: submit K dependent jobs (afterany) that each resume")
    sl.add_argument("--run-dir", help="run directory (default runs/<name>)")
    sl.add_argument("--template", help="render from this copy of launch/templates/train.sbatch instead")
    sl.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command; write nothing")
    add_set_flag(sl)
    sl.set_defaults(func=_slurm)

    sd = lsub.add_parser(
        "slurm-data", help="submit `data prepare` as a job array (one slice per task) and a dependent merge",
        description="One array task per slice of the config's data.sources (`loopstack data prepare --slice I/N`), "
                    "then `loopstack data merge` once every task succeeded (afterok). Rerunning resumes: finished "
                    "slices are kept, a killed one continues.")
    sd.add_argument("config", help="YAML run config (data.sources, tokenizer.dir, data.out)")
    sd.add_argument("--tasks", type=int, required=True, metavar="N", help="array tasks = slices of the sources")
    sd.add_argument("--only", metavar="I,J,...", help="rerun only these slice indices (0-based)")
    sd.add_argument("--cpus-per-task", type=int, help="CPUs per array task (default: data.workers if set)")
    sd.add_argument("--time", default="04:00:00", help="time limit per task HH:MM:SS (default 04:00:00)")
    sd.add_argument("--partition", help="SLURM partition (launch.partition)")
    sd.add_argument("--account", help="SLURM account (launch.account)")
    sd.add_argument("--run-dir", help="where scripts, logs and the journal go (default runs/<name>-data)")
    sd.add_argument("--dry-run", action="store_true", help="print the scripts and sbatch commands; write nothing")
    add_set_flag(sd)
    sd.set_defaults(func=_slurm_data)

    lo = lsub.add_parser(
        "local", help="N torchrun agents on this machine that rendezvous like N nodes (c10d on 127.0.0.1)",
        description="Start --nnodes torchrun agents here, each running `loopstack train` with --nproc-per-node "
                    "workers, joined by a c10d rendezvous on 127.0.0.1: the multi-node code paths without a "
                    "cluster. CPU/gloo unless --gpus.")
    lo.add_argument("config", help="YAML run config")
    lo.add_argument("--nnodes", type=int, default=2, help="agents (pretend nodes), default 2")
    lo.add_argument("--nproc-per-node", type=int, default=1, help="workers per agent, default 1")
    lo.add_argument("--port", type=int, help="rendezvous port (default launch.port)")
    lo.add_argument("--gpus", action="store_true", help="give each agent its own nproc-per-node GPUs")
    lo.add_argument("--run-dir", help="run directory (default runs/<name>)")
    lo.add_argument("--resume", default="auto", metavar="auto|PATH|none", help="passed to loopstack train")
    lo.add_argument("--dry-run", action="store_true", help="print the agents' commands; start nothing")
    add_set_flag(lo)
    lo.set_defaults(func=_local)

    st = lsub.add_parser("status", help="a launched run: state, last step, last checkpoint, restarts, job ids")
    st.add_argument("run_dir", help="run directory (or a slurm-data run directory)")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.add_argument("--no-slurm", action="store_true", help="do not ask squeue for live job states")
    st.set_defaults(func=_status)


def _positive(name: str, value: int | None, minimum: int = 1) -> None:
    from loopstack.errors import UserError

    if value is not None and value < minimum:
        raise UserError(f"{name} {value}: must be at least {minimum}")


def _slurm(args: argparse.Namespace) -> int:
    from launch.slurm import TrainJob

    _positive("--nodes", args.nodes)
    _positive("--gpus-per-node", args.gpus_per_node, 0)
    _positive("--chain", args.chain, 0)
    job = TrainJob.from_args(args.config, args.overrides, args.run_dir, nodes=args.nodes,
                             gpus_per_node=args.gpus_per_node, time=args.time, partition=args.partition,
                             account=args.account, template=args.template)
    if args.dry_run:
        print(job.render(args.chain), end="")
        for cmd in job.sbatch_commands(args.chain):
            print(f"# submit: {cmd}")
        return 0
    job_ids = job.submit(args.chain)
    what = f"chain of {len(job_ids)} jobs" if args.chain else "job"
    print(f"submitted {what} {', '.join(job_ids)}: {job.script_path}")
    print(f"follow it with: loopstack launch status {job.run_dir}")
    return 0


def _slurm_data(args: argparse.Namespace) -> int:
    from launch.slurm_data import DataJob

    _positive("--tasks", args.tasks)
    _positive("--cpus-per-task", args.cpus_per_task)
    job = DataJob.from_args(args.config, args.overrides, args.run_dir, tasks=args.tasks, only=args.only,
                            cpus_per_task=args.cpus_per_task, time=args.time, partition=args.partition,
                            account=args.account)
    if args.dry_run:
        print(job.render_prepare(), end="")
        print(job.render_merge(), end="")
        for cmd in job.sbatch_commands():
            print(f"# submit: {cmd}")
        return 0
    array_id, merge_id = job.submit()
    print(f"submitted array {array_id} (slices {job.array_spec} of {job.tasks}) and merge job {merge_id} "
          f"(afterok): {job.run_dir}")
    print(f"follow it with: loopstack launch status {job.run_dir}")
    return 0


def _local(args: argparse.Namespace) -> int:
    from launch.local import describe, run_agents, train_command
    from pretrain.config import load_config

    _positive("--nnodes", args.nnodes)
    _positive("--nproc-per-node", args.nproc_per_node)
    cfg = load_config(args.config, args.overrides)  # a config error is one line here, not one per worker
    port = args.port or cfg.launch.port
    command = train_command(args.config, args.overrides, args.run_dir, args.resume)
    if args.dry_run:
        print(describe(args.nnodes, args.nproc_per_node, port, command, args.gpus), end="")
        return 0
    return run_agents(args.nnodes, args.nproc_per_node, port, command, gpus=args.gpus,
                      stop_timeout=max(5, cfg.launch.signal_grace_s - 15))


def _status(args: argparse.Namespace) -> int:
    import json

    from launch.status import format_status, status

    info = status(args.run_dir, live=not args.no_slurm)
    print(json.dumps(info, indent=2) if args.json else format_status(info))
    return 0
