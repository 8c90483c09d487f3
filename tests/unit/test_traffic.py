"""mlbuild/traffic.py: the last minute of a service, from recorded /metrics text."""

from __future__ import annotations

from mlbuild import traffic


def test_parse_reads_the_window_and_ignores_other_text():
    text = """\
# HELP mlbuild_recent_requests Answers of /score in the last 60 s.
# TYPE mlbuild_recent_requests gauge
mlbuild_recent_requests{status_class="1xx"} 0.0
mlbuild_recent_requests{status_class="2xx"} 40.0
mlbuild_recent_requests{status_class="3xx"} 0.0
mlbuild_recent_requests{status_class="4xx"} 2.0
mlbuild_recent_requests{status_class="5xx"} 3.0
# TYPE mlbuild_recent_request_duration_seconds gauge
mlbuild_recent_request_duration_seconds{quantile="0.5"} 0.001
mlbuild_recent_request_duration_seconds{quantile="0.99"} 0.0125
# TYPE mlbuild_recent_window_seconds gauge
mlbuild_recent_window_seconds 60.0
"""
    got = traffic.parse(text)
    assert got == traffic.Traffic(60, 45, 3, 2, 0.0125)
    assert got.to_json() == {"window_seconds": 60, "requests": 45, "errors": 3,
                             "client_errors": 2, "p99_ms": 12.5}
    assert got.summary() == "45 req, 3 err, p99 12.5 ms / 60 s"
    no_window = "# TYPE x counter\nx_total 3\n"
    assert traffic.parse(no_window) is None
    idle = text.replace('"0.99"} 0.0125', '"0.99"} NaN')
    assert traffic.parse(idle).p99_seconds is None


def test_combine_adds_up_replicas_and_bounds_the_p99_by_the_largest():
    T = traffic.Traffic
    a, b = T(60, 3, 1, 0, 0.004), T(60, 5, 0, 1, 0.020)
    assert traffic.combine([a, b]) == T(60, 8, 1, 1, 0.020)
    assert traffic.combine(iter([a, b])) == T(60, 8, 1, 1, 0.020)  # any iterable
    assert traffic.combine([a]) == a
    assert traffic.combine([]) is None
    idle = T(60, 0, 0, 0, None)  # a replica without requests has no p99: not a zero
    assert traffic.combine([idle, a]) == T(60, 3, 1, 0, 0.004)
    assert traffic.combine([idle, idle]) == T(60, 0, 0, 0, None)
    assert traffic.combine([T(30, 1, 0, 0, 0.001), a]).window_seconds == 60


def test_serving_pods_and_their_scoring_port():
    from mlbuild.kube import ops
    from mlbuild.kube.settings import CONTAINER_PORT

    def pod(name, ready="True", terminating=False, ports=None):
        meta = {"name": name, **({"deletionTimestamp": "2026-01-01T00:00:00Z"} if terminating else {})}
        return {"metadata": meta,
                "spec": {"containers": [{"name": "svc", "ports": ports or []}]},
                "status": {"conditions": [{"type": "Ready", "status": ready}]}}

    pods = [pod("c"), pod("a"), pod("b", ready="False"), pod("d", terminating=True),
            {"metadata": {"name": "e"}}]  # no status yet
    assert [p["metadata"]["name"] for p in ops.serving_pods(pods)] == ["a", "c"]
    many = [pod(f"p{i:02d}") for i in range(15)]
    assert [p["metadata"]["name"] for p in ops.serving_pods(many)] == [f"p{i:02d}" for i in range(10)]
    # The runtime's port is the container port named http (the rendered Deployment's).
    assert ops.scoring_port(pod("a", ports=[{"name": "health", "containerPort": 5000},
                                            {"name": "http", "containerPort": 6001}])) == 6001
    assert ops.scoring_port(pod("a")) == CONTAINER_PORT


def test_the_scoring_port_read_is_the_rendered_deployments():
    from mlbuild.kube import ops, render
    from mlbuild.kube.settings import KubeSettings

    image = "127.0.0.1:5000/ml/p-s@sha256:" + "0" * 64
    dep = next(o for o in render.render_service("p", "s", image, "sha256:1", KubeSettings(namespace="ml"))
               if o["kind"] == "Deployment")
    template = dep["spec"]["template"]
    env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
    assert ops.scoring_port(template) == int(env["MLBUILD_PORT"])  # where the runtime listens
