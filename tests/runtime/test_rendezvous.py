"""The rendezvous every group uses: the host binds port 0, then publishes what it got; a joiner
reads it (from a file for srun ranks) and connects."""

import threading

import pytest

from megarl.runtime.rendezvous import Rendezvous, open_store, publish_address, wait_for_address


def test_a_published_store_is_joined_and_a_missing_one_is_named(tmp_path):
    path = str(tmp_path / "rendezvous.json")
    with pytest.raises(TimeoutError, match="rank 0's store was not published in .*rendezvous.json within 0 s"):
        wait_for_address(path, 0.2, "rank 0's store")
    store, port = open_store("127.0.0.1", 0, timeout_s=30)
    assert port > 0
    threading.Timer(0.3, publish_address, args=(path, "127.0.0.1", port)).start()  # published later
    host, got = wait_for_address(path, 10, "rank 0's store")
    assert (host, got) == ("127.0.0.1", port)
    client = Rendezvous(host, got, timeout_s=30).connect()
    client.set("hello", "world")
    assert store.get("hello") == b"world"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rendezvous.json"]  # no temporary file left
