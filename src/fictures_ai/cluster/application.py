"""The Ray Serve application of ``serve --ray``: an ingress deployment and one per base model.

The models come from the same place as without Ray (the models file, or the ``TEXT_``/``IMAGE_``
settings): :func:`build_application` builds the model registry once with
:class:`ModelDeployments`, which turns each base model's engine loader into a deployment
(:mod:`fictures_ai.cluster.replicas`) with that model's replicas and resources, then binds the
ingress (:mod:`fictures_ai.cluster.ingress`) to the deployments' handles. In the ingress the
registry is built again with ``cluster.ingress.RayEngines``, whose engines are the handles
(:mod:`fictures_ai.engines.ray_engine`); nothing above the engines changes.

Deployment names: ``ingress``, and ``model-<name>`` per base model (characters other than
letters, digits, ``.``, ``_`` and ``-`` become ``_``); a Ray Serve config file
(``deploy/kuberay/``) overrides their options by these names.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from typing import Any

from fictures_ai.config import Settings
from fictures_ai.database import parse_database_url
from fictures_ai.engines.options import DiffusersEngineOptions, VllmEngineOptions
from fictures_ai.services.engine_factory import (
    EngineLoaders,
    ImageLoader,
    LocalEngines,
    TextLoader,
    image_device,
)
from fictures_ai.services.models.registry import build_model_registry
from fictures_ai.services.models.spec import ModelKind, ModelSpec, ReplicaScaling

logger = logging.getLogger(__name__)

APP_NAME = "fictures"
"""The Ray Serve application's name."""
INGRESS_DEPLOYMENT = "ingress"
INGRESS_CPUS = 0.5
"""Logical CPUs of one ingress replica: it waits on the network and the handles."""
INGRESS_MAX_ONGOING_REQUESTS = 1000
"""Requests one ingress replica takes at once; its own limits (``TEXT_MAX_PENDING``,
``IMAGE_MAX_QUEUE``, rate limits) answer 429 before that."""
MODEL_CPUS = 1.0
"""Logical CPUs of one model replica unless the models file says (``resources.cpus``)."""


def deployment_name(model: str) -> str:
    """The deployment of the base model ``model``: ``model-<name>``, made safe for Ray."""
    return "model-" + re.sub(r"[^A-Za-z0-9._-]", "_", model)


@dataclass(frozen=True, slots=True)
class ReplicaPlan:
    """How many replicas a model runs and what each takes (Ray Serve deployment options)."""

    min_replicas: int
    max_replicas: int
    target_ongoing_requests: float | None
    cpus: float
    gpus: float
    tensor_parallel_size: int
    max_ongoing_requests: int

    def deployment_options(self) -> dict[str, Any]:
        """``serve.deployment`` keyword arguments.

        A fixed count is ``num_replicas``, bounds are ``autoscaling_config``. A replica with
        tensor parallelism (N > 1) gets a placement group of one CPU bundle (the replica
        itself) and N one-GPU bundles packed on one node, in which vLLM's Ray executor starts
        its N workers (as vLLM's own Ray Serve integration places them).
        """
        options: dict[str, Any] = {"max_ongoing_requests": self.max_ongoing_requests}
        if self.min_replicas == self.max_replicas and self.target_ongoing_requests is None:
            options["num_replicas"] = self.max_replicas
        else:
            autoscaling: dict[str, Any] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "initial_replicas": self.min_replicas,
            }
            if self.target_ongoing_requests is not None:
                autoscaling["target_ongoing_requests"] = self.target_ongoing_requests
            options["autoscaling_config"] = autoscaling
        if self.tensor_parallel_size > 1:
            options["ray_actor_options"] = {"num_cpus": self.cpus, "num_gpus": 0}
            options["placement_group_bundles"] = [{"CPU": self.cpus}] + [
                {"GPU": 1.0} for _ in range(self.tensor_parallel_size)
            ]
            options["placement_group_strategy"] = "STRICT_PACK"
        else:
            options["ray_actor_options"] = {"num_cpus": self.cpus, "num_gpus": self.gpus}
        return options


