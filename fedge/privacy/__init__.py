"""fedge.privacy: private embedding retrieval (two-server DPF PIR), independent of FL.

It imports nothing else of fedge (tests/test_privacy_boundary.py), so a PIR server or client
needs neither Flower nor torch.

dpf/: the distributed point function (keys: key format; prg: fixed-key AES PRG, also in
registers; keygen: generation; expansion: evaluation). pir/: queries and reconstruction
(protocol), the compiled products (kernels), table layouts and pass planning (layout), the
one-pass batched server (server) and its GPU answer step (torch_backend). codesign: bins,
hot/cold split and co-located rows. service: gRPC servers (`serve`, run by `fedge pir-server`)
and the client (`PrivateEmbeddingClient`).
"""
