"""``fictures-ai serve --ray``: deploy the application on Ray Serve and keep it until stopped."""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

from fictures_ai.cluster.application import (
    APP_NAME,
    build_application,
    gpus_needed,
    logical_cpus_needed,
)
from fictures_ai.config import Settings

logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0
"""How often a deployment still starting says which deployments wait, and why (Ray's words)."""


class DeployError(RuntimeError):
    """The application could not be deployed: Ray's reason, or one already running."""


def serve_on_ray(settings: Settings) -> None:
    """Deploy on the cluster at ``RAY_ADDRESS`` (unset: a Ray started here, with logical CPUs
    for every replica, which stops with the server), serve HTTP on ``API_HOST:API_PORT``
    through Ray Serve's proxy, and on SIGINT or SIGTERM delete the application, each replica
    first draining its requests for up to ``SHUTDOWN_GRACE_S``. A signal while the
    application is still deploying (a replica that cannot be placed waits for resources
    forever) stops the deployment.

    Raises ``ModelsFileError`` or ``ValueError`` before anything is deployed; ``DeployError``
    when Ray cannot deploy it, or an application of the same name already runs there.
    """
    import ray
    from ray import serve

    application = build_application(settings)
    if settings.ray_address is None:
        cpus = max(logical_cpus_needed(settings), 1.0)
        logger.info("Starting a local Ray with %g logical CPUs", cpus)
        # "local": a new Ray, not one that happens to run on this machine already.
        ray.init(address="local", num_cpus=int(cpus + 0.999), include_dashboard=False)
    else:
        ray.init(address=settings.ray_address)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.api_host, "port": settings.api_port})
        if APP_NAME in serve.status().applications:
            raise DeployError(
                f"An application '{APP_NAME}' already runs on this Ray cluster (another "
                "`serve --ray`?): stop it first (Ctrl-C there, or `serve shutdown`)."
            )
        _warn_missing_gpus(settings, ray.cluster_resources())  # type: ignore[no-untyped-call]
        if not _deploy(application, stop):
            logger.info("Stopped while deploying; deleting the application")
            serve.delete(APP_NAME)
            return
        logger.info(
            "Serving on Ray Serve at http://%s:%d (application %s)",
            settings.api_host,
            settings.api_port,
            APP_NAME,
        )
        stop.wait()
        logger.info("Stopping: draining the replicas (up to %d s)", settings.shutdown_grace_s)
        serve.delete(APP_NAME)  # Serve itself stays up on a shared cluster
    finally:
        ray.shutdown()


def _deploy(application: Any, stop: threading.Event) -> bool:
    """``serve.run`` in a thread, so that signals stay answered and what keeps a deployment
    waiting is logged (Ray writes it only to its controller's log); False when stopped
    first. Raises ``DeployError`` with Ray's reason when the deployment fails."""
    from ray import serve

    done = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            serve.run(application, name=APP_NAME, route_prefix="/")
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name="serve.run", daemon=True).start()
    started = time.monotonic()
    next_report = started + PROGRESS_EVERY_S
    while not done.wait(0.5):
        if stop.is_set():
            return False
        if time.monotonic() >= next_report:
            next_report += PROGRESS_EVERY_S
            waiting = _waiting_deployments()
            logger.warning(
                "Still deploying after %.0f s (Ctrl-C stops): %s",
                time.monotonic() - started,
                "; ".join(waiting) or "Ray Serve reports nothing pending",
            )
    if failure:
        raise DeployError(f"Ray Serve could not deploy the application: {failure[0]}")
    return True


def _waiting_deployments() -> list[str]:
    """Each deployment not yet healthy, with Ray Serve's message (why it waits)."""
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    if app is None:
        return []
    return [
        f"{name}: {overview.status} {overview.message}".strip()
        for name, overview in app.deployments.items()
        if overview.status != "HEALTHY"
    ]


def _warn_missing_gpus(settings: Settings, resources: dict[str, float]) -> None:
    """Say at once when replicas ask for GPUs the cluster does not have: they wait until a
    GPU node joins (an autoscaling cluster may add one), which looks like a hang."""
    needed = gpus_needed(settings)
    available = resources.get("GPU", 0.0)
    if needed > available:
        logger.warning(
            "The models ask for %g GPUs (resources.gpus, tensor parallelism) and the Ray "
            "cluster has %g: their replicas wait until GPU nodes join. Ctrl-C stops.",
            needed,
            available,
        )
