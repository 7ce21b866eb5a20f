"""A Confide installation directory on a party's machine ($CONFIDE_HOME, default ~/.confide): its
policy, its simulated platform, its trust anchors. Imports nothing heavy: every `confide` command
opens one, and the verifiers and the enclave launcher are imported only by what uses them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confide.client.policy import Policy

if TYPE_CHECKING:
    from confide.attest import TrustAnchors
    from confide.enclave.sim_platform import SimPlatform
    from confide.host.enclave_process import EnclaveProcess


@dataclass(frozen=True)
class Home:
    """A Confide installation directory ($CONFIDE_HOME, default ~/.confide)."""

    root: Path

    @classmethod
    def from_env(cls, root: str | os.PathLike[str] | None = None) -> Home:
        """`root`, else $CONFIDE_HOME, else ~/.confide."""
        if root is not None:
            return cls(Path(root))
        env = os.environ.get("CONFIDE_HOME")
        return cls(Path(env) if env else Path.home() / ".confide")

    @property
    def platform_dir(self) -> Path:
        return self.root / "platform"

    @property
    def state_dir(self) -> Path:
        return self.root / "enclave-state"

    @property
    def policy_path(self) -> Path:
        return self.root / "policy.toml"

    @property
    def sim_root_path(self) -> Path:
        """This installation's simulated vendor root certificate (only its public part)."""
        return self.platform_dir / "vendor_root.crt"

    def platform(self) -> SimPlatform:
        from confide.enclave.sim_platform import SimPlatform

        return SimPlatform.load_or_create(self.platform_dir)

    def anchors(self, sim_root: Path | None = None) -> TrustAnchors:
        """The vendor roots shipped with Confide, plus this installation's simulated vendor root
        when there is one (only its public certificate is read), plus `sim_root` (another simulated
        platform's vendor_root.crt: development only)."""
        from confide.attest import TrustAnchors
        from confide.attest.anchors import default_anchors, load_trust_anchors, merge_anchors

        roots = [p for p in (self.sim_root_path,) if p.exists()] + ([sim_root] if sim_root else [])
        return merge_anchors(default_anchors(), load_trust_anchors(sim=roots) if roots else TrustAnchors())

    def trust_from_env(self) -> tuple[Policy, TrustAnchors]:
        """The policy and trust anchors a command uses: CONFIDE_POLICY (else this home's policy.toml,
        else the production defaults) and these anchors plus CONFIDE_SIM_ROOT."""
        policy = os.environ.get("CONFIDE_POLICY")
        sim_root = os.environ.get("CONFIDE_SIM_ROOT")
        return self.policy(Path(policy) if policy else None), self.anchors(
            Path(sim_root) if sim_root else None
        )

    def policy(self, path: Path | None) -> Policy:
        if path is not None:
            return Policy.load(path)
        if self.policy_path.exists():
            return Policy.load(self.policy_path)
        return Policy()

    def start_enclave(self, config: Path | None = None, *, accelerator: Any = None) -> EnclaveProcess:
        """`accelerator`: see EnclaveProcess (None, a backend name, or a socket)."""
        from confide.host.enclave_process import EnclaveProcess

        self.platform()
        return EnclaveProcess(
            platform_dir=self.platform_dir, state_dir=self.state_dir, config=config, accelerator=accelerator
        )
