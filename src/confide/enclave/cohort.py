"""A data owner's standing cohort rule, checked by the enclave before any input is decrypted.

An owner may seal ``{"policy": {"min_k": k}}`` into its dataset's header metadata at upload
(``confide dataset upload --min-k K``). Such a dataset is read only by a built-in that enforces a
cohort threshold (``join-aggregate`` and ``describe``: ``params.k``; ``sql``:
``params.rule.min_group_size``) of at least k; every other function is refused, whatever its
approvals say, so an approval given in haste cannot release rows or small groups of that dataset.
With several such inputs the strictest rule wins. The header is read before the data key is used;
the host cannot drop the rule by editing it, because the bytes of the whole file are hashed against
the approved ``ciphertext_sha256`` as they are decrypted (a changed header fails the task), and the
header MAC is under the owner's data key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import FormatError, PolicyError
from .manifest import Manifest

POLICY_KEY = "policy"
MAX_K = 10**9
# built-in -> the path of its cohort threshold in params
THRESHOLDS: dict[str, tuple[str, ...]] = {
    "join-aggregate": ("k",),
    "describe": ("k",),
    "sql": ("rule", "min_group_size"),
}


def owner_min_k(metadata: Mapping[str, Any], *, where: str) -> int | None:
    """The min_k an owner sealed in a dataset's header metadata, or None."""
    policy = metadata.get(POLICY_KEY)
    if policy is None:
        return None
    if not isinstance(policy, dict) or set(policy) != {"min_k"}:
        raise FormatError('the dataset\'s policy must be {"min_k": k}', where=where)
    k = policy["min_k"]
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= MAX_K:
        raise FormatError(f"the dataset's policy min_k must be an integer in 2..10^9, got {k!r}", where=where)
    return k


def task_threshold(m: Manifest) -> int | None:
    """The cohort threshold the task's built-in enforces, or None (it enforces none)."""
    path = THRESHOLDS.get(m.function.name) if m.function.kind == "builtin" else None
    if path is None:
        return None
    value: Any = m.params
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def check(m: Manifest, rules: Mapping[str, int]) -> None:
    """Refuse the task unless its threshold meets every input's rule (input name -> min_k)."""
    if not rules:
        return
    name = max(sorted(rules), key=lambda n: rules[n])  # the strictest, the first by name on a tie
    need = rules[name]
    k = task_threshold(m)
    if k is None:
        raise PolicyError(
            f"the owner of input {name!r} allows only aggregates over groups of at least {need} "
            f"(join-aggregate, sql or describe with that threshold); {m.function.name!r} enforces none",
            where=f"input {name!r}",
        )
    if k < need:
        raise PolicyError(
            f"the owner of input {name!r} requires a cohort threshold of at least {need}; this task's is {k}",
            where=f"input {name!r}",
        )
