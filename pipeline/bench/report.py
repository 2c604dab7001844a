"""What `mailpipe bench` shows: a progress line while it runs, then a table (or JSON)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

INGEST_GOAL = 0.6
INGEST_P99_GOAL_MS = 100.0
DELIVERY_GOAL = 0.5
BUSY_CPU = 0.9
"""A process using this share of a core (or more) is probably what limits the phase."""


class Progress:
    """One line on stderr, redrawn in place on a terminal; plain lines otherwise."""

    def __init__(self, stream: TextIO = sys.stderr, *, quiet: bool = False) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._quiet = quiet
        self._last = ""

    def step(self, text: str) -> None:
        """A new stage: ends any bar in place and prints `text`."""
        if self._quiet:
            return
        self._clear()
        self._stream.write(f"bench: {text}\n")
        self._stream.flush()

    def bar(self, label: str, fraction: float, detail: str) -> None:
        """The current stage's progress; only drawn on a terminal."""
        if self._quiet or not self._tty:
            return
        fraction = min(max(fraction, 0.0), 1.0)
        width = 30
        filled = round(fraction * width)
        line = f"  {label:<10} [{'#' * filled}{'.' * (width - filled)}] {fraction:4.0%}  {detail}"
        self._stream.write("\r" + line.ljust(len(self._last)))
        self._stream.flush()
        self._last = line

    def done(self) -> None:
        self._clear()

    def _clear(self) -> None:
        if self._last and self._tty:
            self._stream.write("\r" + " " * len(self._last) + "\r")
            self._stream.flush()
        self._last = ""


@dataclass
class Report:
    """Everything one run measured; `as_json()` is the `--json` document."""

    setup: dict[str, Any]
    ingest: dict[str, Any] | None = None
    delivery: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "setup": self.setup,
            "ingest": self.ingest,
            "delivery": self.delivery,
            "cpu_ms_per_item": cpu_ms_per_item(self),
            "notes": self.notes,
        }


_PHASE_RATES = {
    "hello": ("ingest", "hello"),
    "ingest": ("ingest", "accept"),
    "delivery": ("delivery", "pipeline"),
    "raw smtp": ("delivery", "raw"),
}
"""The phases whose CPU shares divide by a rate: the measurement whose rate it is."""


def cpu_ms_per_item(report: Report) -> dict[str, dict[str, float]]:
    """Milliseconds of CPU each process spent per request (ingest phases) or per email
    (delivery phases): what a phase costs, whatever the machine's other load did to its rate.
    A process's share of a core divided by the phase's rate."""
    out: dict[str, dict[str, float]] = {}
    for phase, shares in (report.setup.get("cpu_by_phase") or {}).items():
        where = _PHASE_RATES.get(phase)
        section = getattr(report, where[0]) if where else None
        run = (section or {}).get(where[1]) if where else None
        rate = (run or {}).get("rate")
        if not rate:
            continue
        out[phase] = {
            name: 1000 * share / rate
            for name, share in shares.items()
            if name not in ("machine", "other") and share >= 0.005
        }
    return out


def cost_lines(report: Report) -> list[str]:
    """The table's lines of `cpu_ms_per_item` (none when nothing was measured)."""
    per_item = cpu_ms_per_item(report)
    if not per_item:
        return []
    lines = ["", "CPU per request (ingest) or per email (delivery), ms of one core:"]
    for phase, costs in per_item.items():
        parts = ", ".join(f"{k} {v:.2f}" for k, v in costs.items())
        lines.append(f"  {phase:<9} {parts}, all {sum(costs.values()):.2f}")
    return lines


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _row(cells: list[str], widths: list[int]) -> str:
    first, *rest = cells
    return (
        "  "
        + first.ljust(widths[0])
        + "".join(c.rjust(w) for c, w in zip(rest, widths[1:], strict=False))
    ).rstrip()


