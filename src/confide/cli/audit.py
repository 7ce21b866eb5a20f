"""`confide audit`: the platform's hash-chained audit log, checked."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from confide.cli.common import with_client
from confide.cli.output import emit_json, iso, named, output_option

if TYPE_CHECKING:
    from confide.client.sdk import Client


@click.command(name="audit")
@click.option("--task", "task_id", default=None, help="only this task's events")
@output_option
@with_client
def audit(client: Client, task_id: str | None, fmt: str) -> None:
    """Audit events you may see, with their hash chain checked: every event must match its hash,
    and consecutive events must link. (Events you may not see leave gaps the check cannot span:
    it shows the platform did not alter what you see, not that it showed you everything.)"""
    events = client.audit(task_id)
    names = client.party_names()
    scope = f"task {task_id}" if task_id else "you"
    summary = f"audit chain verified: {len(events)} event(s) visible to {scope}, hashes and links checked"
    if fmt == "json":
        emit_json(
            {
                "verified": True,
                "count": len(events),
                "events": [{**ev, "time_iso": iso(ev.get("time"))} for ev in events],
            }
        )
        click.echo(summary, err=True)
        return
    for ev in events:
        actor = named(str(ev.get("actor", "")), names)
        click.echo(
            f"{ev.get('seq'):>6} {iso(ev.get('time'))} {ev.get('kind'):<24} {actor} {ev.get('detail', '')}"
        )
    click.echo(summary)
