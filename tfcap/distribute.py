"""Where training runs: a `tf.distribute` strategy chosen from `--strategy` and `--devices`.

  - one-device: TensorFlow's default strategy, the training loop exactly as without tf.distribute
    (no OneDeviceStrategy wrapper unless --devices names the device: nothing to place otherwise);
  - mirrored: `MirroredStrategy`, one replica per device of one machine (all visible GPUs, or --devices);
  - multi-worker: `MultiWorkerMirroredStrategy`, one process per machine, the cluster from TF_CONFIG;
  - auto: mirrored when more than one GPU is visible, one-device otherwise.

Every replica gets a slice of the same global batch (`replica_batches`), so a run trains on the
batches a one-device run would, and the all-reduced gradient is the one-device gradient.

MultiWorkerMirroredStrategy has to be created before TensorFlow runs its first op (it configures
the runtime's collective ops), so `placement` comes first in a training process.
"""

from __future__ import annotations

import dataclasses
import json
import os

import tensorflow as tf

from tfcap.errors import TfcapError

STRATEGIES = ("auto", "one-device", "mirrored", "multi-worker")
DISTRIBUTED = ("mirrored", "multi-worker")  # the strategies that split batches over replicas


@dataclasses.dataclass(frozen=True)
class Cluster:
    """This process's place in a TF_CONFIG cluster."""

    jobs: dict  # job name ("chief", "worker") -> ["host:port", ...]
    task_type: str
    task_index: int

    @property
    def is_chief(self) -> bool:
        """The chief: task "chief", or worker 0 in a cluster without a chief job (TensorFlow's convention)."""
        return self.task_type == "chief" or (self.task_type == "worker" and self.task_index == 0
                                             and "chief" not in self.jobs)

    @property
    def workers(self) -> int:
        return sum(len(self.jobs.get(job, ())) for job in ("chief", "worker"))


def parse_tf_config(value: str | None) -> Cluster:
    """The cluster of a TF_CONFIG value, checked: {"cluster": {"worker": ["host:port", ...]},
    "task": {"type": "worker", "index": i}} ("chief" also a job), as TensorFlow documents it.

    Raises TfcapError naming what is missing or wrong.
    """
    if not value:
        raise TfcapError("--strategy multi-worker needs TF_CONFIG: set it on each machine to "
                         '{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", "index": i}}')
    try:
        config = json.loads(value)
    except json.JSONDecodeError as e:
        raise TfcapError(f"TF_CONFIG is not JSON: {e}") from None
    cluster, task = (config.get("cluster"), config.get("task")) if isinstance(config, dict) else (None, None)
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise TfcapError('TF_CONFIG needs a "cluster" and a "task" object')
    jobs = {}
    for job, addresses in cluster.items():
        if job not in ("chief", "worker"):
            raise TfcapError(f'TF_CONFIG has a job "{job}": multi-worker training has "chief" and "worker" jobs only')
        if not isinstance(addresses, list) or not addresses or not all(
                isinstance(a, str) and a.rpartition(":")[2].isdigit() for a in addresses):
            raise TfcapError(f'TF_CONFIG cluster "{job}" must be a list of "host:port" addresses')
        jobs[job] = addresses
    if "worker" not in jobs and "chief" not in jobs:
        raise TfcapError('TF_CONFIG cluster has no "worker" job')
    task_type, task_index = task.get("type"), task.get("index")
    if task_type not in jobs:
        raise TfcapError(f'TF_CONFIG task type {task_type!r} is not a job of its cluster ({", ".join(jobs)})')
    if not isinstance(task_index, int) or isinstance(task_index, bool) or not 0 <= task_index < len(jobs[task_type]):
        raise TfcapError(f'TF_CONFIG task index {task_index!r} is not in 0..{len(jobs[task_type]) - 1}')
    return Cluster(jobs, task_type, task_index)


def is_chief(strategy: str, environ=os.environ) -> bool:
    """Whether this process writes the run directory: always, but for a multi-worker non-chief task."""
    return strategy != "multi-worker" or parse_tf_config(environ.get("TF_CONFIG")).is_chief


