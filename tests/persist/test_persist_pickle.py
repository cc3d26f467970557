"""The state's pickle: plain tensors are reduced by aiostage itself (torch's
Python reduction costs 25 us a tensor), and the bytes are torch's."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from _states import mixed_state

import aiostage
from aiostage import _threads
from aiostage._persist import _archive


def torch_reduced(state: object) -> bytes:
    """The pickle with every tensor reduced by torch's ``__reduce_ex__``."""

    class TorchOnly(_archive._StatePickler):
        def reducer_override(self, obj: Any) -> Any:
            return NotImplemented

    buf = io.BytesIO()
    TorchOnly(buf).dump(state)
    return buf.getvalue()


def special_tensors() -> dict[str, Any]:
    """Tensors that torch must reduce itself, beside plain ones."""
    tagged = torch.ones(3)
    tagged.note = "kept"  # type: ignore[attr-defined]
    return {
        "plain": torch.arange(6.0).view(2, 3)[:, 1:],
        "grad": torch.ones(2, requires_grad=True),
        "param": torch.nn.Parameter(torch.ones(2)),
        "conj": torch.ones(2, dtype=torch.complex64).conj(),
        "neg": torch.ones(2)._neg_view(),
        "u16": torch.ones(4, dtype=torch.uint16),  # a dtype with no legacy storage
        "tagged": tagged,
        "f8": torch.ones(2).to(torch.float8_e4m3fn),
        "empty": torch.empty(0),
        "bool": torch.tensor([True, False]),
    }


@pytest.mark.parametrize("make", [mixed_state, special_tensors])
def test_the_pickle_is_torchs_byte_for_byte(make: Any) -> None:
    state = make()
    ours, records, _ = _archive.pickle_state(state)
    assert ours == torch_reduced(state)
    # and it is what torch.save itself writes into data.pkl
    buf = io.BytesIO()
    torch.save(state, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith("/data.pkl")]
        assert zf.read(name) == ours
    assert len(records) == len({r.storage._cdata for r in records})


def test_plain_tensors_skip_torchs_reduction(monkeypatch: pytest.MonkeyPatch) -> None:
    reduced: list[type] = []
    original = torch.Tensor.__reduce_ex__

    def counting(self: torch.Tensor, proto: int) -> Any:
        reduced.append(type(self))
        return original(self, proto)

    monkeypatch.setattr(torch.Tensor, "__reduce_ex__", counting)
    state = special_tensors()
    _archive.pickle_state(state)
    # Only the tensors torch must reduce: not plain, empty and bool, nor the
    # Parameter, whose own reduction hands over its (plain) data.
    assert len(reduced) == len(state) - 4
    assert set(reduced) == {torch.Tensor}
    plain = {f"t{i}": torch.full((4,), float(i)) for i in range(50)}
    reduced.clear()
    _archive.pickle_state(plain)
    assert reduced == []


async def test_a_state_pickled_so_loads_back(tmp_path: Path) -> None:
    state = special_tensors()
    path = await aiostage.persist(state, tmp_path / "s.pt")
    got = torch.load(path, weights_only=False)
    for key, want in state.items():
        assert type(got[key]) is type(want), key
        assert got[key].dtype == want.dtype and got[key].stride() == want.stride(), key
        assert got[key].requires_grad == want.requires_grad, key
        assert torch.equal(got[key].resolve_conj().resolve_neg(), want.resolve_conj().resolve_neg())
    assert got["tagged"].note == "kept"


def test_the_reductions_outlive_the_memo_and_are_freed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clearing the pickle's memo freed every reduction made for the pickle
    in one call holding the GIL (16-17 ms for 20,000 tensors); they are
    kept past it, then freed a block at a time with the GIL handed over."""
    alive_at_clear: list[int] = []
    real_clear = _archive._StatePickler.clear_memo

    def clear_memo(self: _archive._StatePickler) -> None:
        real_clear(self)
        alive_at_clear.append(len(self.plain))

    turns: list[int] = []
    monkeypatch.setattr(_archive._StatePickler, "clear_memo", clear_memo)
    monkeypatch.setattr(_threads, "FREE_BLOCK", 100)
    monkeypatch.setattr(_archive.GilTurns, "__call__", lambda self: turns.append(1))
    state = {f"t{i}": torch.full((2,), float(i)) for i in range(1000)}
    _archive.pickle_state(state)
    assert alive_at_clear == [1000]
    assert len(turns) >= 10  # (a turn after each block freed, besides the pickling's)


def test_a_torch_that_reduces_otherwise_reduces_every_tensor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch's reduction is not a public interface: it is compared once per
    process, and where it differs torch reduces every tensor itself."""
    assert _archive._torch_reduces_alike()  # (this torch: the fast path is used)
    reduced: list[type] = []
    original = torch.Tensor.__reduce_ex__

    def counting(self: torch.Tensor, proto: int) -> Any:
        reduced.append(type(self))
        return original(self, proto)

    monkeypatch.setattr(_archive, "_torch_reduces_alike", lambda: False)
    monkeypatch.setattr(torch.Tensor, "__reduce_ex__", counting)
    state = {f"t{i}": torch.full((4,), float(i)) for i in range(20)}
    ours, _, _ = _archive.pickle_state(state)
    assert len(reduced) == 20
    assert ours == torch_reduced(state)
