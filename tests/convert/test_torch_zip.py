"""torch_zip against torch.load(weights_only=True) on files torch.save wrote: every tensor bit for bit.
Then damaged and hostile files, and a Meta conversion in a process where torch cannot be imported."""

import collections
import os
import subprocess
import sys
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest
import torch

from llama_jax import checkpoint
from llama_jax.convert import meta
from llama_jax.convert.torch_zip import PthFile
from tests.convert import sources


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).view(f"u{array.dtype.itemsize}")


def assert_same_tree(ours, theirs, where="state"):
    """Same containers, same keys in the same order, tensors of equal dtype, shape and bits."""
    if isinstance(theirs, torch.Tensor):
        want = as_numpy(theirs)
        assert isinstance(ours, np.ndarray), where
        assert (ours.dtype, ours.shape) == (want.dtype, want.shape), where
        np.testing.assert_array_equal(bits(ours), bits(want), err_msg=where)
    else:
        assert type(ours) is type(theirs), where
        assert list(ours) == list(theirs), where
        for key in theirs:
            assert_same_tree(ours[key], theirs[key], f"{where}[{key!r}]")


def test_tensors_match_torch_load(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g)
    shared = torch.randn(4, 5, generator=g, dtype=torch.float16)
    state = collections.OrderedDict(
        f32=x, bf16=torch.randn(3, 7, generator=g).to(torch.bfloat16), f16=torch.randn(5, generator=g).half(),
        transposed=x.t(), strided=x[1::2, ::3], shared=shared, shared_row=shared[2], shared_column=shared[:, 1],
        scalar=torch.tensor(2.5), empty=torch.zeros(0, 3, dtype=torch.bfloat16),
        nested={"inner": collections.OrderedDict(w=torch.arange(6, dtype=torch.float32).view(2, 3)[:, 1:])})
    path = tmp_path / "state.pth"
    torch.save(state, path)

    ours = PthFile(path).state
    theirs = torch.load(path, weights_only=True)
    assert theirs["transposed"].stride() == (1, 8) and theirs["strided"].stride() == (16, 3)
    assert_same_tree(ours, theirs)
    assert ours["transposed"].strides == (4, 32), "a view of the saved strides, not a copy"
    assert np.shares_memory(ours["shared"], ours["shared_row"]) and np.shares_memory(ours["shared"],
                                                                                      ours["shared_column"])
    assert not ours["f32"].flags.writeable


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_meta_shards_match_torch_load(tmp_path, dtype):
    src = sources.write_meta(tmp_path / "meta", "3.1", sources.hf_model("3.1"), 4, dtype=dtype)
    for path in sorted(src.glob("consolidated.*.pth")):
        assert_same_tree(PthFile(path).state, torch.load(path, weights_only=True), path.name)


def test_release_keeps_the_tensor_readable(tmp_path):
    x = torch.randn(3000, 100)
    torch.save({"x": x}, tmp_path / "x.pth")
    pth = PthFile(tmp_path / "x.pth")
    pth.release(pth.state["x"])
    np.testing.assert_array_equal(pth.state["x"], x.numpy())
    with pytest.raises(ValueError, match="not a view of"):
        pth.release(x.numpy())


class Prints:
    def __reduce__(self):
        return print, ("a pickle ran code",)


