"""`python -m fedsim.client`: resolve this client's range, then run its loop."""

from __future__ import annotations

import logging
import sys
import time

from fedsim import cli, config

log = logging.getLogger("fedsim.client")


def _main() -> int:
    settings = config.load()
    # Imported here so that a bad setting is reported before TensorFlow loads.
    from fedsim.client import identity, loop, training, transport

    me = identity.resolve(settings)
    log.info("%s", me.describe(settings.num_images_train))
    threads = training.threads_for(settings)
    training.configure_tensorflow(threads)
    started = time.monotonic()
    learner = training.Trainer(settings, me.first, me.last, seed_offset=me.index)
    log.info(
        "%s: %s, %d epochs, batch %d, %s learning rate %g, TensorFlow threads %d; range from %s",
        me.client_id,
        settings.model,
        settings.epochs,
        settings.batch_size,
        settings.optimizer,
        settings.learning_rate,
        threads,
        me.source,
    )
    policy = transport.RetryPolicy(settings.max_retry, settings.max_wait)
    link = transport.Transport(
        settings.aggregator_url, policy=policy, timeout=settings.http_timeout
    )
    client = loop.Client(settings, me, link, learner)
    try:
        strategy = client.wait_ready()
        # fedavg runs in rounds; async-weighted and fedasync take one pass.
        summary = client.run_fedavg() if strategy == "fedavg" else client.run_async()
    except (loop.AggregatorUnreachable, transport.ProtocolError) as exc:
        print(f"fedsim client: error: {me.client_id}: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        link.close()
    log.info("%s", summary.line(me.client_id, time.monotonic() - started))
    return 0


def main() -> None:
    cli.setup_logging()
    sys.exit(cli.run("client", _main))


if __name__ == "__main__":
    main()