def plan_replicas(
    spec: ModelSpec,
    settings: Settings,
    *,
    per_replica_capacity: int,
    tensor_parallel_size: int = 1,
    on_gpu: bool = False,
) -> ReplicaPlan:
    """The replicas of ``spec`` from its ``replicas``/``resources``/``max_ongoing_requests``,
    else ``RAY_MODEL_REPLICAS`` replicas of one CPU (and one GPU per tensor-parallel rank
    when the model runs on CUDA).

    ``max_ongoing_requests`` defaults to twice what the engine runs at once (vLLM's
    ``max_num_seqs``): continuous batching needs every request it can batch in the engine,
    not held back by Ray Serve's default of 5. An image replica takes as many renders as it
    runs; the rest wait in the ingress's handle for the first free replica.

    Raises ``ValueError`` for GPUs that do not match the tensor-parallel size.
    """
    count = settings.ray_model_replicas
    scaling = spec.replicas or ReplicaScaling(min=count, max=count)
    resources = spec.resources
    cpus = resources.cpus if resources is not None and resources.cpus is not None else MODEL_CPUS
    gpus = resources.gpus if resources is not None else None
    if tensor_parallel_size > 1:
        if gpus is not None and gpus != tensor_parallel_size:
            raise ValueError(
                f"resources.gpus: {gpus:g} GPUs per replica, but tensor_parallel_size "
                f"{tensor_parallel_size} needs {tensor_parallel_size}"
            )
        gpus = float(tensor_parallel_size)
    elif gpus is None:
        gpus = 1.0 if on_gpu else 0.0
    if spec.kind == "text":
        ongoing = spec.max_ongoing_requests or 2 * per_replica_capacity
    else:
        ongoing = spec.max_ongoing_requests or per_replica_capacity
    return ReplicaPlan(
        min_replicas=scaling.min,
        max_replicas=scaling.max,
        target_ongoing_requests=scaling.target_ongoing_requests,
        cpus=cpus,
        gpus=gpus,
        tensor_parallel_size=tensor_parallel_size,
        max_ongoing_requests=ongoing,
    )


@dataclass(frozen=True, slots=True)
class ModelDeployment:
    """One base model's deployment: its name, kind, engine loader and replicas."""

    model: str
    kind: ModelKind
    loader: TextLoader | ImageLoader
    plan: ReplicaPlan

    @property
    def name(self) -> str:
        return deployment_name(self.model)


class ModelDeployments:
    """``EngineLoaders`` that records each base model as a deployment while the registry is
    built (the loaders are then run in the replicas, not here)."""

    remote = True

    def __init__(self, settings: Settings, engines: EngineLoaders | None = None) -> None:
        """``engines`` makes the loaders (default: vLLM and diffusers; the benchmarks pass
        instant engines)."""
        self._settings = settings
        self._engines: EngineLoaders = engines or LocalEngines()
        self.deployments: dict[str, ModelDeployment] = {}

    def _add(self, spec: ModelSpec, loader: TextLoader | ImageLoader, plan: ReplicaPlan) -> None:
        self.deployments[spec.name] = ModelDeployment(spec.name, spec.kind, loader, plan)

    def text(self, spec: ModelSpec, options: VllmEngineOptions) -> TextLoader:
        tensor_parallel = options.tensor_parallel_size
        if tensor_parallel > 1:  # its workers go in the replica's placement group
            options = replace(options, distributed_executor_backend="ray")
        plan = plan_replicas(
            spec,
            self._settings,
            per_replica_capacity=options.max_num_seqs,
            tensor_parallel_size=tensor_parallel,
            on_gpu=tensor_parallel > 1,
        )
        loader = self._engines.text(spec, options)
        self._add(spec, loader, plan)
        return loader

    def image(self, spec: ModelSpec, options: DiffusersEngineOptions) -> ImageLoader:
        plan = plan_replicas(
            spec,
            self._settings,
            per_replica_capacity=options.max_concurrency,
            on_gpu=image_device(options) == "cuda",
        )
        loader = self._engines.image(spec, options)
        self._add(spec, loader, plan)
        return loader

    def replicas(self, spec: ModelSpec) -> int:
        return self.deployments[spec.name].plan.max_replicas


