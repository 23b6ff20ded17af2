"""Anomalies per device, and the quarantine that keeps a device flagged again and again out of rounds.

A train reply is an anomaly when the delta it carries, once opened, is not what an honest device
sends: a layout that is not the global adapter's, NaN or inf, or a norm above the round's absolute
bound (``norm-ratio`` × the adapter's norm; ``DeltaAggregator.anomalies``). A drop against the
median-based bound is not one (that bound depends on what the other devices sent), nor is an example
count above the weight cap (the cap already bounds it, and an honest device with much more data than
the median would hit it every round). Each anomaly is a flag on its device in SQL (``device_flags``).
A device with ``quarantine-after`` flags (default 3; 0: never) since its last release is quarantined:
no round samples it, in any lineage, and an upload from it is refused (its node is then left out for
the rest of the run, whatever name it gives), until an operator releases it (``fleetlora coordinator
devices release ID --reason ...``), which is kept with the quarantine's row.

Who is flagged is who is proven: a sealed upload's device (its signature, enrolled key and node
prove it); for an unsealed fleet, where nothing proves a claimed id, the node (``node-<id>``), so a
forged reply can never get an honest device quarantined. Replies that fail before their upload is
opened (bad metrics, a bad signature), declines and timeouts are not flags: they prove nothing about
who sent them.
"""

from __future__ import annotations

from collections.abc import Mapping

from fleetlora.coordinator.identities import unnamed
from fleetlora.coordinator.storage import DeviceStore


def held_out(store: DeviceStore) -> frozenset[str]:
    """The device ids in quarantine now."""
    return frozenset(entry.device_id for entry in store.quarantined())


def admitted(
    online: list[int], names: Mapping[int, str], held: frozenset[str], store: DeviceStore
) -> list[int]:
    """The ``online`` nodes whose device is not held: by the name a node gives, its node name, and the
    node a held device was enrolled from (a held device cannot escape by giving another name)."""
    if not held:
        return online
    bound = {int(d.node_id) for d in store.enrolled() if d.device_id in held and d.node_id is not None}
    return [n for n in online if names[n] not in held and unnamed(n) not in held and n not in bound]
