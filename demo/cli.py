"""The ``civicmesh demo`` and ``civicmesh eval`` commands: options only, so that listing
the commands imports no component (the work is in :mod:`demo.demo` and
:mod:`demo.evaluate`)."""

from __future__ import annotations

import argparse
from pathlib import Path

DEMO_DOC = """``civicmesh demo``: the whole pipeline in one process, on embedded defaults.

Simulated city -> edge agents (outbox, signed batches) -> MQTT -> gateway (verify,
countersign) -> MQTT -> ingest (verify, exactly-once write) -> store -> API.

The broker is an embedded amqtt broker on a free port unless ``--mqtt-url`` names one;
the store is a single SQLite file unless ``--database-url`` names PostgreSQL. A simulated
week is backfilled as fast as the pipeline takes it, then the devices stream live until
``--duration`` runs out or Ctrl-C. Shutdown flushes every outbox and waits for ingest
to catch up; whatever could not be delivered stays in the durable outboxes on disk.

Demo keys are derived from the seed so a run is reproducible; never do that in the field
(``civicmesh edge keygen`` makes a random key).
"""


def register_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo",
        help="run the whole pipeline on embedded defaults",
        description=DEMO_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--devices", type=int, default=20, help="simulated devices (default 20)")
    demo.add_argument("--zones", type=int, default=4, help="city zones (default 4)")
    demo.add_argument("--seed", type=int, default=7, help="simulation seed (default 7)")
    demo.add_argument(
        "--dashboard-password",
        help="password of the demo's admin, operator and viewer users (default: random)",
    )
    demo.add_argument("--days", type=float, default=7.0, help="days to backfill (default 7)")
    demo.add_argument(
        "--duration", type=float, default=None, help="seconds to stream live after the backfill"
    )
    demo.add_argument("--mqtt-url", help="use this MQTT broker instead of the embedded one")
    demo.add_argument("--database-url", help="postgresql://... instead of the embedded store")
    demo.add_argument("--host", default="127.0.0.1", help="API bind address (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=8080, help="API port (default 8080; 0 = any)")
    demo.add_argument(
        "--state-dir", type=Path, default=Path("var/demo"), help="where outboxes and keys live"
    )
    demo.add_argument(
        "--keep-state", action="store_true", help="reuse the state dir instead of starting fresh"
    )
    demo.add_argument(
        "--live-interval", type=float, default=5.0, help="seconds between live publishes"
    )
    demo.add_argument(
        "--no-models",
        action="store_true",
        help="no edge models (default: the first zone's devices run the fault model, "
        "trained once on a slice of the real data and installed as a signed release)",
    )
    demo.set_defaults(func=_run_demo)


def register_eval(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ev = sub.add_parser("eval", help="evaluate the report API and the reports")
    ev_cmds = ev.add_subparsers(dest="eval_command", metavar="WHAT", required=True)
    for name, func, text in (
        ("ask", _eval_ask, "intent accuracy, faithfulness and latency of /ask"),
        ("reports", _eval_reports, "faithfulness and latency of daily and weekly reports"),
    ):
        p = ev_cmds.add_parser(name, help=text)
        p.add_argument("--llm-backend", choices=("llama-cpp", "openai", "none"))
        p.add_argument("--llm-url", help="endpoint for --llm-backend openai")
        p.add_argument("--model-path", type=Path, help="a GGUF file for llama-cpp")
        p.add_argument("--questions", help="question set JSON (default: the shipped one)")
        p.add_argument("--limit", type=int, help="only the first N questions")
        p.add_argument("--json", action="store_true", help="print the figures as JSON")
        p.set_defaults(func=func)


def _run_demo(args: argparse.Namespace) -> int:
    from demo.demo import run_demo

    return run_demo(args)


def _eval_ask(args: argparse.Namespace) -> int:
    from demo.evaluate import eval_ask

    return eval_ask(args)


def _eval_reports(args: argparse.Namespace) -> int:
    from demo.evaluate import eval_reports

    return eval_reports(args)
