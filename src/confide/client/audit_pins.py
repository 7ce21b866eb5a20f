"""Client side of the audit log (PROTOCOL.md section 7): a chain the host cannot truncate or rewrite
unnoticed.

A party keeps, per platform (keyed by its service fingerprint), in ``$CONFIDE_HOME/audit-pins.json``:
the newest ``(seq, sha256)`` it verified (the pin), the hashes of the events it was shown, and the
audit heads signed by the enclave in receipts it accepted. Every later answer must *extend* the pin:
the client fetches the links ``{seq, prev_sha256, body_sha256, sha256}`` from the oldest event it is
shown (or the pin, whichever is older) to the platform's head, recomputes each link's hash, checks
that they form one chain ending at the head, that every event shown is in it, and that every hash it
remembers within that range is unchanged. A link hides an event's content (only its
``body_sha256``), so any party can check the chain across other parties' events.

When a remembered hash no longer matches, the client looks back to its oldest remembered hash to
name the first event that changed, and refuses with `AuditRewritten` (``.seq``). A receipt's
``audit_head`` is signed by the enclave: a chain that does not contain it is a rewrite a third
party can check against the signed receipt and the platform's own links.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from confide.client.audit_chain import GENESIS, MAX_LINKS, event_hash, link_hash
from confide.enclave.errors import ConfideError, IntegrityError

PINS_FORMAT = "confide-audit-pins-v1"
FetchLinks = Callable[[int, int], Mapping[str, Any]]  # (first, last) -> {"links": [...], "head": {...}}


class AuditRewritten(IntegrityError):
    """The platform's audit chain no longer contains an event this party verified (or that a
    receipt signed): `seq` is the first such event."""

    def __init__(self, seq: int, message: str, *, where: str) -> None:
        super().__init__(message, where=where)
        self.seq = seq


def check_audit_chain(events: Sequence[Mapping[str, Any]], *, where: str) -> None:
    """Each event's sha256 must be its chain hash (recomputed); where two events we see are
    consecutive (seq n, n+1), the later one must link to the earlier one."""
    prev: Mapping[str, Any] | None = None
    for ev in sorted(events, key=lambda e: int(e.get("seq", 0))):
        try:
            ok = event_hash(ev) == ev.get("sha256")
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise IntegrityError(f"audit event {ev.get('seq')} does not match its hash", where=where)
        if (
            prev is not None
            and int(ev["seq"]) == int(prev["seq"]) + 1
            and ev.get("prev_sha256") != prev["sha256"]
        ):
            raise IntegrityError(
                f"audit event {ev.get('seq')} does not link to event {prev['seq']}", where=where
            )
        prev = ev


def _head(value: Any, where: str) -> tuple[int, str]:
    if (
        not isinstance(value, Mapping)
        or not isinstance(value.get("seq"), int)
        or not isinstance(value.get("sha256"), str)
    ):
        raise IntegrityError("the platform's audit head is malformed", where=where)
    return int(value["seq"]), str(value["sha256"])


class PinStore:
    """The pins file: {format, platforms: {service fp: {head, seen, receipts}}}, written atomically (0600)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.data: dict[str, Any] = {"format": PINS_FORMAT, "platforms": {}}
        if path is not None and path.exists():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ConfideError(f"cannot read the audit pins ({exc})", where=str(path)) from None
            if (
                not isinstance(data, dict)
                or data.get("format") != PINS_FORMAT
                or not isinstance(data.get("platforms"), dict)
            ):
                raise ConfideError("not an audit pins file", where=str(path))
            self.data = data

    def platform(self, key: str) -> dict[str, Any]:
        entry = self.data["platforms"].setdefault(key, {})
        entry.setdefault("head", None)
        entry.setdefault("seen", {})
        entry.setdefault("receipts", {})
        return dict(entry)

    def save(self, key: str, entry: Mapping[str, Any]) -> None:
        self.data["platforms"][key] = dict(entry)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".audit-pins-{os.getpid()}-{os.urandom(4).hex()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self.data, fh, sort_keys=True)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class AuditVerifier:
    """Checks audit answers of one platform against what this party pinned; updates the pins."""

    def __init__(self, store: PinStore, key: str, fetch_links: FetchLinks) -> None:
        self.store = store
        self.key = key
        self.fetch_links = fetch_links

    def _links(self, first: int, last: int, where: str) -> tuple[dict[int, dict[str, Any]], tuple[int, str]]:
        """Links first..last, each hash recomputed, contiguous and linked; and the first answer's head."""
        out: dict[int, dict[str, Any]] = {}
        head: tuple[int, str] | None = None
        seq = first
        while seq <= last:
            answer = self.fetch_links(seq, min(last, seq + MAX_LINKS - 1))
            if head is None:
                head = _head(answer.get("head"), where)
            got = answer.get("links")
            if not isinstance(got, list) or not got:
                raise AuditRewritten(
                    seq, f"audit event {seq} is missing from the platform's chain", where=f"audit event {seq}"
                )
            for link in got:
                w = f"audit event {seq}"
                if not isinstance(link, Mapping) or link.get("seq") != seq:
                    raise AuditRewritten(
                        seq,
                        f"audit event {seq} is missing from the platform's chain (events removed?)",
                        where=w,
                    )
                try:
                    ok = link_hash(seq, str(link["prev_sha256"]), str(link["body_sha256"])) == link["sha256"]
                except KeyError:
                    ok = False
                if not ok:
                    raise AuditRewritten(seq, f"audit event {seq}: its link does not match its hash", where=w)
                prev = out.get(seq - 1)
                expect_prev = prev["sha256"] if prev is not None else (GENESIS if seq == 1 else None)
                if expect_prev is not None and link["prev_sha256"] != expect_prev:
                    raise AuditRewritten(seq, f"audit event {seq} does not link to event {seq - 1}", where=w)
                out[seq] = dict(link)
                seq += 1
                if seq > last:
                    break
        assert head is not None or first > last
        return out, head if head is not None else (0, GENESIS)

    def _first_changed(
        self, marks: Mapping[int, tuple[str, str]], head_seq: int, chain: Mapping[int, Any], where: str
    ) -> None:
        """Raise AuditRewritten for the oldest remembered event (<= head_seq) whose hash changed,
        looking as far back as we remember; return when none did."""
        wanted = sorted(s for s in marks if s <= head_seq)
        if not wanted:
            return
        have = dict(chain)
        missing = [s for s in wanted if s not in have]
        if missing:
            have.update(self._links(missing[0], head_seq if not have else min(have) - 1, where)[0])
        for seq in wanted:
            sha, why = marks[seq]
            if have[seq]["sha256"] != sha:
                raise AuditRewritten(
                    seq,
                    f"the audit log was rewritten: event {seq} ({why}) had sha256 {sha[:16]}…, the "
                    f"platform's chain now has {have[seq]['sha256'][:16]}… there (an event removed or "
                    "altered)",
                    where=f"audit event {seq}",
                )

    def pinned_seq(self) -> int | None:
        """The sequence number of the newest head this party verified on this platform, if any."""
        pin = self.store.platform(self.key)["head"]
        return int(pin["seq"]) if pin is not None else None

    def verify(
        self,
        events: Sequence[Mapping[str, Any]],
        head: Mapping[str, Any],
        *,
        receipts: Sequence[tuple[str, Mapping[str, Any]]] = (),
        where: str,
    ) -> None:
        """`events`: what the platform just showed; `head`: its head now; `receipts`: (task id,
        audit_head signed in that task's receipt) to require in the chain and remember."""
        check_audit_chain(events, where=where)
        pins = self.store.platform(self.key)
        head_seq, head_sha = _head(head, where)
        pin = pins["head"]
        marks: dict[int, tuple[str, str]] = {}  # seq -> (sha256, what remembered it)
        for s, sha in pins["seen"].items():
            marks[int(s)] = (str(sha), "verified before")
        for s, r in pins["receipts"].items():
            marks[int(s)] = (str(r["sha256"]), f"signed by the enclave in the receipt of task {r['task_id']}")
        if pin is not None:
            marks[int(pin["seq"])] = (str(pin["sha256"]), "verified before (the pinned head)")
        for task_id, r in receipts:
            seq = int(r["seq"])
            if seq > head_seq:
                raise AuditRewritten(
                    seq,
                    f"the receipt of task {task_id} (signed by the enclave) names audit event {seq}, "
                    f"beyond the platform's head {head_seq}: the log was truncated",
                    where=f"audit event {seq}",
                )
            marks[seq] = (str(r["sha256"]), f"signed by the enclave in the receipt of task {task_id}")
        if pin is not None and head_seq < int(pin["seq"]):
            self._first_changed(marks, head_seq, {}, where)  # an earlier event rewritten, or:
            raise AuditRewritten(
                head_seq + 1,
                f"the platform's audit log ends at event {head_seq}, but event {pin['seq']} was verified "
                "before: the log was truncated",
                where=f"audit event {head_seq + 1}",
            )
        starts = [int(e["seq"]) for e in events] + [int(r["seq"]) for _, r in receipts]
        if pin is not None:
            starts.append(int(pin["seq"]))
        if head_seq == 0:
            if events or marks:
                raise AuditRewritten(1, "the platform's audit log is empty", where="audit event 1")
            return
        first = max(1, min(starts, default=head_seq))
        chain, _ = self._links(first, head_seq, where)
        if chain[head_seq]["sha256"] != head_sha:
            raise IntegrityError(f"the platform's head does not match its event {head_seq}", where=where)
        for ev in events:
            seq = int(ev["seq"])
            if chain[seq]["sha256"] != ev["sha256"]:
                raise AuditRewritten(
                    seq,
                    f"audit event {seq} shown is not the one in the platform's chain",
                    where=f"audit event {seq}",
                )
        broken = sorted(
            s for s, (sha, _) in marks.items() if first <= s <= head_seq and chain[s]["sha256"] != sha
        )
        if broken:
            self._first_changed(marks, head_seq, chain, where)
        seen = dict(pins["seen"])
        seen.update({str(int(e["seq"])): str(e["sha256"]) for e in events})
        rec = dict(pins["receipts"])
        rec.update({str(int(r["seq"])): {"sha256": str(r["sha256"]), "task_id": t} for t, r in receipts})
        self.store.save(
            self.key, {"head": {"seq": head_seq, "sha256": head_sha}, "seen": seen, "receipts": rec}
        )
