"""The ops files cannot run here (no Docker engine, no cluster): check them against their schemas, against each
other and against the code they start, so a renamed command, topic, metric or variable fails here first."""

from __future__ import annotations

import itertools
import json
import re
import shlex
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from schemas import topics
from skillgen.runtime.settings import CommonSettings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
COMPOSE_SCHEMA = INFRA / "compose-spec" / "compose-spec.json"  # Apache-2.0, see its README
DOCKERFILES = sorted(INFRA.glob("Dockerfile.*"))
K8S = INFRA / "k8s"

# The SKILL_* settings the services read: the project's shared list (CommonSettings and the per-service classes).
SKILL_VARS = {
    "SKILL_KAFKA_BOOTSTRAP", "SKILL_KAFKA_IDEMPOTENCE", "SKILL_TOPIC_PREFIX", "SKILL_REDIS_URL", "SKILL_REDIS_PREFIX",
    "SKILL_BLOB_URL", "SKILL_KAFKA_SESSION_TIMEOUT_MS", "SKILL_KAFKA_HEARTBEAT_INTERVAL_MS",
    "SKILL_KAFKA_REBALANCE_TIMEOUT_MS", "SKILL_FETCH_MAX_WAIT_MS",
    "SKILL_MODEL", "SKILL_BACKEND", "SKILL_PRECISION", "SKILL_DEVICE", "SKILL_MAX_BATCH", "SKILL_MAX_WAIT_MS",
    "SKILL_METRICS_PORT", "SKILL_LOG_FORMAT", "SKILL_LOG_LEVEL", "SKILL_ADAPTER_URL",
    "SKILL_DISCORD_TOKEN", "SKILL_DISCORD_APPLICATION_ID", "SKILL_SLACK_BOT_TOKEN", "SKILL_SLACK_SIGNING_SECRET",
    "SKILL_SLACK_APP_TOKEN", "SKILL_SLACK_MODE", "SKILL_SLACK_PORT",
    "SKILL_TRAIN_PERMISSIONS", "SKILL_BOT_EXTENSIONS", "SKILL_WORK_DIR", "SKILL_TRAIN_THREAD_TTL_S",
    # the trust boundary (docs/security.md)
    "SKILL_KAFKA_SECURITY_PROTOCOL", "SKILL_KAFKA_SASL_MECHANISM", "SKILL_KAFKA_USERNAME", "SKILL_KAFKA_PASSWORD",
    "SKILL_KAFKA_CA_FILE", "SKILL_KAFKA_CERT_FILE", "SKILL_KAFKA_KEY_FILE", "SKILL_CACHE_REDIS_URL",
    "SKILL_SIGNING_KEY", "SKILL_ALLOWED_TEAMS", "SKILL_ADMINS", "SKILL_RECORD_MAX_ATTEMPTS",
    # scheduling (issue 17)
    "SKILL_SCHEDULING", "SKILL_TEAM_WEIGHTS", "SKILL_LANE_WEIGHTS", "SKILL_FAST_UNITS_PER_DAY", "SKILL_LANE_DEADLINE_S",
    "SKILL_MAX_PENDING", "SKILL_MAX_BACKLOG_S", "SKILL_PREEMPT",
    # faults (issue 14), safety (issue 15)
    "SKILL_DELIVERY_STATE_DIR", "SKILL_SAFETY_CHECKER_DIR",
    # turbo's fast LoRA (issue 18)
    "SKILL_FAST_LORA",
}
SECRETS = {v for v in SKILL_VARS if v.endswith(("_TOKEN", "_SECRET", "_APPLICATION_ID", "_PASSWORD", "_SIGNING_KEY"))}

# What the services expose on SKILL_METRICS_PORT; the dashboard may use these and nothing else.
METRICS = {
    "skill_batch_size": "histogram", "skill_queue_wait_seconds": "histogram",
    "skill_generation_seconds": "histogram", "skill_request_latency_seconds": "histogram",
    "skill_cache_hits_total": "counter", "skill_cache_misses_total": "counter", "skill_blocked_total": "counter",
    "skill_dlq_total": "counter", "skill_consumer_lag": "gauge", "skill_trainer_progress_ratio": "gauge",
    "skill_trainer_jobs_total": "counter",
    # scheduling (issue 17)
    "skill_sched_queued": "gauge", "skill_sched_queued_units": "gauge", "skill_sched_served_units_total": "counter",
    "skill_sched_wait_seconds": "histogram", "skill_sched_refused_total": "counter", "skill_cancelled_total": "counter",
    "skill_cancel_late_steps": "histogram", "skill_sched_preempted_total": "counter",
}


@cache
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def services() -> dict[str, dict]:
    return compose()["services"]


