"""Mesh strings: parsing, errors, and the device grid (tp innermost)."""

import jax
import numpy as np
import pytest

from llama_jax.sharding import initialize_distributed, make_mesh, mesh_str, parse_mesh


@pytest.mark.parametrize("spec, n, expected", [
    ("dp4,tp8", 32, {"dp": 4, "fsdp": 1, "cp": 1, "tp": 8}),
    ("dp2,fsdp4,tp2", 16, {"dp": 2, "fsdp": 4, "cp": 1, "tp": 2}),
    ("fsdp8", 8, {"dp": 1, "fsdp": 8, "cp": 1, "tp": 1}),
    ("tp2,dp-1", 8, {"dp": 4, "fsdp": 1, "cp": 1, "tp": 2}),
    ("fsdp-1", 1, {"dp": 1, "fsdp": 1, "cp": 1, "tp": 1}),
    (" dp2 , tp4 ", 8, {"dp": 2, "fsdp": 1, "cp": 1, "tp": 4}),
    ("dp2,cp4", 8, {"dp": 2, "fsdp": 1, "cp": 4, "tp": 1}),
    ("fsdp2,cp2,tp2", 8, {"dp": 1, "fsdp": 2, "cp": 2, "tp": 2}),
    ("cp-1,tp2", 8, {"dp": 1, "fsdp": 1, "cp": 4, "tp": 2}),
])
def test_parse_mesh(spec, n, expected):
    assert parse_mesh(spec, n) == expected


@pytest.mark.parametrize("spec, n, message", [
    ("dp4,tp8", 8, "multiply to 32, but there are 8 devices"),
    ("tp8", 1, "multiply to 8, but there is 1 device"),
    ("dp3,fsdp-1", 8, "does not divide the 8 devices"),
    ("dp-1,tp-1", 8, "only one axis may be -1"),
    ("pp2,dp4", 8, "unknown axis 'pp'"),
    ("dp2,dp4", 8, "axis 'dp' is given twice"),
    ("dp0,tp8", 8, "has size 0"),
    ("dp-2,tp4", 8, "has size -2"),
    ("tp", 8, "cannot read 'tp'"),
    ("dp2;tp4", 8, "cannot read"),
    ("", 8, "empty"),
])
def test_parse_mesh_errors(spec, n, message):
    with pytest.raises(ValueError, match=message):
        parse_mesh(spec, n)


def test_make_mesh_puts_tp_innermost_and_cp_next():
    mesh = make_mesh("dp2,fsdp2,tp2")
    assert mesh.axis_names == ("dp", "fsdp", "cp", "tp")
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    # Neighbouring device ids (the closest links on real hardware) differ along tp.
    assert sorted(ids[0, 0, 0, :].tolist()) == [0, 1]
    assert mesh_str(mesh) == "dp2,fsdp2,tp2"
    cp_mesh = make_mesh("fsdp2,cp2,tp2")
    assert np.vectorize(lambda d: d.id)(cp_mesh.devices)[0, 0].tolist() == [[0, 1], [2, 3]]
    assert mesh_str(cp_mesh) == "fsdp2,cp2,tp2"
    assert mesh_str(make_mesh("fsdp-1")) == "fsdp8"
    assert make_mesh("dp1", devices=jax.devices()[:1]).size == 1


def test_distributed_flags_need_a_coordinator():
    with pytest.raises(ValueError, match="need --coordinator"):
        initialize_distributed(num_processes=2, process_id=0)
    with pytest.raises(ValueError, match="needs --num-processes"):
        initialize_distributed(coordinator="localhost:1234")
    initialize_distributed()  # single process: nothing to do
