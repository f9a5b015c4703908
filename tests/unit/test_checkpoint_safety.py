"""Reading a checkpoint runs no code: a pickle payload planted in DCP's `.metadata`, in a non-tensor
item or in a per-rank file is refused with a CheckpointError, and the payload never runs."""

import json
import os
import pickle

import pytest
import torch

from expertmesh.dist import checkpoint
from expertmesh.dist.checkpoint import Checkpointer, CheckpointError, load_model, save_model, write_marker


class Payload:
    """Unpickling it would create the file `flag`."""

    def __init__(self, flag):
        self.flag = str(flag)

    def __reduce__(self):
        return os.system, (f"touch {self.flag}",)


def _reseal(path):
    """An attacker rewrites the manifest too, so the hashes match the planted file."""
    manifest = json.loads((path / checkpoint.MARKER).read_text())
    write_marker(path, manifest["step"], manifest["layout"], manifest["world_size"])


def test_planted_metadata_pickle_is_refused(tmp_path):
    model = torch.nn.Linear(4, 3)
    path = save_model(tmp_path / "run", 5, model)
    assert load_model(path, torch.nn.Linear(4, 3)) == 5  # the intact checkpoint loads
    flag = tmp_path / "ran"
    (path / ".metadata").write_bytes(pickle.dumps(Payload(flag)))
    _reseal(path)
    with pytest.raises(CheckpointError, match="refusing to unpickle posix.system"):
        load_model(path, torch.nn.Linear(4, 3))
    assert not flag.exists()


def _short(text: str) -> bytes:
    return b"\x8c" + bytes([len(text)]) + text.encode()


@pytest.mark.parametrize("module, name", [("torch.distributed.checkpoint.metadata", "os.system"),
                                          ("torch.distributed.checkpoint.metadata", "os"),
                                          ("torch", "os.system"), ("torch", "os"),
                                          ("collections", "OrderedDict.__init__"), ("pathlib", "os.system"),
                                          ("torch.distributed.checkpoint.filesystem", "os.system"),
                                          ("torch.serialization", "os.system"), ("builtins", "eval"),
                                          ("subprocess", "call"), ("posix", "system")])
def test_a_dotted_or_imported_name_under_an_allowed_module_is_refused(tmp_path, module, name):
    """Pickle protocol 4 resolves a dotted name through the module's attributes: ("...metadata", "os.system")
    is os.system, since that module imports os. A planted `.metadata` naming it must not run."""
    model = torch.nn.Linear(4, 3)
    path = save_model(tmp_path / "run", 5, model)
    flag = tmp_path / "ran"
    call = b"\x93" + _short(f"touch {flag}") + b"\x85R." if name.endswith("system") else b"\x93."
    (path / ".metadata").write_bytes(b"\x80\x04" + _short(module) + _short(name) + call)
    _reseal(path)
    with pytest.raises(CheckpointError, match=f"refusing to unpickle {module}.{name}"):
        load_model(path, torch.nn.Linear(4, 3))
    assert not flag.exists()


def test_planted_item_and_per_rank_pickles_are_refused(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt = Checkpointer(tmp_path / "run", keep=2, rank=0)
    path = ckpt.save(3, model, opt, sched, shared={"loader": {"global_batch": 7}},
                     per_rank={"rng": torch.get_rng_state()}, layout="single")
    step, shared, per_rank = ckpt.load(path, model, opt, sched, {"loader": {"global_batch": 0}}, "single")
    assert (step, shared["loader"]["global_batch"]) == (3, 7) and torch.equal(per_rank["rng"], torch.get_rng_state())

    flag = tmp_path / "ran"
    torch.save({"rng": Payload(flag)}, path / "rank-0.pt")
    _reseal(path)
    with pytest.raises(CheckpointError, match="rank-0.pt is not plain data"):
        ckpt.load(path, model, opt, sched, {"loader": {"global_batch": 0}}, "single")

    path = ckpt.save(4, model, opt, sched, shared={"loader": {"global_batch": Payload(flag)}}, per_rank={},
                     layout="single")
    with pytest.raises(CheckpointError, match="item .shared.loader.global_batch. is not plain data"):
        ckpt.load(path, model, opt, sched, {"loader": {"global_batch": 0}}, "single")
    assert not flag.exists()


def test_resume_falls_back_to_the_older_checkpoint_when_the_newest_carries_code(tmp_path, caplog):
    run = tmp_path / "run"
    save_model(run, 2, torch.nn.Linear(4, 3))
    newest = save_model(run, 4, torch.nn.Linear(4, 3))
    flag = tmp_path / "ran"
    (newest / ".metadata").write_bytes(pickle.dumps(Payload(flag)))
    _reseal(newest)
    assert checkpoint.latest_intact(run) == run / "step-2"
    assert "refusing to unpickle posix.system" in caplog.text and "step-4" in caplog.text
    assert load_model(checkpoint.latest_intact(run), torch.nn.Linear(4, 3)) == 2
    assert not flag.exists()
