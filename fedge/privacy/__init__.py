"""fedge.privacy: private embedding retrieval (two-server DPF PIR), independent of FL.

dpf: the distributed point function; pir: queries, one-pass batched servers, reconstruction;
codesign: bins, hot/cold split and co-located rows; service: gRPC servers and the client.
"""