def app_services() -> dict[str, dict]:
    """The services that run a skillgen image (entrypoint `skillgen`)."""
    return {n: s for n, s in services().items() if s.get("image", "").startswith("skillgen-")}


def one_shot(svc: dict) -> bool:
    return svc.get("restart") == "no"


def long_running_apps() -> dict[str, dict]:
    return {
        n: s for n, s in app_services().items() if not one_shot(s) and s["environment"]["SKILL_METRICS_PORT"] != "0"
    }


@cache
def k8s_docs() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def k8s(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in k8s_docs() if d["kind"] == kind}


def k8s_containers() -> list[dict]:
    return [
        c
        for d in k8s_docs()
        if d["kind"] in ("Deployment", "Job")
        for c in d["spec"]["template"]["spec"]["containers"]
    ]


def configmap() -> dict[str, str]:
    return k8s("ConfigMap")["skillgen-config"]["data"]


# --- compose.yaml -----------------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_spec():
    validator = jsonschema.Draft7Validator(json.loads(COMPOSE_SCHEMA.read_text()))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, "\n".join(errors)


def test_compose_file_stays_readable_by_docker_compose_1_29():
    top = {k for k in compose() if not k.startswith("x-")}
    unknown_to_1_29 = top - {"services", "volumes", "networks", "configs", "secrets"}
    assert not unknown_to_1_29, f"docker-compose 1.29 rejects top-level {unknown_to_1_29}"


