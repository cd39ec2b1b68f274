"""The metrics endpoint serves /metrics and nothing else (no Ray, no model: just the HTTP server)."""
import urllib.error
import urllib.request

import pytest

from pdserve.metrics import Metrics


@pytest.fixture(scope="module")
def port():
    return Metrics("skv-tiny").serve_http(0)


def test_metrics_path_serves_the_exposition(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        body = r.read().decode()
    assert r.status == 200 and "pdserve:" in body and r.headers["Content-Type"].startswith("text/plain")


@pytest.mark.parametrize("path", ["/", "/v1/chat/completions", "/metricsx", "/health"])
def test_other_paths_are_not_found(port, path):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10)
    assert e.value.code == 404 and b"/metrics" in e.value.read()
