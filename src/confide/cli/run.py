"""`confide run`: one function on sealed inputs in a local attested enclave (no platform)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from confide.cli.common import EXIT_FAILED, friendly, home, parse_assignments, parse_params, write_new
from confide.client.local import run_function
from confide.enclave.errors import ConfideError
from confide.enclave.function_desc import builtin_source
from confide.enclave.keys import Identity, load_public


@click.command()
@click.argument("function", type=click.Path(dir_okay=False, path_type=Path), required=False)
@click.option(
    "--builtin", default=None, help="run this build's built-in NAME (e.g. infer) instead of FUNCTION"
)
@click.option("--input", "inputs", multiple=True, help="NAME=SEALED_FILE")
@click.option("--output", "outputs", multiple=True, help="NAME=OUT_FILE")
@click.option("--to", "recipients", multiple=True, required=True, help="recipient public line or .pub file")
@click.option("--param", "params", multiple=True, help="KEY=VALUE (VALUE parsed as JSON when it is JSON)")
@click.option("--identity", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--receipt", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option(
    "--accelerator",
    type=click.Choice(["none", "numpy", "cuda", "auto"]),
    default="none",
    show_default=True,
    help="start an (untrusted) accelerator process for the infer built-in's outsourced modes",
)
@friendly
def run(
    function: Path | None,
    builtin: str | None,
    inputs: tuple[str, ...],
    outputs: tuple[str, ...],
    recipients: tuple[str, ...],
    params: tuple[str, ...],
    identity: Path,
    policy_path: Path | None,
    config: Path | None,
    receipt: Path | None,
    accelerator: str,
) -> None:
    """Run FUNCTION (def run(ctx)), or a built-in (--builtin NAME), in an attested enclave on sealed
    inputs; outputs are sealed to --to."""
    here = home()
    ident = Identity.load(identity)
    pubs = [load_public(r) for r in recipients]
    source, label = _function_source(function, builtin)
    in_map = {k: Path(v) for k, v in parse_assignments(inputs, what="--input").items()}
    out_map = {k: Path(v) for k, v in parse_assignments(outputs, what="--output").items()}
    for name, path in in_map.items():
        if not path.is_file():
            raise ConfideError("no such file", where=f"--input {name}={path}")
    param_map = parse_params(params)
    pol = here.policy(policy_path)
    receipt_path = receipt or (next(iter(out_map.values())).with_suffix(".receipt.json") if out_map else None)
    error_path = receipt_path.with_suffix(".error.sealed") if receipt_path else None
    click.echo("starting the enclave…", err=True)
    with here.start_enclave(config, accelerator=None if accelerator == "none" else accelerator) as enc:
        outcome = run_function(
            enc,
            source=source,
            inputs=in_map,
            outputs=out_map,
            recipients=pubs,
            params=param_map,
            identity=ident,
            policy=pol,
            anchors=here.anchors(),
            error_report=error_path,
            say=lambda msg: click.echo(msg, err=True),
        )
    if outcome.claims.simulated:
        click.echo("WARNING: ran on the SIMULATED backend - no protection against the host", err=True)
    if not outcome.ok:
        click.echo(
            f"error: function failed ({outcome.category}); inputs untouched, no output written; "
            f"details sealed to you in {error_path}",
            err=True,
        )
        sys.exit(EXIT_FAILED)
    assert outcome.receipt is not None
    if receipt_path is not None:
        write_new(receipt_path, outcome.receipt["raw"].encode())
    click.echo(f"ran {label} in enclave {outcome.claims.measurement[:16]}… in {outcome.duration_s:.3f} s")
    for name, path in out_map.items():
        click.echo(f"  output {name}: {path} (sealed to {', '.join(p.fingerprint for p in pubs)})")
    if receipt_path is not None:
        click.echo(f"  receipt: {receipt_path} (signed by the enclave, verified)")


def _function_source(function: Path | None, builtin: str | None) -> tuple[str, str]:
    """(source, name to show) of FUNCTION's file or of this build's built-in NAME."""
    if (function is None) == (builtin is None):
        raise ConfideError(
            "give either FUNCTION (a file with def run(ctx)) or --builtin NAME", where="confide run"
        )
    if builtin is not None:
        return builtin_source(builtin), f"built-in {builtin}"
    assert function is not None
    try:
        return function.read_text(encoding="utf-8"), function.name
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfideError(f"cannot read function ({exc})", where=str(function)) from None
