"""Launch ``ludwig train`` on one process per GPU (and per machine): data-parallel fine-tuning (issue #5).

    python -m ludwig_mt.launch --gpus 4 --strategy zero2 -- train --config ludwig_configs/sql.yaml \\
        --dataset data/prepared/sql/train.csv --output_directory results/sql

starts ``torch.distributed.run`` with 4 workers; each worker is ``python -m ludwig_mt.launch worker <ludwig
args>``, which applies the project's Ludwig patches (there may be no ``.pth`` hook, e.g. on a lent GPU machine;
with the same switches as every other process: ``LUDWIG_MT_NO_FIXES=1`` applies none) and runs Ludwig's own CLI.
The distributed patches (:mod:`ludwig_mt.patches.distributed`) then give every worker accelerate's strategy, its
share of the rows and its own GPU; only rank 0 writes, so the output directory is the one a single-process
``ludwig train`` writes. Multi-node: the same command on every machine with ``--num-machines``,
``--machine-rank`` and ``--main-process-ip``/``--main-process-port`` (accelerate's option names).

torchrun rather than ``accelerate launch`` spawns the processes: it is what accelerate launch itself runs for
multi-GPU, and it also works on CPU (accelerate launch --cpu gave each process a world of one).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ludwig_mt.config_args import config_path_in
from ludwig_mt.errors import WorkflowError
from ludwig_mt.strategies import (
    ENV_DEEPSPEED,
    ENV_STRATEGY,
    STRATEGIES,
    DeclaredBackend,
    check_strategy_compatible,
    declared_backend,
    deepspeed_settings,
    default_strategy,
)

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class LaunchSpec:
    """How many processes where: one per GPU on this machine, ``num_machines`` machines in all."""

    processes_per_machine: int = 1
    strategy: str = "zero2"
    cpu: bool = False
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str = "127.0.0.1"
    main_process_port: int | None = None
    declared: DeclaredBackend = DeclaredBackend()  # the YAML's backend section: DeepSpeed's settings come from it


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


def launcher_env(strategy: str, *, cpu: bool = False, base: dict[str, str] | None = None,
                 declared: DeclaredBackend = DeclaredBackend()) -> dict[str, str]:
    """Environment for the workers: the strategy switch, the YAML's DeepSpeed settings for a DeepSpeed strategy,
    and on CPU no CUDA and DeepSpeed's CPU accelerator."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    env = dict(os.environ if base is None else base)
    env[ENV_STRATEGY] = strategy
    env.pop(ENV_DEEPSPEED, None)
    if strategy in ("zero2", "zero3"):
        env[ENV_DEEPSPEED] = json.dumps(deepspeed_settings(strategy, declared))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def launcher_env_plain(cpu: bool) -> dict[str, str]:
    """One plain process: no strategy switch (Ludwig's own single-process path); on CPU no CUDA."""
    env = {k: v for k, v in os.environ.items() if k not in (ENV_STRATEGY, ENV_DEEPSPEED)}
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def check_before_launch(strategy: str, config: Mapping[str, Any] | None, source: str) -> None:
    """Refuse a known-bad strategy/config pair before any process starts, naming ``source`` (the YAML).

    ``config`` is the YAML the caller already loaded (None: no ``--config``, nothing to check). The workers check
    once more at ``LudwigModel.train`` (:mod:`ludwig_mt.patches.distributed`), for runs started by a bare ``torchrun``.
    """
    if config is None:
        return
    try:
        check_strategy_compatible(strategy, config)
    except WorkflowError as err:
        raise WorkflowError(f"{source}: {err}") from None


def load_config_in(ludwig_args: Sequence[str]) -> dict[str, Any] | None:
    """The YAML named by ``--config`` in a ``ludwig train`` command line, loaded once; None without ``--config``."""
    path = config_path_in(ludwig_args)
    if path is None:
        return None
    from ludwig_mt.config import load_yaml

    return load_yaml(path)


def worker(ludwig_args: Sequence[str]) -> None:
    """One rank: apply the project's Ludwig patches in this process (as the ``.pth`` hook would, under the same
    switches), then run Ludwig's CLI on ``ludwig_args``."""
    from ludwig_mt import autoload
    from ludwig_mt.patches import registry

    if not registry.raw_ludwig():
        autoload.install_hook()
    import ludwig.cli  # first: the hook patches ludwig.cli.main as it loads

    registry.apply_all()  # once per process: a no-op where the .pth hook already applied them

    sys.argv = ["ludwig", *ludwig_args]
    try:
        ludwig.cli.main()
    except SystemExit as done:
        if done.code not in (None, 0):
            raise
    release_process_group()


def release_process_group() -> None:
    """Destroy the default process group once a rank's run has succeeded (PyTorch's documented shutdown; only on
    success, as torchtitan does: a rank that failed must not wait in a collective teardown for ranks that went on).
    Left to the interpreter's exit, Gloo's worker threads can still hold work when Python is torn down and abort the
    process (``terminate called without an active exception``, exit -6 after Ludwig printed FINISHED: a ZeRO-3
    run on two CPU ranks of the test suite, once, 2026-12-03), which torchrun reports as a failed run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def add_launch_arguments(parser: argparse.ArgumentParser, *, default_gpus: int | None = 1) -> None:
    """The launcher's options, shared by ``python -m ludwig_mt.launch`` and ``./run.sh train``."""
    parser.add_argument("--gpus", type=int, default=default_gpus,
                        help="processes on this machine, one per GPU (default: the YAML's backend.trainer.num_workers)")
    parser.add_argument("--strategy", choices=STRATEGIES,
                        help="overrides the YAML's backend.trainer.strategy: zero2 (DeepSpeed stage 2, for 4-bit QLoRA), "
                             "ddp, zero3 (without quantization: shards the weights too), fsdp (the same, PyTorch FSDP2)")
    parser.add_argument("--num-machines", type=int, default=1, help="machines in the job (multi-node)")
    parser.add_argument("--machine-rank", type=int, default=0, help="this machine's rank, 0 on the main one")
    parser.add_argument("--main-process-ip", default="127.0.0.1", help="address of machine 0, reachable by all")
    parser.add_argument("--main-process-port", type=int, help=f"port on machine 0 (multi-node default {DEFAULT_PORT})")


