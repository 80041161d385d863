"""Training steps/s of tfcap's train step under a tf.distribute strategy, on cached features.

    python tools/bench_strategy.py RECORDS [--strategy one-device|mirrored] [--logical-cpus 2]
                                   [--devices CPU:0,CPU:1] [--seconds 30] [--repeats 3]

The real train step (`train._Trainer`) on the real input pipeline (`inputs.caption_batches`, split
over replicas by `distribute.replica_batches`) of a merge decoder on pooled features, the sizes of
`bench_train.py`. `--logical-cpus N` splits the CPU into N logical devices (before TensorFlow
starts), which is how a CPU-only machine runs `mirrored`. Prints global steps/s and target
tokens/s after the first step (tracing), the median of `--repeats` timed runs.

It also runs on a tfcap from before `--strategy` (no `tfcap.distribute`; PYTHONPATH pointing at an
older checkout), with --strategy one-device: the baseline the default path must not fall behind.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from bench_train import cached_merge_model, merge_model_parser  # tools/ is this script's sys.path[0]


def main() -> None:
    parser = merge_model_parser(__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=["one-device", "mirrored"], default="one-device")
    parser.add_argument("--devices", default="")
    parser.add_argument("--logical-cpus", type=int, default=0)
    args = parser.parse_args()

    import tensorflow as tf

    if args.logical_cpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.logical_cpus)

    import tfcap
    from tfcap import inputs, model, train

    try:
        from tfcap import distribute
    except ImportError:  # a tfcap from before --strategy
        distribute = None
    if distribute is None and args.strategy != "one-device":
        raise SystemExit(f"{tfcap.__file__}: a tfcap from before --strategy runs one-device only")
    placement = distribute.placement(args.strategy, args.devices) if distribute else None
    print(f"tfcap at {Path(tfcap.__file__).parent}; strategy {placement.name if placement else 'none (before --strategy)'}"
          f", {placement.replicas if placement else 1} replica(s)", flush=True)

    vocab, enc, cached, config = cached_merge_model(args)
    scope = placement.strategy.scope() if placement else tf.distribute.get_strategy().scope()
    with scope:
        captioner = model.Captioner(config, enc, model.build_decoder(config, enc.feature_dim, 1), vocab)
        extra = {"placement": placement} if placement else {}
        trainer = train._Trainer(captioner, train.TrainConfig(batch_size=args.batch_size), total_steps=10**6,
                                 run_dir=Path("/tmp/tfcap-bench-strategy"), **extra)

    def batches(epoch: int):
        make = lambda: inputs.caption_batches(cached, batch_size=args.batch_size, feature_keys=("pooled",),  # noqa: E731
                                              shuffle=True, epoch=epoch)
        if not placement:
            return make()
        data = distribute.replica_batches(placement, make)
        trainer.batch_spec = trainer.batch_spec or data.element_spec  # as `fit` does: one trace
        return data

    def run() -> tuple[float, float]:
        steps, tokens, start, epoch = 0, 0.0, None, 0
        while True:
            for batch in batches(epoch):
                _, n = trainer.train_step(*batch)
                if start is None:  # first step: tracing and warm-up, not timed
                    float(n)
                    start = time.perf_counter()
                    continue
                steps, tokens = steps + 1, tokens + float(n)
                if time.perf_counter() - start > args.seconds:
                    seconds = time.perf_counter() - start
                    return steps / seconds, tokens / seconds
            epoch += 1

    results = []
    for r in range(args.repeats):
        results.append(run())
        print(f"run {r + 1}: {results[-1][0]:.2f} steps/s, {results[-1][1]:,.0f} tokens/s", flush=True)
    steps, tokens = (statistics.median(x) for x in zip(*results))
    print(f"median of {args.repeats}: {steps:.2f} steps/s, {tokens:,.0f} tokens/s")


if __name__ == "__main__":
    main()
