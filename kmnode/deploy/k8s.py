"""Kubernetes manifests: a StatefulSet and a headless Service per node, one ConfigMap, one PDB.

Why a StatefulSet *per node* (each of one replica) rather than one of N replicas:

* A node is an identity, not a replica: its name is committed in the ledger, its sealed state
  and platform secrets are in its volume. In one StatefulSet, pod ``X-i`` would run the i-th
  node of cluster.yaml, so removing a node from the middle of the list would start the next
  node on the removed node's volume. Here ``km2-0`` and its volume ``data-km2-0`` are km2's
  whatever the list becomes.
* cluster.yaml gives each node its own ports (the validator requires it when nodes listen on
  ``0.0.0.0``), and one pod template cannot name a different probe port per pod; here the
  probes are plain ``httpGet`` on the node's own API port.
* ``updateStrategy: OnDelete``: changing the image or the config restarts nothing by itself.
  A new build is a new enclave measurement, which the cluster's policy must allow first, and
  nodes must restart one at a time to keep a quorum: the operator deletes ``km1-0``, waits
  until it is Ready, then the next (the project's own upgrade path, `kmctl members replace`,
  is also one node at a time).

Each node's headless Service has the node's name, so the node is reached at its name, as in
compose, and publishes the pod's address *before* it is ready: a node becomes ready only
after it has joined, and it joins through the others' names.

Secrets: operator identities in cluster.yaml are public keys (the ConfigMap holds them); no
node needs a private operator key. The one secret the pods need is the simulated vendor root
(``kmctl hardware export``): every pod has its own hardware store on its own volume, as on
separate machines, and an init container imports the root from the Secret
``<cluster>-vendor-root`` so the nodes trust each other's quotes. Platform secrets are made in
each pod's own volume and never leave it.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from kmnode.config import ClusterConfig, NodeSpec
from kmnode.deploy.containers import (
    CONFIG_DIR,
    HEALTH_PATH,
    IMAGE_UID,
    LIVE_PATH,
    STATE_DIR,
    api_host_header,
    container_config,
    container_config_yaml,
    node_command,
)
from kmnode.deploy.files import PRIVATE, RenderedFile, Rendering, dump_yaml, dump_yaml_all

#: The Kubernetes version the manifests are written and validated for (kubernetes-validate,
#: tests/test_deploy.py); they use nothing newer.
KUBERNETES_VERSION = "1.31"
VENDOR_DIR = PurePosixPath("/etc/kmsim-vendor")
VENDOR_KEY = "vendor.json"
DATA_VOLUME = "data"


def labels(config: ClusterConfig, node: str | None = None) -> dict[str, str]:
    """The labels every object carries; ``node`` adds the one that selects a node's pod."""
    found = {"app.kubernetes.io/name": "kmsim", "app.kubernetes.io/instance": config.cluster}
    if node is not None:
        found |= {"app.kubernetes.io/component": "km-node", "kmsim/node": node}
    return found


def config_map_name(config: ClusterConfig) -> str:
    return f"{config.cluster}-config"


def vendor_secret_name(config: ClusterConfig) -> str:
    return f"{config.cluster}-vendor-root"


def quorum(config: ClusterConfig) -> int:
    return len(config.nodes) // 2 + 1


