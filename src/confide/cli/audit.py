"""`confide audit`: the platform's hash-chained audit log, checked."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from confide.cli.common import with_client

if TYPE_CHECKING:
    from confide.client.sdk import Client


@click.command(name="audit")
@click.option("--task", "task_id", default=None, help="only this task's events")
@with_client
def audit(client: Client, task_id: str | None) -> None:
    """Audit events you may see, with their hash chain checked."""
    for ev in client.audit(task_id):
        click.echo(
            f"{ev.get('seq'):>6} {ev.get('time')} {ev.get('kind'):<18} {ev.get('actor', '')[:20]:<20} {ev.get('detail', '')}"
        )
