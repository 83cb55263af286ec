"""Multi-process launch that also works for CPU training.

:func:`detectron2.engine.launch` picks NCCL whenever CUDA is visible, which fails for a CPU run
(``train.device="cpu"``) on a GPU machine. :func:`launch` here takes the backend explicitly; for
``"gloo"`` it spawns its own workers (same process-group setup as detectron2: global rank, local
process group, barrier), otherwise it defers to detectron2's launch unchanged.
"""
import logging
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import _find_free_port
from detectron2.utils import comm

__all__ = ["launch", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = timedelta(minutes=30)


def launch(
    main_func,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url=None,
    args=(),
    timeout=DEFAULT_TIMEOUT,
    backend=None,
):
    """Like :func:`detectron2.engine.launch`, plus ``backend`` ("gloo" for CPU processes, ``None``:
    detectron2's choice: NCCL when CUDA is visible, else GLOO). ``num_gpus_per_machine`` is the number
    of processes per machine."""
    if num_gpus_per_machine < 1 or num_machines < 1:
        raise ValueError(
            f"--num-gpus and --num-machines must be >= 1, got {num_gpus_per_machine} and {num_machines}"
        )
    world_size = num_machines * num_gpus_per_machine
    if backend is None or str(backend).lower() != "gloo" or world_size == 1:
        return d2_launch(
            main_func, num_gpus_per_machine, num_machines=num_machines, machine_rank=machine_rank,
            dist_url=dist_url, args=args, timeout=timeout,
        )
    if dist_url is None or dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url auto is only valid for one machine; give tcp://<host>:<port>")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.start_processes(
        _gloo_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args, timeout),
        daemon=False,
    )


def _gloo_worker(local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args, timeout):
    global_rank = machine_rank * num_per_machine + local_rank
    try:
        dist.init_process_group(
            backend="gloo", init_method=dist_url, world_size=world_size, rank=global_rank, timeout=timeout
        )
    except Exception:
        logging.getLogger(__name__).error("Process group URL: {}".format(dist_url))
        raise
    comm.create_local_process_group(num_per_machine)
    # CPU processes share the cores: split them so that 2 processes don't oversubscribe.
    torch.set_num_threads(max(1, torch.get_num_threads() // num_per_machine))
    comm.synchronize()
    main_func(*args)
