"""A device without the embedding table: rows come by PIR from two real `fedge pir-server`
processes (simulations/pir_embeddings.py), and perplexity equals the local table's exactly."""

import json
import subprocess
import sys

from fedge.privacy.dpf import key_size
from fedge.privacy.service import REQUEST_HEADER, RESPONSE_HEADER


def test_private_embeddings_give_the_local_perplexity(tmp_path):
    run = subprocess.run(
        [sys.executable, "simulations/pir_embeddings.py", "--steps", "20", "--tokens", "128"]
        + ["--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["rows_exact"] and r["perplexity_equal"]
    assert r["perplexity_pir"] == r["perplexity_local"] < 256  # trained below uniform bytes
    # a fixed budget: one query per token, whatever the number of distinct tokens
    assert r["tokens"] == 128 and r["pir_queries"] == 128
    assert r["distinct_rows_per_window"] < 64
    # traffic: one request and one answer per server, key and row sizes as the protocol says
    assert r["bytes_up"] == 2 * (REQUEST_HEADER.size + 128 * key_size(8))
    assert r["bytes_down"] == 2 * (RESPONSE_HEADER.size + 128 * r["row_bytes"])
    assert r["device_parameters"] == r["model_parameters"] - r["table_bytes"] // 4
    assert "bit-exact" in run.stdout
