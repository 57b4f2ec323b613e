"""Weight sync between real processes over gloo on 127.0.0.1: one sender, two or
three receivers, each its own process (tests/sync_scenarios.py runs the ranks)."""

import time

import pytest
import torch

from sync_scenarios import Pool, in_one_world, ok, receive, receive_hub, send, send_hub


@pytest.fixture(scope="module")
def pool():
    workers = Pool(4)
    yield workers
    workers.close()


def errors(results):
    """Each rank's ReloadError summary (its scenario returned one), or the failure."""
    out = []
    for rank, (status, value) in enumerate(results):
        if status == "raised" and "ReloadError" in value:
            out.append({"error": value})
        else:
            assert status == "ok" and "error" in value, f"rank {rank} did not refuse: {status} {value}"
            out.append(value)
    return out


def test_moe_updates_in_a_row_in_place_with_versions_committed(pool):
    versions = (3, 4, 9)
    sent, *received = ok(pool.run([(send, dict(versions=versions)), (receive, dict(versions=versions)),
                                   (receive, dict(versions=versions))]))
    assert [r["version"] for r in sent] == list(versions)
    # The schedule is fixed after the first update: only header and buckets travel.
    assert [r["manifest_sent"] for r in sent] == [True, False, False]
    for r in received:
        assert [d["version"] for d in r["done"]] == list(versions)
        first, *later = r["done"]
        assert first["skipped"]["tied"] == 1  # head.weight travels once, with embed.weight
        assert first["calls"] == sent[0]["buckets"]  # one fused copy per bucket
        assert all(d["wire_bytes"] < first["wire_bytes"] for d in later)


def test_sender_order_and_streaming_with_a_manifest(pool):
    # An iterable in reverse order (read whole), then one read once in order against a manifest.
    ok(pool.run([(send, dict(versions=(1,), order="reverse")), (receive, dict(versions=(1,))),
                 (receive, dict(versions=(1,)))]))
    ok(pool.run([(send, dict(versions=(1, 2), order="reverse", manifest=True)),
                 (receive, dict(versions=(1, 2))), (receive, dict(versions=(1, 2)))]))


def test_tensors_larger_than_a_bucket_and_hundreds_of_tiny_ones(pool):
    versions = (1, 2)
    sent, *received = ok(pool.run([(send, dict(kind="big", versions=versions, bucket_bytes=4096))]
                                  + [(receive, dict(kind="big", versions=versions))] * 3))
    assert sent[0]["buckets"] > 84_000 // 4096
    assert all(r["done"][0]["tensors"] == 303 for r in received)


def test_two_tensor_parallel_receivers_take_their_shards(pool):
    ok(pool.run([(send, dict(weights_of="fused", versions=(1, 2), bucket_bytes=8192)),
                 (receive, dict(kind="sharded", rename="tp", versions=(1, 2))),
                 (receive, dict(kind="sharded", rename="tp", versions=(1, 2)))]))


def test_a_recorded_receiver_replays_its_processing(pool):
    sent, *received = ok(pool.run([(send, dict(kind="processed", versions=(1, 2), bucket_bytes=512)),
                                   (receive, dict(kind="processed", versions=(1, 2))),
                                   (receive, dict(kind="processed", versions=(1, 2)))]))
    assert all(d["replayed"] == 3 for r in received for d in r["done"])


def test_tied_weights_and_a_mamba_alias_buffer(pool):
    ok(pool.run([(send, dict(kind="hybrid", versions=(1, 2))), (receive, dict(kind="hybrid", versions=(1, 2))),
                 (receive, dict(kind="hybrid", versions=(1, 2)))]))


def test_fp32_sent_as_bf16_into_bf16_receivers(pool):
    bf16 = torch.bfloat16
    sent, *received = ok(pool.run([(send, dict(versions=(1,), wire_dtype=bf16)),
                                   (receive, dict(versions=(1,), wire_dtype=bf16, dtype=bf16)),
                                   (receive, dict(versions=(1,), wire_dtype=bf16, dtype=bf16))]))
    fp32, = ok(pool.run([(send, dict(versions=(1,))), (receive, dict(versions=(1,), dtype=bf16))]))[:1]
    assert sent[0]["bytes"] * 2 == fp32[0]["bytes"]  # half the bytes travel