def test_kafka_runs_in_kraft_mode_from_the_official_image_with_a_healthcheck():
    kafka = services()["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "zookeeper" not in json.dumps(kafka).lower()
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false", "topics come from `skillgen topics ensure` only"
    assert "kafka-broker-api-versions.sh" in " ".join(kafka["healthcheck"]["test"])


def test_every_app_service_waits_for_healthy_kafka_and_provisioned_topics():
    topics_svc = services()["topics"]
    assert topics_svc["command"][:2] == ["topics", "ensure"] and one_shot(topics_svc)
    assert topics_svc["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name, svc in app_services().items():
        if one_shot(svc):
            continue
        deps = svc["depends_on"]
        assert deps["topics"]["condition"] == "service_completed_successfully", name
        assert deps["kafka"]["condition"] == "service_healthy", name


def test_redis_keeps_an_append_only_file_on_a_volume():
    redis = services()["redis"]
    cmd = redis["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"])


def commands_by_profile(profile: str) -> set[str]:
    return {
        " ".join(s["command"][:2] if s["command"][0] == "bot" else s["command"][:1])
        for s in app_services().values()
        if profile in s.get("profiles", []) and not one_shot(s)
    }


def test_cpu_and_gpu_profiles_run_the_same_workers():
    assert commands_by_profile("cpu") == commands_by_profile("gpu") == {"consumer", "trainer"}


def test_cpu_profile_builds_the_tiny_model_before_the_workers_load_it():
    tiny = services()["model-tiny"]
    assert tiny["command"] == ["model", "tiny", "--out", "/models/tiny"] and one_shot(tiny)
    for name, svc in app_services().items():
        if "cpu" in svc.get("profiles", []) and not one_shot(svc):
            assert svc["environment"]["SKILL_MODEL"] == "/models/tiny", name
            assert svc["environment"]["SKILL_DEVICE"] == "cpu", name
            assert svc["depends_on"]["model-tiny"]["condition"] == "service_completed_successfully", name
            assert "deploy" not in svc, f"{name} must run on a machine without a GPU"


def gpu_devices(svc: dict) -> list[dict]:
    return svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_gpu_services_reserve_an_nvidia_gpu_and_consumers_one_each():
    gpu = {n: s for n, s in app_services().items() if s["image"].startswith("skillgen-gpu")}
    assert gpu
    pinned = []
    for name, svc in gpu.items():
        if one_shot(svc):
            continue
        (device,) = gpu_devices(svc)
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        assert svc["environment"]["SKILL_DEVICE"] == "cuda", name
        if svc["command"] == ["consumer"]:
            # A count reservation gives every replica the same first GPU; one service per device id does not.
            assert "count" not in device and len(device["device_ids"]) == 1, name
            pinned += device["device_ids"]
    assert len(pinned) >= 2 and len(pinned) == len(set(pinned)), pinned


def test_topic_partitions_leave_room_for_every_compose_consumer():
    cmd = services()["topics"]["command"]
    partitions = int(cmd[cmd.index("--partitions") + 1])
    consumers = [s for s in app_services().values() if s["command"] == ["consumer"]]
    assert partitions >= len(consumers)


def mounts(svc: dict) -> dict[str, str]:
    return {v.split(":")[1]: v.split(":")[0] for v in svc.get("volumes", [])}


def test_models_adapters_and_blobs_live_on_named_volumes():
    declared = set(compose()["volumes"])
    assert {"models", "adapters", "blobs"} <= declared
    for name, svc in app_services().items():
        env = svc.get("environment", {})
        for var, url in (("SKILL_BLOB_URL", "file:///data/blobs"), ("SKILL_ADAPTER_URL", "file:///data/adapters")):
            assert env.get(var, url) == url, name
        for target, source in mounts(svc).items():
            assert source in declared or source.startswith("./"), f"{name} mounts undeclared volume {source}"
        if svc["command"][0] in ("consumer", "trainer"):
            assert {"/models", "/data/adapters", "/data/blobs"} <= set(mounts(svc)), name


def test_prometheus_scrapes_every_long_running_service_and_only_those():
    config = yaml.safe_load((INFRA / "prometheus" / "prometheus.yml").read_text())
    scraped = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            scraped.update({name: sd["port"] for name in sd["names"]})
    expected = {n: int(s["environment"]["SKILL_METRICS_PORT"]) for n, s in long_running_apps().items()}
    assert scraped == expected
    assert services()["prometheus"]["volumes"][0].startswith("./infra/prometheus/prometheus.yml:")


def test_long_running_services_have_a_healthcheck_on_the_metrics_port():
    for name, svc in long_running_apps().items():
        test = " ".join(svc["healthcheck"]["test"])
        assert f":{svc['environment']['SKILL_METRICS_PORT']}/healthz" in test, name


# --- Grafana ----------------------------------------------------------------------------------------------


def dashboard() -> dict:
    return json.loads((INFRA / "grafana" / "dashboards" / "skillgen.json").read_text())


def test_dashboard_is_provisioned_where_compose_mounts_it():
    provider = yaml.safe_load((INFRA / "grafana" / "provisioning" / "dashboards" / "skillgen.yml").read_text())
    grafana = mounts(services()["grafana"])
    (path,) = [p["options"]["path"] for p in provider["providers"]]
    assert grafana[path] == "./infra/grafana/dashboards"
    assert grafana["/etc/grafana/provisioning"] == "./infra/grafana/provisioning"
    datasources = yaml.safe_load((INFRA / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (ds,) = datasources["datasources"]
    assert ds["url"] == "http://prometheus:9090"
    panels = [p for p in dashboard()["panels"] if p["type"] != "row"]
    assert {p["datasource"]["uid"] for p in panels} == {ds["uid"]}
    assert len({p["id"] for p in dashboard()["panels"]}) == len(dashboard()["panels"])


def test_dashboard_shows_every_metric_and_invents_none():
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    used = set()
    for expr in exprs:
        for name in re.findall(r"\bskill_[a-z_]+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert base in METRICS, f"{name} in {expr!r} is not a metric the services expose"
            if name != base:
                assert METRICS[base] == "histogram", f"{name}: only histograms have _bucket/_sum/_count"
            used.add(base)
    assert used == set(METRICS)
    for expr in exprs:  # a counter is read through rate() or increase(), never as a raw total
        for name in re.findall(r"\bskill_[a-z_]+_total\b", expr):
            assert re.search(rf"(rate|increase)\({name}\[", expr), expr


# --- .env.example -----------------------------------------------------------------------------------------


def env_example() -> dict[str, tuple[str, bool, str]]:
    """name -> (value, set (not commented out), the comment line above it)."""
    lines = (ROOT / ".env.example").read_text().splitlines()
    found = {}
    for i, line in enumerate(lines):
        m = re.fullmatch(r"(# )?([A-Z][A-Z0-9_]*)=(.*)", line)
        if m:
            above = next((ln for ln in reversed(lines[:i]) if not re.fullmatch(r"# [A-Z][A-Z0-9_]*=.*", ln)), "")
            found[m[2]] = (m[3], m[1] is None, above)
    return found


def test_env_example_documents_every_setting_and_leaves_secrets_empty():
    env = env_example()
    assert {f"SKILL_{name.upper()}" for name in CommonSettings.model_fields} <= SKILL_VARS
    assert SKILL_VARS <= set(env), SKILL_VARS - set(env)
    for name, (value, is_set, comment) in env.items():
        assert comment.startswith("# ") and len(comment) > 10, f"{name} needs a comment line above it"
        if name in SECRETS or name.endswith("PASSWORD"):
            assert is_set and value == "", f"{name}: secrets are listed, empty"
        elif name.startswith("SKILL_"):
            assert not is_set, f"{name}: an empty or set value overrides the default; leave it commented"


def test_env_example_starts_profiles_that_exist():
    profiles = {p for svc in services().values() for p in svc.get("profiles", [])}
    wanted = env_example()["COMPOSE_PROFILES"][0].split(",")
    assert set(wanted) <= profiles and "cpu" in wanted, "a fresh `docker compose up` runs the cpu profile"


def test_every_variable_compose_interpolates_is_in_env_example():
    text = (ROOT / "compose.yaml").read_text()
    interpolated = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", text))
    assert interpolated <= set(env_example()), interpolated - set(env_example())


def test_ops_files_set_only_known_settings():
    named = set()
    for svc in services().values():
        named |= {k for k in svc.get("environment", {}) if k.startswith("SKILL_")}
    named |= set(configmap())
    for c in k8s_containers():
        named |= {e["name"] for e in c.get("env", [])}
        named |= {e["valueFrom"]["secretKeyRef"]["key"] for e in c.get("env", []) if "valueFrom" in e}
    assert named <= SKILL_VARS, named - SKILL_VARS


# --- Dockerfiles ------------------------------------------------------------------------------------------


def dockerfile(name: str) -> str:
    return (INFRA / f"Dockerfile.{name}").read_text()


def test_bots_image_installs_no_torch():
    text = dockerfile("bots")
    assert '".[bots]"' in text
    installs = re.findall(r"pip install (.+)", text)
    assert installs and not re.search(r"torch|\[ml|\[gpu|onnxruntime", " ".join(installs)), installs
    assert "find_spec('torch') is not None" in text, "the build fails if a dependency pulled torch in"


def test_gpu_image_has_onnxruntime_gpu_with_tensorrt_and_cpu_image_has_neither():
    gpu, cpu = dockerfile("gpu"), dockerfile("cpu")
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", gpu, re.M) and "ARG CUDA_IMAGE=nvidia/cuda:" in gpu
    assert '".[gpu]"' in gpu and "onnxruntime-gpu==" in gpu and "tensorrt-cu" in gpu
    assert "TensorrtExecutionProvider" in gpu, "the build asserts the GPU build of onnxruntime won"
    assert '".[ml]"' in cpu and "download.pytorch.org/whl/cpu" in cpu
    assert "onnxruntime-gpu" not in cpu and "tensorrt" not in cpu


def test_images_install_torch_first_within_the_range_pyproject_allows():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (torch_req,) = [r for r in extras["ml"] if re.match(r"torch\b", r)]
    for name in ("gpu", "cpu"):
        text = dockerfile(name)
        assert f'"{torch_req}"' in text, f"Dockerfile.{name} must install {torch_req} (pyproject's ml extra)"
        assert text.index(torch_req) < text.index("pip install \".["), f"Dockerfile.{name}: torch goes first"


def test_every_copied_path_exists_and_is_in_the_build_context():
    allowed = {ln[1:].rstrip("/") for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.startswith("!")}
    assert "*" in (ROOT / ".dockerignore").read_text().splitlines(), "the context is an allow-list"
    for path in DOCKERFILES:
        for line in re.findall(r"^COPY (?!--from)(.+)$", path.read_text(), re.M):
            *sources, _dest = line.split()
            for src in sources:
                assert src.rstrip("/") in allowed, f"{path.name}: {src} is excluded by .dockerignore"
                assert (ROOT / src).exists(), f"{path.name}: COPY {src}, which does not exist"


# --- Kubernetes -------------------------------------------------------------------------------------------


def test_k8s_manifests_are_well_formed_and_all_in_the_kustomization():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    for doc in k8s_docs():
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), doc
    image_names = {i["name"] for i in kustomization["images"]}
    assert {c["image"] for c in k8s_containers()} <= image_names


def test_k8s_workloads_run_skillgen_with_limits_probes_and_their_own_labels():
    for kind in ("Deployment", "Job"):
        for name, doc in k8s(kind).items():
            pod = doc["spec"]["template"]
            if kind == "Deployment":
                assert doc["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items(), name
            mounted_volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
            for c in pod["spec"]["containers"]:
                assert c["command"][0] == "skillgen", name
                assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], name
                gpu = c["image"] == "skillgen-gpu"
                assert (c["resources"]["limits"].get("nvidia.com/gpu") == 1) == gpu, name
                for m in c.get("volumeMounts", []):
                    volume = mounted_volumes[m["name"]]
                    if "persistentVolumeClaim" not in volume:  # scratch space or a mounted Secret (the Kafka CA)
                        assert "emptyDir" in volume or "secret" in volume, f"{name}: {m['name']}"
                        continue
                    claim = volume["persistentVolumeClaim"]["claimName"]
                    assert claim in k8s("PersistentVolumeClaim"), f"{name}: no claim {claim}"
                assert {"configMapRef": {"name": "skillgen-config"}} in c["envFrom"], name
                if kind == "Deployment":
                    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", name
                    (port,) = c["ports"]
                    assert port["containerPort"] == int(configmap()["SKILL_METRICS_PORT"]), name


def test_keda_scales_consumers_on_the_lag_of_their_group_on_skill_generate():
    (scaled,) = k8s("ScaledObject").values()
    assert scaled["apiVersion"].startswith("keda.sh/")
    target = k8s("Deployment")[scaled["spec"]["scaleTargetRef"]["name"]]
    assert target["spec"]["template"]["spec"]["containers"][0]["command"] == ["skillgen", "consumer"]
    (trigger,) = scaled["spec"]["triggers"]
    meta = trigger["metadata"]
    names = topics.Topics(configmap()["SKILL_TOPIC_PREFIX"])
    assert trigger["type"] == "kafka"
    assert all(isinstance(v, str) for v in meta.values()), "the CRD types trigger metadata as map[string]string"
    assert meta["consumerGroup"] == names.group(topics.CONSUMER_GROUP) == "consumers"
    assert meta["topic"] == names.generate == "skill.generate"
    assert int(meta["lagThreshold"]) > 0
    assert meta["bootstrapServers"] == configmap()["SKILL_KAFKA_BOOTSTRAP"]
    job_cmd = k8s("Job")["topics-ensure"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert job_cmd[:3] == ["skillgen", "topics", "ensure"]
    partitions = int(job_cmd[job_cmd.index("--partitions") + 1])
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"] <= partitions


# --- the trust boundary (docs/security.md) ----------------------------------------------------------------
# Static checks on the ops files: each fails if the property it names is removed.


def compose_text() -> str:
    return (ROOT / "compose.yaml").read_text()


def command_words(svc: dict) -> list[str]:
    cmd = svc["command"]
    return cmd if isinstance(cmd, list) else cmd.split()


@pytest.mark.security
def test_compose_requires_every_secret_it_passes():
    secrets = re.findall(r"\$\{((?:[A-Z0-9_]*_PASSWORD)|SKILL_SIGNING_KEY)(\S{0,2})", compose_text())
    assert {name for name, _ in secrets} >= {
        "REDIS_PASSWORD", "REDIS_CACHE_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "SKILL_SIGNING_KEY", "KAFKA_ADMIN_PASSWORD",
        "KAFKA_BOTS_PASSWORD", "KAFKA_CONSUMER_PASSWORD", "KAFKA_DELIVERY_PASSWORD", "KAFKA_TRAINER_PASSWORD",
        "KAFKA_OPS_PASSWORD",
    }
    optional = sorted({name for name, op in secrets if not op.startswith(":?")})
    assert not optional, f"secrets compose must refuse to start without (`${{NAME:?message}}`): {optional}"


@pytest.mark.security
def test_published_ports_bind_to_loopback_only():
    for name, svc in services().items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


@pytest.mark.security
def test_correctness_redis_never_evicts_and_the_cache_has_its_own_instance():
    def option(svc: dict, flag: str) -> str:
        cmd = command_words(svc)
        return cmd[cmd.index(flag) + 1]

    redis, cache = services()["redis"], services()["redis-cache"]
    assert option(redis, "--maxmemory-policy") == "noeviction"
    assert option(redis, "--requirepass").startswith("${REDIS_PASSWORD:?")
    assert option(cache, "--maxmemory-policy") == "allkeys-lru"
    assert option(cache, "--requirepass").startswith("${REDIS_CACHE_PASSWORD:?")
    assert option(cache, "--appendonly") == "no" and option(cache, "--save") == ""
    assert not cache.get("volumes") and not cache.get("ports"), "the cache keeps nothing and stays inside"
    for svc in (redis, cache):  # the healthcheck authenticates (REDISCLI_AUTH) and wants PONG, not NOAUTH
        assert svc["environment"]["REDISCLI_AUTH"] == option(svc, "--requirepass")
        assert "PONG" in " ".join(svc["healthcheck"]["test"])
    for name, svc in app_services().items():
        if "environment" not in svc:  # model-tiny: writes a file, talks to nothing
            continue
        env = svc["environment"]
        assert re.fullmatch(r"redis://:\$\{REDIS_PASSWORD:\?[^}]*\}@redis:6379/0", env["SKILL_REDIS_URL"]), name
        if svc["command"] == ["consumer"]:
            assert re.fullmatch(r"redis://:\$\{REDIS_CACHE_PASSWORD:\?[^}]*\}@redis-cache:6379/0",
                                env["SKILL_CACHE_REDIS_URL"]), name
        assert {"redis", "redis-cache"} <= set(svc.get("depends_on", {})) or one_shot(svc), name


@pytest.mark.security
def test_grafana_requires_a_password_and_admits_no_anonymous_visitor():
    env = services()["grafana"]["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert env.get("GF_USERS_ALLOW_SIGN_UP") == "false"


@pytest.mark.security
def test_kafka_authenticates_every_listener_and_authorizes_by_acl():
    env = services()["kafka"]["environment"]
    protocols = dict(pair.split(":") for pair in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(protocols.values()) <= {"SASL_PLAINTEXT", "SASL_SSL"}, "a PLAINTEXT listener admits User:ANONYMOUS"
    listeners = {entry.split("://")[0] for entry in env["KAFKA_LISTENERS"].split(",")}
    assert listeners == set(protocols)
    assert "CONTROLLER://localhost:" in env["KAFKA_LISTENERS"], "the controller listens on loopback only"
    assert env["KAFKA_LISTENER_NAME_CONTROLLER_SASL_ENABLED_MECHANISMS"] == env["KAFKA_SASL_MECHANISM_CONTROLLER_PROTOCOL"]
    assert env["KAFKA_AUTHORIZER_CLASS_NAME"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
    assert env["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"
    assert env["KAFKA_SUPER_USERS"] == "User:admin"
    assert "java.security.auth.login.config=/tmp/kafka_server_jaas.conf" in env["KAFKA_OPTS"]
    script = command_words(services()["kafka"])[-1]
    assert "/tmp/kafka_server_jaas.conf" in script and script.rstrip().endswith("exec /etc/kafka/docker/run")
    assert "--command-config /tmp/admin.properties" in " ".join(services()["kafka"]["healthcheck"]["test"])


def kafka_init_grants() -> tuple[set[str], dict[str, set[tuple[str, str, str]]]]:
    """kafka-init's SCRAM users and, per user, its (operation, resource type, name) ACLs, prefix left out."""
    script = command_words(services()["kafka-init"])[-1]
    users = set(re.findall(r"^user (\w+) ", script, re.M))
    grants: dict[str, set[tuple[str, str, str]]] = {}
    for user, rest in re.findall(r"^allow (\w+) (.+)$", script, re.M):
        (op,) = re.findall(r"--operation (\w+)", rest)
        for kind, name in re.findall(r'--(topic|group) "\$\$\{p\}([^"]+)"', rest):
            grants.setdefault(user, set()).add((op, kind, name))
    return users, grants


@pytest.mark.security
def test_kafka_init_grants_each_service_only_its_own_topics_and_group():
    t = topics.Topics("")
    read, write = "Read", "Write"
    expected = {
        "bots": {(write, "topic", t.generate), (write, "topic", t.finetune), (write, "topic", t.finetune_cancel),
                 (write, "topic", t.generate_cancel)},
        "consumer": {(read, "topic", t.generate), (read, "topic", t.generate_cancel), (read, "group", topics.CONSUMER_GROUP),
                     (write, "topic", t.events), (write, "topic", t.dlq(t.generate))},
        "delivery": {(read, "topic", t.events), (read, "group", topics.DELIVERY_GROUP),
                     (write, "topic", t.events), (write, "topic", t.dlq(t.events))},
        "trainer": {(read, "topic", t.finetune), (read, "topic", t.finetune_cancel), (read, "group", topics.TRAINER_GROUP),
                    (write, "topic", t.events), (write, "topic", t.dlq(t.finetune))},
        "ops": {(read, "topic", t.generate), (read, "topic", t.dlq(t.generate)), (read, "topic", t.events),
                (write, "topic", t.generate), (write, "topic", t.events)},
    }
    users, grants = kafka_init_grants()
    assert users == set(expected) and grants == expected
    init = services()["kafka-init"]
    assert init["image"] == services()["kafka"]["image"] and one_shot(init)
    assert init["environment"]["TOPIC_PREFIX"] == "${SKILL_TOPIC_PREFIX:-}"
    assert services()["topics"]["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"


@pytest.mark.security
def test_each_compose_service_logs_in_to_kafka_as_its_own_user():
    users, _ = kafka_init_grants()
    by_command = {"consumer": "consumer", "trainer": "trainer", "bot discord": "bots", "bot slack": "bots",
                  "bot delivery": "delivery", "bot console": "ops", "topics ensure": "admin"}
    for name, svc in app_services().items():
        if svc["command"][:2] == ["model", "tiny"]:
            continue
        env = svc["environment"]
        key = " ".join(svc["command"][:2]) if svc["command"][0] in ("bot", "topics") else svc["command"][0]
        user = by_command[key]
        assert env["SKILL_KAFKA_USERNAME"] == user, name
        assert env["SKILL_KAFKA_PASSWORD"].startswith(f"${{KAFKA_{user.upper()}_PASSWORD:?"), name
        assert env["SKILL_KAFKA_SECURITY_PROTOCOL"] == "SASL_PLAINTEXT", name
        # admin is a PLAIN user known to the broker's JAAS file only; every service uses SCRAM from kafka-init
        assert env["SKILL_KAFKA_SASL_MECHANISM"] == ("PLAIN" if user == "admin" else "SCRAM-SHA-512"), name
        assert user == "admin" or user in users, name
        # the trainer decodes hostile uploads and neither seals nor verifies: it gets no key (empty means unset)
        expected = "" if user == "trainer" else "${SKILL_SIGNING_KEY:?"
        assert env["SKILL_SIGNING_KEY"].startswith(expected) and (user != "trainer" or not env["SKILL_SIGNING_KEY"]), name
        assert env["SKILL_ALLOWED_TEAMS"] == "${SKILL_ALLOWED_TEAMS:-}", name


@pytest.mark.security
def test_only_the_services_that_write_a_volume_mount_it_read_write():
    writers = {"blobs": {"consumer", "trainer", "bot slack"}, "adapters": {"trainer"}}
    for name, svc in app_services().items():
        key = " ".join(svc["command"][:2]) if svc["command"][0] == "bot" else svc["command"][0]
        for volume in svc.get("volumes", []):
            source, target, *mode = volume.split(":")
            if source in writers:
                assert (mode != ["ro"]) == (key in writers[source]), f"{name}: {volume}"


@pytest.mark.security
def test_no_trainer_holds_a_chat_credential():
    for name, svc in app_services().items():
        if svc["command"] == ["trainer"]:
            assert not [k for k in svc["environment"] if "SLACK" in k or "DISCORD" in k], name
    assert "SLACK" not in (K8S / "trainer.yaml").read_text()
    for c in k8s("Deployment")["trainer"]["spec"]["template"]["spec"]["containers"]:
        assert not [e["name"] for e in c.get("env", []) if "SLACK" in e["name"] or "DISCORD" in e["name"]]


def k8s_pod_specs() -> dict[str, dict]:
    return {name: doc["spec"]["template"]["spec"] for kind in ("Deployment", "Job") for name, doc in k8s(kind).items()}


@pytest.mark.security
def test_k8s_pods_run_non_root_on_a_read_only_root_without_privileges():
    for name, pod in k8s_pod_specs().items():
        assert pod["automountServiceAccountToken"] is False, name
        ctx = pod["securityContext"]
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] > 0, name
        assert ctx["seccompProfile"]["type"] == "RuntimeDefault", name
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), name
            assert sc.get("runAsNonRoot", ctx["runAsNonRoot"]) is True, name
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]["name"]], f"{name}: /tmp must be a writable emptyDir"
            ca = mounts["/etc/skillgen/kafka-ca"]
            assert ca["readOnly"] is True and volumes[ca["name"]]["secret"]["secretName"] == "kafka-ca", name
    delivery = k8s_pod_specs()["delivery"]["containers"][0]
    assert all(m["readOnly"] for m in delivery["volumeMounts"] if m["name"] != "tmp"), "delivery only reads"


@pytest.mark.security
def test_k8s_secrets_come_from_secrets_per_workload_and_none_is_committed():
    assert not k8s("Secret"), "never commit a Secret: README.md says how to create them"
    config = configmap()
    leaked = [k for k in config if re.search(r"PASSWORD|TOKEN|SECRET|SIGNING_KEY|REDIS_URL", k)]
    assert not leaked, f"secrets (Redis URLs carry a password) belong in a Secret, not the ConfigMap: {leaked}"
    assert config["SKILL_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL" and config["SKILL_KAFKA_SASL_MECHANISM"].startswith("SCRAM")
    users = {"consumer": "consumer", "trainer": "trainer", "discord-bot": "bots", "slack-bot": "bots",
             "delivery": "delivery", "topics-ensure": "admin"}
    assert set(users) == set(k8s_pod_specs())
    for name, pod in k8s_pod_specs().items():
        (c,) = pod["containers"]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
        for var in ("SKILL_KAFKA_USERNAME", "SKILL_KAFKA_PASSWORD"):
            assert refs[var]["name"] == f"skillgen-kafka-{users[name]}" and refs[var]["key"] == var, name
        if name != "topics-ensure":
            assert refs["SKILL_REDIS_URL"] == {"name": "skillgen-secrets", "key": "SKILL_REDIS_URL"}, name
        if name in ("topics-ensure", "trainer"):  # the trainer decodes hostile uploads: it gets no signing key
            assert "SKILL_SIGNING_KEY" not in refs, name
        else:
            assert refs["SKILL_SIGNING_KEY"] == {"name": "skillgen-secrets", "key": "SKILL_SIGNING_KEY"}, name
    (auth,) = k8s("TriggerAuthentication").values()
    assert {r["name"] for r in auth["spec"]["secretTargetRef"] if r["parameter"] != "ca"} == {"skillgen-kafka-consumer"}
    (scaled,) = k8s("ScaledObject").values()
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert trigger["metadata"]["sasl"] == "scram_sha512" and trigger["metadata"]["tls"] == "enable"


def policy_selects(policy: dict, labels: dict[str, str]) -> bool:
    sel = policy["spec"]["podSelector"]
    if not sel.get("matchLabels", {}).items() <= labels.items():
        return False
    return all(labels.get(e["key"]) in e["values"] for e in sel.get("matchExpressions", []) if e["operator"] == "In")


def egress_of(labels: dict[str, str]) -> list[tuple[dict, int]]:
    """(peer, port) pairs the policies allow a pod with these labels to reach."""
    allowed = []
    for policy in k8s("NetworkPolicy").values():
        if policy_selects(policy, labels):
            for rule in policy["spec"].get("egress", []):
                allowed += [(peer, p["port"]) for peer in rule["to"] for p in rule["ports"]]
    return allowed


@pytest.mark.security
def test_k8s_network_policies_deny_by_default_and_allow_each_workload_only_what_it_needs():
    policies = k8s("NetworkPolicy")
    deny = policies["default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert not deny.get("ingress") and not deny.get("egress")
    internet = {"discord-bot", "slack-bot", "delivery", "trainer"}
    for name, doc in {**k8s("Deployment"), **k8s("Job")}.items():
        labels = doc["spec"]["template"]["metadata"]["labels"]
        component = labels["app.kubernetes.io/component"]
        allowed = egress_of(labels)
        namespaces = {peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]: port
                      for peer, port in allowed if "namespaceSelector" in peer}
        assert namespaces.get("kube-system") == 53 and "kafka" in namespaces, name
        assert ("redis" in namespaces) == (component != "topics"), name
        blocks = [peer["ipBlock"] for peer, port in allowed if "ipBlock" in peer]
        assert bool(blocks) == (component in internet), f"{name}: internet egress"
        for peer, port in allowed:
            if "ipBlock" in peer:
                assert port == 443 and {"10.0.0.0/8", "169.254.0.0/16"} <= set(peer["ipBlock"]["except"]), name
    ingress = [rule for p in policies.values() for rule in p["spec"].get("ingress", [])]
    assert [p["port"] for rule in ingress for p in rule["ports"]] == [int(configmap()["SKILL_METRICS_PORT"])]


# --- every command the ops files run exists in the CLI ----------------------------------------------------


def skillgen_commands() -> set[str]:
    found = {"skillgen " + " ".join(s["command"]) for s in app_services().values()}
    for c in k8s_containers():
        found.add(shlex.join(c["command"]))
    for path in DOCKERFILES:
        text = path.read_text()
        entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M)[1])
        cmd = json.loads(re.search(r"^CMD (.+)$", text, re.M)[1])
        assert entry == ["skillgen"], path.name
        found.add(shlex.join(entry + cmd))
        found |= {m.strip() for m in re.findall(r"(?:&&|RUN)\s+(skillgen [^&\n\\]+)", text)}
    return found


def test_the_ops_files_run_the_expected_commands():
    assert {c.split(" --")[0] for c in skillgen_commands()} == {
        "skillgen", "skillgen topics ensure", "skillgen model tiny", "skillgen consumer", "skillgen trainer",
        "skillgen bot discord", "skillgen bot slack", "skillgen bot delivery", "skillgen bot console",
    }


@pytest.mark.parametrize("command", sorted(skillgen_commands()))
def test_command_exists_in_the_cli(command):
    args = shlex.split(command)[1:]
    path = list(itertools.takewhile(lambda a: not a.startswith("-"), args))
    done = subprocess.run(
        [sys.executable, "-m", "skillgen.cli", *path, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"`skillgen {' '.join(path)} --help`: {done.stderr.strip() or done.stdout.strip()}"
    for option in (a.split("=")[0] for a in args if a.startswith("--")):
        # whole words only: argparse would accept an abbreviation, but the next option added may make it ambiguous
        assert re.search(rf"(?<![\w-]){option}(?![\w-])", done.stdout), f"`{command}`: the CLI has no {option}"