def table(report: Report) -> str:
    s = report.setup
    lines = [
        f"mailpipe bench: {s['cpus']} CPUs, Python {s['python']}, "
        f"{'uvloop' if s['uvloop'] else 'asyncio'}",
    ]
    for group in s["processes"]:
        lines.append(f"  {group['count']} x {group['what']}: {group['command']}")
    widths = [26, 11, 11, 11, 8, 12, 12]
    if report.ingest is not None:
        ing = report.ingest
        lines += [
            "",
            f"ingest: {s['concurrency']} HTTP/1.1 keep-alive clients ({s['client']}), "
            f"{s['rounds']} x {_num(s['seconds'], 0)} s of each in ABBA order "
            f"(after {_num(s['warmup_s'], 0)} s warm-up each)",
            _row(["", "req/s", "p50 ms", "p99 ms", "errors", "server cpu", "client cpu"], widths),
        ]
        for name, label in (("hello", "GET /bench/hello (ceiling)"), ("accept", "POST /v1/emails")):
            r = ing.get(name)
            if r is None:
                lines.append(_row([label, "n/a"], widths))
                continue
            lines.append(
                _row(
                    [
                        label,
                        _num(r["rate"]),
                        _num(r["p50_ms"]),
                        _num(r["p99_ms"]),
                        str(r["errors"]),
                        _pct(r.get("server_cpu")),
                        _pct(r["cpu"]),
                    ],
                    widths,
                )
            )
        rounds = [
            f"{label} {', '.join(f'{x:,.0f}' for x in ing[name]['rounds'])}"
            for name, label in (("hello", "hello"), ("accept", "ingest"))
            if ing.get(name) and len(ing[name].get("rounds", ())) > 1
        ]
        if rounds:
            lines.append("  per round (req/s): " + "; ".join(rounds))
        ratio = ing.get("ratio")
        lines.append(
            f"  ratio {_num(ratio, 2)}  (goal ≥ {INGEST_GOAL}, p99 < {INGEST_P99_GOAL_MS:g} ms)"
        )
    if report.delivery is not None:
        d = report.delivery
        lines += [
            "",
            f"delivery: {s['emails']} emails, {s['smtp_connections']} SMTP connections to "
            f"{s['sink']}",
            _row(
                ["", "emails/s", "p50 ms", "p99 ms", "errors", "server cpu", "client cpu"], widths
            ),
        ]
        raw = d.get("raw")
        if raw is not None:
            lines.append(
                _row(
                    [
                        "raw aiosmtplib (ceiling)",
                        _num(raw["rate"]),
                        _num(raw["p50_ms"]),
                        _num(raw["p99_ms"]),
                        str(raw["errors"]),
                        "-",
                        _pct(raw["cpu"]),
                    ],
                    widths,
                )
            )
        pipe = d.get("pipeline")
        if pipe is not None:
            lines.append(
                _row(
                    [
                        "queue → sink (pipeline)",
                        _num(pipe["rate"]),
                        _num(pipe["p50_ms"]),
                        _num(pipe["p99_ms"]),
                        str(pipe["errors"]),
                        _pct(pipe.get("server_cpu")),
                        "-",
                    ],
                    widths,
                )
            )
            lines.append(
                "  (pipeline p50/p99: accept to 250 of a pre-filled backlog; claim to 250: "
                f"p50 {_num(pipe.get('send_p50_ms'))} ms, p99 {_num(pipe.get('send_p99_ms'))} ms)"
            )
        if raw is not None and len(raw.get("rounds", ())) > 1:
            before, after = raw["rounds"][0], raw["rounds"][-1]
            lines.append(f"  raw ceiling before / after the pipeline: {before:,.0f} / {after:,.0f}")
        if pipe is not None and pipe.get("sender_peak_rss_mb") is not None:
            lines.append(f"  sender peak RSS: {pipe['sender_peak_rss_mb']:.0f} MB")
        lines.append(f"  ratio {_num(d.get('ratio'), 2)}  (goal ≥ {DELIVERY_GOAL})")
    cpu = s.get("cpu_by_phase")
    if cpu:
        lines += [
            "",
            "CPU by phase, in % of one core (machine: all of it; other: whatever else runs):",
        ]
        for phase, shares in cpu.items():
            parts = ", ".join(f"{k} {_pct(v)}" for k, v in shares.items())
            lines.append(f"  {phase:<9} {parts}")
    lines += cost_lines(report)
    if report.notes:
        lines.append("")
        lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)
