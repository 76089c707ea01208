"""A pytest plugin for CI: OMK_SHARD=K/N keeps every Nth collected test from the Kth on,
so that two Pythons between the oldest and the newest run half the unit tests each."""

import os


def pytest_collection_modifyitems(config, items):  # type: ignore[no-untyped-def]
    shard = os.environ.get("OMK_SHARD")
    if not shard:
        return
    index, count = (int(part) for part in shard.split("/"))
    kept = [item for number, item in enumerate(items) if number % count == index - 1]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept
