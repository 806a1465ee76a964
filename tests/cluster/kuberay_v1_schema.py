"""A structural JSON schema of the KubeRay ``ray.io/v1`` RayCluster and RayJob fields our manifests use.

Written from the facts of KubeRay's CRDs (``ray-operator/config/crd/bases/ray.io_rayclusters.yaml``
and ``ray.io_rayjobs.yaml``, operator v1.7.0): property names and types, required fields and enums.
The Ray-specific objects (cluster spec, head and worker group specs, job spec, autoscaler and auth
options) list every property the CRD defines and reject any other, so a misspelled field fails.
Pod templates are Kubernetes core objects: only the fields we use are typed, others pass unchecked.
"""

# A Kubernetes resource quantity: a decimal number with an optional binary or decimal suffix.
QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": r"^[+-]?(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?\d+)?$"}]}
INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}

CONTAINER = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "image": {"type": "string"},
        "command": {"type": "array", "items": {"type": "string"}},
        "args": {"type": "array", "items": {"type": "string"}},
        "env": {"type": "array", "items": {"type": "object", "required": ["name"],
                                           "properties": {"name": {"type": "string"}, "value": {"type": "string"},
                                                          "valueFrom": {"type": "object"}}}},
        "resources": {"type": "object", "properties": {
            "limits": {"type": "object", "additionalProperties": QUANTITY},
            "requests": {"type": "object", "additionalProperties": QUANTITY}}},
        "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"],
                                             "properties": {"containerPort": INT32, "name": {"type": "string"}}}},
        "volumeMounts": {"type": "array", "items": {"type": "object", "required": ["mountPath", "name"], "properties": {
            "mountPath": {"type": "string"}, "name": {"type": "string"}, "readOnly": {"type": "boolean"}}}},
    },
}

POD_TEMPLATE = {
    "type": "object",
    "properties": {
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {"type": "array", "minItems": 1, "items": CONTAINER},
                "serviceAccountName": {"type": "string"},
                "nodeSelector": STRING_MAP,
                "tolerations": {"type": "array", "items": {"type": "object", "properties": {
                    "key": {"type": "string"}, "operator": {"type": "string"}, "value": {"type": "string"},
                    "effect": {"type": "string"}}}},
                "volumes": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
                    "name": {"type": "string"},
                    "persistentVolumeClaim": {"type": "object", "required": ["claimName"], "properties": {
                        "claimName": {"type": "string"}, "readOnly": {"type": "boolean"}}},
                    "emptyDir": {"type": "object", "properties": {"medium": {"type": "string"},
                                                                  "sizeLimit": QUANTITY}}}}},
            },
        },
    },
}

HEAD_GROUP = {
    "type": "object",
    "required": ["template"],
    "additionalProperties": False,
    "properties": {
        "enableIngress": {"type": "boolean"},
        "headService": {"type": "object"},
        "ingressOptions": {"type": "object"},
        "labels": STRING_MAP,
        "rayStartParams": STRING_MAP,
        "resources": STRING_MAP,
        "serviceType": {"type": "string"},
        "template": POD_TEMPLATE,
    },
}

WORKER_GROUP = {
    "type": "object",
    "required": ["groupName", "maxReplicas", "minReplicas", "template"],
    "additionalProperties": False,
    "properties": {
        "groupName": {"type": "string"},
        "idleTimeoutSeconds": INT32,
        "labels": STRING_MAP,
        "maxReplicas": INT32,
        "minReplicas": INT32,
        "numOfHosts": INT32,
        "priority": INT32,
        "rayStartParams": STRING_MAP,
        "replicas": INT32,
        "resources": STRING_MAP,
        "scaleStrategy": {"type": "object"},
        "suspend": {"type": "boolean"},
        "template": POD_TEMPLATE,
    },
}

CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "additionalProperties": False,
    "properties": {
        "authOptions": {"type": "object", "additionalProperties": False, "properties": {
            "enableK8sTokenAuth": {"type": "boolean"},
            "mode": {"type": "string", "enum": ["disabled", "token"]},
            "secretName": {"type": "string"}}},
        "autoscalerOptions": {"type": "object", "additionalProperties": False, "properties": {
            "args": {"type": "array"}, "command": {"type": "array"}, "env": {"type": "array"},
            "envFrom": {"type": "array"}, "idleTimeoutSeconds": INT32, "image": {"type": "string"},
            "imagePullPolicy": {"type": "string"}, "resources": {"type": "object"},
            "securityContext": {"type": "object"},
            "upscalingMode": {"type": "string", "enum": ["Default", "Aggressive", "Conservative"]},
            "version": {"type": "string"}, "volumeMounts": {"type": "array"}}},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "gcsFaultToleranceOptions": {"type": "object"},
        "headGroupSpec": HEAD_GROUP,
        "headServiceAnnotations": STRING_MAP,
        "historyServerOptions": {"type": "object"},
        "managedBy": {"type": "string"},
        "networkPolicy": {"type": "object"},
        "rayVersion": {"type": "string"},
        "suspend": {"type": "boolean"},
        "tlsOptions": {"type": "object"},
        "upgradeStrategy": {"type": "object"},
        "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
    },
}

JOB_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "activeDeadlineSeconds": INT32,
        "backoffLimit": INT32,
        "clusterSelector": STRING_MAP,
        "deletionStrategy": {"type": "object"},
        "entrypoint": {"type": "string"},
        "entrypointNumCpus": {"type": "number"},
        "entrypointNumGpus": {"type": "number"},
        "entrypointResources": {"type": "string"},
        "jobId": {"type": "string"},
        "managedBy": {"type": "string"},
        "metadata": STRING_MAP,
        "preRunningDeadlineSeconds": INT32,
        "rayClusterSpec": CLUSTER_SPEC,
        "runtimeEnvYAML": {"type": "string"},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "submissionMode": {"type": "string"},
        "submitterConfig": {"type": "object"},
        "submitterPodTemplate": POD_TEMPLATE,
        "suspend": {"type": "boolean"},
        "ttlSecondsAfterFinished": INT32,
    },
}


def resource(kind: str, spec: dict) -> dict:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
            "spec": spec,
        },
    }


SCHEMAS = {"RayCluster": resource("RayCluster", CLUSTER_SPEC), "RayJob": resource("RayJob", JOB_SPEC)}