def render_k8s(
    config: ClusterConfig, *, image: str, storage: str = "1Gi", vendor_root: bytes | None = None
) -> Rendering:
    """The manifests of ``config``. ``vendor_root`` (an exported vendor root) also renders its
    Secret, written owner-only; without it the operator creates the Secret (see the notes)."""
    inside = container_config(config, mqtt_url=None)
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": config_map_name(config), "labels": labels(config)},
        "data": {"cluster.yaml": container_config_yaml(inside)},
    }
    pdb = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": f"{config.cluster}-nodes", "labels": labels(config)},
        "spec": {
            # A majority must stay up for Raft to commit (and so to release keys).
            "minAvailable": quorum(config),
            "selector": {
                "matchLabels": labels(config) | {"app.kubernetes.io/component": "km-node"}
            },
            # A pod that is not ready counts for nothing anyway: let a drain evict it.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }
    files = [
        RenderedFile(PurePosixPath("configmap.yaml"), _HEADER + dump_yaml(config_map)),
        RenderedFile(
            PurePosixPath("services.yaml"),
            _HEADER + dump_yaml_all([_service(config, n) for n in inside.nodes]),
        ),
        RenderedFile(
            PurePosixPath("statefulsets.yaml"),
            _HEADER
            + dump_yaml_all([_stateful_set(config, n, image, storage) for n in inside.nodes]),
        ),
        RenderedFile(PurePosixPath("poddisruptionbudget.yaml"), _HEADER + dump_yaml(pdb)),
    ]
    secret = vendor_secret_name(config)
    notes = [
        f"build and push the image: docker build -f docker/Dockerfile -t {image} . (from the "
        "repository root), then push it where the cluster pulls from",
    ]
    if vendor_root is not None:
        files.append(
            RenderedFile(
                PurePosixPath("vendor-root-secret.yaml"),
                _HEADER + dump_yaml(_vendor_secret(config, vendor_root)),
                PRIVATE,
            )
        )
        notes.append(
            "vendor-root-secret.yaml holds this machine's simulated vendor root (a secret): "
            "keep it out of version control"
        )
    else:
        notes.append(
            f"create the Secret {secret} first (the vendor root every node imports): kmctl -c "
            f"cluster.yaml hardware export vendor.json && kubectl create secret generic {secret} "
            f"--from-file={VENDOR_KEY}=vendor.json && rm vendor.json"
        )
    notes.append("then: kubectl apply -f <this directory> (in the namespace of your choice)")
    notes.append(
        "updates restart nothing by themselves (OnDelete): delete one pod at a time "
        f"(kubectl delete pod {inside.nodes[0].name}-0) and wait until it is Ready"
    )
    if config.mqtt.url is None:
        notes.append(
            "no MQTT broker in these manifests and mqtt.url is unset: the nodes' events are "
            "dropped (counted in /metrics); set mqtt.url to a broker the pods reach"
        )
    if any(node.netns for node in config.nodes):
        notes.append("netns dropped: each pod has a network namespace of its own")
    return Rendering(tuple(files), {}, tuple(notes))


_HEADER = "# Rendered by `kmctl deploy render k8s` from cluster.yaml: render again, not edit.\n"


def _service(config: ClusterConfig, node: NodeSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": node.name, "labels": labels(config, node.name)},
        "spec": {
            "clusterIP": "None",
            # Peers resolve the name before the pod is ready: it becomes ready by joining them.
            "publishNotReadyAddresses": True,
            "selector": labels(config, node.name),
            "ports": [
                {"name": "peer", "port": node.peer_port, "targetPort": "peer", "protocol": "TCP"},
                {"name": "api", "port": node.api_port, "targetPort": "api", "protocol": "TCP"},
            ],
        },
    }


def _http_probe(node: NodeSpec, path: str, period: int, failures: int) -> dict[str, Any]:
    # The kubelet would name the pod's IP as the Host, which the node refuses (it answers only
    # requests for its own names: DNS-rebinding protection); its advertised name it accepts.
    return {
        "httpGet": {
            "path": path,
            "port": "api",
            "httpHeaders": [{"name": "Host", "value": api_host_header(node)}],
        },
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def _stateful_set(
    config: ClusterConfig, node: NodeSpec, image: str, storage: str
) -> dict[str, Any]:
    config_mounts = [
        {"name": DATA_VOLUME, "mountPath": str(STATE_DIR)},
        {"name": "config", "mountPath": str(CONFIG_DIR), "readOnly": True},
    ]
    vendor_import = {
        "name": "vendor-root",
        "image": image,
        # Idempotent: the same root again is "already trusted"; another root is refused (a
        # node's platform certificate must not change under a running cluster).
        "args": [
            "-c",
            f"{CONFIG_DIR}/cluster.yaml",
            "hardware",
            "import",
            f"{VENDOR_DIR}/{VENDOR_KEY}",
        ],
        "volumeMounts": [
            *config_mounts,
            {"name": "vendor-root", "mountPath": str(VENDOR_DIR), "readOnly": True},
        ],
        "securityContext": _CONTAINER_SECURITY,
    }
    container = {
        "name": "node",
        "image": image,
        "args": node_command(node.name),
        "ports": [
            {"name": "peer", "containerPort": node.peer_port, "protocol": "TCP"},
            {"name": "api", "containerPort": node.api_port, "protocol": "TCP"},
        ],
        # Started: the API answers (it comes up once the enclaves run; two minutes at most).
        "startupProbe": _http_probe(node, LIVE_PATH, period=2, failures=60),
        # Alive: the node process and its KM enclave run; restarted after 30 s without.
        "livenessProbe": _http_probe(node, LIVE_PATH, period=10, failures=3),
        # Ready: joined, with a known leader.
        "readinessProbe": _http_probe(node, HEALTH_PATH, period=5, failures=2),
        "volumeMounts": [*config_mounts, {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": _CONTAINER_SECURITY,
    }
    selector = labels(config, node.name)
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": node.name, "labels": selector},
        "spec": {
            "serviceName": node.name,
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "updateStrategy": {"type": "OnDelete"},
            # The volume holds the node's sealed state: deleting the StatefulSet keeps it.
            "persistentVolumeClaimRetentionPolicy": {
                "whenDeleted": "Retain",
                "whenScaled": "Retain",
            },
            "template": {
                "metadata": {"labels": selector},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": IMAGE_UID,
                        "runAsGroup": IMAGE_UID,
                        "fsGroup": IMAGE_UID,
                        "fsGroupChangePolicy": "OnRootMismatch",
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    # Nodes on different machines, where the cluster has several (preferred,
                    # so a one-machine test cluster still schedules them).
                    "affinity": {
                        "podAntiAffinity": {
                            "preferredDuringSchedulingIgnoredDuringExecution": [
                                {
                                    "weight": 100,
                                    "podAffinityTerm": {
                                        "topologyKey": "kubernetes.io/hostname",
                                        "labelSelector": {
                                            "matchLabels": labels(config)
                                            | {"app.kubernetes.io/component": "km-node"}
                                        },
                                    },
                                }
                            ]
                        }
                    },
                    "initContainers": [vendor_import],
                    "containers": [container],
                    "volumes": [
                        {"name": "config", "configMap": {"name": config_map_name(config)}},
                        {
                            "name": "vendor-root",
                            "secret": {
                                "secretName": vendor_secret_name(config),
                                "defaultMode": 0o440,
                                "items": [{"key": VENDOR_KEY, "path": VENDOR_KEY}],
                            },
                        },
                        {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
                    ],
                },
            },
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": DATA_VOLUME, "labels": labels(config, node.name)},
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": storage}},
                    },
                }
            ],
        },
    }


def _vendor_secret(config: ClusterConfig, vendor_root: bytes) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": vendor_secret_name(config), "labels": labels(config)},
        "type": "Opaque",
        "stringData": {VENDOR_KEY: vendor_root.decode()},
    }