@pytest.mark.parametrize("other, problem", [
    ("moe_deeper", "missing from the source"),
    ("moe_shallow", "not in the model"),
    ("moe_wider", "shape mismatch"),
    ("big_float_steps", "dtype mismatch"),
])
def test_a_refusal_on_one_receiver_is_raised_on_every_rank(pool, other, problem):
    kind = "big" if other.startswith("big") else "moe"
    started = time.monotonic()
    results = pool.run([(send, dict(kind=kind, versions=(1,))), (receive, dict(kind=kind, versions=(1,))),
                        (receive, dict(kind=other, versions=(1,)))])
    sender, fine, refusing = errors(results)
    assert time.monotonic() - started < 20
    assert "rank 2" in sender["error"] and "refused the manifest" in sender["error"]
    assert problem in refusing["error"] and refusing["rank"] == 2 and refusing["version"] == 1
    assert "ranks [2] refused" in fine["error"] and fine["rank"] == 2
    for r in (fine, refusing):
        assert r["unchanged"] and r["written"] == [] and r["committed"] is None


def test_a_sender_that_contradicts_its_manifest_stops_everyone_and_the_group_goes_on(pool):
    options = dict(kind="sharded", rename="tp", versions=(1, 2), go_on=True)
    sender, *receivers = ok(pool.run([
        (send, dict(weights_of="fused", versions=(1, 2), manifest=True, bucket_bytes=8192, lie_in=(1,))),
        (receive, options), (receive, options)]))
    assert "the manifest says" in sender[0]["error"] and sender[1]["version"] == 2
    for r in receivers:
        refused, = r["refused"]
        assert "the sender stopped the update" in refused["error"] and "the manifest says" in refused["error"]
        assert refused["version"] == 1 and refused["committed"] is None
        assert [d["version"] for d in r["done"]] == [2]  # then the next update, on the same group


def test_a_sender_killed_after_its_first_bucket(pool):
    started = time.monotonic()
    results = pool.run([(send, dict(versions=(1,), bucket_bytes=4096, die_at=40, timeout=5)),
                        (receive, dict(versions=(1,), timeout=5)), (receive, dict(versions=(1,), timeout=5))])
    assert results[0][0] == "died"
    for status, r in results[1:]:
        assert status == "ok", r
        assert "update 1" in r["error"] and r["version"] == 1 and r["committed"] is None
        assert r["written"], "the first buckets were written, and said so"
    assert time.monotonic() - started < 20


def test_a_receiver_killed_mid_update(pool):
    started = time.monotonic()
    results = pool.run([(send, dict(versions=(1,), bucket_bytes=4096, timeout=5)),
                        (receive, dict(versions=(1,), timeout=5, die_in_bucket=2)),
                        (receive, dict(versions=(1,), timeout=5))])
    assert results[1][0] == "died"
    assert results[0][0] == "raised" and "ReloadError" in results[0][1]
    assert results[2][0] == "ok" and "update 1" in results[2][1]["error"]
    assert time.monotonic() - started < 25


def test_no_update_within_the_timeout_and_a_sender_gone(pool):
    results = pool.run([(send, dict(versions=())), (receive, dict(versions=(1,), wait=1.0))])
    status, r = results[1]
    assert status == "ok" and "no update" in r["error"]
    # The sender sends once and leaves: the next receive() does not wait for it.
    started = time.monotonic()
    results = pool.run([(send, dict(versions=(1,))), (receive, dict(versions=(1, 2), wait=None))])
    status, r = results[1]
    assert status == "ok" and [d["version"] for d in r["done"]] == [1] and "no update" in r["error"]
    assert time.monotonic() - started < 20


def test_a_group_of_the_processes_own_world(pool):
    # dist.new_group inside one init_process_group world, as under torchrun.
    ok(pool.run([(in_one_world, dict(role=send, versions=(1, 2))),
                 (in_one_world, dict(role=receive, versions=(1, 2))),
                 (in_one_world, dict(role=receive, versions=(1, 2)))]))


def test_not_strict_leaves_what_the_sender_lacks_and_reports_it(pool):
    sent, received = ok(pool.run([(send, dict(versions=(1,))),
                                  (receive, dict(kind="moe_deeper", sent_kind="moe", versions=(1,), strict=False))]))
    done, = received["done"]
    assert done["skipped"]["missing"] == 35  # the fourth block's tensors, kept as they were


def test_hub_format_weights_into_transformers_models(pool, tmp_path):
    pytest.importorskip("transformers")
    options = dict(folder=str(tmp_path), versions=(1, 2))
    _, *received = ok(pool.run([(send_hub, options), (receive_hub, options), (receive_hub, options)], timeout=120))
    for r in received:
        assert all("transformers" in renamed for renamed in r["renamed"])