def check_shared_state(settings: Settings) -> None:
    """Refuse several ingress replicas over per-process state: each would keep its own keys
    and jobs database and its own rate-limit counts. Raises ``ValueError`` saying what to
    set. (``JOBS_DIR`` must be storage every replica mounts: that cannot be checked here.)"""
    replicas = settings.ray_ingress_replicas
    if replicas == 1:
        return
    problems = []
    url = settings.database_url
    if url is None or parse_database_url(url).get_backend_name() == "sqlite":
        problems.append(
            "API keys and jobs are in an SQLite file: set DATABASE_URL=postgresql://... (one "
            "database every replica reads), with JOBS_DIR on storage they all mount"
        )
    limited = (
        settings.rate_limit_per_minute
        or settings.rate_limit_tokens_per_minute
        or settings.rate_limit_images_per_minute
    )
    if limited and settings.redis_url is None:
        problems.append(
            "rate limits are counted in each process: set REDIS_URL=redis://... (one count "
            "every replica shares)"
        )
    if problems:
        raise ValueError(
            f"RAY_INGRESS_REPLICAS={replicas} needs state shared by the replicas, but "
            + "; ".join(problems)
            + ". Or set RAY_INGRESS_REPLICAS=1."
        )


def build_application(settings: Settings, engines: EngineLoaders | None = None) -> Any:
    """The Ray Serve application (``serve.run`` takes it) that serves ``settings``.

    Raises ``ModelsFileError`` or ``ValueError`` (settings that cannot work, shared state
    missing for several ingress replicas) before anything is deployed.
    """
    from ray import serve

    from fictures_ai.cluster.ingress import Ingress
    from fictures_ai.cluster.replicas import ImageModelReplica, TextModelReplica

    check_shared_state(settings)
    recorder = ModelDeployments(settings, engines)
    build_model_registry(settings, recorder)
    handles: dict[str, Any] = {}
    grace = settings.shutdown_grace_s
    for deployment in recorder.deployments.values():
        replica_class = TextModelReplica if deployment.kind == "text" else ImageModelReplica
        replica_deployment: Any = serve.deployment(replica_class)
        handles[deployment.model] = replica_deployment.options(
            name=deployment.name,
            graceful_shutdown_timeout_s=grace,
            health_check_period_s=settings.engine_health_interval_s,
            **deployment.plan.deployment_options(),
        ).bind(deployment.loader, settings)
        logger.info("Deployment %s: %s", deployment.name, deployment.plan)
    replicas = {name: d.plan.max_replicas for name, d in recorder.deployments.items()}
    ingress_deployment: Any = serve.deployment(Ingress)
    ingress = ingress_deployment.options(
        name=INGRESS_DEPLOYMENT,
        num_replicas=settings.ray_ingress_replicas,
        max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS,
        ray_actor_options={"num_cpus": INGRESS_CPUS},
        graceful_shutdown_timeout_s=grace,
    )
    return ingress.bind(settings, handles, replicas)


def app_builder(args: dict[str, Any]) -> Any:
    """The application of a Ray Serve config file (``import_path:
    fictures_ai.cluster.application:app_builder``): the settings come from the environment
    (the config's ``runtime_env.env_vars``), overridden by ``args`` (setting names, e.g.
    ``models_file``)."""
    return build_application(Settings(**args))


def _plans(settings: Settings) -> list[ReplicaPlan]:
    recorder = ModelDeployments(settings)
    build_model_registry(settings, recorder)
    return [deployment.plan for deployment in recorder.deployments.values()]


def logical_cpus_needed(settings: Settings) -> float:
    """The logical CPUs the application asks of Ray at its largest (every model at its most
    replicas, and the ingress): what a local Ray started for it must offer."""
    models = sum(plan.cpus * plan.max_replicas for plan in _plans(settings))
    return models + INGRESS_CPUS * settings.ray_ingress_replicas


def gpus_needed(settings: Settings) -> float:
    """The GPUs the application's first replicas ask for (each model's ``min`` replicas)."""
    return sum(plan.gpus * plan.min_replicas for plan in _plans(settings))
