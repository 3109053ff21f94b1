"""deploy/kuberay/ against the code: the RayService's Serve config passes Ray's own schema and
builds the application the way Ray Serve builds it (import path, args, deployment names and
options), its settings are settings, and the pods give the models file's replicas what they
ask for. Nothing here starts Ray or touches the network; no Kubernetes cluster is involved."""

from __future__ import annotations

import functools
from pathlib import Path, PurePosixPath
from typing import Any

import cloudpickle
import pytest
import ray
import yaml
from ray._common.utils import import_attr
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve._private.build_app import BuiltApplication, build_app
from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

from fictures_ai.cluster import application
from fictures_ai.config import Settings
from fictures_ai.services.models import registry, spec
from fictures_ai.services.models.spec import ModelSpec, load_models_file

KUBERAY = Path(__file__).resolve().parents[2] / "deploy" / "kuberay"
TEXT_GROUP, IMAGE_GROUP = "text-gpu", "image-gpu"
GPU = "nvidia.com/gpu"
SECRETS = {
    # What the Secret fictures-ai-secrets holds (pod environment, not runtime_env).
    "DATABASE_URL": "postgresql://fictures:pw@postgres/fictures",
    "REDIS_URL": "redis://redis:6379/0",
}
MODEL_OPTIONS = {
    "num_replicas",
    "autoscaling_config",
    "ray_actor_options",
    "max_ongoing_requests",
    "placement_group_bundles",
    "placement_group_strategy",
}
"""Deployment options a model's entry in the models file sets: the Serve config must not (an
option there replaces the code's whole value)."""


