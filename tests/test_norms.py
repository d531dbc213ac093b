"""diffv2/parallel/norms.py: the expert-parallel mesh registry is an explicit object, not module state."""

from types import SimpleNamespace

import torch

from diffv2.parallel.engine import Engine
from diffv2.parallel.norms import DisjointMeshes, local_piece, mesh_key


def _mesh(ranks, names=("dp_mod_ep",)):
    """What DisjointMeshes reads of a DeviceMesh (device type, rank layout, dimension names)."""
    return SimpleNamespace(device_type="cpu", mesh=torch.tensor(ranks), mesh_dim_names=names)


def test_two_disjoint_mesh_registries_do_not_share_state():
    a, b = DisjointMeshes(), DisjointMeshes()
    mesh = _mesh([0, 2])
    a.mark(mesh, 2)
    assert a.groups(mesh) == 2
    assert b.groups(mesh) == 1  # unmarked in b: the mark stayed on a
    assert a.groups(_mesh([1, 3])) == 1  # another mesh, same names
    assert a.groups(_mesh([0, 2], ("dp",))) == 1
    assert mesh_key(mesh) == mesh_key(_mesh([0, 2]))  # equal layouts, equal keys (meshes are rebuilt per engine)
    b.mark(mesh, 4)
    assert (a.groups(mesh), b.groups(mesh)) == (2, 4)


def test_each_engine_owns_its_registry():
    models = (torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    engines = [Engine(m, torch.optim.SGD(m.parameters(), lr=0.1)) for m in models]
    engines[0].disjoint.mark(_mesh([0, 1]), 2)
    assert engines[1].disjoint.groups(_mesh([0, 1])) == 1
    shared = DisjointMeshes()
    m = torch.nn.Linear(2, 2)
    assert Engine(m, torch.optim.SGD(m.parameters(), lr=0.1), disjoint=shared).disjoint is shared


def test_plain_tensor_piece_without_a_process_group():
    t = torch.randn(3)
    piece, weight = local_piece(t, DisjointMeshes())
    assert torch.equal(piece, t) and weight == 1.0