@dataclasses.dataclass(frozen=True)
class Placement:
    """A strategy and this process's role in it."""

    strategy: tf.distribute.Strategy
    name: str  # the resolved strategy: one-device | mirrored | multi-worker
    is_chief: bool = True  # writes the run directory (always, but for multi-worker non-chief tasks)

    @property
    def distributed(self) -> bool:
        """Whether batches are split over replicas (`replica_batches`); false for one-device."""
        return self.name in DISTRIBUTED

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync


def _device_names(devices: str) -> list[str]:
    """--devices "GPU:0,GPU:1" -> ["/device:GPU:0", "/device:GPU:1"], each checked against the visible devices."""
    visible = {d.name.rpartition("device:")[2].upper(): d.name for d in tf.config.list_logical_devices()}
    names = []
    for part in (p.strip() for p in devices.split(",")):
        key = part.upper().removeprefix("/").removeprefix("DEVICE:")
        if key not in visible:
            raise TfcapError(f"--devices: no device {part} here (visible: {', '.join(sorted(visible))})")
        names.append(visible[key])
    if len(set(names)) != len(names):
        raise TfcapError(f"--devices names a device twice: {devices}")
    return names


def placement(strategy: str = "auto", devices: str = "", environ=os.environ) -> Placement:
    """The strategy for `--strategy` and `--devices` (comma-separated, e.g. "GPU:0,GPU:1"; "": all GPUs).

    Raises TfcapError for multi-worker without or with a malformed TF_CONFIG, a device that is not
    visible, or mirrored over fewer than two devices.
    """
    if strategy not in STRATEGIES:
        raise TfcapError(f"--strategy must be one of {', '.join(STRATEGIES)}")
    if strategy == "multi-worker":
        if devices:
            raise TfcapError("--devices goes with --strategy mirrored or one-device; multi-worker uses each "
                             "machine's GPUs (or its CPU)")
        cluster = parse_tf_config(environ.get("TF_CONFIG"))
        return Placement(tf.distribute.MultiWorkerMirroredStrategy(), "multi-worker", cluster.is_chief)
    names = _device_names(devices) if devices else None
    if strategy == "auto":
        strategy = "mirrored" if len(names or tf.config.list_logical_devices("GPU")) > 1 else "one-device"
    if strategy == "one-device":
        if names and len(names) > 1:
            raise TfcapError(f"--strategy one-device takes one device, not {devices}; use --strategy mirrored")
        return Placement(tf.distribute.OneDeviceStrategy(names[0]) if names else tf.distribute.get_strategy(),
                         "one-device")
    names = names or [d.name for d in tf.config.list_logical_devices("GPU")]
    if len(names) < 2:
        raise TfcapError(f"--strategy mirrored needs at least two devices, found {len(names)} "
                         f"({', '.join(names) or 'no GPU'}); use --strategy one-device, or --devices to name them")
    return Placement(tf.distribute.MirroredStrategy(names), "mirrored")


def replica_batches(placement_: Placement, make_batches) -> tf.data.Dataset:
    """Global batches split into one slice per replica, as a distributed dataset (one-device: as they are).

    Args:
      make_batches: () -> tf.data.Dataset of global batches, tuples of tensors [B, ...] (every
        worker builds the same ones: they are a pure function of seed and epoch).
    Returns an iterable of per-replica tuples: replica r of R gets rows [B*r//R, B*(r+1)//R) of each
    global batch, so the replicas of one step together hold exactly the global batch (a slice may
    have no rows when B < R). Each input pipeline (one per worker) yields the slices of its local
    replicas in order, which `distribute_datasets_from_function` hands out one per local replica.
    """
    if not placement_.distributed:
        return make_batches()
    replicas = placement_.replicas

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        local = replicas // context.num_input_pipelines
        first = context.input_pipeline_id * local

        def split(*batch):
            rows = tf.shape(batch[-1], out_type=tf.int64)[0]

            def part(replica):
                start, stop = rows * replica // replicas, rows * (replica + 1) // replicas
                return tf.nest.map_structure(lambda t: t[start:stop], batch)

            return tf.data.Dataset.range(first, first + local).map(part)

        return make_batches().flat_map(split)

    return placement_.strategy.distribute_datasets_from_function(dataset_fn)
