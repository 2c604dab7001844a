"""`mailpipe bench`: the pipeline's throughput against ceilings measured in the same run.

- `cli`: the subcommand's arguments and entry point;
- `run`: the orchestration (a database, AMQP prefix and key of its own, the service as
  `mailpipe run` subprocesses, an SMTP sink process, the phases);
- `load`: the load generator, a process of its own (HTTP with httpx, raw SMTP with aiosmtplib);
- `sink`: the SMTP sink, a process of its own (aiosmtpd, counts and drops every message);
- `hello`: the bare endpoint served by the API's own app when `MAILPIPE_BENCH_HELLO=1`;
- `report`: the progress line, the final table and the JSON document.
"""
