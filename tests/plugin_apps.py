"""Small ClientApps for grid tests, importable as `plugin_apps:<name>` by Ray workers."""

import time

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

counter_app = ClientApp()


@counter_app.train()
def count(msg: Message, context: Context) -> Message:
    """Counts how often this node trained, in its Context.state; may sleep or raise on cue."""
    config = msg.content["config"]
    pid = int(context.node_config["partition-id"])
    if pid in list(config.get("raise-on", [])):
        raise RuntimeError(f"node {pid} was told to fail")
    time.sleep(float(config.get("sleep", 0.0)) if pid in list(config.get("slow", [])) else 0.0)
    seen = context.state.config_records.get("seen", ConfigRecord({"count": 0}))
    seen["count"] = int(seen["count"]) + 1
    context.state["seen"] = seen
    context.state["padding"] = ConfigRecord({"blob": b"x" * int(config.get("state-bytes", 0))})
    metrics = MetricRecord({"count": seen["count"], "partition": pid, "num-examples": 1})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
