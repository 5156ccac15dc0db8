"""``distill serve-teacher teacher.remote=NAME``: start the teacher's workers as named Ray actors
and serve until Ctrl-C or SIGTERM.

With ``teacher.remote_address=auto`` (the default) the workers join the Ray cluster on this machine,
or, where there is none, one started for them that ends with the command; with ``HOST:PORT`` they
join that cluster (``ray start --head`` there). Several teachers, and trainers on other machines,
want one long-lived cluster: ``ray start --head`` first. Each worker holds the whole teacher: a
GPU each on CUDA, a CPU core each here. A worker that dies is restarted by Ray
(``cluster.RESTARTS`` times), and the request it was answering is sent again.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from distill.config import DistillConfig, validate
from distill.errors import DistillError
from distill.memory import fmt
from distill.models import resolve_device
from distill.remote.cluster import NAMESPACE, RESTARTS, find_workers, init, worker_name
from distill.remote.worker import TeacherWorker


def start_workers(cfg: DistillConfig) -> tuple[list, list[dict], str]:
    """Start ``teacher.remote_workers`` workers named ``NAME/i``; their handles, identities and the
    cluster's address."""
    t = cfg.teacher
    ray = init(t.remote_address, start=True)
    if find_workers(t.remote):
        raise DistillError(f"serve-teacher: workers named {t.remote} already serve in this Ray cluster; choose "
                           "another teacher.remote")
    device = resolve_device(cfg.trainer.device)
    resources = {"num_gpus": 1, "num_cpus": 0} if device.type == "cuda" else {"num_cpus": 1}
    kind = "GPU" if device.type == "cuda" else "CPU"
    free = ray.available_resources().get(kind, 0)
    if free < t.remote_workers:  # Ray would wait for them without end
        raise DistillError(f"serve-teacher: {t.remote_workers} workers need a {kind} each; the Ray cluster has "
                           f"{free:g} free (lower teacher.remote_workers, or add nodes: ray start --address=...)")
    actor = ray.remote(max_restarts=RESTARTS, max_task_retries=RESTARTS, **resources)(TeacherWorker)
    handles = [actor.options(name=worker_name(t.remote, i), namespace=NAMESPACE).remote(
        t.path, t.tokenizer, t.dtype, device.type, t.remote_threads, t.remote_batching)
        for i in range(t.remote_workers)]
    try:
        identities = ray.get([h.identity.remote() for h in handles])
    except ray.exceptions.RayError as e:
        raise DistillError(f"serve-teacher: a worker failed to start: {str(e).splitlines()[0]}") from None
    return handles, identities, ray.get_runtime_context().gcs_address


def serve_teacher(cfg: DistillConfig, say: Callable[[str], None] = print) -> None:
    """Serve until SIGINT or SIGTERM, then stop the workers and leave the cluster."""
    validate(cfg)
    t = cfg.teacher
    if not t.remote:
        raise DistillError("serve-teacher: teacher.remote is not set (the name trainers connect to)")
    handles, identities, address = start_workers(cfg)
    ray = init(t.remote_address)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda *_: stop.set())
    first = identities[0]
    say(f"each worker holds the teacher: {first['parameters']:,} parameters, {fmt(first['bytes'])} in {t.dtype} on "
        f"{first['device']}")
    say(f"serve-teacher {t.remote}: {len(handles)} worker{'s' * (len(handles) > 1)} ready in the Ray cluster at "
        f"{address} (teacher {t.path}); train with teacher.remote={t.remote}; Ctrl-C stops them")
    try:
        stop.wait()
    finally:
        for h in handles:
            ray.kill(h)
        ray.shutdown()
        say(f"serve-teacher {t.remote}: stopped")
