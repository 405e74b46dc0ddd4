"""Launch ``ludwig train`` on one process per GPU (and per machine): data-parallel fine-tuning (issue #5).

    python -m ludwig_mt.launch --gpus 4 --strategy zero2 -- train --config ludwig_configs/sql.yaml \\
        --dataset data/prepared/sql/train.csv --output_directory results/sql

starts ``torch.distributed.run`` with 4 workers; each worker is ``python -m ludwig_mt.launch worker <ludwig
args>``, which applies the project's Ludwig fixes (there may be no ``.pth`` hook, e.g. on a lent GPU machine)
and runs Ludwig's own CLI. :mod:`ludwig_mt.distributed` then gives every worker accelerate's strategy, its share
of the rows and its own GPU; only rank 0 writes, so the output directory is the one a single-process
``ludwig train`` writes. Multi-node: the same command on every machine with ``--num-machines``,
``--machine-rank`` and ``--main-process-ip``/``--main-process-port`` (accelerate's option names).

torchrun rather than ``accelerate launch`` spawns the processes: it is what accelerate launch itself runs for
multi-GPU, and it also works on CPU (accelerate launch --cpu gave each process a world of one).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence

from ludwig_mt.distributed import ENV_STRATEGY, STRATEGY_FILES

DEFAULT_PORT = 29500


def free_port() -> int:
    """A TCP port nobody listens on now (for single-machine runs, so parallel jobs do not collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_skip_processed_input(ludwig_args: Sequence[str]) -> list[str]:
    """Every rank preprocesses the same rows; caching them would make all ranks write the same cache file."""
    args = list(ludwig_args)
    if args[:1] == ["train"] and "--skip_save_processed_input" not in args:
        args.append("--skip_save_processed_input")
    return args


def launcher_command(
    processes_per_machine: int,
    ludwig_args: Sequence[str],
    *,
    num_machines: int = 1,
    machine_rank: int = 0,
    main_process_ip: str = "127.0.0.1",
    main_process_port: int | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The ``torch.distributed.run`` command line that starts this machine's workers."""
    if processes_per_machine < 1 or num_machines < 1 or not 0 <= machine_rank < num_machines:
        raise ValueError(f"need processes >= 1 and 0 <= machine_rank < num_machines, got "
                         f"{processes_per_machine}, {machine_rank}, {num_machines}")
    port = main_process_port or (free_port() if num_machines == 1 else DEFAULT_PORT)
    return [
        python, "-m", "torch.distributed.run",
        "--nnodes", str(num_machines), "--node_rank", str(machine_rank),
        "--nproc_per_node", str(processes_per_machine),
        "--master_addr", main_process_ip, "--master_port", str(port),
        "-m", "ludwig_mt.launch", "worker", *with_skip_processed_input(ludwig_args),
    ]


def launcher_env(strategy: str, *, cpu: bool = False, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the workers: the strategy switch, and on CPU no CUDA and DeepSpeed's CPU accelerator."""
    if strategy not in STRATEGY_FILES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGY_FILES)}")
    env = dict(os.environ if base is None else base)
    env[ENV_STRATEGY] = strategy
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def worker(ludwig_args: Sequence[str]) -> None:
    """One rank: apply the project's Ludwig fixes in this process, then run Ludwig's CLI on ``ludwig_args``."""
    from ludwig_mt import autoload, ludwig_fixes

    autoload.install_hook()
    ludwig_fixes.apply_all()  # idempotent: a no-op where the .pth hook already applied them
    import ludwig.cli

    sys.argv = ["ludwig", *ludwig_args]
    ludwig.cli.main()


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m ludwig_mt.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=1, help="processes on this machine, one per GPU")
    parser.add_argument("--strategy", choices=sorted(STRATEGY_FILES), default="zero2")
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU (tests, smoke runs): no CUDA")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0)
    parser.add_argument("--main-process-ip", default="127.0.0.1")
    parser.add_argument("--main-process-port", type=int)
    args, rest = parser.parse_known_args(argv)
    rest = [a for a in rest if a != "--"] if rest[:1] == ["--"] else rest
    if not rest:
        parser.error("give the ludwig command after --, e.g. -- train --config X.yaml --dataset D.csv")
    return args, rest


def launch(args: argparse.Namespace, ludwig_args: Sequence[str], *, stdout=None) -> int:
    """Run the launcher in the foreground; return its exit code (non-zero if any rank failed)."""
    import subprocess

    cmd = launcher_command(args.gpus, ludwig_args, num_machines=args.num_machines, machine_rank=args.machine_rank,
                           main_process_ip=args.main_process_ip, main_process_port=args.main_process_port)
    env = launcher_env(args.strategy, cpu=args.cpu)
    return subprocess.run(cmd, env=env, stdout=stdout, stderr=subprocess.STDOUT if stdout else None,
                          check=False).returncode


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        worker(argv[1:])
        return 0
    args, ludwig_args = parse_args(argv)
    return launch(args, ludwig_args)


if __name__ == "__main__":
    raise SystemExit(main())
