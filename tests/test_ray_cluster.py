"""Ray workers across nodes (daemon.worker.ray_executor): a three-node ray.cluster_utils.Cluster on this machine
(a head without GPUs, two nodes with one fake GPU each), one actor per GPU. Losing a node mid-job retries the job
on the other node, and the job is published exactly once. Skipped, with the reason, only where ray is not
installed."""

from __future__ import annotations

import pytest
from conftest import wait_for
from rayhelpers import RAY_INIT, RayDaemons, actor_of, sha256

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'wan-daemon[ray]')")


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    store = RAY_INIT["object_store_memory"] // 2
    made = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "object_store_memory": store})
    for _ in range(2):
        made.add_node(num_cpus=1, num_gpus=1, object_store_memory=store)
    made.wait_for_nodes()
    ray.init(address=made.address, log_to_driver=False, namespace=RAY_INIT["namespace"])
    yield made
    ray.shutdown()
    made.shutdown()


def test_a_node_lost_mid_job_retries_the_job_on_the_other_node_and_publishes_it_once(cluster, tmp_path):
    daemons = RayDaemons(tmp_path)
    try:
        h = daemons.start(ray={"actors": None})  # one actor per GPU of the cluster: two
        assert sorted(h.daemon.workers) == ["ray0", "ray1"]
        wait_for(h.daemon.workers_ready, 60, what="an actor on each node")
        h.drop("moving.yaml", "prompt: sleep=4\n")
        wait_for(lambda: getattr(h.daemon.progress("moving"), "step", 0) >= 2, 60, what="the job to run")
        worker = h.daemon.workers[h.daemon.progress("moving").worker]
        doomed = worker.placed.node_id
        node = next(n for n in cluster.worker_nodes if n.node_id == doomed)
        cluster.remove_node(node, allow_graceful=False)
        side = h.sidecar("moving", timeout=90)
        assert side["attempts"] == 2
        assert actor_of(side)["node_id"] not in (doomed, None)
        assert side["video"]["sha256"] == sha256(h.outbox / "moving.mp4")
        assert [p.name for p in h.outbox.glob("*.mp4")] == ["moving.mp4"]
        assert [p.name for p in h.outbox.glob("*.json")] == ["moving.json"]
        wait_for(h.daemon.is_idle, 30, what="the daemon to be idle")  # the lost node's GPU is not coming back
        assert not list(h.outbox.glob(".*"))  # the lost attempt's temps are gone
    finally:
        for h in daemons.made:
            h.stop()
