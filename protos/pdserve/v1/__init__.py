"""Generated stubs of pdserve.v1: ``from protos.pdserve.v1 import pdserve_pb2, pdserve_pb2_grpc``."""