def rewrite(path, keep=lambda name: True, edit=lambda name, data: data, compression=zipfile.ZIP_STORED):
    """Copy the zip at `path` onto itself, member by member, dropping or editing some."""
    with zipfile.ZipFile(path) as source:
        members = [(info.filename, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w", compression=compression) as target:
        for name, data in members:
            if keep(name):
                target.writestr(name, edit(name, data))


def saved(tmp_path, state=None):
    path = tmp_path / "consolidated.00.pth"
    torch.save({"w": torch.arange(12, dtype=torch.float32).view(3, 4)} if state is None else state, path)
    return path


def damaged(path, why):
    return f"{path}: not a readable PyTorch checkpoint, truncated or damaged ({why}"


ERRORS = {
    "foreign global": (lambda p: saved(p.parent, {"w": torch.zeros(2), "x": Prints()}),
                       lambda p: f"{p}: refused to load: its pickle calls __builtin__.print, which a weights file "
                                 f"never needs; it may be malicious"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-100]), lambda p: damaged(p, "not a zip archive")),
    "not a zip": (lambda p: p.write_text("{}"), lambda p: damaged(p, "not a zip archive")),
    "legacy format": (lambda p: torch.save({"w": torch.zeros(2)}, p, _use_new_zipfile_serialization=False),
                      lambda p: f"{p}: a PyTorch checkpoint in the legacy format of torch < 1.6"),
    "no data.pkl": (lambda p: rewrite(p, keep=lambda name: not name.endswith("data.pkl")),
                    lambda p: damaged(p, "0 */data.pkl members in its zip archive, not one")),
    "missing storage": (lambda p: rewrite(p, keep=lambda name: not name.endswith("/data/0")),
                        lambda p: damaged(p, "no storage member consolidated.00/data/0")),
    "short storage": (lambda p: rewrite(p, edit=lambda name, data: data[:40] if name.endswith("/data/0") else data),
                      lambda p: damaged(p, "storage consolidated.00/data/0 holds 40 bytes, its tensors need 48")),
    "compressed": (lambda p: rewrite(p, compression=zipfile.ZIP_DEFLATED),
                   lambda p: f"{p}: storage consolidated.00/data/0 is compressed"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_bad_files_give_one_line_naming_the_file(tmp_path, capsys, case):
    spoil, message = ERRORS[case]
    path = saved(tmp_path)
    spoil(path)
    with pytest.raises(ValueError) as error:
        PthFile(path)
    assert str(error.value).startswith(message(path)) and "\n" not in str(error.value)
    assert "a pickle ran code" not in capsys.readouterr().out


def test_tensor_past_the_end_of_its_storage(tmp_path):
    """A tensor whose size and stride reach past its storage: torch.save never writes one, a forged file can."""
    path = saved(tmp_path, {"w": torch.arange(12, dtype=torch.float32).view(3, 4)[:, :2]})
    def stride_6(name, data):  # the pickled stride (4, 1) -> (6, 1)
        return data.replace(b"K\x04K\x01\x86", b"K\x06K\x01\x86") if name.endswith("data.pkl") else data

    rewrite(path, edit=stride_6)
    with pytest.raises(ValueError, match=r"stride \(6, 1\) at storage offset 0 needs 14 elements of a storage that "
                                         r"holds 12"):
        PthFile(path)


class TorchLoaded:
    """meta.load_shard as it was before torch_zip: torch.load(weights_only=True), tensors viewed as numpy."""

    def __init__(self, path):
        self.state = {name: as_numpy(t) for name, t in torch.load(path, weights_only=True).items()}

    def release(self, array):
        pass


def test_conversion_without_torch_matches_torch_load(tmp_path, monkeypatch):
    src = sources.write_meta(tmp_path / "meta", "3.0", sources.hf_model("3.0"), 4, dtype=torch.bfloat16)
    without_torch = ("import sys; sys.modules['torch'] = None; from llama_jax.convert.__main__ import main; "
                     "sys.exit(main(sys.argv[1:]))")
    run = subprocess.run([sys.executable, "-c", without_torch, "meta", str(src), str(tmp_path / "no-torch"), "--quiet"],
                         capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert run.returncode == 0, run.stderr
    monkeypatch.setattr(meta, "load_shard", TorchLoaded)
    meta.convert_meta(src, tmp_path / "torch")

    cfg_ours, ours = checkpoint.load(tmp_path / "no-torch", dtype="bfloat16")  # as stored, not CPU's float32
    cfg_torch, theirs = checkpoint.load(tmp_path / "torch", dtype="bfloat16")
    assert cfg_ours == cfg_torch and cfg_ours.param_dtype == "bfloat16"
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(bits(np.asarray(a)), bits(np.asarray(b)))
