"""Node membership: a node's key in etcd, on a lease it keeps alive.

A node joins by granting itself a lease of ``node_lease_ttl_s`` and writing its
:class:`~memcluster.cluster.keys.NodeInfo` to ``nodes/{node_id}`` on that lease. It then
renews the lease every third of its TTL. That renewal is the node's heartbeat; lease expiry is
the failure detector. A node that stops renewing (killed, frozen, cut off from etcd)
disappears from ``nodes/`` within one TTL, and every watcher of the prefix sees the delete.

States of :class:`Member`::

    JOINING --register--> UP --renew fails (lease gone)--> JOINING (a new lease, a new key)
                           |  --etcd unreachable--> retry renewals until the lease would
                           |                        have expired, then JOINING
                           '--leave()--> LEFT (lease revoked: the key goes at once)

The node id is stable across restarts: it is the name given to ``memcluster node``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time

import msgspec

from memcluster.cluster.coordinator import Coordinator
from memcluster.cluster.keys import NodeInfo, node_key, nodes_prefix
from memcluster.core.errors import LeaseExpired, MemclusterError, is_retryable

log = logging.getLogger("memcluster.cluster")


class MemberState(enum.Enum):
    JOINING = "joining"
    UP = "up"
    LEFT = "left"


async def live_nodes(coord: Coordinator, cluster: str) -> list[NodeInfo]:
    """Every node whose key is in etcd (its lease alive), sorted by id."""
    kvs, _ = await coord.get_prefix(nodes_prefix(cluster))
    return [msgspec.json.decode(kv.value, type=NodeInfo) for kv in kvs]


LEASE_SAFETY = 0.75
"""The share of the lease TTL after a confirmed renewal during which the node counts its lease
as certainly valid (the rest is margin for clock rate differences and etcd's timing)."""


class Member:
    """Keeps this node registered in cluster ``cluster`` while :meth:`run` runs."""

    def __init__(
        self, coord: Coordinator, cluster: str, info: NodeInfo, *, lease_ttl_s: float
    ) -> None:
        self.coord = coord
        self.cluster = cluster
        self.info = info
        self.lease_ttl_s = lease_ttl_s
        self.state = MemberState.JOINING
        self.lease: int | None = None
        self.registered = asyncio.Event()
        self._stop = asyncio.Event()
        self._valid_until = 0.0

    def lease_valid(self) -> bool:
        """Whether the node's lease is certainly still alive in etcd (any thread): the last
        renewal that etcd confirmed was sent less than ``LEASE_SAFETY`` of the TTL ago, by
        the monotonic clock. A leader serves strong reads only while this holds: once it
        may have expired, the controller may have promoted another replica."""
        return time.monotonic() < self._valid_until

    async def _register(self) -> None:
        self.lease = await self.coord.grant_lease(self.lease_ttl_s)
        await self.coord.put(
            node_key(self.cluster, self.info.id), msgspec.json.encode(self.info), lease=self.lease
        )
        self.state = MemberState.UP
        self.registered.set()
        log.info("node %s joined cluster %s (lease %x)", self.info.id, self.cluster, self.lease)

    async def run(self) -> None:
        """Register, then renew until :meth:`leave`; re-register after losing the lease."""
        interval = self.lease_ttl_s / 3
        last_renewal = 0.0
        while not self._stop.is_set():
            try:
                sent = time.monotonic()
                if self.state is MemberState.JOINING:
                    await self._register()
                else:
                    assert self.lease is not None
                    await self.coord.keepalive(self.lease)
                last_renewal = time.monotonic()
                # etcd restarted the TTL after it got the request, so after ``sent``.
                self._valid_until = sent + self.lease_ttl_s * LEASE_SAFETY
            except LeaseExpired:
                log.warning("node %s: its lease expired; joining again", self.info.id)
                self.state = MemberState.JOINING
                self.registered.clear()
                continue
            except MemclusterError as exc:
                if not is_retryable(exc):
                    raise
                if time.monotonic() - last_renewal > self.lease_ttl_s:
                    self.state = MemberState.JOINING
                    self.registered.clear()
                log.warning("node %s: cannot reach etcd (%s); retrying", self.info.id, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), interval)

    async def report(self, data_bytes: int) -> None:
        """Publish the node's data size in its key (``memcluster status`` shows it)."""
        if data_bytes == self.info.data_bytes or self.state is not MemberState.UP:
            return
        self.info = msgspec.structs.replace(self.info, data_bytes=data_bytes)
        lease = self.lease
        if lease is not None:
            with contextlib.suppress(MemclusterError):
                await self.coord.put(
                    node_key(self.cluster, self.info.id),
                    msgspec.json.encode(self.info),
                    lease=lease,
                )

    async def leave(self) -> None:
        """Stop renewing and revoke the lease: the node's key disappears now."""
        self._stop.set()
        lease, self.lease = self.lease, None
        self.state = MemberState.LEFT
        if lease is not None:
            try:
                await self.coord.revoke(lease)
            except MemclusterError as exc:
                log.warning("node %s: could not revoke its lease on leaving: %s", self.info.id, exc)
