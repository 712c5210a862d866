"""Tensor parallelism over processes: rank 0 here, ranks 1..N-1 in worker processes.

How workers start (``start_method``, logged): by fork while this process has no CUDA context
(always on CPU), so a script that builds an ``LLM`` at module level, without an
``if __name__ == "__main__":`` guard, works as in vLLM; by spawn once CUDA is initialised, or
was queried through the runtime (``torch.cuda.is_available()``), since torch then refuses CUDA
in forked children; ``VLLM_WORKER_MULTIPROC_METHOD`` forces one.  Spawned workers import the
main module again, so there the guard is needed.

Start-up: the workers are started first; each builds its ``Worker`` (joining
the TP group whose store rank 0 hosts, then loading its shard of the weights)
while rank 0 builds its own; the KV cache gets the fewest blocks any rank can
hold.  Then, per call, rank 0 sends ``(method, args)`` through each worker's
pipe and reads one reply ``("ok", result)`` or ``("error", traceback)``.

A step: ``start_execute(ModelInput)`` sends the inputs, rank 0 runs its own
forward (the layers' collectives pair the ranks up), ``finish_execute()``
collects the acknowledgements.  Only rank 0 samples.

A worker exits when told to, when its pipe closes (the engine process ended)
or with its daemon parent; ``shutdown`` (also run when the executor is
garbage-collected) stops them.
"""
from __future__ import annotations

import contextlib
import gc
import os
import time
import traceback
import weakref
from typing import Any, Iterator

import torch
import torch.multiprocessing as mp

from vllm import envs
from vllm.distributed import free_port
from vllm.engine.arg_utils import EngineArgs
from vllm.executor.executor import Executor
from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.worker.worker import Worker

logger = init_logger(__name__)


def start_method(on_cuda: bool) -> tuple[str, str]:
    """(the multiprocessing start method for the workers, why it was chosen).  ``on_cuda``: the
    workers will use CUDA devices (on CPU a forked child never needs CUDA, so fork always works)."""
    forced = envs.VLLM_WORKER_MULTIPROC_METHOD
    if forced is not None:
        return forced, "VLLM_WORKER_MULTIPROC_METHOD"
    if not on_cuda:
        return "fork", "CPU workers"
    if torch.cuda.is_initialized():
        return "spawn", "CUDA is already initialised in this process, and a forked worker could not use it"
    if not _forked_child_can_use_cuda():
        return "spawn", ("this process already queried CUDA through the runtime (torch.cuda.is_available() does; "
                         "torch.cuda.device_count() does not), after which a forked worker cannot use it")
    return "fork", "no CUDA context exists in this process yet"


def _forked_child_can_use_cuda() -> bool:
    """Whether torch would let a forked child initialise CUDA: once this process called the CUDA
    runtime, torch marks its forked children as unable to (and they fail when they try).  Asked of
    a short-lived forked probe, which exits at once."""
    pid = os.fork()
    if pid == 0:  # the probe: no Python clean-up, no flush of inherited buffers
        os._exit(3 if torch.cuda._is_in_bad_fork() else 0)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


@contextlib.contextmanager
def _fork_safe_objects(forking: bool) -> Iterator[None]:
    """Around forks: this process's garbage is collected first (an earlier engine's TCP store and
    process group are torn down here, where their threads exist), and what is left is frozen out of
    the cyclic collector while the children are forked, so a child never destroys an inherited
    object whose threads it does not have (a TCP store's destructor would wait for them forever)."""
    if not forking:
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class WorkerError(RuntimeError):
    """A worker process failed; the message carries its traceback."""


def _worker_main(args: EngineArgs, rank: int, world_size: int, port: int, conn) -> None:
    conn.send(("started", None))
    if not torch.cuda.is_available():  # CPU ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        worker = Worker(args, rank, world_size, port)
    except BaseException:  # noqa: BLE001 - reported to rank 0, which raises it
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", None))
    while True:
        try:
            method, call_args = conn.recv()
        except (EOFError, OSError):
            return
        if method == "shutdown":
            if worker.tp_group is not None:
                worker.tp_group.close()
            conn.send(("ok", None))
            return
        try:
            conn.send(("ok", getattr(worker, method)(*call_args)))
        except BaseException:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))


def _stop(conns: list, procs: list) -> None:
    for conn in conns:
        try:
            conn.send(("shutdown", ()))
        except (OSError, ValueError):
            pass
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
    for conn in conns:
        conn.close()


