"""pdserve.v1 proto package (generated stubs live in ``protos.pdserve.v1``)."""
