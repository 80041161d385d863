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

Creating it waits in TensorFlow's C++ for every worker of the cluster, holding the GIL: no signal
handler runs there, and it waits forever for a worker that never starts. So each worker first waits
for the others in Python (`wait_for_peers`), where Ctrl-C and SIGTERM end it at once and a timeout
(--cluster-timeout) gives up with one line; the strategy is created once all are up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import threading
import time

import tensorflow as tf

from tfcap.errors import Interrupted, TfcapError

STRATEGIES = ("auto", "one-device", "mirrored", "multi-worker")
DISTRIBUTED = ("mirrored", "multi-worker")  # the strategies that split batches over replicas
CLUSTER_TIMEOUT = 300.0  # seconds a multi-worker task waits for the others to start (--cluster-timeout)


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

    @property
    def address(self) -> str:
        """This task's "host:port"."""
        return self.jobs[self.task_type][self.task_index]

    @property
    def peers(self) -> list[str]:
        """The "host:port" of every other task."""
        return [a for job in ("chief", "worker") for k, a in enumerate(self.jobs.get(job, ()))
                if (job, k) != (self.task_type, self.task_index)]


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


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _is_up(address: str, timeout: float) -> bool:
    """Whether something accepts TCP connections at "host:port" (a peer's `wait_for_peers` or its server)."""
    try:
        socket.create_connection(_split_address(address), timeout=timeout).close()
        return True
    except OSError:
        return False


def wait_for_peers(cluster: Cluster, timeout: float = CLUSTER_TIMEOUT, poll: float = 0.25) -> None:
    """Wait until every other task of `cluster` is up, in Python, where Ctrl-C and SIGTERM are honoured.

    This task listens on its own address meanwhile (the port its TensorFlow server takes next), so
    that the others see it up; a peer is up when its address accepts a connection, whether its own
    wait or its server does (a peer past its wait has closed its listener and started its server).
    Nothing is sent: a connection is opened and closed. Raises TfcapError naming the tasks that did
    not come within `timeout` seconds, and Interrupted on Ctrl-C.
    """
    peers = cluster.peers
    if not peers:
        return
    _, port = _split_address(cluster.address)
    try:
        if socket.has_dualstack_ipv6():
            listener = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
        else:
            listener = socket.create_server(("", port))
    except OSError as e:
        raise TfcapError(f"cannot listen on {cluster.address}, this task's address in TF_CONFIG: "
                         f"{e.strerror or e}") from None
    deadline, missing = time.monotonic() + timeout, list(peers)
    try:
        while True:
            missing = [a for a in missing if not _is_up(a, poll)]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TfcapError(f"multi-worker: {len(missing)} of the {len(peers)} other tasks did not start within "
                                 f"{timeout:g} s ({', '.join(missing)}); start tfcap train on each machine of TF_CONFIG, "
                                 "or wait longer with --cluster-timeout")
            time.sleep(poll)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted while waiting for the other tasks of the cluster ({', '.join(missing)})") from None
    finally:
        listener.close()


@contextlib.contextmanager
def _signals_end_the_process():
    """Ctrl-C ends the process at once for the block (its C++ wait runs no Python handler), and SIGTERM
    does so after it too: creating MultiWorkerMirroredStrategy installs a C++ handler that takes
    SIGTERM as a preemption notice tfcap does not use, so SIGTERM would do nothing for the whole run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def placement(strategy: str = "auto", devices: str = "", environ=os.environ,
              cluster_timeout: float = CLUSTER_TIMEOUT) -> Placement:
    """The strategy for `--strategy` and `--devices` (comma-separated, e.g. "GPU:0,GPU:1"; "": all GPUs).

    Multi-worker waits for the other tasks of TF_CONFIG's cluster for `cluster_timeout` seconds at most
    (`wait_for_peers`). Raises TfcapError for multi-worker without or with a malformed TF_CONFIG, tasks
    that did not start in time, a device that is not visible, or mirrored over fewer than two devices.
    """
    if strategy not in STRATEGIES:
        raise TfcapError(f"--strategy must be one of {', '.join(STRATEGIES)}")
    if strategy == "multi-worker":
        if devices:
            raise TfcapError("--devices goes with --strategy mirrored or one-device; multi-worker uses each "
                             "machine's GPUs (or its CPU)")
        cluster = parse_tf_config(environ.get("TF_CONFIG"))
        wait_for_peers(cluster, cluster_timeout)
        with _signals_end_the_process():  # all are up: this wait is short, unless one died since
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
