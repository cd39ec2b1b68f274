"""The public gRPC API (``pdserve.v1``) and its generated stubs.

Layout: the .proto lives at ``protos/pdserve/v1/pdserve.proto`` and is compiled with the
repository root as the include path, so the generated modules are ``protos.pdserve.v1.pdserve_pb2``
and ``..._pb2_grpc`` and import each other as ``from protos.pdserve.v1 import pdserve_pb2``.
That cannot collide with the ``pdserve`` Python package. Regenerate with
``python -m protos.generate`` (``tests/test_protos.py`` checks the committed stubs are current).
"""
