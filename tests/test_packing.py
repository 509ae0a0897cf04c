"""Few objects per message on the wire: exact round trips, both packings, the device mod."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedge import compat
from fedge.edge.packing import LAYOUT, SIZES, WHOLE, is_packed, pack, packing_mod, unpack
from fedge.tasks import build_task


def objects(obj) -> int:
    """How many objects Flower sends for `obj` (itself and all below it)."""
    return 1 + sum(objects(child) for child in (obj.children or {}).values())


@pytest.fixture
def content():
    model = build_task("digits").build_model()
    rng = np.random.default_rng(0)
    return RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "control": ArrayRecord([rng.normal(size=(3, 4)), np.array(2.5), np.arange(5)]),
            "single": ArrayRecord([np.ones(7, np.float16)]),
            "config": ConfigRecord({"lr": 0.1}),
            "metrics": MetricRecord({"num-examples": 12}),
        }
    )


@pytest.mark.parametrize("whole_max", [2**30, 0], ids=["whole", "per-record"])
def test_unpack_gives_back_exactly_what_was_packed(content, whole_max):
    packed = pack(content, whole_max)
    assert is_packed(packed) and not is_packed(content)
    if whole_max:
        assert list(packed.keys()) == [WHOLE]
    else:  # too big to travel whole: each ArrayRecord as one array, still chunked by Flower
        assert len(packed["arrays"]) == 1 and len(packed["control"]) == 1
        assert packed["single"] is content["single"]  # nothing to gain from one array
    back = unpack(packed)
    assert list(back.keys()) == list(content.keys())
    for name in content:
        assert back[name].object_id == content[name].object_id, name
    assert np.array_equal(back["control"]["0"].numpy(), content["control"]["0"].numpy())


def test_a_digits_message_shrinks_from_20_objects_to_3(content):
    compat.claim_server_identity(run_id=3)
    plain = RecordDict({"arrays": content["arrays"], "config": content["config"]})
    assert objects(Message(plain, 2, "train")) == 20
    assert objects(Message(pack(plain), 2, "train")) == 3
    assert objects(Message(pack(plain, whole_max=0), 2, "train")) == 7


def test_damaged_packing_is_an_error_not_a_wrong_model(content):
    packed = pack(content, whole_max=0)
    packed[LAYOUT + "arrays"][SIZES] = [1, *packed[LAYOUT + "arrays"][SIZES][1:]]
    with pytest.raises(ValueError, match="does not fit its bytes"):
        unpack(packed)
    whole = pack(content)
    whole[WHOLE][WHOLE] = whole[WHOLE][WHOLE][:-9]  # cut short on the way
    with pytest.raises(ValueError, match="content is damaged"):
        unpack(whole)


def test_the_device_mod_unpacks_instructions_and_packs_their_replies(content):
    compat.claim_server_identity(run_id=3)
    seen = []

    def client_app(msg: Message, context: Context) -> Message:
        seen.append(msg.content)
        return Message(RecordDict({"arrays": msg.content["arrays"]}), reply_to=msg)

    context = Context(3, 2, {}, RecordDict(), {})
    reply = packing_mod(Message(pack(content), 2, "train"), context, client_app)
    assert not is_packed(seen[-1]) and seen[-1]["arrays"].object_id == content["arrays"].object_id
    assert is_packed(reply.content)
    assert unpack(reply.content)["arrays"].object_id == content["arrays"].object_id
    plain = Message(content, 2, "train")  # simulation: nothing packed, nothing changed
    assert not is_packed(packing_mod(plain, context, client_app).content)
    assert seen[-1] is plain.content
