"""Cluster manifests: ray_cluster.yaml validates against Ray's own schema; KubeRay manifests and the Dockerfile parse
and point at real entry points of this project."""
import pathlib

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ray_cluster_yaml_validates_against_ray_schema():
    from ray.autoscaler._private.util import validate_config

    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    validate_config(cfg)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    gpu = cfg["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] > 0 and gpu["max_workers"] > gpu["min_workers"]
    assert any("pip install" in c and "softmask" in c for c in cfg["setup_commands"])


def test_kuberay_manifests_reference_real_entry_points():
    from pipelines import cli
    from pipelines.cli import COMMANDS

    docs = {p.name: yaml.safe_load(p.read_text()) for p in (ROOT / "infra" / "k8s").glob("*.yaml")}
    assert {d["kind"] for d in docs.values()} == {"RayCluster", "RayJob", "RayService"}
    job = docs["rayjob-train.yaml"]
    entry = job["spec"]["entrypoint"].split()
    assert entry[0] == "softmask" and entry[1] in COMMANDS
    recipe = entry[entry.index("--config") + 1]
    assert (ROOT / recipe).is_file()
    cli.build_config(COMMANDS[entry[1]], str(ROOT / recipe), [], {})
    svc = yaml.safe_load(docs["rayservice-sampler.yaml"]["spec"]["serveConfigV2"])
    app = svc["applications"][0]
    module, _, attr = app["import_path"].partition(":")
    import importlib

    builder = getattr(importlib.import_module(module), attr)
    assert callable(builder)
    from workers.serving_config import ServeConfig
    from infra.config import from_dict

    serve_cfg = from_dict(ServeConfig, app["args"])
    assert serve_cfg.max_replicas == 8 and serve_cfg.require_api_key  # fails closed without its key
    # the key comes from a Secret into every Ray container (an ingress replica may land on any node), never inline
    cluster = docs["rayservice-sampler.yaml"]["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        env = {e["name"]: e for c in pod["spec"]["containers"] for e in c.get("env", [])}
        assert env[serve_cfg.api_key_env]["valueFrom"]["secretKeyRef"]["name"] == "softmask-api-key", env
        assert "value" not in env[serve_cfg.api_key_env]
    docker = (ROOT / "infra" / "Dockerfile").read_text()
    assert "FROM rayproject/ray:" in docker and 'ENTRYPOINT ["softmask"]' in docker
