"""The deployment files of the Ray Serve app (deploy/ray/) against the app's options (RayAppConfig, server/ray.py)
and Ray's own Serve config schema: a misspelt option fails here, not at deploy time on a cluster."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
IMPORT_PATH = "fewstep.server.ray:build_app"


def fewstep_apps(serve_config: dict) -> list[dict]:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(serve_config)  # Ray's schema of a Serve config file
    apps = [a for a in serve_config["applications"] if a["import_path"] == IMPORT_PATH]
    assert apps, f"no application imports {IMPORT_PATH}"
    return apps


def check_app(app: dict):
    from ray.serve import Application

    from fewstep.server.ray import RayAppConfig, build_app

    options = RayAppConfig.model_validate(app.get("args") or {})
    assert isinstance(build_app(app.get("args")), Application)  # Ray accepts the deployment options too
    assert app["route_prefix"] == "/"  # the API's paths are absolute (/v1/..., /ready, /metrics)
    return options


def test_serve_config_file():
    cfg = yaml.safe_load((ROOT / "deploy/ray/serve.yaml").read_text())
    for app in fewstep_apps(cfg):
        options = check_app(app)
        assert options.autoscaling is not None and options.autoscaling.max_replicas >= options.autoscaling.min_replicas


def test_rayservice_manifest():
    doc = yaml.safe_load((ROOT / "deploy/ray/rayservice.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    cluster = doc["spec"]["rayClusterConfig"]
    floor = next(line.split("==")[1].strip() for line in (ROOT / "constraints/minimum.txt").read_text().splitlines()
                 if line.startswith("ray=="))
    assert cluster["rayVersion"] == floor  # the image's Ray, the version the tests run at their floor
    gpus = [int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for g in cluster["workerGroupSpecs"]
            for c in g["template"]["spec"]["containers"]]
    for app in fewstep_apps(serve_config):
        options = check_app(app)
        assert options.resolved_num_gpus() <= max(gpus), "a replica asks for more GPUs than a worker pod has"
        if options.autoscaling is not None:  # enough GPU pods for the most replicas
            assert sum(g["maxReplicas"] for g in cluster["workerGroupSpecs"]) * max(gpus) >= \
                options.autoscaling.max_replicas * options.resolved_num_gpus()


@pytest.mark.parametrize("args,message", [
    ({"server": {"engine": {"devcie": "cuda"}}}, "server.engine.devcie is not an option"),
    ({"server": {"limits": {"max_n": 0}}}, "max_n"),
    ({"replica": 2}, "replica"),
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "must not exceed"),
])
def test_bad_options_are_refused_with_their_name(args, message):
    from pydantic import ValidationError

    from fewstep.server.ray import RayAppConfig

    with pytest.raises(ValidationError, match=message):
        RayAppConfig.model_validate(args)


def test_autoscaling_and_gpus_become_ray_deployment_options():
    from fewstep.server.ray import RayAppConfig

    fixed = RayAppConfig.model_validate({"replicas": 3, "server": {"engine.device": "cuda"}}).deployment_options()
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"]["num_gpus"] == 1.0  # one GPU per replica on a GPU host
    scaled = RayAppConfig.model_validate({"autoscaling": {"min_replicas": 2, "max_replicas": 6},
                                          "server": {"engine": {"device": "cpu"}}}).deployment_options()
    a = scaled["autoscaling_config"]
    assert (a.min_replicas, a.max_replicas, a.initial_replicas) == (2, 6, 2) and "num_replicas" not in scaled
    assert scaled["ray_actor_options"]["num_gpus"] == 0.0  # CPU replicas
    assert scaled["request_router_config"].request_router_class.endswith("ray_routing:FewstepRouter")
    drained = RayAppConfig.model_validate({"graceful_shutdown_timeout_s": 30, "graceful_shutdown_wait_loop_s": 0.2,
                                           "autoscaling": {"max_replicas": 2, "target_ongoing_requests": 1,
                                                           "upscale_delay_s": 1, "downscale_delay_s": 5}})
    opts = drained.deployment_options()
    assert (opts["graceful_shutdown_timeout_s"], opts["graceful_shutdown_wait_loop_s"]) == (30, 0.2)
    a = opts["autoscaling_config"]
    assert (a.target_ongoing_requests, a.upscale_delay_s, a.downscale_delay_s) == (1, 1, 5)


@pytest.mark.parametrize("flags,message", [
    (["--replicas", "0"], "replicas: Input should be greater than or equal to 1"),
    (["--replicas", "3", "--max-replicas", "2"], "min_replicas (3) must not exceed max_replicas (2)"),
    (["--replicas", "2", "--upscale-delay", "1"], "tune the autoscaler: add --max-replicas N"),
    (["--max-replicas", "2", "--target-ongoing-requests", "0"], "target_ongoing_requests: Input should be greater"),
])
def test_cli_refuses_bad_replica_counts_before_starting_ray(flags, message):
    import subprocess

    from tests.conftest import FEWSTEP

    p = subprocess.run([*FEWSTEP, "serve", *flags], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and message in p.stderr, p.stderr
