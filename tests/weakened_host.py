"""A deliberately weakened participant host, for tests only: it ignores its own policy.

Every refusal the node policy makes is tested twice: the shipped :class:`ParticipantHost` refuses
the server's request, and this host, identical except that it skips the policy, accepts the same
request (so the refusal test cannot pass for an unrelated reason). Nothing shipped can skip the
policy: ``ParticipantHost`` requires one and calls it on every setup and every round.
"""

from __future__ import annotations

from fedrlhf_secure.federation.participant import ParticipantHost


class ObedientHost(ParticipantHost):
    """Builds whatever the server's setup frame asks for, as every node did before the policy."""

    def _policy_admits(self, config, everyone):
        return config

    def _policy_admits_round(self, config, ctx):
        return None