class MirroredLoRAManager:
    """Rank 0's LoRAModelManager; calls that change adapter state are repeated on every other rank.

    Rank 0 goes first: a bad adapter is refused there and never sent.  Reads
    (``get_request``, ``list_adapters``, ...) are answered by rank 0.
    """

    def __init__(self, local: Any, executor: "MultiprocExecutor") -> None:
        self._local = local
        self._executor = executor

    def add_adapter(self, lora_request) -> bool:
        added = self._local.add_adapter(lora_request)
        try:
            self._executor.call_workers("call_lora_manager", "add_adapter", lora_request)
        except WorkerError:  # keep the ranks equal: drop it everywhere, then report
            self.remove_adapter(lora_request.lora_int_id)
            raise
        return added

    def remove_adapter(self, lora_int_id: int) -> bool:
        removed = self._local.remove_adapter(lora_int_id)
        self._executor.call_workers("call_lora_manager", "remove_adapter", lora_int_id)
        return removed

    def pin_adapters(self, lora_int_ids) -> None:
        self._local.pin_adapters(lora_int_ids)
        self._executor.call_workers("call_lora_manager", "pin_adapters", set(lora_int_ids))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._local, name)


class MultiprocExecutor(Executor):
    def __init__(self, args: EngineArgs) -> None:
        world_size = args.tensor_parallel_size
        port = free_port()
        method, why = start_method(current_platform().is_cuda())
        self.start_method = method
        ctx = mp.get_context(method)
        self._conns, self._procs = [], []
        self._finalizer = weakref.finalize(self, _stop, self._conns, self._procs)
        with _fork_safe_objects(method == "fork"):
            for rank in range(1, world_size):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker_main, args=(args, rank, world_size, port, child), daemon=True,
                                   name=f"vllm-tp{rank}")
                proc.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(proc)
        logger.info("tensor parallel size %d: started %d worker process(es) by %s (%s)", world_size, world_size - 1,
                    method, why)
        try:
            self._await_started()
            self.driver = Worker(args, 0, world_size, port)
            self._collect("start-up")
            self.num_blocks = min([self.driver.num_kv_blocks()] + self.call_workers("num_kv_blocks"))
            self.call_workers("init_kv_cache", self.num_blocks)
            self.driver.init_kv_cache(self.num_blocks, peers=self)
        except BaseException:
            self.shutdown()
            raise
        local = self.driver.lora_manager
        self.lora_manager = None if local is None else MirroredLoRAManager(local, self)

    def _await_started(self, timeout: float = 300.0) -> None:
        """Each worker says "started" once its process is up; one that dies first is reported at once
        (rather than rank 0 waiting for it in the group's rendezvous)."""
        for rank, (conn, proc) in enumerate(zip(self._conns, self._procs), start=1):
            deadline = time.monotonic() + timeout
            while not conn.poll(0.1):
                if not proc.is_alive() or time.monotonic() > deadline:
                    break
            try:
                status, _ = conn.recv() if conn.poll(0) else ("silent", None)
            except (EOFError, OSError):
                status = "exited"
            if status != "started":
                proc.join(timeout=1)
                hint = (" Spawned workers import the main module first: a script that builds an LLM or engine at "
                        "import time must do so under `if __name__ == \"__main__\":`."
                        if self.start_method == "spawn" else "")
                raise WorkerError(f"the worker process of tensor-parallel rank {rank} did not start (exit code "
                                  f"{proc.exitcode}).{hint}")

    # ---- calls --------------------------------------------------------------------
    def dead_ranks(self, wait_s: float = 0.0) -> list[str]:
        """"rank r (exit code c)" of each worker process that has exited; waits up to ``wait_s``
        for one to be seen dead (a process killed a moment ago is not reaped at once)."""
        deadline = time.monotonic() + wait_s
        while True:
            dead = [f"rank {rank} (exit code {proc.exitcode})"
                    for rank, proc in enumerate(self._procs, start=1) if not proc.is_alive()]
            if dead or time.monotonic() >= deadline:
                return dead
            time.sleep(0.05)

    def _send(self, method: str, *args: Any) -> None:
        dead = self.dead_ranks()
        if dead:  # caught before rank 0 would wait for it in a collective
            raise WorkerError(f"tensor-parallel worker process(es) {', '.join(dead)} died; this engine cannot "
                              "run any more - restart it")
        for conn in self._conns:
            conn.send((method, args))

    def _collect(self, what: str) -> list[Any]:
        results, errors = [], []
        for rank, conn in enumerate(self._conns, start=1):
            try:
                status, value = conn.recv()
            except (EOFError, OSError):
                status, value = "error", f"worker process of rank {rank} exited (exit code " \
                                         f"{self._procs[rank - 1].exitcode})"
            if status == "ok":
                results.append(value)
            else:
                errors.append(f"rank {rank}: {value}")
        if errors:
            raise WorkerError(f"tensor-parallel {what} failed on " + "\n".join(errors))
        return results

    def call_workers(self, method: str, *args: Any) -> list[Any]:
        """Run ``Worker.method(*args)`` on ranks 1..N-1; their results in rank order."""
        self._send(method, *args)
        return self._collect(method)

    def start_execute(self, inp) -> None:
        self._send("execute_model", inp)

    def finish_execute(self) -> None:
        self._collect("execute_model")

    def shutdown(self) -> None:
        self._finalizer()
        driver = getattr(self, "driver", None)
        if driver is not None and driver.tp_group is not None:
            driver.tp_group.close()