def manifests() -> list[dict[str, Any]]:
    return [
        document
        for path in sorted(KUBERAY.glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8"))
        if document
    ]


def only(kind: str) -> dict[str, Any]:
    (document,) = [document for document in manifests() if document["kind"] == kind]
    return document


RAY_SERVICE = only("RayService")
MODELS_CONFIGMAP = only("ConfigMap")
CLUSTER = RAY_SERVICE["spec"]["rayClusterConfig"]
GROUPS = {group["groupName"]: group for group in CLUSTER["workerGroupSpecs"]}
POD_SPECS = [CLUSTER["headGroupSpec"]["template"]["spec"]] + [
    group["template"]["spec"] for group in GROUPS.values()
]


def serve_config() -> ServeDeploySchema:
    return ServeDeploySchema.model_validate(yaml.safe_load(RAY_SERVICE["spec"]["serveConfigV2"]))


def the_application() -> ServeApplicationSchema:
    (app,) = serve_config().applications
    return app


def env_vars() -> dict[str, str]:
    runtime_env = the_application().runtime_env
    variables: dict[str, str] = runtime_env["env_vars"]
    return variables


def overrides() -> dict[str, dict[str, Any]]:
    """The Serve config's deployment options, by deployment name, as written (Ray's schema
    drops the keys it does not know)."""
    serve_config()  # valid first
    (app,) = yaml.safe_load(RAY_SERVICE["spec"]["serveConfigV2"])["applications"]
    return {deployment["name"]: deployment for deployment in app.get("deployments", [])}


@pytest.fixture
def models_file(tmp_path: Path) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(MODELS_CONFIGMAP["data"]["models.yaml"], encoding="utf-8")
    return path


def base_models(path: Path) -> list[ModelSpec]:
    return [entry for entry in load_models_file(path, check_paths=False).models if not entry.base]


@pytest.fixture
def built(models_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> BuiltApplication:
    """The application as Ray Serve's controller builds it from the config (its
    ``build_serve_application`` task): the import path called with the args, in the environment
    of a pod (runtime_env's variables and the Secret's), with the models file where the
    ConfigMap would be. Only the LoRA file on the /models volume is not checked."""
    monkeypatch.chdir(tmp_path)  # no .env
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    for name, value in {**env_vars(), **SECRETS}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(
        registry, "load_models_file", functools.partial(spec.load_models_file, check_paths=False)
    )
    app_config = the_application()
    args = {**app_config.args, "models_file": str(models_file)}
    app = call_user_app_builder_with_args_if_necessary(import_attr(app_config.import_path), args)
    return build_app(app, name=app_config.name, route_prefix=app_config.route_prefix)


def test_the_serve_config_is_one_application_of_the_code() -> None:
    app = the_application()
    assert app.name == application.APP_NAME
    assert app.route_prefix == "/"
    assert app.import_path == "fictures_ai.cluster.application:app_builder"
    assert import_attr(app.import_path) is application.app_builder
    assert app.args == {"models_file": "/etc/fictures/models.yaml"}
    (written,) = yaml.safe_load(RAY_SERVICE["spec"]["serveConfigV2"])["applications"]
    assert set(written) <= set(ServeApplicationSchema.model_fields)  # no key Ray would drop


def test_rayversion_is_the_installed_ray() -> None:
    assert CLUSTER["rayVersion"] == ray.__version__


def test_the_settings_are_settings_and_no_secret_is_written_out() -> None:
    variables = env_vars()
    fields = Settings.model_fields
    assert all(isinstance(value, str) for value in variables.values())  # runtime_env's rule
    unknown = [name for name in variables if name.lower() not in fields]
    assert unknown == []  # Settings ignores unknown names: a typo would pass unnoticed
    secret = [
        name
        for name in variables
        if isinstance(extra := fields[name.lower()].json_schema_extra, dict) and "secret" in extra
    ]
    assert secret == []  # those come from the Secret, as pod environment
    assert variables["REQUIRE_API_KEY"] == "true"
    for pod in POD_SPECS:
        for container in pod["containers"]:
            refs = [source["secretRef"]["name"] for source in container.get("envFrom", [])]
            assert refs == ["fictures-ai-secrets"], container["name"]


def test_the_models_file_is_mounted_where_the_args_name_it(models_file: Path) -> None:
    path = PurePosixPath(the_application().args["models_file"])
    assert list(MODELS_CONFIGMAP["data"]) == [path.name]
    locals_ = [
        value
        for entry in load_models_file(models_file, check_paths=False).models
        for value in (entry.source, entry.lora)
        if value is not None and value.startswith("/")
    ]
    # The application is built on whichever pod Ray picks: every pod mounts both.
    for pod in POD_SPECS:
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
            assert (
                mounts[str(path.parent)]["configMap"]["name"]
                == MODELS_CONFIGMAP["metadata"]["name"]
            )
            for local in locals_:
                assert any(PurePosixPath(local).is_relative_to(mount) for mount in mounts), local


def test_the_deployment_options_name_deployments_of_the_code(models_file: Path) -> None:
    names = {application.INGRESS_DEPLOYMENT} | {
        application.deployment_name(entry.name) for entry in base_models(models_file)
    }
    options = overrides()
    assert set(options) <= names
    known = set(DeploymentSchema.model_fields)
    for name, values in options.items():
        assert set(values) <= known, name  # Ray's schema ignores unknown options
        if name != application.INGRESS_DEPLOYMENT:
            assert not set(values) & MODEL_OPTIONS, f"{name}: set it in the models file"
    ingress = options[application.INGRESS_DEPLOYMENT]
    assert ingress["num_replicas"] == int(env_vars()["RAY_INGRESS_REPLICAS"])


def test_the_config_builds_the_application_as_serve_does(
    built: BuiltApplication, models_file: Path
) -> None:
    deployments = {deployment.name: deployment for deployment in built.deployments}
    assert built.ingress_deployment_name == application.INGRESS_DEPLOYMENT
    assert set(overrides()) <= set(deployments)  # Serve refuses options for a missing one
    expected = {application.INGRESS_DEPLOYMENT} | {
        application.deployment_name(entry.name) for entry in base_models(models_file)
    }
    assert set(deployments) == expected
    for deployment in built.deployments:  # Ray ships these to the replicas
        cloudpickle.dumps((deployment.init_args, deployment.init_kwargs))
    assert not ray.is_initialized()


def test_text_and_image_replicas_each_own_a_gpu(built: BuiltApplication, models_file: Path) -> None:
    deployments = {deployment.name: deployment for deployment in built.deployments}
    for entry in base_models(models_file):
        deployment = deployments[application.deployment_name(entry.name)]
        gpus = deployment.ray_actor_options.get("num_gpus", 0) + sum(
            bundle.get("GPU", 0)
            for bundle in deployment._replica_config.placement_group_bundles or []
        )
        assert gpus >= 1, f"{entry.name}: resources.gpus (else it shares a GPU or runs on CPU)"
        assert entry.replicas is not None, f"{entry.name}: replicas (autoscaling bounds)"
        assert entry.replicas.min < entry.replicas.max, entry.name
        assert deployment._deployment_config.autoscaling_config is not None, entry.name
    assert {entry.kind for entry in base_models(models_file)} == {"text", "image"}


def container_resources(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod["containers"]
    resources: dict[str, Any] = container["resources"]
    assert resources["requests"] == resources["limits"]  # Ray advertises the limits
    return resources["limits"]


def test_the_gpu_groups_hold_their_models_at_most_replicas(
    built: BuiltApplication, models_file: Path
) -> None:
    head = CLUSTER["headGroupSpec"]["template"]["spec"]
    assert GPU not in container_resources(head)
    assert set(GROUPS) == {TEXT_GROUP, IMAGE_GROUP}
    deployments = {deployment.name: deployment for deployment in built.deployments}
    for kind, group_name in (("text", TEXT_GROUP), ("image", IMAGE_GROUP)):
        group = GROUPS[group_name]
        limits = container_resources(group["template"]["spec"])
        assert int(limits[GPU]) >= 1
        needed_gpus = needed_min = 0.0
        for entry in base_models(models_file):
            if entry.kind != kind:
                continue
            deployment = deployments[application.deployment_name(entry.name)]
            actor = deployment.ray_actor_options
            assert actor["num_gpus"] <= int(limits[GPU])
            assert actor["num_cpus"] <= float(limits["cpu"])  # one replica fits a pod
            assert entry.replicas is not None
            needed_gpus += actor["num_gpus"] * entry.replicas.max
            needed_min += actor["num_gpus"] * entry.replicas.min
        assert group["maxReplicas"] * int(limits[GPU]) >= needed_gpus, group_name
        assert group["minReplicas"] * int(limits[GPU]) >= needed_min, group_name
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
