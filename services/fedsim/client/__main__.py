"""`python -m fedsim.client`: a worker that takes tasks from the aggregator.

Started by hand in a terminal it first asks for a Client Id, as the original
client did (see handstart.py); Enter alone makes it a worker.
"""

from __future__ import annotations

import logging
import sys
import time

from fedsim import allocator, cli, config, tokens

log = logging.getLogger("fedsim.client")


def _main() -> int:
    settings = config.load()
    # Imported here so that a bad setting is reported before TensorFlow loads.
    from fedsim import tfruntime
    from fedsim.client import handstart, outbox, records, transport, worker

    tfruntime.keep_pyplot_out()  # a worker draws nothing: no font cache at its start

    typed = handstart.ask(settings, input, print) if sys.stdin.isatty() else None
    policy = transport.RetryPolicy(settings.max_retry, settings.max_wait)
    token = settings.client_token or tokens.workers_secret(settings.tokens_file)
    verify: str | bool = True
    if settings.aggregator_url.startswith("https://") and settings.tls_ca is not None:
        if not settings.tls_ca.is_file():
            raise config.ConfigError(
                "TLS_CA",
                str(settings.tls_ca),
                "no such file: run scripts/make-certs.sh (or leave TLS_CA empty for the "
                "system's CAs)",
            )
        verify = str(settings.tls_ca)
    link = transport.Transport(
        settings.aggregator_url,
        policy=policy,
        timeout=settings.http_timeout,
        token=token,
        verify=verify,
    )
    started = time.monotonic()

    def make_learner(workers: int) -> records.Learner:
        threads = tfruntime.threads_for(settings.tf_threads, workers)
        tfruntime.configure(threads)
        from fedsim.client.training import Trainer

        log.info(
            "TensorFlow threads %d (%d workers live), memory allocator: %s",
            threads,
            workers,
            allocator.name(),
        )
        return Trainer(
            settings.data_dir, verify=settings.data_verify, model=settings.model, seed=settings.seed
        )

    try:
        if typed is not None:
            name = typed.client_id
            learner = make_learner(1)
            box = outbox.Outbox(
                name,
                link,
                outbox.Counts(),
                clock=time.monotonic,
                sleep=time.sleep,
                idle_save_seconds=settings.idle_save_seconds,
            )
            summary = handstart.run(settings, typed, link, learner, box)
        else:
            me = worker.Worker(settings, link, make_learner, warm_up=tfruntime.import_tensorflow)
            summary = me.run()
            name = me.name
    except (worker.AggregatorUnreachable, transport.ProtocolError) as exc:
        print(f"fedsim client: error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        link.close()
    log.info("%s", summary.line(name, time.monotonic() - started))
    return 0


def main() -> None:
    cli.setup_logging()
    sys.exit(cli.run("client", _main))


if __name__ == "__main__":
    main()
