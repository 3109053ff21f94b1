"""``fictures-ai serve --ray``: deploy the application on Ray Serve and keep it until stopped."""

from __future__ import annotations

import logging
import signal
import threading

from fictures_ai.cluster.application import APP_NAME, build_application, logical_cpus_needed
from fictures_ai.config import Settings

logger = logging.getLogger(__name__)


def serve_on_ray(settings: Settings) -> None:
    """Deploy on the cluster at ``RAY_ADDRESS`` (unset: a Ray started here, with logical CPUs
    for every replica, which stops with the server), serve HTTP on ``API_HOST:API_PORT``
    through Ray Serve's proxy, and on SIGINT or SIGTERM delete the application, each replica
    first draining its requests for up to ``SHUTDOWN_GRACE_S``.

    Raises ``ModelsFileError`` or ``ValueError`` before anything is deployed; ``RuntimeError``
    (Ray's) when a deployment cannot start.
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
        serve.run(application, name=APP_NAME, route_prefix="/")
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