def visible_gpus() -> int:
    """CUDA devices this process may use (``CUDA_VISIBLE_DEVICES`` respected); 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan_launch(args: argparse.Namespace, config: Mapping[str, Any] | None, *, cpu: bool = False,
                gpus_here: int | None = None, source: str = "config") -> tuple[LaunchSpec | None, list[str]]:
    """What to start: the YAML's ``backend:`` section, with the flags (``--gpus``, ``--strategy``) over it.

    Returns the launch (None: one plain process, no DeepSpeed engine, exactly ``ludwig train``) and one note per
    decision the user should see (a flag overriding the YAML, ``--cpu`` or a machine without GPUs shrinking the
    declared processes). ``num_workers: auto`` means every visible GPU (``gpus_here``, counted when None).
    """
    declared = declared_backend(config, source)
    notes: list[str] = []
    flag_processes = getattr(args, "gpus", None)
    num_machines = getattr(args, "num_machines", 1) or 1
    if flag_processes is not None:
        processes = flag_processes
        if declared.strategy and declared.num_workers not in (flag_processes, "auto"):
            notes.append(f"--gpus {flag_processes} overrides {source}'s num_workers: {declared.num_workers}")
    elif declared.strategy is None:
        processes = 1
    elif cpu:  # gloo on CPU: a declared number of processes is honoured, "every visible GPU" means one
        processes = 1 if declared.num_workers == "auto" else int(declared.num_workers)
        if processes == 1:
            notes.append(f"--cpu: one plain process; {source} declares {declared.describe()} (--gpus N runs N CPU "
                         f"processes with its strategy)")
    else:
        here = visible_gpus() if gpus_here is None else gpus_here
        processes = here if declared.num_workers == "auto" else int(declared.num_workers)
        if here == 0:
            processes = 1
            notes.append(f"no GPU visible: one process; {source} declares {declared.describe()}")
        elif processes > here:
            raise WorkflowError(f"{source}: backend.trainer.num_workers: {processes} processes, but {here} GPU(s) "
                                f"are visible. Fix: pass --gpus {here} or set num_workers: auto")
    flag_strategy = getattr(args, "strategy", None)
    strategy = flag_strategy or declared.strategy or default_strategy(config)
    check_before_launch(strategy, config, source)  # the strategy run, and the YAML's own even when overridden
    if declared.strategy:
        check_before_launch(declared.strategy, config, source)
    if flag_strategy and declared.strategy and flag_strategy != declared.strategy:
        notes.append(f"--strategy {flag_strategy} overrides {source}'s {declared.strategy}")
    if processes <= 1 and num_machines <= 1 and not (flag_processes is not None and flag_strategy):
        return None, notes  # one process is a plain process: the single-GPU speed path, no DeepSpeed engine
    return LaunchSpec(processes_per_machine=processes, strategy=strategy, cpu=cpu, num_machines=num_machines,
                      machine_rank=getattr(args, "machine_rank", 0), main_process_ip=getattr(
                          args, "main_process_ip", "127.0.0.1"), main_process_port=getattr(
                          args, "main_process_port", None), declared=declared), notes


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m ludwig_mt.launch", description=__doc__.splitlines()[0])
    add_launch_arguments(parser, default_gpus=None)
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU (tests, smoke runs): no CUDA")
    args, rest = parser.parse_known_args(argv)
    rest = rest[1:] if rest[:1] == ["--"] else rest
    if not rest:
        parser.error("give the ludwig command after --, e.g. -- train --config X.yaml --dataset D.csv")
    return args, rest


def command_and_env(spec: LaunchSpec, ludwig_args: Sequence[str],
                    config: Mapping[str, Any] | None) -> tuple[list[str], dict[str, str]]:
    """Check the strategy against ``config`` (the already loaded ``--config`` YAML), then the launcher command and
    the workers' environment for ``spec``."""
    check_before_launch(spec.strategy, config, config_path_in(ludwig_args) or "config")
    cmd = launcher_command(spec.processes_per_machine, ludwig_args, num_machines=spec.num_machines,
                           machine_rank=spec.machine_rank, main_process_ip=spec.main_process_ip,
                           main_process_port=spec.main_process_port)
    return cmd, launcher_env(spec.strategy, cpu=spec.cpu, declared=spec.declared)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        worker(argv[1:])
        return 0
    import subprocess

    args, ludwig_args = parse_args(argv)
    try:
        config = load_config_in(ludwig_args)
        spec, notes = plan_launch(args, config, cpu=args.cpu, source=config_path_in(ludwig_args) or "config")
        for note in notes:
            print(f"ludwig_mt.launch: {note}", file=sys.stderr)
        if spec is None:  # one process: plain Ludwig in this environment, as `ludwig train` would run it
            cmd, env = [sys.executable, "-m", "ludwig_mt.launch", "worker", *ludwig_args], launcher_env_plain(args.cpu)
        else:
            cmd, env = command_and_env(spec, ludwig_args, config)
        return subprocess.run(cmd, env=env, check=False).returncode
    except WorkflowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
