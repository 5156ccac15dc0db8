"""Ray for served teachers: one namespace, token authentication, no dashboard, quiet logs.

Ray's trust model: a process that reaches a cluster's ports and holds its token can run any code
on every node of it. Ray (2.59 and later) authenticates local clusters with a token it writes to
``~/.ray/auth_token``; distill asks for token authentication on every cluster it starts or joins
(``RAY_AUTH_MODE=token``), makes that file readable by its owner alone (Ray writes it readable by
every user of the machine), starts neither the dashboard nor its job API, and warns when the
cluster is not on this machine.
"""

from __future__ import annotations

import os
import stat
import sys
import warnings
from pathlib import Path

from distill.errors import DistillError

NAMESPACE = "distill"
# Attempts per request: Ray restarts a worker that died and sends the request again.
RESTARTS = 3


def ray_module():
    """Ray, or a DistillError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise DistillError("teacher.remote and serve-teacher need Ray: pip install 'distill[ray]'") from None
    return ray


def local(address: str) -> bool:
    return address in ("auto", "local") or address.split(":")[0] in ("127.0.0.1", "localhost", "::1")


def init(address: str, start: bool = False):
    """Join the Ray cluster at ``address`` ("auto": the one on this machine), or with ``start``,
    where "auto" finds none, start one on this machine (it ends with this process); with token
    authentication and without the dashboard."""
    # Ray reads RAY_AUTH_MODE when it is imported: a program that imported it first has no token.
    late = "ray" in sys.modules and "RAY_AUTH_MODE" not in os.environ
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = ray_module()
    if ray.is_initialized():
        return ray
    if not local(address):
        warnings.warn(f"distill: joining the Ray cluster at {address}: anyone who reaches its ports and holds its "
                      "token can run code on it (docs/teachers.md, 'Security')", RuntimeWarning, stacklevel=2)
    options = dict(namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False, configure_logging=False)
    try:
        ray.init(address=address, **options)
    except ConnectionError as e:
        if not (start and address == "auto"):
            where = "on this machine" if address == "auto" else f"at {address}"
            hint = ("; Ray was imported before distill set RAY_AUTH_MODE=token: set it in the environment "
                    "first" if late else "; start the teacher first: distill serve-teacher teacher.remote=NAME")
            raise DistillError(f"cannot join a Ray cluster {where} ({e}){hint}") from None
        ray.init(include_dashboard=False, **options)
    private_token()
    return ray


def private_token(path: Path | None = None) -> None:
    """Make Ray's token file (default ``~/.ray/auth_token``) readable and writable by its owner
    alone: whoever reads it can run code on the cluster."""
    path = path or Path.home() / ".ray" / "auth_token"
    try:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)
    except FileNotFoundError:  # a token given another way (RAY_AUTH_TOKEN)
        pass


def worker_name(name: str, index: int) -> str:
    return f"{name}/{index}"


def find_workers(name: str) -> list:
    """Handles of the workers serving ``name`` (``NAME/0``, ``NAME/1``, ...)."""
    ray = ray_module()
    handles = []
    while True:
        try:
            handles.append(ray.get_actor(worker_name(name, len(handles)), namespace=NAMESPACE))
        except ValueError:
            return handles
