"""Closing the registry while another thread is inside a transaction (the engine's logit-effect writer,
a stats job, an upload) waits for that transaction instead of closing the connection under it: with
SQLite that was a use-after-free in the sqlite3 module, a segfault of the whole server at shutdown."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from steerserve.registry import Registry


def test_close_waits_for_a_transaction_in_flight(registry_config):
    registry = Registry.from_config(registry_config)
    with registry.db.write() as tx:
        tx.execute("CREATE TABLE scratch (v INTEGER)")
    inside, done, errors = threading.Event(), threading.Event(), []

    def slow_writer():
        try:
            with registry.db.write() as tx:
                tx.execute("INSERT INTO scratch (v) VALUES (?)", (1,))
                inside.set()
                time.sleep(0.4)  # close() is called now, from the main thread
                tx.execute("INSERT INTO scratch (v) VALUES (?)", (2,))
        except BaseException as e:
            errors.append(e)
        done.set()

    t = threading.Thread(target=slow_writer)
    t.start()
    assert inside.wait(10)
    registry.close()
    assert done.is_set(), "close() returned while a transaction was still running"
    t.join()
    assert errors == []
    with pytest.raises(RuntimeError, match="closed"):
        registry.get_cached("anything")

    reopened = Registry.from_config(registry_config)
    try:
        with reopened.db.read() as tx:
            rows = tx.all("SELECT v FROM scratch ORDER BY v")
        assert [r["v"] for r in rows] == [1, 2]  # the whole transaction committed
    finally:
        reopened.close()


def test_close_while_a_writer_thread_loops(registry_config):
    """Each cache write either lands whole or is refused as `closed`; nothing crashes."""
    registry = Registry.from_config(registry_config)
    stored, refused, other = [], [], []
    g = torch.Generator().manual_seed(7)
    values = [torch.randn(97, generator=g) for _ in range(400)]
    started = threading.Event()

    def writer():
        for i, v in enumerate(values):
            started.set()
            try:
                registry.put_cached(f"k{i}", {"effect": v})
            except RuntimeError as e:
                if "closed" not in str(e):
                    other.append(e)
                refused.append(i)
                return
            except BaseException as e:
                other.append(e)
                return
            stored.append(i)

    t = threading.Thread(target=writer)
    t.start()
    assert started.wait(10)
    time.sleep(0.05)
    registry.close()
    t.join(60)
    assert not t.is_alive() and other == []
    assert stored, "the writer never got a write in before close()"

    reopened = Registry.from_config(registry_config)
    try:
        for i in stored:
            got = reopened.get_cached(f"k{i}")
            assert got is not None and torch.equal(got["effect"], values[i])
        for i in refused:
            assert reopened.get_cached(f"k{i}") is None
    finally:
        reopened.close()
