"""The `confide` command. Every failure prints `error: <what> (<where>)` and exits non-zero:
1 for a refused or failed operation, 2 for bad usage; never a traceback.

Each command group lives in its own module, imported only when that command runs, so that
`confide --help` and every command start without importing what they do not use.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import sys
import threading
from typing import Any

import click

from confide import __version__

# name -> (module, attribute, one-line help). The help line is here so `--help` imports nothing.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "keygen": ("files", "keygen", "Create a party identity: NAME.key (private) and NAME.pub (shareable)."),
    "encrypt": ("files", "encrypt", "Seal a file to one or more recipients."),
    "decrypt": ("files", "decrypt", "Open a sealed file addressed to you."),
    "measure": ("enclave", "measure_cmd", "Print the measurement of the installed enclave runtime."),
    "verify": ("verify", "verify", "Verify TEE evidence (sim, SGX/TDX, SEV-SNP, Nitro) against a policy."),
    "endorse": ("verify", "endorse", "As an auditor, sign a measurement."),
    "policy": ("policy", "policy", "Verification policies."),
    "platform": ("enclave", "platform", "The simulated TEE platform of this installation."),
    "enclave": ("enclave", "enclave", "Start the local enclave runtime and talk to it."),
    "run": ("run", "run", "Run a function on sealed inputs in a local attested enclave."),
    "party": ("party", "party", "Parties registered on a platform."),
    "whoami": ("party", "whoami", "Your fingerprint and the name the platform has for you."),
    "service": ("service", "service", "The platform's enclave service."),
    "dataset": ("dataset", "dataset", "Datasets: encrypted on your machine, key wrapped to the service."),
    "function": ("function", "function", "Functions: built-ins or your own run(ctx) code."),
    "task": ("task", "task", "Tasks: create, review, approve, run, fetch results."),
    "audit": ("audit", "audit", "The platform's audit log, hash chain checked."),
    "model": (
        "model",
        "model",
        "ONNX models for the infer built-in: sealed here, key wrapped to the service.",
    ),
    "flow": (
        "flow",
        "flow",
        "Confidential dataflow jobs: functions in enclaves, the engine sees ciphertext.",
    ),
    "ui": ("ui", "ui", "Your web console on 127.0.0.1: review, approve, run, results, audit."),
    "serve": ("serve", "serve", "Run the platform server (the untrusted host)."),
    "gramine": ("gramine", "gramine", "Gramine-SGX deployment files."),
}

ENVIRONMENT = """\b
Environment:
  CONFIDE_HOME      your Confide directory (default ~/.confide): policy.toml, caches, pins
  CONFIDE_URL       platform URL for party commands (default http://127.0.0.1:8470)
  CONFIDE_IDENTITY  your private identity file (confide keygen NAME)
  CONFIDE_POLICY    verification policy (confide policy init [--dev])
  CONFIDE_SIM_ROOT  a SIMULATED platform's vendor_root.crt to trust (development only)
  CONFIDE_PCCS_URL  Intel PCCS for SGX/TDX collateral"""


def _usage_where(exc: click.UsageError) -> str:
    """Where a usage error is: the option or argument as the user types it, else the command."""
    param = getattr(exc, "param", None)
    if isinstance(param, click.Option) and param.opts:
        return "/".join(param.opts)  # -o/--output-format: whichever the user typed
    if isinstance(param, click.Parameter):
        return param.human_readable_name
    option = getattr(exc, "option_name", None)
    if isinstance(option, str) and option:
        return option
    return exc.ctx.command_path if exc.ctx is not None else "confide"


def _show_usage_error(self: click.UsageError, file: Any = None) -> None:
    """Click's usage errors in the CLI's one format: the usage line, the help hint, then
    `error: <what> (<where>)`; the exit code stays 2."""
    lines = []
    if self.ctx is not None:
        lines.append(self.ctx.get_usage())
        if self.ctx.command.get_help_option(self.ctx) is not None:
            lines.append(f"Try '{self.ctx.command_path} {self.ctx.help_option_names[0]}' for help.")
    lines.append(f"error: {self.format_message()} ({_usage_where(self)})")
    click.echo("\n".join(lines), file=file, err=file is None)


click.UsageError.show = _show_usage_error  # type: ignore[method-assign]


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None:
            return None
        module = importlib.import_module(f"confide.cli.{entry[0]}")
        command: click.Command = getattr(module, entry[1])
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_line) for name, (_, _, help_line) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=ENVIRONMENT,
)
@click.version_option(__version__, prog_name="confide")
def main() -> None:
    """Confide: confidential computing among parties who do not trust each other.

    The default TEE backend is a SIMULATION: it gives no protection against the host.
    """


def entry() -> None:
    """The `confide` console script: `main`, then a quick exit.

    A finished command leaves with `os._exit` once its output is flushed and the `atexit` handlers
    have run: the interpreter's own teardown (freeing every imported module) does nothing a finished
    command needs and costs ~40 ms here, a quarter of a client command. Where another thread is
    still alive (a server draining) the process exits the usual way, which waits for it."""
    try:
        main()
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    status = code if isinstance(code, int) else (0 if code is None else 1)
    if threading.active_count() > 1:
        sys.exit(status)
    getattr(atexit, "_run_exitfuncs", lambda: None)()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (| head): nothing to say to it
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    entry()
