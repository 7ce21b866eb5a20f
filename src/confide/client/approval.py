"""What a party approves, for people: the text a person reads before signing a task manifest.

It runs only on the party's own machine (the SDK's `task show` / `task approve`), never in the
enclave, so it lives outside the TCB: the enclave checks the signed manifest digest, not this text.
Everything in it that other parties wrote is made safe to print (no terminal control sequences).
"""

from __future__ import annotations

import time

from confide.enclave.encoding import canonical_json
from confide.enclave.manifest import Manifest
from confide.enclave.padding import describe_pad


def _clean(text: str) -> str:
    """Text from other parties, safe to print (no terminal control sequences)."""
    return "".join(c if c.isprintable() or c == "\n" else f"\\u{ord(c):04x}" for c in text)


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.4g} {unit}"
    return f"{n} bytes"


def describe_manifest(manifest: Manifest) -> str:
    """Exactly what an approval of this manifest consents to, for a person to read."""
    m = manifest
    fn = m.function
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(m.created_at))
    lines = [
        f"Task {m.task_id}",
        f"  manifest sha256: {m.digest}",
        f"  enclave service: {m.service}",
        f"  created by:      {_clean(m.name_of(m.creator))} at {when}",
        "",
        f"Function {fn.name!r} version {fn.version} ({'built into the enclave' if fn.kind == 'builtin' else 'Python'})",
        f"  digest:       {m.function_digest}",
        f"  source sha256: {fn.source_sha256}",
        f"  owner:        {_clean(m.name_of(fn.owner)) if fn.owner else '- (part of the measured enclave)'}",
        "  code:         "
        + (
            "CONFIDENTIAL: only the enclave reads it; you approve it by digest and description"
            if m.confidential
            else "readable by participants (check it against the source sha256)"
        ),
        f"  requires:     {', '.join(fn.requirements) or '-'}",
        "  description:  " + _clean(fn.description).replace("\n", "\n                "),
        "",
        "Parameters:",
    ]
    if m.params:
        lines += [
            f"  {_clean(k)} = {_clean(canonical_json(v).decode())}" for k, v in sorted(m.params.items())
        ]
    else:
        lines.append("  (none)")
    lines += ["", "Inputs (the enclave unlocks each only with its owner's approval):"]
    lines += [
        f"  {i.name}: dataset {i.dataset_id} of {_clean(m.name_of(i.owner))}, ciphertext sha256 {i.ciphertext_sha256}"
        for i in m.inputs
    ] or ["  (none)"]
    lines += ["", "Outputs (sealed to these recipients only):"]
    for o in m.outputs:
        pad = "" if o.pad is None else f", {describe_pad(o.pad)}"
        lines.append(
            f"  {o.name} (at most {_size(o.max_bytes)}{pad}) -> {', '.join(_clean(m.name_of(r)) for r in o.recipients)}"
        )
    lines += [
        f"  if the function fails, at most {_size(m.error_cap)} of its error text (it may quote input data)"
        f" is sealed to: {', '.join(_clean(m.name_of(r)) for r in m.error_recipients())}"
        " (the host sees only that cap)",
        "  the host sees each unpadded output's exact size and every run's duration",
        "",
    ]
    from confide.client.analytics import describe  # psi / join-aggregate: what each output releases
    from confide.client.custody import describe as describe_custody
    from confide.client.flow_approval import describe as describe_flow
    from confide.client.inference import describe as describe_inference
    from confide.client.ml_tasks import describe as describe_ml
    from confide.client.ordered_join import describe as describe_ordered_join

    analytics = describe(m, _clean) + describe_inference(m, _clean) + describe_flow(m, _clean)
    analytics += describe_ml(m, _clean)
    analytics += describe_ordered_join(m, _clean) + describe_custody(m, _clean)
    lines += [*analytics, ""] if analytics else []
    lines += [
        "The enclave runs it only with approvals of this exact manifest by: "
        + (", ".join(_clean(m.name_of(fp)) for fp in m.required_approvals()) or "nobody (no inputs)"),
        "",
        "Participants:",
    ]
    lines += [f"  {p.name}: {p.fingerprint}" for p in m.participants]
    return "\n".join(lines)


__all__ = ["describe_manifest"]
