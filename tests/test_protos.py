"""The committed pdserve.v1 stubs are what the .proto generates now."""
from pathlib import Path

import pytest

from protos.generate import ROOT, generate


def test_committed_stubs_are_up_to_date(tmp_path):
    pytest.importorskip("grpc_tools")
    for fresh in generate(tmp_path):
        committed = ROOT / fresh.relative_to(tmp_path)
        assert committed.read_text() == fresh.read_text(), f"{committed} is stale: run python -m protos.generate"


def test_stubs_import_as_installed_package_paths():
    from protos.pdserve.v1 import pdserve_pb2, pdserve_pb2_grpc

    assert pdserve_pb2.DESCRIPTOR.package == "pdserve.v1"
    assert hasattr(pdserve_pb2_grpc, "PDServeStub")
    assert Path(pdserve_pb2.__file__).parent == ROOT / "protos/pdserve/v1"
